"""Listing S3 (and S3-compatible stores): ListObjectsV2 pages over key ranges listed
concurrently (`fanout` at a time), each range starting with `StartAfter`. The first
ranges come from a sample of the keys the output already knows (so each holds about as
many keys), and a range that turns out long is cut again where its keys vary, so a first
night lists in parallel too."""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import obstore
import obstore.exceptions
import pyarrow as pa
import pyarrow.compute as pc
from obstore.store import S3Store

from gender_pipeline.lake.columns import LISTING_SCHEMA, TIMESTAMP
from gender_pipeline.lake.storage import StorageError, Store, _kind, with_retries

log = logging.getLogger(__name__)

PAGE = 1000  # S3's most keys per ListObjectsV2 call
DEFAULT_S3_FANOUT = 16


_CLASSES = ("0123456789", "abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _alphabet(chars: set[str]) -> str:
    """The characters a key position may hold, from those seen there: a digit stands for
    every digit, a letter for its case's letters."""
    wider = set(chars)
    for char in chars:
        wider.update(*(group for group in _CLASSES if char in group))
    return "".join(sorted(wider))


def split_points(keys: list[str], upto: str | None, limit: int = 32) -> list[str]:
    """Increasing cut points for the key range (keys[-1], upto] after a page of `keys`:
    the next sibling prefixes of the last key, from the position where the page's keys
    vary outward, with the characters seen at each position (so the first ranges hold
    about a page each, each level about ten or 26 times as many), at most `limit`."""
    first, after = keys[0], keys[-1]
    vary = next((i for i, (a, b) in enumerate(zip(first, after)) if a != b), min(len(first), len(after)))
    points: list[str] = []
    for position in range(min(vary, len(after) - 1), -1, -1):
        seen = {k[position] for k in keys if len(k) > position}
        for char in _alphabet(seen):
            if char <= after[position]:
                continue
            point = after[:position] + char
            if upto is not None and point >= upto:
                break
            points.append(point)
    if len(points) > limit:  # thin out evenly
        step = len(points) / limit
        points = [points[int(i * step)] for i in range(limit)]
    return points


# Words of obstore's (object_store's) error text that mean the request, not the key, failed:
# a refused, reset or dropped connection ("error sending request" with hyper's
# IncompleteMessage when the peer closes before answering), a timeout, a 5xx answer.
OBSTORE_TRANSIENT = ("connection", "Connection", "error sending request", "IncompleteMessage", "timed out",
                     "reset", "500", "502", "503", "504")


@dataclass
class Page:
    """One ListObjectsV2 page: keys relative to the source (sorted), sizes, times."""

    keys: pa.Array
    sizes: pa.Array
    modified: pa.Array
    truncated: bool


class S3Lister:
    """ListObjectsV2 over key ranges, `fanout` calls at a time (threads), through obstore
    (Rust: a page costs about a tenth of the CPU botocore's parser takes) or s3fs."""

    def __init__(self, store: Store, fanout: int = DEFAULT_S3_FANOUT, boundaries: list[str] | None = None,
                 client: str = "obstore") -> None:
        self.store, self.fanout = store, max(1, fanout)
        bucket, _, prefix = store.root.partition("/")
        self.bucket, self.prefix = bucket, (prefix.rstrip("/") + "/") if prefix else ""
        points = sorted(set(b for b in (boundaries or []) if b))
        self.ranges = list(zip([""] + points, points + [None]))
        self.fetch = self._obstore_fetcher() if client == "obstore" else self._s3fs_fetch
        self.pages = 0

    def _obstore_fetcher(self):
        options = {"region": self.store.region}
        endpoint = self.store.endpoint_url
        client_options = {}
        if endpoint:
            options["endpoint"] = endpoint
            client_options["allow_http"] = endpoint.startswith("http://")
        credentials = _botocore_credentials()
        if credentials is None:
            raise StorageError(f"listing {self.store.url}: no usable credentials; set AWS_ACCESS_KEY_ID/"
                               f"AWS_SECRET_ACCESS_KEY or AWS_PROFILE", transient=False)
        options.update(credentials)
        # Few quick retries inside obstore; ours (lake.storage.with_retries) come on top, so
        # an endpoint that refuses connections fails in seconds, not after object_store's
        # default ten retries.
        retry = {"max_retries": 2, "retry_timeout": timedelta(seconds=20),
                 "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=2)}}
        s3 = S3Store(self.bucket, client_options=client_options, retry_config=retry, **options)

        def fetch(after: str) -> Page:
            try:
                stream = obstore.list(s3, prefix=self.prefix.rstrip("/") or None,
                                      offset=self.prefix + after if after else None, chunk_size=PAGE,
                                      return_arrow=True)
                chunk = pa.record_batch(next(iter(stream)))
            except (obstore.exceptions.InvalidPathError, ValueError):
                # object_store refuses keys with '.', '..' or empty segments or control
                # characters (in a page, or as the key to start after); such a page is
                # listed by botocore, and its keys are answered bad_key.
                return self._s3fs_fetch(after)
            except StopIteration:
                return Page(pa.array([], pa.string()), pa.array([], pa.int64()), pa.array([], TIMESTAMP), False)
            keys = pc.utf8_slice_codeunits(chunk.column("path").cast(pa.string()), len(self.prefix))
            return Page(keys, chunk.column("size").cast(pa.int64()), chunk.column("last_modified").cast(TIMESTAMP),
                        chunk.num_rows >= PAGE)

        return fetch

    def _s3fs_fetch(self, after: str) -> Page:
        from fsspec.asyn import sync  # lazy: only the s3fs client needs fsspec's event loop

        kwargs = dict(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=PAGE)
        if after:
            kwargs["StartAfter"] = self.prefix + after
        page = sync(self.store.fs.loop, self.store.fs._call_s3, "list_objects_v2", **kwargs)
        contents = page.get("Contents", [])
        return Page(pa.array([c["Key"][len(self.prefix):] for c in contents], pa.string()),
                    pa.array([int(c.get("Size") or 0) for c in contents], pa.int64()),
                    pa.array([utc(c.get("LastModified")) for c in contents], TIMESTAMP), bool(page.get("IsTruncated")))

    def _page(self, after: str) -> Page:
        def fetch() -> Page:
            try:
                return self.fetch(after)
            except Exception as error:  # obstore's errors carry no errno: name the transient ones
                if _kind(error) == "other" and any(word in str(error) for word in OBSTORE_TRANSIENT):
                    raise ConnectionError(str(error)) from error
                if "NoSuchBucket" in str(error) or "not found" in str(error).lower() and "bucket" in str(error).lower():
                    raise FileNotFoundError(str(error)) from error
                raise

        try:
            return with_retries(fetch, f"listing {self.store.url}")
        except FileNotFoundError as error:
            raise StorageError(f"source {self.store.url} does not exist ({error})", transient=False) from error

    def batches(self) -> Iterator[pa.RecordBatch]:
        work = deque(self.ranges)
        ready = threading.Condition()
        state: dict = {"busy": 0, "error": None}
        out: queue.Queue = queue.Queue(maxsize=4 * self.fanout)
        stop = threading.Event()

        def take():
            with ready:
                while not stop.is_set():
                    if work:
                        state["busy"] += 1
                        return work.popleft()
                    if state["busy"] == 0:
                        return None
                    ready.wait(0.1)
            return None

        def give(ranges: list) -> None:
            with ready:
                work.extend(ranges)
                ready.notify_all()

        def idle() -> int:
            with ready:
                return self.fanout - state["busy"] - len(work)

        def put(item) -> None:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.25)
                    return
                except queue.Full:
                    continue

        def worker() -> None:
            while (item := take()) is not None:
                try:
                    self._list_range(*item, give, idle, put, stop)
                except BaseException as error:  # noqa: BLE001 - raised by the consumer
                    state["error"] = state["error"] or error
                    stop.set()
                finally:
                    with ready:
                        state["busy"] -= 1
                        ready.notify_all()

        threads = [threading.Thread(target=worker, name=f"s3-lister-{i}", daemon=True) for i in range(self.fanout)]
        for thread in threads:
            thread.start()
        try:
            while True:
                try:
                    yield out.get(timeout=0.2)
                except queue.Empty:
                    if not any(t.is_alive() for t in threads):
                        while not out.empty():
                            yield out.get_nowait()
                        break
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=30)
        if state["error"] is not None:
            raise state["error"]

    def _list_range(self, after: str, upto: str | None, give, idle, put, stop: threading.Event) -> None:
        """List the keys in (after, upto]; hand the rest of a long range to idle workers."""
        while not stop.is_set():
            page = self._page(after)
            self.pages += 1
            count = len(page.keys)
            end = count
            if upto is not None and count and page.keys[count - 1].as_py() > upto:
                end = count - int(pc.sum(pc.cast(pc.greater(page.keys, upto), pa.int64())).as_py())
            if end:
                put(pa.record_batch([page.keys[:end], page.sizes[:end], page.modified[:end]], schema=LISTING_SCHEMA))
            if end < count or not page.truncated or not count:
                return
            after = page.keys[count - 1].as_py()
            free = idle()
            if free > 0:
                points = split_points(page.keys.to_pylist(), upto, limit=max(2, 2 * free))
                if points:
                    bounds = points + [upto]
                    give(list(zip(bounds[:-1], bounds[1:])))
                    upto = points[0]


def _botocore_credentials() -> dict | None:
    """Credentials as botocore resolves them (environment, profile, instance role)."""
    import botocore.session  # lazy: 0.1 s, for S3 sources only

    found = botocore.session.get_session().get_credentials()
    if found is None:
        return None
    frozen = found.get_frozen_credentials()
    credentials = {"access_key_id": frozen.access_key, "secret_access_key": frozen.secret_key}
    if frozen.token:
        credentials["session_token"] = frozen.token
    return credentials


def utc(value: datetime | None) -> datetime | None:
    return value if value is None or value.tzinfo else value.replace(tzinfo=timezone.utc)
