"""The stop request itself, in one process: signals, interruptible stretches, a cancel
that came first."""

import os
import signal
import threading
import time

import pytest

from gender_pipeline.runtime.stopping import Stop, StopRequested, result_unless_stopped, stop_on_signals


def test_a_signal_asks_to_stop_and_interrupts_only_interruptible_stretches():
    stop = Stop()
    with stop_on_signals(stop):
        os.kill(os.getpid(), signal.SIGTERM)  # outside an interruptible stretch: only noted
        time.sleep(0.05)
        assert stop.requested and stop.reason == "received SIGTERM" and stop.signum == signal.SIGTERM
        with pytest.raises(StopRequested, match="SIGTERM"):
            stop.check()
    assert signal.getsignal(signal.SIGTERM) is not None  # the previous handler is back


def test_a_signal_interrupts_a_reading_stretch_at_once():
    stop = Stop()
    started = time.monotonic()
    with stop_on_signals(stop):
        threading.Timer(0.2, os.kill, args=(os.getpid(), signal.SIGINT)).start()
        with pytest.raises(StopRequested, match="SIGINT"):
            with stop.interruptible():
                time.sleep(30)  # a listing that would take long
    assert time.monotonic() - started < 5


def test_a_signal_after_a_cancel_is_not_a_second_signal():
    """A runner cancelling a run sends SIGTERM; the run may have seen the cancel first."""
    stop = Stop()
    with stop_on_signals(stop):
        stop.request("cancelled from Prefect (UI or API)")
        os.kill(os.getpid(), signal.SIGTERM)  # must not exit the process
        time.sleep(0.05)
        assert stop.reason == "cancelled from Prefect (UI or API)"


def test_waiting_for_a_worker_stops_when_asked():
    from concurrent.futures import Future

    stop = Stop()
    threading.Timer(0.2, stop.request, args=("received SIGTERM",)).start()
    with pytest.raises(StopRequested):
        result_unless_stopped(Future(), stop.check)  # a result that never comes


def test_stop_travels_to_other_processes_as_their_own():
    import pickle

    from gender_pipeline.runtime.stopping import STOP

    assert pickle.loads(pickle.dumps(STOP)) is STOP


POLL = 0.1


def test_a_signal_delivered_to_another_thread_is_handled_while_tasks_run():
    """The kernel may hand a process's SIGTERM to any thread; the main thread, waiting for
    the shards, must still notice it within a moment, not when the shards end."""
    import uuid
    from concurrent.futures import ThreadPoolExecutor

    from prefect.futures import PrefectConcurrentFuture

    from gender_pipeline.tasks.run_control import finish_all

    stop = Stop()
    release = threading.Event()
    with stop_on_signals(stop), ThreadPoolExecutor(2) as pool:
        shard = PrefectConcurrentFuture(uuid.uuid4(), pool.submit(release.wait, 5))

        def signal_from_another_thread():
            time.sleep(0.3)
            signal.pthread_kill(threading.get_ident(), signal.SIGTERM)  # this thread, not the main one
            stop.wait(3)
            release.set()

        helper = pool.submit(signal_from_another_thread)
        started = time.monotonic()
        finish_all([shard], poll=POLL)  # the shard ends once the stop was noticed (or after 3 s)
        noticed = time.monotonic() - started
        helper.result()
    assert stop.requested and stop.reason == "received SIGTERM"
    assert noticed < 2.0, f"the stop was noticed after {noticed:.1f} s"
