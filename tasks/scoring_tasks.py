"""Prefect tasks for the scoring flow: thin wrappers (names, retries, logs, artifacts)
around the plain functions in lake.storage, engine.scoring, lake.history."""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field
from datetime import date, datetime
from functools import lru_cache

import pandas as pd
from prefect import get_run_logger, task
from prefect.artifacts import (create_link_artifact, create_markdown_artifact,
                               create_progress_artifact, create_table_artifact,
                               update_progress_artifact)
from prefect.cache_policies import NO_CACHE
from prefect.states import Cancelled

from gender_pipeline.models.registry import ModelRef, Registry, RegistryError
from gender_pipeline.night.checks import ExpectationsFailed, check_photo_metadata, check_predictions
from gender_pipeline.lake.history import PhotoResult, to_table, write_predictions
from gender_pipeline.engine.scoring import ScoringOptions, ScoringStats, merge_stats, score_objects, user_of
from gender_pipeline.lake.lock import Lease, LeaseRef, acquire
from gender_pipeline.tasks.run_control import retry_unless_stopped
from gender_pipeline.runtime.stopping import STOP, StopRequested
from gender_pipeline.lake.listing import ListingSpec, list_source
from gender_pipeline.lake.state import Applied, NightPlan, OutputState, SourceListing, rows_table
from gender_pipeline.lake.storage import ObjectInfo, StorageError, Store, read_lines, retry_if_transient, storage_options
from gender_pipeline.lake.runs import ERASURES, check_listing, completed, key_shape_warnings, recent_runs, record_run
from gender_pipeline.night.report import (alarms, outcome, rejected_rows, render_failure_markdown, render_markdown,
                          summarize)


@dataclass
class Listing:
    """The objects this run must read, what the output already answered, and what the
    source and the output's last runs looked like."""

    objects: list[ObjectInfo]
    known_hashes: dict[str, set[str]]
    skipped_unchanged: int
    listed_at: datetime
    listed: int = 0  # objects under the source
    warnings: list[str] = field(default_factory=list)
    recent_runs: list[dict] = field(default_factory=list)  # the output's last runs, oldest first
    plan: NightPlan | None = None  # the night's plan against the output's state
    waiting: int = 0  # new photos left for the next run by --max-photos
    erasures: list[dict] = field(default_factory=list)  # `forget` calls since the last run


@task(name="lock-output", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_if_transient,
      cache_policy=NO_CACHE)
def lock_output(output: str, endpoint_url: str | None, run_id: str, lease_seconds: float,
                wait_seconds: float) -> Lease:
    """One run at a time per output, so two runs never answer the same photo."""
    lease = acquire(Store(output, storage_options(endpoint_url)), run_id, lease_seconds, wait_seconds)
    get_run_logger().info("holding %s/%s", output, lease.key)
    return lease


@task(name="unlock-output", cache_policy=NO_CACHE)
def unlock_output(lease: Lease) -> None:
    """Let go of the output; the flow calls this only once no shard can write any more."""
    lease.release()
    get_run_logger().info("released %s/%s", lease.store.url, lease.key)


@task(name="list-new-photos", retries=2, retry_delay_seconds=[5, 30],
      retry_condition_fn=retry_if_transient, cache_policy=NO_CACHE)
def list_new_photos(source: str, output: str, endpoint_url: str | None, listed_at: datetime,
                    max_photos: int | None = None, min_new_photos: int = 0,
                    max_listing_drop: float = 0.9, model: str | None = None, refresh_budget: int = 10_000,
                    exclude_users: str | None = None, run_id: str | None = None,
                    scoring_date: date | None = None, listing: str = "list",
                    listing_fanout: int | None = None) -> Listing:
    """List the source, join it with what the output already answered, and check that the
    listing looks like the source's (a wrong prefix fails here instead of looking like a
    quiet night). The photos to read: new, changed, a failed read, and up to
    `refresh_budget` photos whose answer comes from another model than `model`. When the
    night has work, a marker says that run `run_id` may publish rows for `scoring_date`
    (the next run applies them if this one dies before updating the users table)."""
    logger = get_run_logger()
    options = storage_options(endpoint_url)
    source_store, output_store = Store(source, options), Store(output, options)
    if not source_store.exists():
        raise StorageError(f"source {source} does not exist", transient=False)
    spec = ListingSpec.parse(listing, listing_fanout)
    state = OutputState(output_store)
    # Concurrent S3 listers start at keys spread over what the output already knows.
    boundaries = (state.key_sample(2 * (spec.fanout or 16))
                  if spec.kind == "list" and source_store.protocol in ("s3", "s3a") else None)
    excluded = tuple(read_lines(exclude_users, options)) if exclude_users else ()
    with list_source(source_store, spec, boundaries, check=STOP.check) as spool:
        logger.info("listed %d objects under %s%s", spool.rows, source,
                    f" (S3 Inventory report {spec.url})" if spec.kind == "inventory" else "")
        plan = state.plan(SourceListing(spool.close().path, excluded), model if model and "@" in model else "",
                          refresh_budget)
    for run in plan.caught_up:
        logger.warning("applied the published rows of run %s, which stopped before updating the users table", run)
    new = plan.to_read.num_rows - plan.refresh
    logger.info("%d unchanged since answered; %d to read%s%s%s", plan.unchanged, new, f"; {plan.excluded} of opted-out users" if plan.excluded else "",
                f"; {plan.erased_skipped} of erased users" if plan.erased_skipped else "",
                f"; {plan.removed.num_rows} gone from the source" if plan.removed.num_rows else "")
    recent = recent_runs(output_store)
    since = str(recent[-1]["listed_at"]) if recent else ""
    erasures = [r for r in recent_runs(output_store, 100, ERASURES) if str(r["listed_at"]) > since]
    warnings = check_listing(plan.listed, new, recent, min_new_photos, max_listing_drop)
    warnings += key_shape_warnings(plan.listed, plan.bad_keys, plan.one_user)
    to_read = plan.objects()
    waiting = 0
    if max_photos is not None and new > max_photos:
        # Oldest uploads first (the plan's order); the rest are new again for the next run.
        waiting = new - max_photos
        to_read = to_read[:max_photos] + to_read[new:]
        warnings.append(f"limit of {max_photos} photos per run: {waiting} left for the next run")
    if plan.refresh:
        logger.info("re-scoring %d photos answered by another model than %s (oldest answers first; %d users "
                    "behind, budget %d)", plan.refresh, plan.model, plan.behind, refresh_budget)
    for warning in warnings:
        logger.warning(warning)
    if run_id and (to_read or plan.removed.num_rows):
        OutputState(output_store).begin(plan.seq, run_id, scoring_date or listed_at.date(), plan)
    return Listing(to_read, plan.known_hashes(), plan.unchanged, listed_at, plan.listed, warnings, recent, plan,
                   waiting, erasures)


@task(name="check-photo-metadata", cache_policy=NO_CACHE)
def check_photo_metadata_task(listing: Listing) -> dict | None:
    """Before inference: the photos to read have unique, contained keys and sane sizes.
    Returns the suite's verdict (None when there is nothing to read)."""
    if not listing.objects:
        get_run_logger().info("nothing to read: no listing to check")
        return None
    readable = [o for o in listing.objects if user_of(o.key) is not None]
    frame = pd.DataFrame({"photo_key": [o.key for o in readable],
                          "size_bytes": [o.size for o in readable]})
    report = check_photo_metadata(frame)
    get_run_logger().info(report.text())
    if not report.success:
        raise ExpectationsFailed(report)
    return report.as_dict()


@dataclass
class Shard:
    """A slice of the listing, scored and published as one unit (one Parquet file)."""

    index: int
    objects: list[ObjectInfo]
    known_hashes: dict[str, set[str]]
    listed_at: datetime


@dataclass
class ShardResult:
    rows: list[PhotoResult]
    stats: ScoringStats
    written: str | None
    suite_seconds: float = 0.0  # the predictions suite
    publish_seconds: float = 0.0
    suite: dict | None = None  # the predictions suite's verdict


def split_listing(listing: Listing, shard_size: int) -> list[Shard]:
    if shard_size < 1:
        raise ValueError(f"shard size must be at least 1, got {shard_size}")
    objects = listing.objects
    return [Shard(i // shard_size, objects[i:i + shard_size],
                  {o.key: listing.known_hashes[o.key] for o in objects[i:i + shard_size]
                   if o.key in listing.known_hashes}, listing.listed_at)
            for i in range(0, len(objects), shard_size)]


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


@task(name="update-users-table", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_if_transient,
      cache_policy=NO_CACHE)
def update_users_table(output: str, endpoint_url: str | None, listing: Listing, results: list[ShardResult],
                       run_id: str, scoring_date: date, lease: LeaseRef | None = None) -> UsersUpdate:
    """After the night's history rows are published: one MERGE into the photo state and one
    into the users table (only the users the night touched), each committed only while the
    run holds the output. A run that dies before this leaves a marker: the next run applies
    the published rows first."""
    started = time.perf_counter()
    logger = get_run_logger()
    store = Store(output, storage_options(endpoint_url))
    plan = listing.plan
    rows = [row for result in results if result.written for row in result.rows]
    same = sorted({key for result in results for key in result.stats.same_content})

    def still_ours() -> None:
        STOP.check()
        if lease is not None:
            lease.check(store)

    state = OutputState(store)
    if not (rows or same or plan.removed.num_rows):
        return UsersUpdate(Applied(), plan.users, plan.behind, plan.model, plan.refresh_budget,
                           time.perf_counter() - started)
    applied = state.apply_night(plan, rows_table(rows, scoring_date), same, listing.listed_at, run_id,
                                before_commit=still_ours)
    # The counts of the plan (taken under the same lock), moved by what this night changed
    # (counted again when an earlier attempt of this step had committed part of it).
    users, behind = (state.user_counts(plan.model) if applied.skipped else
                     (plan.users + applied.users_added, plan.behind + applied.behind_added))
    update = UsersUpdate(applied, users, behind, plan.model, plan.refresh_budget, time.perf_counter() - started)
    logger.info("users table %s: %d users (%d answered or changed tonight, %d removed); %s answers %d of them",
                state.users.url, users, applied.users_upserted, applied.users_removed, plan.model or "?",
                users - behind)
    return update


@lru_cache(maxsize=4)
def _predictor(registry: str | None, endpoint_url: str | None, model: str, device: str,
               abstain_threshold: float | None, compile: bool):
    """One model per process (a Dask worker keeps it between shards). It must answer gender
    (dlib's age predictor, say, is in the registry to be evaluated, not to score)."""
    predictor = Registry(registry, storage_options(endpoint_url)).load_predictor(
        ModelRef.parse(model), device=device, abstain_threshold=abstain_threshold, compile=compile)
    if "gender" not in predictor.attributes:
        raise RegistryError(f"{model} answers {', '.join(predictor.attributes)} only; the nightly scoring needs a "
                            f"model that answers gender")
    return predictor


def run_checkpoint(lease: LeaseRef | None, output: Store, every: float = 2.0):
    """What a shard calls between photos: raise when this process was asked to stop, and,
    every `every` seconds, when the run's lease says stop or is not ours any more (the
    way a shard on another machine learns that its run is stopping)."""
    last = [time.monotonic()]

    def checkpoint() -> None:
        STOP.check()
        if lease is not None and time.monotonic() - last[0] >= every:
            last[0] = time.monotonic()
            lease.check(output)

    return checkpoint


@task(name="score-shard", retries=1, retry_delay_seconds=10, retry_condition_fn=retry_unless_stopped,
      cache_policy=NO_CACHE)
def score_shard(shard: Shard, source: str, output: str, endpoint_url: str | None, registry: str | None,
                model: str, device: str, options: ScoringOptions, run_id: str, scoring_date: date,
                compile: bool = False, lease: LeaseRef | None = None) -> ShardResult | Cancelled:
    """Score one shard, check its rows, publish them as one file. A retry redoes this shard
    only; the photos of shards already published are not in a rerun's listing. The file
    is moved into place only if the run was not asked to stop and still holds `lease`."""
    logger = get_run_logger()
    try:
        output_store = Store(output, storage_options(endpoint_url))
        checkpoint = run_checkpoint(lease, output_store)
        checkpoint()
        predictor = _predictor(registry, endpoint_url, model, device, options.abstain_threshold, compile)
        total = len(shard.objects)
        logger.info("shard %d: %d photos; model %s@%s on %s, batch size %d, framing %s", shard.index, total,
                    predictor.name, predictor.version, predictor.device,
                    options.batch_size or predictor.auto_batch_size(), predictor.framing.to_dict())
        # A progress bar while the shard runs; removed when it ends (the summary says the rest).
        artifact = create_progress_artifact(0.0, description=f"shard {shard.index} of {output}: photos answered "
                                                             f"out of {total}")
        last = {"t": time.monotonic(), "pct": 0.0}

        def progress(done: int, of: int) -> None:
            pct = 100.0 * done / max(of, 1)
            now = time.monotonic()
            if done == of or now - last["t"] >= 5 or pct - last["pct"] >= 10:
                logger.info("progress: %d/%d photos (%.0f%%)", done, of, pct)
                update_progress_artifact(artifact, pct)
                last.update(t=now, pct=pct)

        rows, stats = score_objects(Store(source, storage_options(endpoint_url)), shard.objects,
                                    shard.known_hashes, predictor, options, run_id, shard.listed_at, progress,
                                    checkpoint=checkpoint)
        logger.info("scored %d, rejected %d, same content skipped %d, %.1f photos/s",
                    stats.scored, stats.rejected, stats.skipped_same_hash, stats.photos_per_second)
        written, suite_seconds, publish_seconds, suite = None, 0.0, 0.0, None
        if rows:
            started = time.perf_counter()
            suite = check_rows(rows, output)
            suite_seconds = time.perf_counter() - started
            logger.info("publishing %d rows", len(rows))

            def still_ours() -> None:
                STOP.check()
                if lease is not None:
                    lease.check(output_store)

            started = time.perf_counter()
            written = write_predictions(output_store, to_table(rows), scoring_date,
                                        f"part-{run_id}-{shard.index:05d}", before_move=still_ours)
            publish_seconds = time.perf_counter() - started
            logger.info("published %d rows to %s", len(rows), written)
        return ShardResult(rows, stats, written, suite_seconds, publish_seconds, suite)
    except StopRequested as error:
        logger.warning("shard %d stopped before publishing: %s", shard.index, error)
        return Cancelled(message=f"stopped before publishing: {error}")
    finally:
        if "artifact" in locals():
            _delete_artifact(artifact)


def _delete_artifact(artifact_id) -> None:
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            client.delete_artifact(artifact_id)
    except Exception as error:  # a leftover progress bar never fails a shard
        get_run_logger().debug("could not remove the progress artifact: %s", error)


def check_rows(rows: list[PhotoResult], output: str) -> dict:
    """Before publishing: keys present, one row per photo, probabilities valid. Returns the
    suite's verdict; a failed suite raises (and leaves its report as an artifact)."""
    report = check_predictions(to_table(rows).to_pandas())
    logger = get_run_logger()
    if not report.success:
        logger.error(report.text())
        create_markdown_artifact("```\n" + report.text() + "\n```", key=artifact_key("predictions-suite", output),
                                 description=f"predictions suite failed for {output}: nothing was published")
        raise ExpectationsFailed(report)
    logger.info(report.text())
    return report.as_dict()


def artifact_key(name: str, output: str) -> str:
    """`name` keyed per output (artifact keys take lowercase letters, digits and dashes), so
    each output's history in the UI reads as one series."""
    tail = re.sub(r"[^a-z0-9]+", "-", output.rstrip("/").rsplit("/", 1)[-1].lower()).strip("-")[:24]
    return f"{name}-{tail or 'output'}-{hashlib.sha256(output.encode()).hexdigest()[:8]}"


def file_link(url: str, how: str, store: Store) -> str | None:
    """A URL a browser can open for a written file, or None: `how` is none, presigned (the
    store signs an https URL, e.g. S3), or an https:// template with {url}, {bucket}, {key}."""
    if how == "none":
        return None
    if how == "presigned":
        try:
            link = store.fs.url(url.split("://", 1)[-1], expires=7 * 24 * 3600)
        except (AttributeError, NotImplementedError, TypeError, ValueError):
            return None
        return link if str(link).startswith("https://") else None
    bucket, _, key = url.split("://", 1)[-1].partition("/")
    return how.format(url=url, bucket=bucket, key=key)


def model_card_summary(registry: str | None, endpoint_url: str | None, model: str) -> dict | None:
    """From the model card: what an operator needs to read the answers."""
    name, _, version = model.partition("@")
    if not version:
        return None
    try:
        card = Registry(registry, storage_options(endpoint_url)).card(name, version)
    except Exception:  # a report must not fail the run
        return None
    data, metrics = card.get("data") or {}, card.get("metrics") or {}
    test = metrics.get("test") or {}
    if data:
        trained_on = (f"{data.get('faces_used', data.get('images'))} faces of a {data.get('format')} dataset "
                      f"(fingerprint {str(data.get('fingerprint', ''))[:12]}…)")
    else:
        trained_on = card.get("source", "?")
    if test.get("accuracy") is not None:
        accuracy = f"{100 * test['accuracy']:.2f}% on {test.get('count')} test faces"
    elif (metrics.get("reported") or {}).get("lfw_accuracy"):
        accuracy = f"{100 * metrics['reported']['lfw_accuracy']:.0f}% on LFW (reported by its authors)"
    else:
        accuracy = None
    age = None
    if "age" in (card.get("attributes") or ()):
        measured = test.get("age") or {}
        age = {"abstain_threshold": float((card.get("age") or {}).get("abstain_threshold", 0.0)),
               "mae": measured.get("mae"), "band_accuracy": measured.get("band_accuracy")}
    return {"kind": f"{card.get('format')} ({card.get('arch')})", "framing": card.get("framing") or {},
            "abstain_threshold": float(card.get("abstain_threshold", 0.5)), "trained_on": trained_on,
            "accuracy": accuracy, "attributes": list(card.get("attributes") or ["gender"]), "age": age}


def _suites(listing_suite: dict | None, results: list[ShardResult]) -> dict:
    rows = [r.suite for r in results if r.suite]
    merged = None
    if rows:
        merged = {"suite": "predictions", "success": all(r["success"] for r in rows),
                  "evaluated": rows[0]["evaluated"], "passed": min(r["passed"] for r in rows),
                  "failures": [f for r in rows for f in r["failures"]], "runs": len(rows)}
    return {"listing_suite_report": listing_suite, "rows_suite_report": merged}


def run_record(summary: dict, listing_at: datetime, source: str, outcome: str, message: str) -> dict:
    """What the output keeps of a run (`_runs/`), for the next runs' trend and guards."""
    genders = summary.get("genders") or {}
    return {"run_id": summary["run_id"], "listed_at": listing_at.isoformat(), "source": source,
            "model": summary.get("model"), "outcome": outcome, "message": message,
            "listed": summary.get("listed"), "new": summary.get("new", 0), "rows": summary.get("rows", 0),
            "scored": summary.get("scored", 0), "rejected": summary.get("rejected", 0),
            "unknown": genders.get("unknown", 0), "female": genders.get("female", 0), "male": genders.get("male", 0),
            "wall_seconds": summary.get("wall_seconds"), "files": summary.get("written") or [],
            "removed": summary.get("removed", 0), "users_left": (summary.get("users") or {}).get("removed", 0)}


def report_run(results: list[ShardResult], listing: Listing, model: str, source: str, output: str,
               scoring_date: date, run_id: str, timings: dict, wall_seconds: float,
               endpoint_url: str | None = None, file_links: str = "none", users: UsersUpdate | None = None,
               registry: str | None = None, listing_suite: dict | None = None) -> dict:
    """The run's summary: artifacts on the flow run itself (called from the flow, not from a
    task), keyed per output, and the run's record beside the dataset for the next runs.
    The summary carries the outcome tag and the one-line message of the final state."""
    rows = [row for result in results for row in result.rows]
    stats = merge_stats([r.stats for r in results])
    timings = {**timings, "predictions_suite": sum(r.suite_seconds for r in results),
               "publish": sum(r.publish_seconds for r in results)}
    summary = summarize(rows, stats, listing.listed, listing.skipped_unchanged)
    previous = listing.recent_runs
    last = next((r["listed_at"] for r in reversed(previous) if completed(r)), None)
    summary.update(model=model, written=[r.written for r in results if r.written], shards=len(results),
                   warnings=list(listing.warnings), last_run_at=str(last) if last else None, run_id=run_id,
                   scoring_date=scoring_date.isoformat(), timings={k: round(v, 3) for k, v in timings.items()},
                   wall_seconds=round(wall_seconds, 3), model_card=model_card_summary(registry, endpoint_url, model),
                   **_suites(listing_suite, results))
    plan = listing.plan
    if plan is not None:
        summary.update(new=summary["new"] - plan.refresh, refreshed=plan.refresh, removed=plan.removed.num_rows,
                       excluded=plan.excluded, erased_skipped=plan.erased_skipped, waiting=listing.waiting,
                       erased_users=sum(int(r.get("users", 0)) for r in listing.erasures))
    store = Store(output, storage_options(endpoint_url))
    if users is not None:
        summary["users"] = {
            "table": OutputState(store).users.url, "users": users.users, "model": users.model,
            "on_model": users.users - users.behind, "behind": users.behind,
            "share": round((users.users - users.behind) / users.users, 4) if users.users else None,
            "refresh_budget": users.refresh_budget, "nights_left": users.nights_left,
            "upserted": users.applied.users_upserted, "removed": users.applied.users_removed}
    summary["alarms"] = alarms(run_record(summary, listing.listed_at, source, "completed", ""), previous)
    tag, message = outcome(summary)
    summary.update(outcome="completed", outcome_tag=tag, message=message)
    record = run_record(summary, listing.listed_at, source, "completed", message)
    if users is not None:
        record.update(users=users.users, users_behind=users.behind)
    record_run(store, record)
    summary["recent_runs"] = previous[-9:] + [record]

    create_markdown_artifact(render_markdown(summary, source, output), key=artifact_key("scoring-summary", output),
                             description=f"{message[0].upper()}{message[1:]} (nightly scoring of {source} into "
                                         f"{output})")
    create_table_artifact([{"status": "scored", "photos": summary["scored"]},
                           {"status": "rejected", "photos": summary["rejected"]},
                           {"status": "unchanged (skipped)", "photos": summary["skipped_unchanged"]}],
                          key=artifact_key("scoring-counts", output),
                          description=f"Photos by status in this run of {output}")
    rejected = rejected_rows(rows)
    if rejected:
        more = summary["rejected"] - len(rejected)
        create_table_artifact(rejected, key=artifact_key("rejected-photos", output),
                              description=f"Rejected photos of this run of {output}, with the reason"
                                          + (f" (the first {len(rejected)}; {more} more in the Parquet)" if more else ""))
    for url in summary["written"]:
        link = file_link(url, file_links, store)
        if link:
            create_link_artifact(link, link_text=url, key=artifact_key("predictions-file", output),
                                 description="A Parquet file written by this run")
    return summary


def report_failure(outcome_name: str, message: str, stage: str, source: str, output: str, scoring_date: date,
                   run_id: str, listed_at: datetime, model: str, endpoint_url: str | None,
                   listing: Listing | None = None, written: list[str] | None = None, timings: dict | None = None,
                   wall_seconds: float = 0.0, holds_output: bool = True, error: BaseException | None = None) -> dict:
    """A run that failed or was cancelled is on the record too: a summary on the flow run
    (what was listed, what failed and why, what was not written) and, while the run holds
    the output, a row in the output's trend. Never raises: the failure is what matters."""
    summary = {"run_id": run_id, "scoring_date": scoring_date.isoformat(), "outcome": outcome_name,
               "message": message, "stage": stage, "model": model, "written": list(written or []),
               "listed": listing.listed if listing else getattr(error, "listed", None),
               "new": len(listing.objects) if listing else getattr(error, "new", 0), "timings": {k: round(v, 3) for k, v in
                                                                          (timings or {}).items()},
               "wall_seconds": round(wall_seconds, 3)}
    try:
        # A run that never held the output (locked, unreachable) reads and writes nothing there.
        store = Store(output, storage_options(endpoint_url))
        previous = listing.recent_runs if listing else (recent_runs(store) if holds_output else [])
        record = run_record(summary, listed_at, source, outcome_name, message)
        if holds_output:
            record_run(store, record)
        summary["recent_runs"] = previous[-9:] + [record]
    except Exception as error:  # storage may be what failed
        get_run_logger().warning("the failed run could not be recorded beside the output: %s", error)
    try:
        create_markdown_artifact(render_failure_markdown(summary, source, output),
                                 key=artifact_key("scoring-summary", output),
                                 description=f"{outcome_name.capitalize()}: {message} (nightly scoring of {source} "
                                             f"into {output})")
    except Exception as error:
        get_run_logger().warning("the failure report could not be written: %s", error)
    return summary
