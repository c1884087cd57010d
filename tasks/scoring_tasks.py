"""Prefect tasks for the scoring flow: thin wrappers (names, retries, logs, artifacts)
around the plain functions in core.storage, core.scoring, core.predictions."""

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

from models.registry import ModelRef, Registry
from core.expectations import ExpectationsFailed, check_photo_metadata, check_predictions
from core.predictions import (PhotoResult, diff_against_dataset, read_predictions, to_table,
                               write_predictions)
from core.scoring import ScoringOptions, ScoringStats, merge_stats, score_objects, user_of
from core.locking import Lease, LeaseRef, acquire
from tasks.run_control import retry_unless_stopped
from core.stopping import STOP, StopRequested
from core.storage import ObjectInfo, StorageError, Store, retry_if_transient, storage_options
from core.run_history import check_listing, key_shape_warnings, recent_runs, record_run
from core.summary import rejected_rows, render_markdown, summarize


@dataclass
class Listing:
    """The objects this run must look at, what the dataset already answered, and what the
    source and the output's last runs looked like."""

    objects: list[ObjectInfo]
    known_hashes: dict[str, set[str]]
    skipped_unchanged: int
    listed_at: datetime
    listed: int = 0  # objects under the source
    warnings: list[str] = field(default_factory=list)
    recent_runs: list[dict] = field(default_factory=list)  # the output's last runs, oldest first


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
                    max_listing_drop: float = 0.9) -> Listing:
    """List the source, drop what the dataset already answered, and check that the listing
    looks like the source's (a wrong prefix fails here instead of looking like a quiet night)."""
    logger = get_run_logger()
    options = storage_options(endpoint_url)
    source_store, output_store = Store(source, options), Store(output, options)
    if not source_store.exists():
        raise StorageError(f"source {source} does not exist", transient=False)
    objects = source_store.list_objects()
    existing = read_predictions(output_store, columns=["photo_key", "photo_sha256", "reject_reason", "scored_at"])
    diff = diff_against_dataset(objects, existing)
    logger.info("listed %d objects under %s; %d unchanged since answered; %d to read",
                len(objects), source, diff.skipped_unchanged, len(diff.to_read))
    recent = recent_runs(output_store)
    warnings = check_listing(len(objects), len(diff.to_read), recent, min_new_photos, max_listing_drop)
    warnings += key_shape_warnings([o.key for o in objects], sum(user_of(o.key) is None for o in objects))
    for warning in warnings:
        logger.warning(warning)
    to_read = diff.to_read
    if max_photos is not None and len(to_read) > max_photos:
        # Oldest uploads first; the rest are new again for the next run.
        oldest = datetime.min.replace(tzinfo=listed_at.tzinfo)
        to_read = sorted(to_read, key=lambda o: (o.modified or oldest, o.key))[:max_photos]
        logger.warning("limit of %d photos per run: %d left for the next run", max_photos,
                       len(diff.to_read) - max_photos)
    return Listing(to_read, diff.known_hashes, diff.skipped_unchanged, listed_at, len(objects), warnings, recent)


@task(name="check-photo-metadata", cache_policy=NO_CACHE)
def check_photo_metadata_task(listing: Listing) -> None:
    """Before inference: the photos to read have unique, contained keys and sane sizes."""
    if not listing.objects:
        get_run_logger().info("nothing to read: no listing to check")
        return
    readable = [o for o in listing.objects if user_of(o.key) is not None]
    frame = pd.DataFrame({"photo_key": [o.key for o in readable],
                          "size_bytes": [o.size for o in readable]})
    report = check_photo_metadata(frame)
    get_run_logger().info(report.text())
    if not report.success:
        raise ExpectationsFailed(report)


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


def split_listing(listing: Listing, shard_size: int) -> list[Shard]:
    if shard_size < 1:
        raise ValueError(f"shard size must be at least 1, got {shard_size}")
    objects = listing.objects
    return [Shard(i // shard_size, objects[i:i + shard_size],
                  {o.key: listing.known_hashes[o.key] for o in objects[i:i + shard_size]
                   if o.key in listing.known_hashes}, listing.listed_at)
            for i in range(0, len(objects), shard_size)]


@lru_cache(maxsize=4)
def _predictor(registry: str | None, endpoint_url: str | None, model: str, device: str,
               abstain_threshold: float | None, compile: bool):
    """One model per process (a Dask worker keeps it between shards)."""
    return Registry(registry, storage_options(endpoint_url)).load_predictor(
        ModelRef.parse(model), device=device, abstain_threshold=abstain_threshold, compile=compile)


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
        logger.info("shard %d: %d photos; model %s@%s on %s, batch size %s, framing %s", shard.index, total,
                    predictor.name, predictor.version, predictor.device, options.batch_size or "auto",
                    predictor.framing.to_dict())
        artifact = create_progress_artifact(0.0, key=artifact_key(f"scoring-progress-{shard.index}", output),
                                            description=f"shard {shard.index} of {output}: photos answered "
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
        written, suite_seconds, publish_seconds = None, 0.0, 0.0
        if rows:
            started = time.perf_counter()
            check_rows(rows, output)
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
        return ShardResult(rows, stats, written, suite_seconds, publish_seconds)
    except StopRequested as error:
        logger.warning("shard %d stopped before publishing: %s", shard.index, error)
        return Cancelled(message=f"stopped before publishing: {error}")


def check_rows(rows: list[PhotoResult], output: str) -> None:
    """Before publishing: keys present, one row per photo, probabilities valid."""
    report = check_predictions(to_table(rows).to_pandas())
    logger = get_run_logger()
    if not report.success:
        logger.error(report.text())
        create_markdown_artifact("```\n" + report.text() + "\n```", key=artifact_key("predictions-suite", output),
                                 description=f"predictions suite failed for {output}: nothing was published")
        raise ExpectationsFailed(report)
    logger.info(report.text())


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


def report_run(results: list[ShardResult], listing: Listing, model: str, source: str, output: str,
               scoring_date: date, run_id: str, timings: dict, wall_seconds: float,
               endpoint_url: str | None = None, file_links: str = "none") -> dict:
    """The run's summary: artifacts on the flow run itself (called from the flow, not from a
    task), keyed per output, and the run's record beside the dataset for the next runs."""
    rows = [row for result in results for row in result.rows]
    stats = merge_stats([r.stats for r in results])
    timings = {**timings, "predictions_suite": sum(r.suite_seconds for r in results),
               "publish": sum(r.publish_seconds for r in results)}
    summary = summarize(rows, stats, listing.listed, listing.skipped_unchanged)
    last = listing.recent_runs[-1]["listed_at"] if listing.recent_runs else None
    summary.update(model=model, written=[r.written for r in results if r.written], shards=len(results),
                   warnings=list(listing.warnings), last_run_at=str(last) if last else None, run_id=run_id,
                   scoring_date=scoring_date.isoformat(), timings={k: round(v, 3) for k, v in timings.items()},
                   wall_seconds=round(wall_seconds, 3))
    record = {"run_id": run_id, "listed_at": listing.listed_at.isoformat(), "source": source, "model": model,
              "listed": listing.listed, "new": summary["new"], "rows": summary["rows"], "scored": summary["scored"],
              "rejected": summary["rejected"], "unknown": summary["genders"]["unknown"],
              "wall_seconds": summary["wall_seconds"], "files": summary["written"]}
    store = Store(output, storage_options(endpoint_url))
    record_run(store, record)
    summary["recent_runs"] = listing.recent_runs[-9:] + [record]

    create_markdown_artifact(render_markdown(summary, source, output), key=artifact_key("scoring-summary", output),
                             description=f"nightly scoring of {source} into {output}")
    create_table_artifact([{"status": "scored", "photos": summary["scored"]},
                           {"status": "rejected", "photos": summary["rejected"]},
                           {"status": "unchanged (skipped)", "photos": summary["skipped_unchanged"]}],
                          key=artifact_key("scoring-counts", output), description=f"photos by status, {output}")
    rejected = rejected_rows(rows)
    if rejected:
        more = summary["rejected"] - len(rejected)
        create_table_artifact(rejected, key=artifact_key("rejected-photos", output),
                              description=f"rejected photos of this run, {output}"
                                          + (f" (the first {len(rejected)}; {more} more in the Parquet)" if more else ""))
    for url in summary["written"]:
        link = file_link(url, file_links, store)
        if link:
            create_link_artifact(link, link_text=url, key=artifact_key("predictions-file", output),
                                 description="a Parquet file written by this run")
    return summary
