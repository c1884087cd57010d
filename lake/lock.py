"""One scoring run at a time per output: a lease lock stored beside the dataset.

The lock is `{output}/_locks/{name}.json`, created with an exclusive create (`O_EXCL` on
local disks, `If-None-Match: *` on S3) and renewed by a heartbeat while the run lives. A
run that dies stops renewing it; after the lease expires the next run takes it over, at
once when the holder is provably dead (same host, its process gone). Readers ignore the
`_locks` folder like every name that starts with `_`.

The record also carries a stop request: when the holding run is asked to stop, the
heartbeat writes the reason into it, so shards running in other processes (Dask) stop
too, and every publish checks, just before it moves its file into place, that the lease
is still held and not stopping.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from gender_pipeline.lake.storage import StorageError, Store, with_retries
from gender_pipeline.runtime.errors import EXIT_LOCKED, ExpectedFailure
from gender_pipeline.runtime.stopping import STOP, Stop, StopRequested

log = logging.getLogger(__name__)

LEASE_SECONDS = 300.0  # how long a dead run's lock outlives it (a live run renews it every third)


class OutputLocked(ExpectedFailure, RuntimeError):
    """Another live run holds the output (exit 5)."""

    exit_status = EXIT_LOCKED


class LeaseLost(StopRequested):
    """This run no longer holds the output's lock: it must not publish."""


def _read_first_line(path: str) -> str | None:
    try:
        with open(path) as handle:
            return handle.readline().strip() or None
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    """Start time of a process in clock ticks since boot (Linux), to tell a reused pid."""
    stat = _read_first_line(f"/proc/{pid}/stat")
    if stat is None:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def this_process() -> dict:
    """Who holds a lock: enough to prove later, from the same host, that it is dead."""
    return {"host": socket.gethostname(), "boot_id": _read_first_line("/proc/sys/kernel/random/boot_id"),
            "pid": os.getpid(), "pid_started": _process_start(os.getpid())}


def holder_is_dead(holder: dict) -> bool:
    """True only when the holder ran on this host (same boot) and its process is gone."""
    me = this_process()
    if not holder.get("pid") or holder.get("host") != me["host"] or holder.get("boot_id") != me["boot_id"] \
            or me["boot_id"] is None:
        return False
    pid = int(holder["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    started = _process_start(pid)
    return started is not None and holder.get("pid_started") not in (None, started)


@dataclass
class Lease:
    store: Store
    key: str
    owner: str
    seconds: float
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    stop: Stop | None = None  # when it is requested, the record says so (for other processes)
    _stopped_reason: str | None = None
    _done: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _record(self) -> bytes:
        expires = datetime.now(timezone.utc) + timedelta(seconds=self.seconds)
        record = {"owner": self.owner, "token": self.token, "expires_at": expires.isoformat(), **this_process()}
        if self._stopped_reason:
            record["stop"] = self._stopped_reason
        return json.dumps(record).encode()

    def ref(self) -> "LeaseRef":
        return LeaseRef(self.store.url, self.key, self.token)

    def _beat(self) -> None:
        """Renew every third of the lease; write a stop request into the record at once."""
        next_beat = time.monotonic() + self.seconds / 3
        while not self._done.wait(0.25):
            stopping = self.stop is not None and self.stop.requested and self._stopped_reason is None
            if not stopping and time.monotonic() < next_beat:
                continue
            if stopping:
                self._stopped_reason = self.stop.reason or "stop requested"
            if (read_holder(self.store, self.key) or {}).get("token") != self.token:
                log.error("lost the output lock %s", self.key)
                if self.stop is not None:
                    self.stop.request(f"lost the output lock {self.key}")
                return
            try:
                with_retries(lambda: self.store.fs.pipe_file(self.store.path(self.key), self._record()),
                             f"renewing {self.key}")
            except StorageError as error:  # try again at the next beat; a publish checks the lease
                log.error("%s", error)
            next_beat = time.monotonic() + self.seconds / 3

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *_) -> None:
        self.release()

    def release(self) -> None:
        """Let go of the output. Call only when nothing of this run can write any more."""
        self._done.set()
        if self._thread:
            self._thread.join()
        if (read_holder(self.store, self.key) or {}).get("token") == self.token:
            _remove(self.store, self.key)


@dataclass(frozen=True)
class LeaseRef:
    """What a shard (in this or another process) needs to check the run's lease."""

    url: str
    key: str
    token: str

    def check(self, store: Store) -> None:
        """Raise LeaseLost when the lease is not ours any more, StopRequested when the
        holding run was asked to stop."""
        holder = read_holder(store, self.key) or {}
        if holder.get("token") != self.token:
            raise LeaseLost(f"the output lock {self.key} is no longer held by this run")
        if holder.get("stop"):
            raise StopRequested(holder["stop"])


@dataclass
class LeaseGuard:
    """The one "does this run still hold the output" check: called before a file is moved
    into place, before each table commit, and between a shard's photos. It raises
    StopRequested when this process was asked to stop, LeaseLost when the run's lease is
    not ours any more, StopRequested when the holding run was asked to stop (the way a
    shard on another machine learns it). The lease is read at most every `every` seconds
    (0: at every call)."""

    lease: LeaseRef | None
    store: Store
    every: float = 0.0
    stop: Stop = STOP
    _last: float = field(default_factory=time.monotonic)

    def __call__(self) -> None:
        self.stop.check()
        if self.lease is not None and time.monotonic() - self._last >= self.every:
            self._last = time.monotonic()
            self.lease.check(self.store)


def read_holder(store: Store, key: str) -> dict | None:
    try:
        return json.loads(with_retries(lambda: store.fs.cat_file(store.path(key)), f"reading {key}"))
    except FileNotFoundError:
        return None
    except ValueError:  # being written this instant
        return {"owner": "?", "token": "?", "expires_at": datetime.now(timezone.utc).isoformat()}


def _remove(store: Store, key: str) -> None:
    """Delete the lock file; gone already (a retried delete that had worked) is fine."""
    try:
        with_retries(lambda: store.fs.rm_file(store.path(key)), f"removing {key}")
    except FileNotFoundError:
        pass


def _create(store: Store, path: str, data: bytes) -> None:
    with store.fs.open(path, "xb") as handle:
        handle.write(data)


def _describe(holder: dict) -> str:
    where = f" on {holder['host']} (pid {holder.get('pid')})" if holder.get("host") else ""
    return f"run {holder.get('owner')}{where}"


def acquire(store: Store, owner: str, lease_seconds: float = LEASE_SECONDS, wait_seconds: float = 0,
            name: str = "nightly-scoring", stop: Stop | None = STOP) -> Lease:
    """Hold the output's lock, waiting up to `wait_seconds` for a live holder to finish.
    The lease is a context manager: `with acquire(...) as lease:` lets go at the end."""
    lease = Lease(store, f"_locks/{name}.json", owner, lease_seconds, stop=stop)
    path = store.path(lease.key)
    with_retries(lambda: store.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True), f"locking {store.url}")
    deadline = time.monotonic() + wait_seconds
    while True:
        if stop is not None:
            stop.check()
        try:
            with_retries(lambda: _create(store, path, lease._record()), f"locking {store.url}")
            lease._thread = threading.Thread(target=lease._beat, name="lock-heartbeat", daemon=True)
            lease._thread.start()
            return lease
        except FileExistsError:
            pass
        holder = read_holder(store, lease.key)
        if holder is None:
            continue
        expired = datetime.fromisoformat(holder["expires_at"]) < datetime.now(timezone.utc)
        dead = not expired and holder_is_dead(holder)
        if expired or dead:
            log.warning("taking over the lock of %s: %s", _describe(holder),
                        "its process is gone from this host" if dead else "its lease expired")
            if read_holder(store, lease.key) == holder:
                _remove(store, lease.key)
            continue
        if time.monotonic() >= deadline:
            elsewhere = holder.get("host") and holder.get("host") != this_process()["host"]
            rule = (" It runs on another host, so its lock is taken over only when the lease expires."
                    if elsewhere else "")
            raise OutputLocked(f"{store.url} is being written by {_describe(holder)} "
                               f"(lease until {holder['expires_at']}); try again when it has finished.{rule}")
        time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))
