"""Stopping a run cleanly.

SIGTERM, SIGINT or a cancel from Prefect asks the run to stop. Work in progress checks the
request at safe points (between photos, batches, chunks and before a file is moved into
place), so a stopped run publishes nothing half-done, ends its worker processes, and lets
go of the output only after its work has stopped.

Where the main thread only reads (listing, data checks, waiting for a lock), a signal
interrupts it at once: those stretches run inside `STOP.interruptible()`. A second signal,
or a run that has not stopped `grace` seconds after the first, ends the process at once
without releasing anything it holds: its lock then belongs to a provably dead process.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, TimeoutError as FutureTimeout
from contextlib import contextmanager

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequested(Exception):
    """The run was asked to stop; nothing after this point is published."""


class Stop:
    """A process-wide stop request: set once by a signal or a cancel, read everywhere."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason: str | None = None
        self.signum: int | None = None
        self._interruptible = 0

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def request(self, reason: str, signum: int | None = None) -> bool:
        """Ask the run to stop; True the first time."""
        if self._event.is_set():
            return False
        self.reason, self.signum = reason, signum
        self._event.set()
        return True

    def wait(self, timeout: float) -> bool:
        return self._event.wait(timeout)

    def check(self) -> None:
        """Raise StopRequested when a stop was asked for."""
        if self._event.is_set():
            raise StopRequested(self.reason or "stop requested")

    def reset(self) -> None:
        self._event.clear()
        self.reason = self.signum = None
        self._interruptible = 0

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """A stretch of the main thread that a signal may interrupt at once (it only reads)."""
        main = threading.current_thread() is threading.main_thread()
        self.check()
        if main:
            self._interruptible += 1
        try:
            yield
        finally:
            if main:
                self._interruptible -= 1

    def in_interruptible(self) -> bool:
        return self._interruptible > 0

    def __reduce__(self):
        # A stop request belongs to a process: sent to another process (a flow run that
        # Prefect pickles into a subprocess, a Dask worker), it is that process's own.
        return (process_stop, ())


STOP = Stop()


def process_stop() -> Stop:
    return STOP


def result_unless_stopped(future: Future, checkpoint: Callable[[], None] = STOP.check, poll: float = 0.25):
    """A future's result, calling `checkpoint` between short waits so that a run asked to
    stop does not sit waiting for a worker."""
    while True:
        checkpoint()
        try:
            return future.result(timeout=poll)
        except FutureTimeout:
            continue


def _exit_now(code: int, why: str) -> None:
    log.error("%s: exiting now without releasing the output lock (a later run takes it over)", why)
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:  # pragma: no cover - best effort on the way out
            pass
    sys.stderr.flush()
    os._exit(code)


@contextmanager
def stop_on_signals(stop: Stop = STOP, grace: float = 20.0) -> Iterator[Stop]:
    """While inside, SIGTERM and SIGINT ask `stop` to stop instead of killing the process.

    A second signal ends the process at once; so does a run still alive `grace` seconds
    after the first. Outside the main thread (a Dask worker, a test thread) no handler
    can be installed and `stop` is only reset."""
    stop.reset()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    timers: list[threading.Timer] = []

    def handle(signum, _frame) -> None:
        name = signal.Signals(signum).name
        if timers:  # a signal came before: this one means "now"
            _exit_now(128 + signum, f"second signal ({name})")
        stop.request(f"received {name}", signum)  # a cancel may have asked already
        log.warning("received %s: stopping (send it again to exit at once)", name)
        timer = threading.Timer(grace, _exit_now, args=(128 + signum, f"still running {grace:.0f} s after {name}"))
        timer.daemon = True
        timer.start()
        timers.append(timer)
        if stop.in_interruptible():
            raise StopRequested(stop.reason)

    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s in STOP_SIGNALS:
        signal.signal(s, handle)
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for timer in timers:
            timer.cancel()
