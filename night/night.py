"""A night of nightly-scoring as one object.

    lock the output → plan (list the source, join it with the state) → check the listing →
    score the shards (read, decode, find faces, classify, check, publish) → update the users
    table (two MERGEs) → report (the summary, the run's record, the trend)

Each step is a method; the Prefect tasks in tasks/night_tasks.py are thin wrappers around
them (names, retries, artifacts). The night keeps its context (lake.night.context) and
what it has learnt so far, so that a failed or stopped night reports itself from the same
object: the stage it was in, what it had listed, which files it had published.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from gender_pipeline.lake.history import to_table
from gender_pipeline.lake.listing import list_source
from gender_pipeline.lake.lock import Lease, LeaseGuard, acquire
from gender_pipeline.lake.output import Applied, OutputState
from gender_pipeline.lake.photo_state import NightPlan, SourceListing
from gender_pipeline.lake.runs import ERASURES, recent_runs
from gender_pipeline.lake.storage import ObjectInfo, StorageError
from gender_pipeline.night.context import RunContext
from gender_pipeline.night.guards import check_listing, key_shape_warnings
from gender_pipeline.night.options import NightOptions
from gender_pipeline.night.shards import Shard, ShardResult, split
from gender_pipeline.runtime.stopping import STOP, Stop

log = logging.getLogger(__name__)


@dataclass
class NightListing:
    """The objects this night must read, what the output already answered, and what the
    source and the output's last runs looked like."""

    objects: list[ObjectInfo]
    known_hashes: dict[str, set[str]]
    skipped_unchanged: int
    listed: int = 0  # objects under the source
    warnings: list[str] = field(default_factory=list)
    recent_runs: list[dict] = field(default_factory=list)  # the output's last runs, oldest first
    plan: NightPlan | None = None  # the night's plan against the output's state
    waiting: int = 0  # new photos left for the next run by max_photos
    erasures: list[dict] = field(default_factory=list)  # `forget` calls since the last run


@dataclass
class UsersUpdate:
    """What the night did to the users table, and how far it is from the run's model."""

    applied: Applied
    users: int  # users with an answer after the night
    behind: int  # of them, answered by another model than the run's
    model: str
    refresh_budget: int
    seconds: float = 0.0

    @property
    def nights_left(self) -> int | None:
        """Nights until every user is answered by the run's model at this budget."""
        if not self.behind:
            return 0
        return -(-self.behind // self.refresh_budget) if self.refresh_budget else None


class Night:
    """One night of one output (see the module's docstring)."""

    def __init__(self, options: NightOptions, run_id: str, stop: Stop = STOP) -> None:
        self.context = RunContext.start(options, run_id, datetime.now(timezone.utc))
        self.stop = stop
        self.started = time.perf_counter()
        self.stage = "checking the inputs"
        self.excluded: tuple[str, ...] = ()  # the opted-out users, read before anything is written
        self.production: str | None = None  # NAME@VERSION production pointed at when the night began
        self.timings: dict[str, float] = {}
        self.lease: Lease | None = None
        self.listing: NightListing | None = None
        self.results: list[ShardResult] = []
        self.state = OutputState(self.context.output)

    @property
    def options(self) -> NightOptions:
        return self.context.options

    @property
    def holds_output(self) -> bool:
        return self.lease is not None

    def seconds(self) -> float:
        return time.perf_counter() - self.started

    # -- the steps ------------------------------------------------------------------------------

    def check_inputs(self) -> None:
        """Before anything is written: the source is there, and the opt-out list reads,
        every id in it one the upload key rule can produce (else the night fails saying
        which line)."""
        options = self.options
        if not self.context.source.exists():
            raise StorageError(f"source {options.where.source} does not exist", transient=False)
        if options.users.exclude_users:
            self.excluded = tuple(self.context.stores.user_ids(options.users.exclude_users))
        self.stage = "taking the output lock"

    def lock(self) -> Lease:
        """One run at a time per output, so two runs never answer the same photo."""
        guards = self.options.guards
        self.lease = acquire(self.context.output, self.context.run_id, guards.lock_lease_seconds,
                             guards.lock_wait_seconds, stop=self.stop)
        self.context = self.context.holding(self.lease.ref())
        return self.lease

    def release(self) -> None:
        """Let go of the output; call only once no shard of this night can write any more."""
        if self.lease is not None:
            self.lease.release()

    def answer_with(self, model: str) -> None:
        """The concrete NAME@VERSION the night answers with (resolved before the lock):
        every shard loads it, so that a long-lived worker that cached the model of an
        earlier night never answers with it after a promotion."""
        self.context = self.context.answering_with(model)

    def plan(self) -> NightListing:
        """List the source, join it with what the output already answered, and check that
        the listing looks like the source's (a wrong prefix fails here instead of looking
        like a quiet night). The photos to read: new, changed, a failed read, and up to
        the refresh budget of photos whose answer comes from another model than the
        night's. When the night has work, a marker says that this run may publish rows
        for its day (the next run applies them if this one dies before the users table)."""
        self.stage = "listing the source"
        context, options = self.context, self.options
        source = context.source
        spec = options.listing_spec()
        # Concurrent S3 listers start at keys spread over what the output already knows.
        boundaries = (self.state.key_sample(2 * (spec.fanout or 16))
                      if spec.kind == "list" and source.protocol in ("s3", "s3a") else None)
        with list_source(source, spec, boundaries, check=self.stop.check) as spool:
            log.info("listed %d objects under %s%s", spool.rows, options.where.source,
                     f" (S3 Inventory report {spec.url})" if spec.kind == "inventory" else "")
            plan = self.state.plan(SourceListing(spool.close().path, self.excluded),
                                   context.model if "@" in context.model else "", options.users.refresh_budget)
        self.listing = self._listing(plan)
        if self.listing.objects or plan.removed.num_rows:
            self.state.begin(plan, context.run_id, context.day)
        return self.listing

    def _listing(self, plan: NightPlan) -> NightListing:
        """What the plan means for tonight: the guards, the warnings, the photo limit."""
        for run in plan.caught_up:
            log.warning("applied the published rows of run %s, which stopped before updating the users table", run)
        log.info("%d unchanged since answered; %d to read%s%s%s", plan.unchanged, plan.new,
                 f"; {plan.excluded} of opted-out users" if plan.excluded else "",
                 f"; {plan.erased_skipped} of erased users" if plan.erased_skipped else "",
                 f"; {plan.removed.num_rows} gone from the source" if plan.removed.num_rows else "")
        output, guards = self.context.output, self.options.guards
        recent = recent_runs(output)
        since = str(recent[-1]["listed_at"]) if recent else ""
        erasures = [r for r in recent_runs(output, 100, ERASURES) if str(r["listed_at"]) > since]
        warnings = check_listing(plan.listed, plan.new, recent, guards.min_new_photos, guards.max_listing_drop)
        warnings += key_shape_warnings(plan.listed, plan.bad_keys, plan.one_user)
        to_read, waiting, limit = plan.objects(), 0, self.options.limits.max_photos
        if limit is not None and plan.new > limit:
            # Oldest uploads first (the plan's order); the rest are new again for the next run.
            waiting = plan.new - limit
            to_read = to_read[:limit] + to_read[plan.new:]
            warnings.append(f"limit of {limit} photos per run: {waiting} left for the next run")
        if plan.refresh:
            log.info("re-scoring %d photos answered by another model than %s (oldest answers first; %d users "
                     "behind, budget %d)", plan.refresh, plan.model, plan.behind, plan.refresh_budget)
        for warning in warnings:
            log.warning(warning)
        return NightListing(to_read, plan.known_hashes(), plan.unchanged, plan.listed, warnings, recent, plan,
                            waiting, erasures)

    def shards(self) -> list[Shard]:
        self.stage = "scoring"
        return split(self.listing.objects, self.listing.known_hashes, self.options.compute.shard_size)

    def update_users(self, results: list[ShardResult]) -> UsersUpdate:
        """After the night's history rows are published: one MERGE into the photo state and
        one into the users table (only the users the night touched), each committed only
        while the run holds the output. A run that dies before this leaves a marker: the
        next run applies the published rows first."""
        self.stage = "updating the users table"
        started = time.perf_counter()
        plan, context = self.listing.plan, self.context
        rows = [row for result in results if result.written for row in result.rows]
        same = sorted({key for result in results for key in result.stats.same_content})
        if not (rows or same or plan.removed.num_rows):
            return UsersUpdate(Applied(), plan.users, plan.behind, plan.model, plan.refresh_budget,
                               time.perf_counter() - started)
        applied = self.state.apply_night(plan, to_table(rows, context.day), same, context.listed_at, context.run_id,
                                         before_commit=LeaseGuard(context.lease, context.output, stop=self.stop))
        # The counts of the plan (taken under the same lock), moved by what this night changed
        # (counted again when an earlier attempt of this step had committed part of it).
        users, behind = (self.state.user_counts(plan.model) if applied.skipped else
                         (plan.users + applied.users_added, plan.behind + applied.behind_added))
        log.info("users table %s: %d users (%d answered or changed tonight, %d removed); %s answers %d of them",
                 self.state.users.url, users, applied.users_upserted, applied.users_removed, plan.model or "?",
                 users - behind)
        return UsersUpdate(applied, users, behind, plan.model, plan.refresh_budget, time.perf_counter() - started)

    def published(self) -> list[str]:
        """The shard files this night has published so far."""
        return [r.written for r in self.results if r.written]
