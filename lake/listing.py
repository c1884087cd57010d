"""The night's listing of the source, streamed in Arrow batches into a local spool.

A listing is (key, size, modified) for every object under the source. It is never a
Python object per key: pages become Arrow record batches as they arrive and go straight
into a Parquet file in a temporary folder, which DuckDB joins with the output's state.

Where it comes from:
- a local folder: `os.scandir`, one directory at a time;
- S3 (and S3-compatible stores): ListObjectsV2 pages over key ranges listed concurrently
  (`fanout` at a time), each range starting with `StartAfter`. The first ranges come from
  a sample of the keys the output already knows (so each holds about as many keys), and a
  range that turns out long is cut again where its keys vary, so a first night lists in
  parallel too;
- an S3 Inventory report (`inventory:URL`, see lake.inventory): no LIST call at all;
- any other fsspec store: its `find`, one page of 50,000 keys at a time.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import shutil
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from gender_pipeline.runtime.processes import cpu_count, kill_pool, quiet_worker
from gender_pipeline.lake.storage import StorageError, Store, _kind, modified_time, with_retries

log = logging.getLogger(__name__)

TIMESTAMP = pa.timestamp("us", tz="UTC")
LISTING_SCHEMA = pa.schema([pa.field("key", pa.string(), nullable=False), pa.field("size", pa.int64()),
                            pa.field("modified", TIMESTAMP)])
BATCH = 50_000
PAGE = 1000  # S3's most keys per ListObjectsV2 call
DEFAULT_S3_FANOUT = 16


@dataclass(frozen=True)
class ListingSpec:
    """How a run lists its source: `list` (the store itself) or `inventory:URL`."""

    kind: str = "list"
    url: str | None = None
    fanout: int | None = None  # concurrent LIST calls (None: 16 on S3, 1 elsewhere)
    client: str = "obstore"  # S3 pages through obstore, or s3fs (botocore)

    @classmethod
    def parse(cls, text: str | None, fanout: int | None = None) -> "ListingSpec":
        if fanout is not None and fanout < 1:
            raise ValueError(f"the listing fan-out is at least 1, got {fanout}")
        if not text or text == "list":
            return cls("list", None, fanout)
        kind, _, url = text.partition(":")
        if kind != "inventory" or not url:
            raise ValueError(f"--listing is 'list' or 'inventory:URL' (an S3 Inventory manifest.json or its "
                             f"folder), got {text!r}")
        return cls("inventory", url, fanout)


def batch(keys: list[str], sizes: list[int], modified: list) -> pa.RecordBatch:
    return pa.record_batch([pa.array(keys, pa.string()), pa.array(sizes, pa.int64()),
                            pa.array(modified, TIMESTAMP)], schema=LISTING_SCHEMA)


class Spool:
    """The listing in a local Parquet file: written batch by batch, read by DuckDB."""

    def __init__(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="gp-listing-")
        self.path = os.path.join(self.folder, "listing.parquet")
        self._writer = pq.ParquetWriter(self.path, LISTING_SCHEMA, compression="zstd")
        self.rows = 0

    def add(self, record_batch: pa.RecordBatch) -> None:
        if record_batch.num_rows:
            if record_batch.schema != LISTING_SCHEMA:
                record_batch = record_batch.cast(LISTING_SCHEMA)
            self._writer.write_batch(record_batch)
            self.rows += record_batch.num_rows

    def close(self) -> "Spool":
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        return self

    def dataset(self) -> ds.Dataset:
        self.close()
        return ds.dataset(self.path, format="parquet")

    def table(self) -> pa.Table:
        """The whole listing in memory (small listings and tests only)."""
        return self.dataset().to_table()

    def remove(self) -> None:
        self.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "Spool":
        return self

    def __exit__(self, *_) -> None:
        self.remove()


def list_source(store: Store, spec: ListingSpec = ListingSpec(), boundaries: list[str] | None = None,
                check: Callable[[], None] = lambda: None) -> Spool:
    """The source's listing, spooled. `boundaries` (sorted keys, e.g. a sample of the keys
    known from the last run) seed the concurrent S3 ranges; `check` runs between batches
    (it raises to stop)."""
    spool = Spool()
    try:
        for record_batch in iter_listing(store, spec, boundaries):
            check()
            spool.add(record_batch)
    except BaseException:
        spool.remove()
        raise
    return spool.close()


def iter_listing(store: Store, spec: ListingSpec = ListingSpec(),
                 boundaries: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    if spec.kind == "inventory":
        from gender_pipeline.lake.inventory import iter_inventory

        yield from iter_inventory(spec.url, store)
    elif store.protocol in ("file", "local"):
        yield from iter_local(store.root)
    elif store.protocol in ("s3", "s3a"):
        yield from S3Lister(store, spec.fanout or DEFAULT_S3_FANOUT, boundaries, spec.client).batches()
    else:
        yield from iter_fsspec(store)


# -- local folders ------------------------------------------------------------------------

LOCAL_CHUNK = 5000  # top-level folders (users) per job of the parallel walk


def iter_local(root: str, workers: int | None = None) -> Iterator[pa.RecordBatch]:
    """Every file under `root` (symbolic links to files included, links to folders not
    followed), in batches. The top-level folders (one per user) are walked by a pool of
    processes, one per core, when there are many: the walk is mostly system calls, which
    one Python process makes one at a time."""
    if not os.path.isdir(root):
        raise StorageError(f"source {root} does not exist", transient=False)
    folders, keys, sizes, modified = [], [], [], []
    with os.scandir(root) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                folders.append((f"{entry.name}/", entry.path))
            else:
                _add_file(entry, "", keys, sizes, modified)
    if keys:
        yield _local_batch(keys, sizes, modified)
    chunks = [folders[i:i + LOCAL_CHUNK] for i in range(0, len(folders), LOCAL_CHUNK)]
    workers = min(workers or cpu_count(), len(chunks))
    if workers <= 1 or multiprocessing.current_process().daemon:
        for chunk in chunks:
            yield from _walk(chunk)
        return
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=quiet_worker, initargs=(os.getpid(),))
    try:
        for found in pool.map(_walk_all, chunks):
            yield found
    except BaseException:
        kill_pool(pool)
        raise
    pool.shutdown(wait=True)


def _walk_all(folders: list[tuple[str, str]]) -> pa.RecordBatch:
    batches = list(_walk(folders, limit=None))
    return pa.concat_batches(batches) if batches else _local_batch([], [], [])


def _walk(folders: list[tuple[str, str]], limit: int | None = BATCH) -> Iterator[pa.RecordBatch]:
    keys, sizes, modified = [], [], []
    stack = list(reversed(folders))
    while stack:
        prefix, folder = stack.pop()
        try:
            entries = os.scandir(folder)
        except FileNotFoundError:  # removed while listing
            continue
        with entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append((f"{prefix}{entry.name}/", entry.path))
                    continue
                _add_file(entry, prefix, keys, sizes, modified)
                if limit is not None and len(keys) >= limit:
                    yield _local_batch(keys, sizes, modified)
                    keys, sizes, modified = [], [], []
    if keys:
        yield _local_batch(keys, sizes, modified)


def _add_file(entry, prefix: str, keys: list, sizes: list, modified: list) -> None:
    try:
        info = entry.stat()
    except FileNotFoundError:
        return
    if entry.is_file():
        keys.append(prefix + entry.name)
        sizes.append(info.st_size)
        modified.append(info.st_mtime_ns // 1000)


def _local_batch(keys, sizes, micros) -> pa.RecordBatch:
    return pa.record_batch([pa.array(keys, pa.string()), pa.array(sizes, pa.int64()),
                            pa.array(micros, pa.int64()).cast(TIMESTAMP)], schema=LISTING_SCHEMA)


# -- any fsspec store -----------------------------------------------------------------------

def iter_fsspec(store: Store) -> Iterator[pa.RecordBatch]:
    def find() -> dict:
        store.fs.invalidate_cache()
        return store.fs.find(store.root, detail=True, withdirs=False)

    found = with_retries(find, f"listing {store.url}")
    keys, sizes, modified = [], [], []
    for path, info in found.items():
        if info.get("type") == "directory":
            continue
        keys.append(store.key_of(path))
        sizes.append(int(info.get("size") or 0))
        modified.append(modified_time(info))
        if len(keys) >= BATCH:
            yield batch(keys, sizes, modified)
            keys, sizes, modified = [], [], []
    if keys:
        yield batch(keys, sizes, modified)


# -- S3: concurrent key ranges ----------------------------------------------------------------

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
        import obstore
        import obstore.exceptions
        from obstore.store import S3Store

        options = {"region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"}
        endpoint = (self.store.options.get("client_kwargs") or {}).get("endpoint_url") or os.environ.get(
            "AWS_ENDPOINT_URL")
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
        from fsspec.asyn import sync

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
    import botocore.session

    found = botocore.session.get_session().get_credentials()
    if found is None:
        return None
    frozen = found.get_frozen_credentials()
    credentials = {"access_key_id": frozen.access_key, "secret_access_key": frozen.secret_key}
    if frozen.token:
        credentials["session_token"] = frozen.token
    return credentials


def key_sample(keys: list[str], count: int) -> list[str]:
    """`count` evenly spaced boundaries of a sorted key sample."""
    keys = sorted(keys)
    if len(keys) <= count:
        return keys
    step = len(keys) / count
    return [keys[int(i * step)] for i in range(1, count)]


def utc(value: datetime | None) -> datetime | None:
    return value if value is None or value.tzinfo else value.replace(tzinfo=timezone.utc)
