"""One scoring run at a time per output: a lease lock stored beside the dataset.

The lock is `{output}/_locks/{name}.json`, created with an exclusive create (`O_EXCL` on
local disks, `If-None-Match: *` on S3) and renewed by a heartbeat while the run lives. A
run that dies stops renewing it; after the lease expires the next run takes it over.
Readers ignore the `_locks` folder like every name that starts with `_`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from tasks.storage import Store, with_retries

log = logging.getLogger(__name__)


class OutputLocked(RuntimeError):
    """Another live run holds the output."""


@dataclass
class Lease:
    store: Store
    key: str
    owner: str
    seconds: float
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _record(self) -> bytes:
        expires = datetime.now(timezone.utc) + timedelta(seconds=self.seconds)
        return json.dumps({"owner": self.owner, "token": self.token,
                           "expires_at": expires.isoformat()}).encode()

    def _beat(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            if (read_holder(self.store, self.key) or {}).get("token") != self.token:
                log.error("lost the output lock %s", self.key)
                return
            self.store.fs.pipe_file(self.store.path(self.key), self._record())

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        if (read_holder(self.store, self.key) or {}).get("token") == self.token:
            self.store.fs.rm_file(self.store.path(self.key))


def read_holder(store: Store, key: str) -> dict | None:
    try:
        return json.loads(with_retries(lambda: store.fs.cat_file(store.path(key)), f"reading {key}"))
    except FileNotFoundError:
        return None
    except ValueError:  # being written this instant
        return {"owner": "?", "token": "?", "expires_at": datetime.now(timezone.utc).isoformat()}


def _create(store: Store, path: str, data: bytes) -> None:
    with store.fs.open(path, "xb") as handle:
        handle.write(data)


def acquire(store: Store, owner: str, lease_seconds: float = 300, wait_seconds: float = 0,
            name: str = "nightly-scoring") -> Lease:
    """Hold the output's lock, waiting up to `wait_seconds` for a live holder to finish."""
    lease = Lease(store, f"_locks/{name}.json", owner, lease_seconds)
    path = store.path(lease.key)
    with_retries(lambda: store.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True), f"locking {store.url}")
    deadline = time.monotonic() + wait_seconds
    while True:
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
        if datetime.fromisoformat(holder["expires_at"]) < datetime.now(timezone.utc):
            log.warning("taking over the lock of run %s, whose lease expired", holder.get("owner"))
            if read_holder(store, lease.key) == holder:
                store.fs.rm_file(path)
            continue
        if time.monotonic() >= deadline:
            raise OutputLocked(f"{store.url} is being written by run {holder.get('owner')} "
                               f"(lease until {holder['expires_at']}); try again when it has finished")
        time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))
