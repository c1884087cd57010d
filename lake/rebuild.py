"""The photo state and the users table rebuilt from the history and the source: after a
damaged or lost table, or by `gender-pipeline rebuild-users`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gender_pipeline.lake.history import empty_history, history_dataset
from gender_pipeline.lake.listing import ListingSpec, list_source
from gender_pipeline.lake.lock import acquire
from gender_pipeline.lake.photo_state import PHOTOS_SCHEMA, SourceListing, register_listing
from gender_pipeline.lake.sql import duckdb_session
from gender_pipeline.lake.storage import StorageError, Store, with_retries
from gender_pipeline.lake.tables import TableError
from gender_pipeline.lake.tombstones import erased_photo_sql
from gender_pipeline.lake.users import answers

if TYPE_CHECKING:
    from gender_pipeline.lake.output import OutputState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RebuildOptions:
    """Who rebuilds (the lock's owner), how long to wait for a night, and whether a
    damaged or foreign table under the tables' names is deleted first."""

    owner: str
    wait_seconds: float = 0.0
    replace: bool = False

# The history's latest answer per key still listed, minus what erasures removed.
LATEST_ANSWERS_SQL = """
    WITH latest AS (
        SELECT *, first_value(run_id) OVER (PARTITION BY photo_key ORDER BY scored_at, run_id) AS first_seen_run
        FROM history
        QUALIFY row_number() OVER (PARTITION BY photo_key ORDER BY scored_at DESC, run_id DESC) = 1)
    SELECT h.photo_key, h.user_id,
           CASE WHEN l.modified > h.scored_at THEN NULL ELSE l.size END AS size,
           l.modified AS uploaded_at, h.photo_sha256, h.status,
           h.reject_reason, h.gender, h.p_male, h.confidence, h.model_name, h.model_version,
           h.scored_at AS answered_at, h.scored_at AS checked_at, h.run_id, h.first_seen_run,
           h.age_years, h.age_band, h.age_confidence, CAST(h.dt AS DATE) AS answered_on
    FROM latest h JOIN listing l ON l.key = h.photo_key
    WHERE NOT EXISTS (SELECT 1 FROM erased e WHERE e.user_id = h.user_id AND {erased})"""


def rebuild_tables(state: "OutputState", listing, seq: int, replace: bool = False) -> tuple[int, int]:
    """`_state/photos` and `users` from scratch: the history's latest answer per key
    still in `listing`, minus what erasures removed; returns (photos, users).

    The history does not say what the listing said when a photo was read: a photo listed
    with a time after its answer's is read again by the next night (its size is left
    unknown; the hash decides whether it is a new answer or a touch) — the one place
    where an object's time meets this machine's, and it errs towards a read. Tables of
    ours are replaced in one commit each; anything else under their names stays an error
    unless `replace` (`rebuild-users --replace`) deletes it first."""
    for table in (state.photos, state.users):
        try:
            table.open()
        except TableError:
            if not replace:
                raise
            log.warning("removing %s to rebuild it", table.url)
            with_retries(lambda t=table: state.store.fs.rm(state.store.path(t.key), recursive=True),
                         f"removing {table.url}")
    history = history_dataset(state.store)
    with duckdb_session() as con:
        register_listing(con, "listing", listing)
        con.register("history", history if history is not None else empty_history())
        state.erased.view(con, "erased", state.erased.open())
        photos = con.arrow(LATEST_ANSWERS_SQL.format(erased=erased_photo_sql("l"))).cast(PHOTOS_SCHEMA)
        users = answers(con, photos)
    state.photos.create(photos, seq=seq, mode="overwrite")
    state.users.create(users, seq=seq, mode="overwrite")
    log.info("rebuilt %s (%d photos) and %s (%d users) from the history", state.photos.url, photos.num_rows,
             state.users.url, users.num_rows)
    return photos.num_rows, users.num_rows


def rebuild_users(state: "OutputState", source: Store, spec: ListingSpec, excluded: tuple[str, ...],
                  options: RebuildOptions) -> tuple[int, int]:
    """`gender-pipeline rebuild-users`: list the source and rebuild both tables from the
    history, holding the output's lock. Returns (photos, users)."""
    if not source.exists():
        raise StorageError(f"source {source.url} does not exist", transient=False)
    with acquire(state.store, options.owner, wait_seconds=options.wait_seconds), list_source(source, spec) as spool:
        return state.rebuild(SourceListing(spool.close().path, excluded), seq=state.next_seq(None, None),
                             replace=options.replace)
