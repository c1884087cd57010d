"""What the output knows of the source, kept in columns, and what a night must do.

Beside the history (`predictions/`, the audit log) an output keeps:

- `_state/photos/`: one row per photo the pipeline answered that was still in the source
  at the last run: key, user, size, upload time, hash, the latest answer (status, reason,
  gender, p_male, confidence, model, run) and when its bytes were last checked. A Delta
  table partitioned by `answered_on`.
- `users/`: the recommender's table (lake.users), derived from `_state/photos` by the rule.
- `_state/erased/`: one tombstone per erased user (the id and the time, nothing else).
- `_state/pending/`: a marker per run that may have published history rows not yet in
  the tables; the next run applies those rows first (a run killed between its writes).

A night: list the source, catch up what a killed run left, join the listing with
`_state/photos` in DuckDB (only the photos to read become Python objects), score them,
publish their history rows, then one MERGE into `_state/photos` and one into `users`,
each pruned to the partitions the night touches and marked with the run's sequence
number, so that a commit that happened is never applied twice.
"""

from __future__ import annotations

import io
import json
import logging
import re
from dataclasses import dataclass, field
from datetime import date, datetime

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from gender_pipeline.lake.tables import APP_ID, Table, TableError, TableSpec, duckdb_session
from gender_pipeline.lake.listing import LISTING_SCHEMA, key_sample
from gender_pipeline.lake.history import (DATASET, PREDICTIONS_SCHEMA, RETRYABLE_REASONS, PhotoResult, conform,
                              in_band_order, published_files)
from gender_pipeline.lake.storage import ObjectInfo, Store, with_retries
from gender_pipeline.runtime.timing import timed
from gender_pipeline.lake.users import TIMESTAMP, USERS, answers

log = logging.getLogger(__name__)

PHOTOS_SCHEMA = pa.schema([
    pa.field("photo_key", pa.string(), nullable=False),
    pa.field("user_id", pa.string()),
    pa.field("size", pa.int64()),
    pa.field("uploaded_at", TIMESTAMP),
    pa.field("photo_sha256", pa.string()),
    pa.field("status", pa.string()),
    pa.field("reject_reason", pa.string()),
    pa.field("gender", pa.string()),
    pa.field("p_male", pa.float32()),
    pa.field("confidence", pa.float32()),
    pa.field("model_name", pa.string()),
    pa.field("model_version", pa.string()),
    pa.field("answered_at", TIMESTAMP),
    pa.field("checked_at", TIMESTAMP),  # when its bytes were last read (answered, or the same again)
    pa.field("run_id", pa.string()),
    pa.field("first_seen_run", pa.string()),  # the run that first listed the photo (since it last left the source)
    pa.field("age_years", pa.float32()),
    pa.field("age_band", pa.string()),
    pa.field("age_confidence", pa.float32()),
    pa.field("answered_on", pa.date32()),
])
PHOTOS = TableSpec(
    name="gender-pipeline photo state", schema=PHOTOS_SCHEMA, partition_by=("answered_on",),
    stats_columns=("status", "model_name", "model_version", "answered_at", "checked_at"),
    description="Every photo still in the source that gender-pipeline answered, with its latest answer.")

# A tombstone: one row per photo the user had in the source when `forget` listed it (key,
# size and the listing's time, as the source's own listing gives them), or one row with no
# key when there was none. Tombstones written before the photos were recorded have
# `source_listed` null: for them a photo listed at or before `erased_at` counts as erased.
ERASED_SCHEMA = pa.schema([pa.field("user_id", pa.string(), nullable=False),
                           pa.field("erased_at", TIMESTAMP, nullable=False),
                           pa.field("source_listed", pa.bool_()),
                           pa.field("photo_key", pa.string()),
                           pa.field("size", pa.int64()),
                           pa.field("uploaded_at", TIMESTAMP)])
ERASED = TableSpec(name="gender-pipeline erasures", schema=ERASED_SCHEMA, stats_columns=("erased_at",),
                   description="Users erased by `gender-pipeline forget`, with the photos they had in the source "
                               "then: those are never read again.")

PENDING = "_state/pending"
OP = "_op"
# What a pending run keeps of its plan: the listing its photos were read under, and the
# photos it found gone (`removed`).
PLAN_LISTING = pa.schema([pa.field("key", pa.string()), pa.field("size", pa.int64()),
                          pa.field("modified", TIMESTAMP), pa.field("first_seen_run", pa.string()),
                          pa.field("removed", pa.bool_())])


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
                    f"WHERE split_part(key, '/', 1) NOT IN (SELECT user_id FROM {name}_excluded)")


def _register(con, name: str, data) -> None:
    """A listing (or a table with a `key` column) as `name`, and `{name}_all` unfiltered."""
    (data if isinstance(data, SourceListing) else SourceListing(data)).view(con, name)


# Whether a tombstone covers a listed photo: the object as `forget` listed it, the same
# key, size and listing time (to the second: S3 lists whole seconds, and one way of
# listing a store may give more digits than another). The time is compared with the
# time the same listing gave, never with the erasure's: a photo dated ahead of the
# erasure by a skewed clock is still the photo that was there. Anything written under
# the key later (a new upload, even of the same file) is a new photo. Tombstones
# written before the photos were recorded fall back to the listing's time against the
# erasure's.
def erased_photo_sql(listed: str) -> str:
    """The SQL condition, for a tombstone `e` and a listed photo `listed` (key, size,
    modified), that the tombstone covers the photo."""
    return f"""((e.source_listed AND e.photo_key = {listed}.key AND e.size IS NOT DISTINCT FROM {listed}.size
       AND date_trunc('second', e.uploaded_at) IS NOT DISTINCT FROM date_trunc('second', {listed}.modified))
    OR (e.source_listed IS NULL AND ({listed}.modified IS NULL OR {listed}.modified <= e.erased_at)))"""

# A key without a usable user id: no '/', an empty segment, or a '.' or '..' segment
# (engine.scoring.user_of, in SQL).
BAD_KEY_SQL = ("(NOT contains(key, '/') OR contains('/' || key || '/', '//') OR contains('/' || key || '/', '/./') "
               "OR contains('/' || key || '/', '/../'))")


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
        return _count(self.to_read, "refresh")

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


@dataclass
class Applied:
    """What one application of a night's rows changed."""

    photos_upserted: int = 0
    photos_removed: int = 0
    users_upserted: int = 0
    users_removed: int = 0
    skipped: bool = False  # already applied by an earlier attempt
    users_added: int = 0  # change in the number of users with an answer
    behind_added: int = 0  # change in the number of them answered by another model than the night's


def model_ref(model: str) -> tuple[str, str]:
    name, _, version = model.partition("@")
    return name, version


class OutputState:
    """The tables beside an output's history (see the module's docstring)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.photos = Table(store, "_state/photos", PHOTOS)
        self.users = Table(store, "users", USERS)
        self.erased = Table(store, "_state/erased", ERASED)

    # -- sequence numbers and pending runs ------------------------------------------------

    def _pending(self) -> list[dict]:
        folder = self.store.path(PENDING)
        self.store.fs.invalidate_cache()
        try:
            names = with_retries(lambda: self.store.fs.ls(folder, detail=False), f"listing {PENDING}")
        except FileNotFoundError:
            return []
        markers = []
        for name in sorted(n for n in names if n.rsplit("/", 1)[-1].endswith(".json")
                           and not n.rsplit("/", 1)[-1].startswith("_")):
            try:
                markers.append(json.loads(with_retries(lambda n=name: self.store.fs.cat_file(n), f"reading {name}")))
            except (FileNotFoundError, ValueError):
                continue
        return sorted(markers, key=lambda m: m["seq"])

    def next_seq(self, photos, users) -> int:
        seen = [t.transaction_version(APP_ID) for t in (photos, users) if t is not None]
        seen += [m["seq"] for m in self._pending()]
        return max([s for s in seen if s is not None], default=0) + 1

    def _marker_key(self, seq: int, run_id: str, suffix: str = ".json") -> str:
        return f"{PENDING}/{seq:012d}-{re.sub(r'[^A-Za-z0-9_.-]', '_', run_id)}{suffix}"

    def begin(self, seq: int, run_id: str, scoring_date: date, plan: NightPlan | None = None) -> None:
        """Before a run publishes history rows or changes the tables: say so, for the next
        run if this one dies. The plan's photos (key, size, listing time) and the photos it
        found gone are kept beside the marker: the published rows are applied with the
        listing they were read under, and a run that died between its two commits has its
        users brought up to date."""
        record = {"seq": seq, "run_id": run_id, "scoring_date": scoring_date.isoformat()}
        if plan is not None:
            read = plan.to_read.select(["key", "size", "modified", "first_seen_run"])
            gone = plan.removed.select(["photo_key"]).rename_columns(["key"])
            kept = pa.concat_tables([
                read.append_column("removed", pa.array([False] * read.num_rows, pa.bool_())).cast(PLAN_LISTING),
                pa.table({"key": gone["key"], "size": pa.nulls(gone.num_rows, pa.int64()),
                          "modified": pa.nulls(gone.num_rows, TIMESTAMP),
                          "first_seen_run": pa.nulls(gone.num_rows, pa.string()),
                          "removed": pa.array([True] * gone.num_rows, pa.bool_())}).cast(PLAN_LISTING)])
            buffer = io.BytesIO()
            pq.write_table(kept, buffer, compression="zstd")
            record["listing"] = self._marker_key(seq, run_id, ".parquet")
            self.store.write_atomic(record["listing"], buffer.getvalue())
        self.store.write_atomic(self._marker_key(seq, run_id), json.dumps(record).encode())

    def end(self, seq: int, run_id: str) -> None:
        for suffix in (".json", ".parquet"):
            path = self.store.path(self._marker_key(seq, run_id, suffix))
            try:
                with_retries(lambda p=path: self.store.fs.rm_file(p), f"removing {path}")
            except FileNotFoundError:
                pass

    def scrub_pending(self, user_ids: list[str]) -> None:
        """Erasure: the users' keys out of the listings that pending runs kept."""
        wanted = pa.array(sorted(set(user_ids)), pa.string())
        for marker in self._pending():
            listed = self._marker_listing(marker)
            if listed is None:
                continue
            keep = pc.invert(pc.fill_null(pc.is_in(_user_of(listed["key"]), wanted), False))
            if pc.all(keep).as_py():
                continue
            buffer = io.BytesIO()
            pq.write_table(listed.filter(keep), buffer, compression="zstd")
            self.store.write_atomic(marker["listing"], buffer.getvalue())

    def _marker_listing(self, marker: dict):
        """The listing a pending run read its photos under (None for markers that kept none)."""
        if not marker.get("listing"):
            return None
        try:
            return pq.read_table(io.BytesIO(self.store.read(marker["listing"])))
        except FileNotFoundError:
            return None

    def run_files(self, run_id: str, scoring_date: str) -> list[str]:
        """History files a run published (keys), found by name in its date partition."""
        folder = self.store.path(f"{DATASET}/dt={scoring_date}")
        self.store.fs.invalidate_cache()
        try:
            names = with_retries(lambda: self.store.fs.ls(folder, detail=False), f"listing {folder}")
        except FileNotFoundError:
            return []
        prefix = f"part-{run_id}-"
        return sorted(self.store.key_of(n) for n in names
                      if n.rsplit("/", 1)[-1].startswith(prefix) and n.endswith(".parquet"))

    def catch_up(self, objects) -> list[str]:
        """Finish what runs that died left (in run order): a run that committed the photo
        state but not the users table has its users' rows computed again; otherwise its
        published history rows are applied, with the listing it read them under
        (`objects`, the night's listing, for markers that kept none). What it had not
        committed besides (photos gone, the same bytes seen again) tonight's plan finds
        again. Returns the ids of the runs whose published rows or users were applied."""
        done = []
        for marker in self._pending():
            seq, run_id = marker["seq"], marker["run_id"]
            files = self.run_files(run_id, marker["scoring_date"])
            rows = read_history_files(self.store, files)
            listed = self._marker_listing(marker)
            photos, users = self.photos.open(), self.users.open()
            if (listed is not None and photos is not None and self.photos.applied(photos, seq)
                    and not self.users.applied(users, seq)):
                ids = _user_of(pa.concat_arrays([listed["key"].combine_chunks(), rows["photo_key"].combine_chunks()]))
                log.warning("bringing the users of run %s up to date: it stopped between its two commits", run_id)
                self._update_users(pa.array(sorted({u for u in ids.to_pylist() if u}), pa.string()), seq, Applied())
                done.append(run_id)
            elif rows.num_rows:
                log.warning("applying %d published rows of run %s, which stopped before updating the users "
                            "table", rows.num_rows, run_id)
                self.apply(rows, objects if listed is None else listed.filter(pc.invert(listed["removed"])),
                           seq=seq, checked_at=None)
                done.append(run_id)
            self.end(seq, run_id)
        return done

    # -- the night's plan -----------------------------------------------------------------

    def plan(self, listing, model: str, refresh_budget: int = 10_000) -> NightPlan:
        """Catch up, (re)build what is missing, and join the listing with the state.

        `listing` is a SourceListing (or an Arrow table or dataset): the photos of its
        opted-out users are left out. The photos to read are the new ones, the changed
        ones, the ones whose last read failed (`read_error`), and up to `refresh_budget`
        photos that back an answer from another model than `model`, oldest answers first.
        Photos that were in the source when their user was erased are never read again.

        One clock: "changed" means the listing's size or time differs from what the
        listing said when the photo's bytes were last read (the state keeps both), and
        "erased" means listed as it was when `forget` listed the source. An object's time
        is never compared with this machine's clock, so an upload dated in the future (a
        skewed uploader or storage clock) is read once, like any other.
        """
        if not isinstance(listing, SourceListing):
            listing = SourceListing(listing)
        photos, users = self.photos.open(), self.users.open()
        erased = self.erased.open()
        rebuilt = False
        if photos is None and self.history_exists():
            log.warning("%s is missing: rebuilding it and %s from the history", self.photos.url, self.users.url)
            self.rebuild(listing, seq=self.next_seq(None, users))
            photos, users, rebuilt = self.photos.open(), self.users.open(), True
        caught_up = self.catch_up(listing)
        if caught_up:
            photos, users = self.photos.open(), self.users.open()
        seq = self.next_seq(photos, users)
        with duckdb_session() as con:
            _register(con, "listing", listing)
            self.photos.view(con, "state", photos)
            self.erased.view(con, "erased", erased)
            total = con.rows("SELECT count(*) FROM listing_all")[0][0]
            excluded = (total - con.rows("SELECT count(*) FROM listing")[0][0]) if listing.excluded else 0
            listed = total - excluded
            # The key shapes, for the warnings, from the first 100,000 keys listed: the share
            # of keys without a user id, and whether every key has the same one.
            shapes = con.rows(f"SELECT count(*), count(*) FILTER (WHERE {BAD_KEY_SQL}), min(split_part(key, '/', 1)), "
                              "max(split_part(key, '/', 1)) FROM (SELECT key FROM listing_all LIMIT 100000)")[0]
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
            # Photos that were in the source when their user was erased: never read again.
            erased_skipped = con.execute(f"""
                DELETE FROM work WHERE why = 'new' AND EXISTS (
                    SELECT 1 FROM erased e WHERE e.user_id = split_part(work.key, '/', 1) AND {erased_photo_sql('work')})
                """).fetchall()[0][0]
            removed = con.arrow("SELECT key AS photo_key, state_user AS user_id, answered_on FROM work "
                                "WHERE why = 'removed'")
            to_read = con.arrow("SELECT key, size, modified, known_sha, known_model, first_seen_run, why, "
                                "answered_on FROM work WHERE why <> 'removed' ORDER BY modified NULLS FIRST, key")
            users_total = behind = 0
            if users is not None:
                name, version = model_ref(model)
                self.users.view(con, "users", users)
                users_total, behind = _user_counts(con, model)
                if behind and refresh_budget:
                    # The photos behind the oldest answers from another model (still listed,
                    # not already read tonight for another reason).
                    refresh = con.arrow("""
                        WITH stale AS (
                            SELECT photo_key, answered_at, answered_on FROM users
                            WHERE (model_name IS DISTINCT FROM $1 OR model_version IS DISTINCT FROM $2)
                              AND photo_key NOT IN (SELECT key FROM work)
                            ORDER BY answered_at, user_id LIMIT $3)
                        SELECT l.key, l.size, l.modified, NULL::VARCHAR AS known_sha, NULL::VARCHAR AS known_model,
                               s.first_seen_run, 'refresh' AS why, r.answered_on
                        FROM stale r JOIN listing l ON l.key = r.photo_key
                             JOIN state s ON s.photo_key = r.photo_key
                        ORDER BY r.answered_at, l.key""", [name, version, refresh_budget])
                    to_read = pa.concat_tables([to_read, refresh.cast(to_read.schema)])
        return NightPlan(seq=seq, model=model, to_read=to_read, removed=removed, listed=total,
                         excluded=excluded, erased_skipped=erased_skipped,
                         unchanged=listed - (to_read.num_rows - _count(to_read, "refresh")) - erased_skipped,
                         users=users_total, behind=behind, refresh_budget=refresh_budget, caught_up=caught_up,
                         rebuilt=rebuilt, bad_keys=round(total * shapes[1] / shapes[0]) if shapes[0] else 0,
                         one_user=shapes[2] if shapes[2] is not None and shapes[2] == shapes[3] else None)

    def key_sample(self, count: int) -> list[str]:
        """`count` keys that cut the known keys into about equal ranges (a random sample
        of 4,096, sorted): where concurrent listers of the source start."""
        photos = self.photos.open()
        if photos is None or count < 1:
            return []
        with duckdb_session() as con:
            self.photos.view(con, "state", photos)
            sample = [k for (k,) in con.rows("SELECT photo_key FROM state USING SAMPLE 4096 ROWS")]
        return key_sample(sample, count)

    def compact(self, retention_hours: int = 168) -> dict:
        """Compact the tables (the weekly upkeep; see flows/maintenance.py)."""
        return {table.key: table.compact(retention_hours) for table in (self.photos, self.users, self.erased)
                if table.open() is not None}

    def user_counts(self, model: str) -> tuple[int, int]:
        """(users with an answer, those answered by another model than `model`)."""
        with duckdb_session() as con:
            self.users.view(con, "users", self.users.open())
            return _user_counts(con, model)

    def history_exists(self) -> bool:
        return bool(published_files(self.store))

    # -- applying a night -------------------------------------------------------------------

    def apply(self, rows: pa.Table, objects, seq: int, checked_at: datetime | None,
              touched: pa.Table | None = None, removed: pa.Table | None = None,
              partitions: pa.Table | None = None, before_commit=lambda: None,
              timings: dict | None = None, model: str = "") -> Applied:
        """Apply a night to `_state/photos` and `users`: its history `rows` (with `dt`), the
        photos read again with the same bytes (`touched`: key, size, modified; checked at
        `checked_at`), and the photos gone from the source (`removed`: photo_key, user_id).
        `objects` gives the size and upload time of the answered photos (the night's plan
        or listing); answered photos no longer in it are not kept. `partitions` (key,
        answered_on of the known keys) prunes the MERGE; without it they are looked up.
        `before_commit` runs before each of the two commits (it raises to stop); `timings`
        (when given) adds the seconds of the photo state's and the users table's updates.

        The touched users' photos are read from the state once, before its MERGE: their
        users' rows before and after the night follow from the rule, when the users table
        is in step with the state (both last committed by the same run). Otherwise (a run
        that died between the two commits) the users' rows are read from both tables."""
        report = Applied()
        photos_table, users_table = self.photos.open_or_create(), self.users.open_or_create()
        in_step = (not self.photos.applied(photos_table, seq)
                   and photos_table.transaction_version(APP_ID) == users_table.transaction_version(APP_ID))
        with duckdb_session() as con, timed(timings, "photo_state"):
            changes, upserts = self._changes(con, rows, objects, checked_at, touched, removed)
            report.photos_upserted, report.photos_removed = upserts.num_rows, (removed.num_rows if removed else 0)
            if not changes.num_rows:
                return report
            user_ids = pa.array(sorted({u for u in changes["user_id"].to_pylist() if u is not None}), pa.string())
            before = after = None
            if in_step and len(user_ids):
                self.photos.view(con, "state", photos_table)
                before = _rows_where(con, "state", "user_id", user_ids, PHOTOS_SCHEMA.names)
                after = _after(con, before, changes)
            if partitions is None:
                self.photos.view(con, "state", photos_table)
                partitions = _rows_where(con, "state", "photo_key", changes["photo_key"], ["photo_key", "answered_on"])
            old = sorted({str(d) for d in partitions["answered_on"].to_pylist() if d is not None})
            if self.photos.applied(photos_table, seq):
                report.skipped = True
            elif old:
                before_commit()
                self.photos.merge(changes, "photo_key", old, seq)
            else:  # only new keys: nothing to match
                before_commit()
                self.photos.append(upserts, seq)
        with timed(timings, "users_table"):
            if not len(user_ids):
                return report
            if self.users.applied(self.users.open(), seq):
                report.skipped = True
                return report
            if before is None:
                self._update_users(user_ids, seq, report, before_commit, model)
                return report
            with duckdb_session() as con:
                existing, rows_now = answers(con, before), answers(con, after)
            self._merge_users(existing, rows_now, seq, report, before_commit, model)
        return report

    def _update_users(self, user_ids: pa.Array, seq: int, report: Applied, before_commit=lambda: None,
                      model: str = "") -> None:
        """The users' rows computed again from the photo state as it is, in one MERGE."""
        with duckdb_session() as con:
            self.photos.view(con, "state", self.photos.open())
            self.users.view(con, "users", self.users.open())
            rows_now = answers(con, _rows_where(con, "state", "user_id", user_ids, PHOTOS_SCHEMA.names))
            existing = _rows_where(con, "users", "user_id", user_ids,
                                   ["user_id", "answered_on", "model_name", "model_version"])
        self._merge_users(existing, rows_now, seq, report, before_commit, model)

    def apply_night(self, plan: NightPlan, rows: pa.Table, same_content: list[str], listed_at: datetime,
                    run_id: str, before_commit=lambda: None) -> Applied:
        """After a night's history rows (`rows`, with `dt`) are published: its answers, the
        photos read again with the same bytes (`same_content`) and the photos gone from the
        source, applied to both tables; then the run's marker goes."""
        touched = plan.to_read.filter(pc.is_in(plan.to_read["key"], pa.array(sorted(set(same_content)), pa.string())))
        applied = self.apply(rows, plan.to_read, plan.seq, listed_at, touched=touched.select(["key", "size", "modified"]),
                             removed=plan.removed, partitions=plan.partitions(), before_commit=before_commit,
                             model=plan.model)
        self.end(plan.seq, run_id)
        return applied

    def _changes(self, con, rows, objects, checked_at, touched, removed) -> tuple[pa.Table, pa.Table]:
        """The night's changes to the photo state (its columns plus `_op`), and the upserts."""
        con.register("night_rows", rows)
        _register(con, "objects", objects)
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
        parts = [_with_op(upserts, "upsert")]
        if touched is not None and touched.num_rows:
            parts.append(_with_op(_state_rows(touched.num_rows, photo_key=touched["key"],
                                              user_id=_user_of(touched["key"]), size=touched["size"],
                                              uploaded_at=touched["modified"],
                                              checked_at=pa.array([checked_at] * touched.num_rows, TIMESTAMP)),
                                  "touch"))
        if removed is not None and removed.num_rows:
            parts.append(_with_op(_state_rows(removed.num_rows, photo_key=removed["photo_key"],
                                              user_id=removed["user_id"]), "delete"))
        return pa.concat_tables(parts), upserts

    def _merge_users(self, existing: pa.Table, rows: pa.Table, seq: int, report: Applied, before_commit,
                     model: str) -> None:
        """One MERGE of the users' rows `rows` over their `existing` ones (in the partitions
        those sit in); users that have no row any more are deleted."""
        report.users_added = rows.num_rows - existing.num_rows
        report.behind_added = _behind(rows, model) - _behind(existing, model)
        gone = pc.filter(existing["user_id"], pc.invert(pc.is_in(existing["user_id"], rows["user_id"])))
        source = pa.concat_tables([_with_op(rows, "upsert"),
                                   _with_op(_user_rows(len(gone), user_id=gone), "delete")])
        old = sorted({str(d) for d in existing["answered_on"].to_pylist() if d is not None})
        if old or rows.num_rows:
            before_commit()
        if old:
            self.users.merge(source, "user_id", old, seq)
        elif rows.num_rows:
            self.users.append(rows, seq)
        report.users_upserted, report.users_removed = rows.num_rows, len(gone)

    # -- rebuilding from the history ----------------------------------------------------------

    def rebuild(self, listing, seq: int, replace: bool = False) -> tuple[int, int]:
        """`_state/photos` and `users` from scratch: the history's latest answer per key
        still in `listing`, minus what erasures removed; returns (photos, users).
        The history does not say what the listing said when a photo was read: a photo
        listed with a time after its answer's is read again by the next night (its size
        is left unknown; the hash decides whether it is a new answer or a touch) — the
        one place where an object's time meets this machine's, and it errs towards a read. Tables of
        ours are replaced in one commit each; anything else under their names stays an
        error unless `replace` (`rebuild-users --replace`) deletes it first."""
        for table in (self.photos, self.users):
            try:
                table.open()
            except TableError:
                if not replace:
                    raise
                log.warning("removing %s to rebuild it", table.url)
                with_retries(lambda t=table: self.store.fs.rm(self.store.path(t.key), recursive=True),
                             f"removing {table.url}")
        erased = self.erased.open()
        history = history_dataset(self.store)
        with duckdb_session() as con:
            _register(con, "listing", listing)
            con.register("history", history if history is not None else _empty_history())
            self.erased.view(con, "erased", erased)
            state = con.arrow(f"""
                WITH latest AS (
                    SELECT *, first_value(run_id) OVER (PARTITION BY photo_key ORDER BY scored_at, run_id)
                              AS first_seen_run
                    FROM history
                    QUALIFY row_number() OVER (PARTITION BY photo_key ORDER BY scored_at DESC, run_id DESC) = 1)
                SELECT h.photo_key, h.user_id,
                       CASE WHEN l.modified > h.scored_at THEN NULL ELSE l.size END AS size,
                       l.modified AS uploaded_at, h.photo_sha256, h.status,
                       h.reject_reason, h.gender, h.p_male, h.confidence, h.model_name, h.model_version,
                       h.scored_at AS answered_at, h.scored_at AS checked_at, h.run_id, h.first_seen_run,
                       h.age_years, h.age_band, h.age_confidence, CAST(h.dt AS DATE) AS answered_on
                FROM latest h JOIN listing l ON l.key = h.photo_key
                WHERE NOT EXISTS (SELECT 1 FROM erased e WHERE e.user_id = h.user_id
                                  AND {erased_photo_sql('l')})""").cast(PHOTOS_SCHEMA)
            users = answers(con, state)
        mode = "overwrite"
        self.photos.create(state, seq=seq, mode=mode)
        self.users.create(users, seq=seq, mode=mode)
        for marker in self._pending():  # everything published is in the rebuilt tables
            self.end(marker["seq"], marker["run_id"])
        log.info("rebuilt %s (%d photos) and %s (%d users) from the history", self.photos.url, state.num_rows,
                 self.users.url, users.num_rows)
        return state.num_rows, users.num_rows


def _user_counts(con, model: str) -> tuple[int, int]:
    if not model:  # the run's model is not known: nobody counts as behind
        return con.rows("SELECT count(*) FROM users")[0][0], 0
    name, version = model_ref(model)
    return tuple(con.rows("SELECT count(*), count(*) FILTER (WHERE model_name IS DISTINCT FROM $1 "
                          "OR model_version IS DISTINCT FROM $2) FROM users", [name, version])[0])


def _after(con, before: pa.Table, changes: pa.Table) -> pa.Table:
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


def _behind(users: pa.Table, model: str) -> int:
    """How many of `users` are answered by another model than `model` (none when unknown)."""
    if not model or not users.num_rows:
        return 0
    name, version = model_ref(model)
    same = pc.and_(pc.equal(users["model_name"], name), pc.equal(users["model_version"], version))
    return users.num_rows - int(pc.sum(pc.cast(pc.fill_null(same, False), pa.int64())).as_py() or 0)


def _count(to_read: pa.Table, why: str) -> int:
    return int(pc.sum(pc.cast(pc.equal(to_read["why"], why), pa.int64())).as_py() or 0)


def _user_of(keys: pa.ChunkedArray | pa.Array) -> pa.Array:
    """The first path segment of each key (the user id of a valid key)."""
    return pc.list_element(pc.split_pattern(keys, "/", max_splits=1), 0)


def _empty_history() -> pa.Table:
    return PREDICTIONS_SCHEMA.append(pa.field("dt", pa.string())).empty_table()


def history_dataset(store: Store) -> ds.Dataset | None:
    """The published history as one Arrow dataset (with `dt`), or None when there is none."""
    files = published_files(store)
    if not files:
        return None
    return ds.dataset([store.path(k) for k in files], filesystem=store.fs, format="parquet",
                      schema=PREDICTIONS_SCHEMA.append(pa.field("dt", pa.string())),
                      partitioning=ds.partitioning(pa.schema([("dt", pa.string())]), flavor="hive"),
                      partition_base_dir=store.path(DATASET))


def read_history_files(store: Store, keys: list[str]) -> pa.Table:
    """Rows of some history files, with their `dt`."""
    tables = []
    for key in keys:
        table = conform(pq.read_table(io.BytesIO(store.read(key))))
        day = re.search(r"dt=(\d{4}-\d{2}-\d{2})", key).group(1)
        tables.append(table.append_column("dt", pa.array([day] * table.num_rows, pa.string())))
    return pa.concat_tables(tables) if tables else _empty_history()


def rows_table(rows: list[PhotoResult], scoring_date: date) -> pa.Table:
    from gender_pipeline.lake.history import to_table

    table = to_table(rows)
    return table.append_column("dt", pa.array([scoring_date.isoformat()] * table.num_rows, pa.string()))


def _rows_where(con, relation: str, column: str, values, columns: list[str]) -> pa.Table:
    """The rows of `relation` whose `column` is in `values` (one columnar scan)."""
    con.register("_wanted", pa.table({"value": pa.array(values, pa.string()) if not isinstance(
        values, (pa.Array, pa.ChunkedArray)) else values}))
    try:
        return con.arrow(f"SELECT {', '.join(columns)} FROM {relation} WHERE {column} IN (SELECT value FROM _wanted)")
    finally:
        con.unregister("_wanted")


def _state_rows(count: int, **columns) -> pa.Table:
    data = {name: columns.get(name, pa.nulls(count, f.type)) for name, f in zip(PHOTOS_SCHEMA.names, PHOTOS_SCHEMA)}
    return pa.table(data).cast(PHOTOS_SCHEMA.set(0, pa.field("photo_key", pa.string())))


def _user_rows(count: int, **columns) -> pa.Table:
    schema = USERS.schema
    data = {name: columns.get(name, pa.nulls(count, f.type)) for name, f in zip(schema.names, schema)}
    return pa.table(data).cast(schema.set(0, pa.field("user_id", pa.string())))


def _with_op(table: pa.Table, op: str) -> pa.Table:
    table = pa.table({name: table[name] for name in table.column_names})
    schema = pa.schema([pa.field(f.name, f.type) for f in table.schema])  # nullable for the concat
    return table.cast(schema).append_column(OP, pa.array([op] * table.num_rows, pa.string()))


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
    seconds: float = 0.0


def erase_from_history(store: Store, user_ids: list[str], workers: int = 16) -> tuple[int, int, int, int, set[str]]:
    """Remove the rows of `user_ids` from every history file in one pass: each file's
    user_id column is read (concurrently), and only files that hold one of them are
    rewritten (atomically) or deleted. Returns (rows removed, files read, rewritten,
    deleted, the ids found)."""
    from concurrent.futures import ThreadPoolExecutor

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


def erase(state: OutputState, user_ids: list[str], erased_at: datetime, source: Store) -> Erasure:
    """Erase users in one pass: a tombstone each first, then their rows out of every
    history file, the photo state and the users table, then VACUUM of the tables that
    changed, so that the rewritten files are gone from storage, not only from the current
    version.

    The tombstone records the photos each user has in `source` now, as the source lists
    them (key, size, time): later runs never read a photo still listed so, whatever its
    time says; a photo uploaded (or overwritten) after this is scored."""
    import time

    started = time.perf_counter()
    ids = sorted(set(user_ids))
    if not ids:
        raise ValueError("no user id to erase")
    report = Erasure(users=len(ids), erased_at=erased_at)
    id_table = pa.table({"user_id": pa.array(ids, pa.string())})
    photos = state.photos.open()
    with duckdb_session() as con:  # what the photo state knows of them (a rebuilt history may lack them)
        state.photos.view(con, "state", photos)
        known = set(_rows_where(con, "state", "user_id", id_table["user_id"], ["user_id"])["user_id"].to_pylist())
    listed = _objects_under(source, ids)
    report.source_keys = [o.key for o in listed]
    state.erased.open_or_create()
    state.erased.append(_tombstones(ids, listed, erased_at), None)
    report.rows_removed, report.files_read, report.files_rewritten, report.files_deleted, found = \
        erase_from_history(state.store, ids)
    found |= known | {o.key.split("/", 1)[0] for o in listed}
    state.scrub_pending(ids)
    for table, attr in ((state.photos, "photos_removed"), (state.users, "users_removed")):
        if table.open() is None:
            continue
        metrics = table.delete_matching(id_table, "user_id")
        deleted = int(metrics.get("num_target_rows_deleted", 0))
        setattr(report, attr, deleted)
        if deleted:  # nothing deleted: no file to vacuum
            report.vacuumed += len(table.vacuum())
    report.unmatched = [u for u in ids if u not in found]
    report.seconds = time.perf_counter() - started
    return report


def _tombstones(ids: list[str], listed: list[ObjectInfo], erased_at: datetime) -> pa.Table:
    """One row per listed photo of each user (listed under `{user_id}/`), and one without
    a key for a user with none."""
    rows = [(o.key.split("/", 1)[0], o.key, o.size, o.modified) for o in listed]
    with_photos = {user for user, *_ in rows}
    rows += [(user, None, None, None) for user in ids if user not in with_photos]
    users, keys, sizes, times = (list(column) for column in zip(*rows)) if rows else ([], [], [], [])
    count = len(users)
    return pa.table({"user_id": pa.array(users, pa.string()),
                     "erased_at": pa.array([erased_at] * count, TIMESTAMP),
                     "source_listed": pa.array([True] * count, pa.bool_()),
                     "photo_key": pa.array(keys, pa.string()), "size": pa.array(sizes, pa.int64()),
                     "uploaded_at": pa.array(times, TIMESTAMP)})


def _objects_under(source: Store, user_ids: list[str]) -> list[ObjectInfo]:
    """The objects under `{source}/{user_id}/` for each user (listed concurrently)."""
    from concurrent.futures import ThreadPoolExecutor

    def under(user: str) -> list[ObjectInfo]:
        try:
            return source.list_objects(user)
        except FileNotFoundError:
            return []

    with ThreadPoolExecutor(max_workers=16) as pool:
        return sorted((o for found in pool.map(under, user_ids) for o in found), key=lambda o: o.key)


def output_status(state: OutputState) -> dict:
    """The history (files, rows, reject and `unknown` rates per day, reasons, models) and
    the users table (users, genders, models), in columns: nothing per row in Python."""
    store = state.store
    history = history_dataset(store)
    with duckdb_session() as con:
        con.register("history", history if history is not None else _empty_history())
        days = con.rows("""SELECT dt, count(*) AS rows,
                                 round(avg(CASE WHEN status = 'rejected' THEN 1 ELSE 0 END), 4) AS reject_rate,
                                 round(avg(CASE WHEN gender = 'unknown' THEN 1 ELSE 0 END), 4) AS unknown_rate
                          FROM history GROUP BY dt ORDER BY dt""")
        reasons = con.rows("SELECT reject_reason, count(*) FROM history WHERE reject_reason IS NOT NULL "
                           "GROUP BY ALL ORDER BY 2 DESC, 1")
        models = con.rows("SELECT model_name || '@' || model_version, count(*) FROM history "
                          "WHERE model_name IS NOT NULL GROUP BY ALL ORDER BY 1")
        users_table = state.users.open()
        state.users.view(con, "users", users_table)
        genders = dict(con.rows("SELECT gender, count(*) FROM users GROUP BY ALL"))
        by_model = con.rows("SELECT model_name || '@' || model_version, count(*) FROM users GROUP BY ALL "
                            "ORDER BY 2 DESC, 1")
        bands = dict(con.rows("SELECT age_band, count(*) FROM users WHERE age_band IS NOT NULL GROUP BY ALL"))
        total = sum(n for _, n in by_model)
    from gender_pipeline.lake.runs import ERASURES, recent_runs

    return {
        "output": store.url,
        "runs": recent_runs(store, 10),
        "erasures": recent_runs(store, 100, ERASURES),
        "files": len(published_files(store)),
        "rows": sum(d[1] for d in days),
        "partitions": [{"dt": str(dt), "rows": n, "reject_rate": float(r), "unknown_rate": float(u)}
                       for dt, n, r, u in days],
        "reject_reasons": {str(k): int(v) for k, v in reasons},
        "models": [{"model": m, "rows": int(n)} for m, n in models],
        "users": {"table": state.users.url, "exists": users_table is not None, "users": int(total),
                  "genders": {g: int(genders.get(g, 0)) for g in ("female", "male", "unknown")},
                  "age_bands": in_band_order(bands),
                  "models": [{"model": m, "users": int(n), "share": round(n / total, 4)} for m, n in by_model]},
    }
