"""An output's tables as one object: the photo state, the users table, the tombstones and
the pending runs beside the history (`predictions/`, the audit log).

A night: list the source, catch up what a killed run left, plan (lake.photo_state: join
the listing with the state, only the photos to read become Python objects), score them,
publish their history rows, then one MERGE into `_state/photos` and one into `users`,
each pruned to the partitions the night touches and marked with the run's sequence
number, so that a commit that happened is never applied twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime

import pyarrow as pa
import pyarrow.compute as pc

from gender_pipeline.lake.history import published_files, read_history_files
from gender_pipeline.lake.keys import folders
from gender_pipeline.lake.listing import key_sample
from gender_pipeline.lake.lock import acquire
from gender_pipeline.lake.pending import PendingRuns
from gender_pipeline.lake.photo_state import (NightPlan, PHOTOS, PHOTOS_SCHEMA, REFRESH_BUDGET, SourceListing,
                                              after_night, changed_photos, key_shapes, listing_counts, night_changes,
                                              photos_to_read, refresh_photos, register_listing, rows_where, with_op)
from gender_pipeline.lake.rebuild import rebuild_tables
from gender_pipeline.lake.sql import duckdb_session
from gender_pipeline.lake.storage import Store
from gender_pipeline.lake.tables import APP_ID, RETENTION_HOURS, Table
from gender_pipeline.lake.tombstones import ERASED
from gender_pipeline.lake.users import USERS, answers, behind, user_counts, user_rows
from gender_pipeline.runtime.timing import timed

log = logging.getLogger(__name__)


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
    # The users table's versions the night wrote: its change data feed from `users_version_from` + 1
    # to `users_version_to` is what the night changed (None: it wrote none).
    users_version_from: int | None = None
    users_version_to: int | None = None


@dataclass
class NightRows:
    """What a night (or a run caught up later) brings to the tables."""

    rows: pa.Table  # its history rows, with `dt`
    objects: object  # the listing they were read under (size and upload time of each answered photo)
    checked_at: datetime | None = None  # when the night read its photos
    touched: pa.Table | None = None  # photos read again with the same bytes: key, size, modified
    removed: pa.Table | None = None  # photos gone from the source: photo_key, user_id
    partitions: pa.Table | None = None  # where the known keys sit (prunes the MERGE); looked up when None
    model: str = ""  # NAME@VERSION the night answered with


def _never() -> None:
    """A `before_commit` that lets every commit through."""


class OutputState:
    """The tables beside an output's history (see the module's docstring)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.photos = Table(store, "_state/photos", PHOTOS)
        self.users = Table(store, "users", USERS)
        self.erased = Table(store, "_state/erased", ERASED)
        self.pending = PendingRuns(store)

    def next_seq(self, photos, users) -> int:
        """This run's number in the output's commits: after every commit and pending run."""
        seen = [t.transaction_version(APP_ID) for t in (photos, users) if t is not None]
        seen += [m["seq"] for m in self.pending.markers()]
        return max([s for s in seen if s is not None], default=0) + 1

    def begin(self, plan: NightPlan, run_id: str, scoring_date: date) -> None:
        """Before the night publishes anything: its marker, with the listing it reads under."""
        self.pending.begin(plan.seq, run_id, scoring_date,
                           read=plan.to_read.select(["key", "size", "modified", "first_seen_run"]),
                           gone=plan.removed.select(["photo_key"]).rename_columns(["key"]))

    def history_exists(self) -> bool:
        return bool(published_files(self.store))

    # -- catching up and planning -----------------------------------------------------------

    def catch_up(self, objects) -> list[str]:
        """Finish what runs that died left (in run order): a run that committed the photo
        state but not the users table has its users' rows computed again; otherwise its
        published history rows are applied, with the listing it read them under
        (`objects`, the night's listing, for markers that kept none). What it had not
        committed besides (photos gone, the same bytes seen again) tonight's plan finds
        again. Returns the ids of the runs whose published rows or users were applied."""
        done = []
        for marker in self.pending.markers():
            seq, run_id = marker["seq"], marker["run_id"]
            rows = read_history_files(self.store, self.pending.run_files(run_id, marker["scoring_date"]))
            listed = self.pending.listing(marker)
            photos, users = self.photos.open(), self.users.open()
            if (listed is not None and photos is not None and self.photos.applied(photos, seq)
                    and not self.users.applied(users, seq)):
                ids = folders(pa.concat_arrays([listed["key"].combine_chunks(), rows["photo_key"].combine_chunks()]))
                log.warning("bringing the users of run %s up to date: it stopped between its two commits", run_id)
                self._update_users(pa.array(sorted({u for u in ids.to_pylist() if u}), pa.string()), seq, Applied())
                done.append(run_id)
            elif rows.num_rows:
                log.warning("applying %d published rows of run %s, which stopped before updating the users "
                            "table", rows.num_rows, run_id)
                self.apply(NightRows(rows, objects if listed is None else listed.filter(pc.invert(listed["removed"]))),
                           seq)
                done.append(run_id)
            self.pending.end(seq, run_id)
        return done

    def plan(self, listing, model: str, refresh_budget: int = REFRESH_BUDGET) -> NightPlan:
        """Catch up, (re)build what is missing, and join the listing with the state.

        `listing` is a SourceListing (or an Arrow table or dataset): the photos of its
        opted-out users are left out. The photos to read are the new ones, the changed
        ones, the ones whose last read failed (`read_error`), and up to `refresh_budget`
        photos that back an answer from another model than `model`, oldest answers first.
        Photos that were in the source when their user was erased are never read again
        (lake.photo_state has the rules)."""
        if not isinstance(listing, SourceListing):
            listing = SourceListing(listing)
        photos, users = self.photos.open(), self.users.open()
        rebuilt = False
        if photos is None and self.history_exists():
            log.warning("%s is missing: rebuilding it and %s from the history", self.photos.url, self.users.url)
            self.rebuild(listing, seq=self.next_seq(None, users))
            photos, users, rebuilt = self.photos.open(), self.users.open(), True
        caught_up = self.catch_up(listing)
        if caught_up:
            photos, users = self.photos.open(), self.users.open()
        plan = NightPlan(seq=self.next_seq(photos, users), model=model, to_read=pa.table({}), removed=pa.table({}),
                         refresh_budget=refresh_budget, caught_up=caught_up, rebuilt=rebuilt)
        with duckdb_session() as con:
            register_listing(con, "listing", listing)
            self.photos.view(con, "state", photos)
            self.erased.view(con, "erased", self.erased.open())
            plan.listed, plan.excluded = listing_counts(con, bool(listing.excluded))
            plan.bad_keys, plan.one_user = key_shapes(con, plan.listed)
            plan.erased_skipped = changed_photos(con)
            plan.to_read, plan.removed = photos_to_read(con)
            if users is not None:
                self.users.view(con, "users", users)
                plan.users, plan.behind = user_counts(con, model)
                if plan.behind and refresh_budget:
                    refresh = refresh_photos(con, model, refresh_budget)
                    plan.to_read = pa.concat_tables([plan.to_read, refresh.cast(plan.to_read.schema)])
        plan.unchanged = plan.listed - plan.excluded - plan.new - plan.erased_skipped
        return plan

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

    def user_counts(self, model: str) -> tuple[int, int]:
        """(users with an answer, those answered by another model than `model`)."""
        with duckdb_session() as con:
            self.users.view(con, "users", self.users.open())
            return user_counts(con, model)

    # -- applying a night -------------------------------------------------------------------

    def apply_night(self, plan: NightPlan, rows: pa.Table, same_content: list[str], listed_at: datetime,
                    run_id: str, before_commit: Callable[[], None] = _never) -> Applied:
        """After a night's history rows (`rows`, with `dt`) are published: its answers, the
        photos read again with the same bytes (`same_content`) and the photos gone from the
        source, applied to both tables; then the run's marker goes."""
        touched = plan.to_read.filter(pc.is_in(plan.to_read["key"], pa.array(sorted(set(same_content)), pa.string())))
        applied = self.apply(NightRows(rows, plan.to_read, listed_at, touched.select(["key", "size", "modified"]),
                                       plan.removed, plan.partitions(), plan.model), plan.seq, before_commit)
        self.pending.end(plan.seq, run_id)
        return applied

    def apply(self, night: NightRows, seq: int, before_commit: Callable[[], None] = _never,
              timings: dict | None = None) -> Applied:
        """Apply a night to `_state/photos` and `users` (see NightRows); answered photos no
        longer in its listing are not kept. `before_commit` runs before each of the two
        commits (it raises to stop); `timings` (when given) adds the seconds of the photo
        state's and the users table's updates.

        The touched users' photos are read from the state once, before its MERGE: their
        users' rows before and after the night follow from the rule, when the users table
        is in step with the state (both last committed by the same run). Otherwise (a run
        that died between the two commits) the users' rows are read from both tables."""
        report = Applied()
        photos_table, users_table = self.photos.open_or_create(), self.users.open_or_create()
        report.users_version_from = users_table.version()
        in_step = (not self.photos.applied(photos_table, seq)
                   and photos_table.transaction_version(APP_ID) == users_table.transaction_version(APP_ID))
        with duckdb_session() as con, timed(timings, "photo_state"):
            changes, upserts = night_changes(con, night.rows, night.objects, night.checked_at, night.touched,
                                             night.removed)
            report.photos_upserted = upserts.num_rows
            report.photos_removed = night.removed.num_rows if night.removed is not None else 0
            if not changes.num_rows:
                return report
            user_ids = pa.array(sorted({u for u in changes["user_id"].to_pylist() if u is not None}), pa.string())
            before = after = None
            if in_step and len(user_ids):
                self.photos.view(con, "state", photos_table)
                before = rows_where(con, "state", "user_id", user_ids, PHOTOS_SCHEMA.names)
                after = after_night(con, before, changes)
            self._merge_photos(con, changes, upserts, night.partitions, photos_table, seq, report, before_commit)
        with timed(timings, "users_table"):
            if not len(user_ids):
                return report
            if self.users.applied(self.users.open(), seq):
                report.skipped = True
            elif before is None:
                self._update_users(user_ids, seq, report, before_commit, night.model)
            else:
                with duckdb_session() as con:
                    existing, rows_now = answers(con, before), answers(con, after)
                self._merge_users(existing, rows_now, seq, report, before_commit, night.model)
        return report

    def _merge_photos(self, con, changes: pa.Table, upserts: pa.Table, partitions: pa.Table | None, photos_table,
                      seq: int, report: Applied, before_commit: Callable[[], None]) -> None:
        """One MERGE of the night's changes into the photo state, pruned to the partitions
        its known keys sit in (an append when every key is new)."""
        if partitions is None:
            self.photos.view(con, "state", photos_table)
            partitions = rows_where(con, "state", "photo_key", changes["photo_key"], ["photo_key", "answered_on"])
        old = sorted({str(d) for d in partitions["answered_on"].to_pylist() if d is not None})
        if self.photos.applied(photos_table, seq):
            report.skipped = True
            return
        before_commit()
        if old:
            self.photos.merge(changes, "photo_key", old, seq)
        else:  # only new keys: nothing to match
            self.photos.append(upserts, seq)

    def _update_users(self, user_ids: pa.Array, seq: int, report: Applied,
                      before_commit: Callable[[], None] = _never, model: str = "") -> None:
        """The users' rows computed again from the photo state as it is, in one MERGE."""
        with duckdb_session() as con:
            self.photos.view(con, "state", self.photos.open())
            self.users.view(con, "users", self.users.open())
            rows_now = answers(con, rows_where(con, "state", "user_id", user_ids, PHOTOS_SCHEMA.names))
            existing = rows_where(con, "users", "user_id", user_ids,
                                  ["user_id", "answered_on", "model_name", "model_version"])
        self._merge_users(existing, rows_now, seq, report, before_commit, model)

    def _merge_users(self, existing: pa.Table, rows: pa.Table, seq: int, report: Applied,
                     before_commit: Callable[[], None], model: str) -> None:
        """One MERGE of the users' rows `rows` over their `existing` ones (in the partitions
        those sit in); users that have no row any more are deleted."""
        report.users_added = rows.num_rows - existing.num_rows
        report.behind_added = behind(rows, model) - behind(existing, model)
        gone = pc.filter(existing["user_id"], pc.invert(pc.is_in(existing["user_id"], rows["user_id"])))
        source = pa.concat_tables([with_op(rows, "upsert"), with_op(user_rows(len(gone), user_id=gone), "delete")])
        old = sorted({str(d) for d in existing["answered_on"].to_pylist() if d is not None})
        if old or rows.num_rows:
            before_commit()
        if old:
            self.users.merge(source, "user_id", old, seq)
        elif rows.num_rows:
            self.users.append(rows, seq)
        if old or rows.num_rows:
            report.users_version_to = self.users.version()
        report.users_upserted, report.users_removed = rows.num_rows, len(gone)

    # -- rebuilding and upkeep ----------------------------------------------------------------

    def rebuild(self, listing, seq: int, replace: bool = False) -> tuple[int, int]:
        """`_state/photos` and `users` from the history (lake.rebuild); every pending run's
        marker goes (what it published is in the rebuilt tables). Returns (photos, users)."""
        counts = rebuild_tables(self, listing, seq, replace)
        for marker in self.pending.markers():
            self.pending.end(marker["seq"], marker["run_id"])
        return counts

    def compact(self, retention_hours: int = RETENTION_HOURS) -> dict:
        """Compact the tables (the weekly upkeep; see flows/maintenance.py)."""
        return {table.key: table.compact(retention_hours) for table in (self.photos, self.users, self.erased)
                if table.open() is not None}


def compact_output(store: Store, owner: str, retention_hours: int, wait_seconds: float) -> dict:
    """The weekly upkeep, holding the output's lock (no night writes meanwhile)."""
    with acquire(store, owner, wait_seconds=wait_seconds):
        return OutputState(store).compact(retention_hours)
