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
import shutil
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from gender_pipeline.lake.columns import LISTING_SCHEMA, TIMESTAMP
from gender_pipeline.lake.inventory import iter_inventory
from gender_pipeline.lake.s3_listing import DEFAULT_S3_FANOUT, S3Lister
from gender_pipeline.lake.storage import StorageError, Store, modified_time, with_retries
from gender_pipeline.runtime.processes import cpu_count, kill_pool, quiet_worker

log = logging.getLogger(__name__)

BATCH = 50_000
PAGE = 1000  # S3's most keys per ListObjectsV2 call


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


def key_sample(keys: list[str], count: int) -> list[str]:
    """`count` evenly spaced boundaries of a sorted key sample."""
    keys = sorted(keys)
    if len(keys) <= count:
        return keys
    step = len(keys) / count
    return [keys[int(i * step)] for i in range(1, count)]
