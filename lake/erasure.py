"""Erasure: users gone from every stored byte of the output, in one pass.

Their rows leave every history file (rewritten or deleted), the photo state and the
users table (a MERGE, so their ids never appear in a table's log), the pending runs'
listings; Delta's older files are vacuumed. A tombstone per photo they had in the
source (lake.tombstones) keeps later runs from reading those photos again.
"""

from __future__ import annotations

import io
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gender_pipeline.lake.history import PREDICTIONS_SCHEMA, published_files
from gender_pipeline.lake.lock import acquire
from gender_pipeline.lake.photo_state import rows_where
from gender_pipeline.lake.runs import ERASURES, record_run
from gender_pipeline.lake.sql import duckdb_session
from gender_pipeline.lake.storage import ObjectInfo, Store, with_retries
from gender_pipeline.lake.tombstones import tombstones

if TYPE_CHECKING:
    from gender_pipeline.lake.output import OutputState


@dataclass
class Erasure:
    """What `forget` removed, and where the erased users' photos still are."""

    users: int
    erased_at: datetime
    rows_removed: int = 0  # history rows
    files_read: int = 0
    files_rewritten: int = 0
    files_deleted: int = 0
    photos_removed: int = 0  # rows of _state/photos
    users_removed: int = 0  # rows of the users table
    vacuumed: int = 0  # files Delta kept for time travel, deleted
    source_keys: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)  # ids found nowhere: not in the history, the tables or the source
    change_data_removed: int = 0  # change data files of the users table that held an erased user's row
    change_data_from: int | None = None  # the users table's feed is whole from this version on
    seconds: float = 0.0


def erase_from_history(store: Store, user_ids: list[str], workers: int = 16) -> tuple[int, int, int, int, set[str]]:
    """Remove the rows of `user_ids` from every history file in one pass: each file's
    user_id column is read (concurrently), and only files that hold one of them are
    rewritten (atomically) or deleted. Returns (rows removed, files read, rewritten,
    deleted, the ids found)."""
    wanted = pa.array(sorted(set(user_ids)), pa.string())
    files = published_files(store)

    def holds(key: str) -> set[str]:
        def read() -> pa.Table:
            with store.fs.open(store.path(key), "rb") as handle:
                return pq.read_table(handle, columns=["user_id"])
        ids = with_retries(read, f"reading {key}")["user_id"]
        return set(pc.unique(pc.filter(ids, pc.fill_null(pc.is_in(ids, wanted), False))).to_pylist())

    with ThreadPoolExecutor(max_workers=workers) as pool:
        found = list(pool.map(holds, files))
    affected = [key for key, hit in zip(files, found) if hit]
    removed = rewritten = deleted = 0
    for key in affected:
        table = pq.read_table(io.BytesIO(store.read(key)))
        keep = pc.fill_null(pc.invert(pc.is_in(table["user_id"], wanted)), True)
        remaining = table.filter(keep)
        removed += table.num_rows - remaining.num_rows
        if remaining.num_rows:
            buffer = io.BytesIO()
            pq.write_table(remaining.cast(PREDICTIONS_SCHEMA), buffer, compression="zstd")
            store.write_atomic(key, buffer.getvalue())
            rewritten += 1
        else:
            with_retries(lambda k=key: store.fs.rm_file(store.path(k)), f"removing {key}")
            deleted += 1
    return removed, len(files), rewritten, deleted, set().union(*found)


def erase(state: "OutputState", user_ids: list[str], erased_at: datetime, source: Store) -> Erasure:
    """Erase users in one pass: a tombstone each first, then their rows out of every
    history file, the photo state and the users table, then VACUUM of the tables that
    changed, so that the rewritten files are gone from storage, not only from the current
    version.

    The tombstone records the photos each user has in `source` now, as the source lists
    them (key, size, time): later runs never read a photo still listed so, whatever its
    time says; a photo uploaded (or overwritten) after this is scored."""
    started = time.perf_counter()
    ids = sorted(set(user_ids))
    if not ids:
        raise ValueError("no user id to erase")
    report = Erasure(users=len(ids), erased_at=erased_at)
    id_table = pa.table({"user_id": pa.array(ids, pa.string())})
    photos = state.photos.open()
    with duckdb_session() as con:  # what the photo state knows of them (a rebuilt history may lack them)
        state.photos.view(con, "state", photos)
        known = set(rows_where(con, "state", "user_id", id_table["user_id"], ["user_id"])["user_id"].to_pylist())
    listed = _objects_under(source, ids)
    report.source_keys = [o.key for o in listed]
    state.erased.open_or_create()
    state.erased.append(tombstones(ids, listed, erased_at), None)
    report.rows_removed, report.files_read, report.files_rewritten, report.files_deleted, found = \
        erase_from_history(state.store, ids)
    found |= known | {o.key.split("/", 1)[0] for o in listed}
    state.pending.scrub(ids)
    for table, attr in ((state.photos, "photos_removed"), (state.users, "users_removed")):
        if table.open() is None:
            continue
        metrics = table.delete_matching(id_table, "user_id")
        deleted = int(metrics.get("num_target_rows_deleted", 0))
        setattr(report, attr, deleted)
        if deleted:  # nothing deleted: no file to vacuum
            report.vacuumed += len(table.vacuum())
    if state.users.open() is not None:
        # Change data is never rewritten: a file of it that holds an erased user's row goes
        # whole (the erasure's own commit wrote one); the feed is whole again after this version.
        report.change_data_removed = len(state.users.scrub_change_data(id_table["user_id"], "user_id"))
        if report.change_data_removed:
            report.change_data_from = state.users.version() + 1
    report.unmatched = [u for u in ids if u not in found]
    report.seconds = time.perf_counter() - started
    return report


def _objects_under(source: Store, user_ids: list[str]) -> list[ObjectInfo]:
    """The objects under `{source}/{user_id}/` for each user (listed concurrently)."""
    def under(user: str) -> list[ObjectInfo]:
        try:
            return source.list_objects(user)
        except FileNotFoundError:
            return []

    with ThreadPoolExecutor(max_workers=16) as pool:
        return sorted((o for found in pool.map(under, user_ids) for o in found), key=lambda o: o.key)


def forget(state: "OutputState", user_ids: list[str], source: Store, owner: str, wait_seconds: float) -> Erasure:
    """`gender-pipeline forget`: erase users holding the output's lock (no night writes
    meanwhile) and record the erasure (when, how many ids were asked, how many of them
    were erased and how many matched nothing, what it rewrote; no ids) for the next
    night's summary and `status`."""
    with acquire(state.store, owner, wait_seconds=wait_seconds):
        now = datetime.now(timezone.utc)
        report = erase(state, user_ids, now, source)
        record_run(state.store, {"run_id": f"forget-{now:%f}", "listed_at": now.isoformat(), "users": report.users,
                                 "erased": report.users - len(report.unmatched), "unmatched": len(report.unmatched),
                                 "rows_removed": report.rows_removed,
                                 "files_rewritten": report.files_rewritten + report.files_deleted}, folder=ERASURES)
    return report
