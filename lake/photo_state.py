"""The photo state: what the output knows of the source, kept in columns, and what a
night must do about it.

`{output}/_state/photos/` is a Delta table with one row per photo the pipeline answered
that was still in the source at the last run: key, user, size, upload time, hash, the
latest answer (status, reason, gender, p_male, confidence, model, run) and when its bytes
were last checked, partitioned by `answered_on`.

A night's plan joins the listing with it in DuckDB: only the photos to read become
Python objects. One clock: "changed" means the listing's size or time differs from what
the listing said when the photo's bytes were last read (the state keeps both), and
"erased" means listed as it was when `forget` listed the source. An object's time is
never compared with this machine's clock, so an upload dated in the future (a skewed
uploader or storage clock) is read once, like any other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import pyarrow as pa
import pyarrow.compute as pc

from gender_pipeline.lake.answers import ModelRef, RETRYABLE_REASONS
from gender_pipeline.lake.columns import AGE_ANSWER, GENDER_ANSWER, LISTING_SCHEMA, TIMESTAMP, WHO_ANSWERED, schema
from gender_pipeline.lake.keys import bad_key_sql, folder_sql, folders
from gender_pipeline.lake.storage import ObjectInfo
from gender_pipeline.lake.tables import TableSpec
from gender_pipeline.lake.tombstones import erased_photo_sql

PHOTOS_SCHEMA = schema(
    ("photo_key", "user_id", "size", "uploaded_at", "photo_sha256", "status", "reject_reason", *GENDER_ANSWER,
     *WHO_ANSWERED, "answered_at",
     "checked_at",  # when its bytes were last read (answered, or the same again)
     "run_id",
     "first_seen_run",  # the run that first listed the photo (since it last left the source)
     *AGE_ANSWER, "answered_on"),
    required=("photo_key",))
PHOTOS = TableSpec(
    name="gender-pipeline photo state", schema=PHOTOS_SCHEMA, partition_by=("answered_on",),
    stats_columns=("status", "model_name", "model_version", "answered_at", "checked_at"),
    description="Every photo still in the source that gender-pipeline answered, with its latest answer.")

OP = "_op"  # what a row of the night's changes does: upsert | touch | delete
REFRESH_BUDGET = 10_000  # photos a night re-scores for users answered by another model


def listing_table(objects: list[ObjectInfo]) -> pa.Table:
    """A listing as Arrow (key, size, modified)."""
    return pa.table({"key": [o.key for o in objects], "size": [o.size for o in objects],
                     "modified": [o.modified for o in objects]}, schema=LISTING_SCHEMA)


@dataclass
class SourceListing:
    """The night's listing (an Arrow table or dataset of key, size, modified: a spool on
    disk for a large source) and the opted-out users whose photos are left out of it."""

    data: object
    excluded: tuple[str, ...] = ()

    def view(self, con, name: str) -> None:
        """`name` in a DuckDB session: the listing without the opted-out users' photos
        (`{name}_all` with them). A path is a local Parquet file (the spool), read by
        DuckDB itself."""
        if isinstance(self.data, str):
            con.execute(f"CREATE OR REPLACE TEMP VIEW {name}_all AS SELECT * FROM read_parquet($path)".replace(
                "$path", "'" + self.data.replace("'", "''") + "'"))
        else:
            con.register(f"{name}_all", self.data)
        if not self.excluded:
            con.execute(f"CREATE OR REPLACE TEMP VIEW {name} AS SELECT * FROM {name}_all")
            return
        con.register(f"{name}_excluded", pa.table({"user_id": pa.array(sorted(set(self.excluded)), pa.string())}))
        con.execute(f"CREATE OR REPLACE TEMP VIEW {name} AS SELECT * FROM {name}_all "
                    f"WHERE {folder_sql()} NOT IN (SELECT user_id FROM {name}_excluded)")


def register_listing(con, name: str, data) -> None:
    """A listing (or a table with a `key` column) as `name`, and `{name}_all` unfiltered."""
    (data if isinstance(data, SourceListing) else SourceListing(data)).view(con, name)


@dataclass
class NightPlan:
    """What a night must do, from the listing and the state; small (the night's work)."""

    seq: int  # this run's number in the output's commits
    model: str  # NAME@VERSION the run answers with
    to_read: pa.Table  # key, size, modified, known_sha, why (new | changed | retry | refresh), answered_on
    removed: pa.Table  # photo_key, user_id, answered_on: in the state, no longer in the source
    listed: int = 0
    excluded: int = 0  # photos of opted-out users, never read
    erased_skipped: int = 0  # photos that were in the source when their user was erased
    unchanged: int = 0
    users: int = 0  # users with an answer before tonight
    behind: int = 0  # of them, answered by another model than `model`
    refresh_budget: int = 0
    caught_up: list[str] = field(default_factory=list)  # runs whose published rows were applied late
    rebuilt: bool = False
    bad_keys: int = 0  # listed keys that are not {user_id}/{file name} (estimated from the first 100,000)
    one_user: str | None = None  # the user id every listed key shares, when they all share one

    @property
    def refresh(self) -> int:
        return count_why(self.to_read, "refresh")

    @property
    def new(self) -> int:
        """Photos to read for what the listing says (new, changed, a failed read), not the refresh."""
        return self.to_read.num_rows - self.refresh

    def partitions(self) -> pa.Table:
        """Where the known keys of the night sit in `_state/photos` (prunes its MERGE)."""
        return pa.concat_tables([
            self.to_read.select(["key", "answered_on"]).rename_columns(["photo_key", "answered_on"]),
            self.removed.select(["photo_key", "answered_on"])])

    def objects(self) -> list[ObjectInfo]:
        """The photos to read, new ones first (oldest upload first), then the refresh."""
        columns = [self.to_read[name].to_pylist() for name in ("key", "size", "modified")]
        return [ObjectInfo(key, int(size or 0), modified) for key, size, modified in zip(*columns)]

    def known_hashes(self) -> dict[str, set[str]]:
        """Content this run's model already answered, for the changed keys: the same bytes
        are not answered twice by the same model (read again, they are a `touch`). Bytes
        another model answered are scored again (the refresh, for free: they were read)."""
        known = self.to_read.filter(pc.and_(pc.is_valid(self.to_read["known_sha"]),
                                            pc.not_equal(self.to_read["why"], "refresh")))
        if self.model:
            known = known.filter(pc.equal(known["known_model"], self.model))
        return {key: {sha} for key, sha in zip(known["key"].to_pylist(), known["known_sha"].to_pylist())}


def count_why(to_read: pa.Table, why: str) -> int:
    return int(pc.sum(pc.cast(pc.equal(to_read["why"], why), pa.int64())).as_py() or 0)


# -- the plan, in DuckDB: `listing`, `state`, `erased` and `users` are registered -----------

def listing_counts(con, has_excluded: bool) -> tuple[int, int]:
    """(objects listed, of them photos of opted-out users)."""
    total = con.rows("SELECT count(*) FROM listing_all")[0][0]
    excluded = (total - con.rows("SELECT count(*) FROM listing")[0][0]) if has_excluded else 0
    return total, excluded


def key_shapes(con, total: int, sample: int = 100_000) -> tuple[int, str | None]:
    """The key shapes, for the warnings, from the first `sample` keys listed: (listed keys
    without a user id, estimated; the user id every key has, when they all share one)."""
    seen, bad, low, high = con.rows(
        f"SELECT count(*), count(*) FILTER (WHERE {bad_key_sql()}), min({folder_sql()}), max({folder_sql()}) "
        f"FROM (SELECT key FROM listing_all LIMIT {int(sample)})")[0]
    one_user = low if low is not None and low == high else None
    return (round(total * bad / seen) if seen else 0), one_user


def changed_photos(con) -> int:
    """The temporary table `work`: every listed photo the state does not know as it is
    (new, changed, a failed read) and every known photo no longer listed (removed), less
    the photos that were in the source when their user was erased (never read again).
    Returns how many of those were left out."""
    retry = ", ".join(f"'{r}'" for r in RETRYABLE_REASONS)
    con.execute(f"""
        CREATE TEMP TABLE work AS
        SELECT coalesce(l.key, s.photo_key) AS key, l.size, l.modified, s.photo_sha256 AS known_sha,
               s.model_name || '@' || s.model_version AS known_model, s.first_seen_run,
               s.user_id AS state_user, s.answered_on,
               CASE WHEN l.key IS NULL THEN 'removed' WHEN s.photo_key IS NULL THEN 'new'
                    WHEN s.reject_reason IN ({retry}) THEN 'retry' ELSE 'changed' END AS why
        FROM listing l FULL OUTER JOIN
             (SELECT photo_key, user_id, size, uploaded_at, photo_sha256, reject_reason, model_name,
                     model_version, first_seen_run, answered_on FROM state) s
             ON l.key = s.photo_key
        WHERE s.photo_key IS NULL OR l.key IS NULL OR s.reject_reason IN ({retry})
              OR l.modified IS DISTINCT FROM s.uploaded_at OR l.size IS DISTINCT FROM s.size""")
    return con.execute(f"""
        DELETE FROM work WHERE why = 'new' AND EXISTS (
            SELECT 1 FROM erased e WHERE e.user_id = {folder_sql('work.key')} AND {erased_photo_sql('work')})
        """).fetchall()[0][0]


def photos_to_read(con) -> tuple[pa.Table, pa.Table]:
    """(the photos to read, oldest upload first; the photos gone from the source), from `work`."""
    removed = con.arrow("SELECT key AS photo_key, state_user AS user_id, answered_on FROM work WHERE why = 'removed'")
    to_read = con.arrow("SELECT key, size, modified, known_sha, known_model, first_seen_run, why, answered_on "
                        "FROM work WHERE why <> 'removed' ORDER BY modified NULLS FIRST, key")
    return to_read, removed


def refresh_photos(con, model: str, budget: int) -> pa.Table:
    """The photos behind the oldest `budget` answers from another model than `model` (still
    listed, not already read tonight for another reason): the refresh."""
    ref = ModelRef.parse(model)
    return con.arrow("""
        WITH stale AS (
            SELECT photo_key, answered_at, answered_on FROM users
            WHERE (model_name IS DISTINCT FROM $1 OR model_version IS DISTINCT FROM $2)
              AND photo_key NOT IN (SELECT key FROM work)
            ORDER BY answered_at, user_id LIMIT $3)
        SELECT l.key, l.size, l.modified, NULL::VARCHAR AS known_sha, NULL::VARCHAR AS known_model,
               s.first_seen_run, 'refresh' AS why, r.answered_on
        FROM stale r JOIN listing l ON l.key = r.photo_key
             JOIN state s ON s.photo_key = r.photo_key
        ORDER BY r.answered_at, l.key""", [ref.name, ref.version, budget])


# -- the night's changes to the state ---------------------------------------------------------

def night_changes(con, rows: pa.Table, objects, checked_at: datetime | None, touched: pa.Table | None,
                  removed: pa.Table | None) -> tuple[pa.Table, pa.Table]:
    """The night's changes to the photo state (its columns plus `_op`), and the upserts:
    the answers in `rows` (history rows with `dt`; their size and upload time from
    `objects`), the photos read again with the same bytes (`touched`: key, size, modified;
    checked at `checked_at`) and the photos gone from the source (`removed`)."""
    con.register("night_rows", rows)
    register_listing(con, "objects", objects)
    seen = ("o.first_seen_run" if "first_seen_run" in con.sql("SELECT * FROM objects LIMIT 0").columns
            else "NULL")
    upserts = con.arrow(f"""
        SELECT r.photo_key, r.user_id, o.size, o.modified AS uploaded_at, r.photo_sha256, r.status,
               r.reject_reason, r.gender, r.p_male, r.confidence, r.model_name, r.model_version,
               r.scored_at AS answered_at, r.scored_at AS checked_at, r.run_id,
               coalesce({seen}, r.run_id) AS first_seen_run, r.age_years, r.age_band, r.age_confidence,
               CAST(r.dt AS DATE) AS answered_on
        FROM night_rows r JOIN objects o ON o.key = r.photo_key
        QUALIFY row_number() OVER (PARTITION BY r.photo_key ORDER BY r.scored_at DESC) = 1
        """).cast(PHOTOS_SCHEMA)
    parts = [with_op(upserts, "upsert")]
    if touched is not None and touched.num_rows:
        parts.append(with_op(state_rows(touched.num_rows, photo_key=touched["key"],
                                        user_id=folders(touched["key"]), size=touched["size"],
                                        uploaded_at=touched["modified"],
                                        checked_at=pa.array([checked_at] * touched.num_rows, TIMESTAMP)),
                             "touch"))
    if removed is not None and removed.num_rows:
        parts.append(with_op(state_rows(removed.num_rows, photo_key=removed["photo_key"],
                                        user_id=removed["user_id"]), "delete"))
    return pa.concat_tables(parts), upserts


def after_night(con, before: pa.Table, changes: pa.Table) -> pa.Table:
    """The users' photos once the night's changes are in: what the state's MERGE makes of
    `before` (the same rows, computed here rather than read back)."""
    con.register("before_night", before)
    con.register("night_changes", changes)
    columns = ", ".join(PHOTOS_SCHEMA.names)
    touched = ", ".join(f"c.{c}" if c in ("size", "uploaded_at", "checked_at") else f"b.{c}"
                        for c in PHOTOS_SCHEMA.names)
    return con.arrow(f"""
        SELECT {columns} FROM before_night
        WHERE photo_key NOT IN (SELECT photo_key FROM night_changes)
        UNION ALL SELECT {columns} FROM night_changes WHERE _op = 'upsert'
        UNION ALL SELECT {touched} FROM before_night b JOIN night_changes c
                  ON c.photo_key = b.photo_key AND c._op = 'touch'""").cast(PHOTOS_SCHEMA)


def rows_where(con, relation: str, column: str, values, columns: list[str]) -> pa.Table:
    """The rows of `relation` whose `column` is in `values` (one columnar scan)."""
    con.register("_wanted", pa.table({"value": pa.array(values, pa.string()) if not isinstance(
        values, (pa.Array, pa.ChunkedArray)) else values}))
    try:
        return con.arrow(f"SELECT {', '.join(columns)} FROM {relation} WHERE {column} IN (SELECT value FROM _wanted)")
    finally:
        con.unregister("_wanted")


def state_rows(count: int, **columns) -> pa.Table:
    """`count` rows of the state's columns: those given, the others null."""
    data = {name: columns.get(name, pa.nulls(count, f.type)) for name, f in zip(PHOTOS_SCHEMA.names, PHOTOS_SCHEMA)}
    return pa.table(data).cast(PHOTOS_SCHEMA.set(0, pa.field("photo_key", pa.string())))


def with_op(table: pa.Table, op: str) -> pa.Table:
    """`table` (nullable columns, for the concat) with the change's `_op`."""
    table = pa.table({name: table[name] for name in table.column_names})
    nullable = pa.schema([pa.field(f.name, f.type) for f in table.schema])
    return table.cast(nullable).append_column(OP, pa.array([op] * table.num_rows, pa.string()))
