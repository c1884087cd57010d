import threading
import time

import pytest

from gender_pipeline.cli import EXIT_LOCKED, main
from tasks.locking import OutputLocked, acquire, read_holder
from tasks.storage import Store


def test_one_holder_at_a_time(tmp_path):
    store = Store(str(tmp_path))
    first = acquire(store, "run-1")
    with pytest.raises(OutputLocked, match="run-1"):
        acquire(store, "run-2")
    first.release()
    second = acquire(store, "run-2")
    assert read_holder(store, second.key)["owner"] == "run-2"
    second.release()
    assert read_holder(store, second.key) is None


def test_heartbeat_keeps_a_live_run_locked_and_a_dead_runs_lease_expires(tmp_path):
    store = Store(str(tmp_path))
    live = acquire(store, "live", lease_seconds=0.6)
    time.sleep(1.5)  # well past one lease: renewed by the heartbeat
    with pytest.raises(OutputLocked):
        acquire(store, "other", lease_seconds=0.6)
    live._stop.set()  # the run dies: no more renewals
    live._thread.join()
    time.sleep(0.8)
    taker = acquire(store, "other", lease_seconds=0.6)
    assert read_holder(store, taker.key)["owner"] == "other"
    taker.release()


def test_waiting_for_the_holder_to_finish(tmp_path):
    store = Store(str(tmp_path))
    holder = acquire(store, "first")
    threading.Timer(0.5, holder.release).start()
    waiter = acquire(store, "second", wait_seconds=10)
    assert read_holder(store, waiter.key)["owner"] == "second"
    waiter.release()


def test_only_one_of_many_racing_runs_wins(tmp_path):
    store = Store(str(tmp_path))
    winners, losers = [], []

    def race(name):
        try:
            winners.append(acquire(store, name))
        except OutputLocked:
            losers.append(name)

    threads = [threading.Thread(target=race, args=(f"run-{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1 and len(losers) == 7
    winners[0].release()


@pytest.mark.usefixtures("prefect_harness")
def test_a_second_run_on_a_locked_output_exits_5(uploads, tmp_path, capsys):
    source, _ = uploads
    lease = acquire(Store(str(tmp_path / "lake")), "a-running-run")
    try:
        status = main(["score", "--source", str(source), "--output", str(tmp_path / "lake"),
                       "--registry", str(tmp_path / "reg"), "--workers", "0"])
    finally:
        lease.release()
    assert status == EXIT_LOCKED
    assert "a-running-run" in capsys.readouterr().err
    assert not (tmp_path / "lake" / "predictions").exists()


def test_lock_on_s3_uses_conditional_create(s3_endpoint):
    import s3fs

    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}).mkdir("locks")
    store = Store("s3://locks/lake", {"client_kwargs": {"endpoint_url": s3_endpoint}})
    first = acquire(store, "run-1")
    with pytest.raises(OutputLocked, match="run-1"):
        acquire(store, "run-2")
    first.release()
    acquire(store, "run-2").release()
