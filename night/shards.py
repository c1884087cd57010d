"""A shard: a slice of the night's photos, scored, checked and published as one unit (one
Parquet file). A shard runs wherever its task runs (this process, a Dask worker); all it
needs is the run's context and a model."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from gender_pipeline.engine.engine import FaceModel, RunStamp, ScoringEngine, ScoringStats
from gender_pipeline.lake.history import PhotoResult, to_table, write_predictions
from gender_pipeline.lake.lock import LeaseGuard
from gender_pipeline.lake.storage import ObjectInfo
from gender_pipeline.night.checks import ExpectationsFailed, SuiteReport, check_predictions
from gender_pipeline.night.context import RunContext

log = logging.getLogger(__name__)


@dataclass
class Shard:
    """A slice of the listing, scored and published as one unit (one Parquet file)."""

    index: int
    objects: list[ObjectInfo]
    known_hashes: dict[str, set[str]]


@dataclass
class ShardResult:
    rows: list[PhotoResult]
    stats: ScoringStats
    written: str | None
    suite_seconds: float = 0.0  # the predictions suite
    publish_seconds: float = 0.0
    suite: dict | None = None  # the predictions suite's verdict


def split(objects: list[ObjectInfo], known_hashes: dict[str, set[str]], shard_size: int) -> list[Shard]:
    if shard_size < 1:
        raise ValueError(f"shard size must be at least 1, got {shard_size}")
    return [Shard(i // shard_size, objects[i:i + shard_size],
                  {o.key: known_hashes[o.key] for o in objects[i:i + shard_size] if o.key in known_hashes})
            for i in range(0, len(objects), shard_size)]


def score_shard(context: RunContext, shard: Shard, model: FaceModel,
                progress: Callable[[int, int], None] | None = None,
                on_failed_suite: Callable[[SuiteReport], None] | None = None) -> ShardResult:
    """Score one shard, check its rows, publish them as one file. The file is moved into
    place only if the run was not asked to stop and still holds its lease; when either
    fails, StopRequested is raised and nothing of the shard is published.
    `on_failed_suite` hears a failed predictions suite before ExpectationsFailed is raised."""
    output = context.output
    checkpoint = LeaseGuard(context.lease, output, every=2.0)
    checkpoint()
    options = context.options.scoring(model.device)
    engine = ScoringEngine(model, options, RunStamp(context.run_id, context.listed_at), progress, checkpoint)
    rows, stats = engine.score(context.source, shard.objects, shard.known_hashes)
    log.info("scored %d, rejected %d, same content skipped %d, %.1f photos/s",
             stats.scored, stats.rejected, stats.skipped_same_hash, stats.photos_per_second)
    result = ShardResult(rows, stats, None)
    if not rows:
        return result
    started = time.perf_counter()
    report = check_predictions(to_table(rows).to_pandas())
    result.suite_seconds = time.perf_counter() - started
    if not report.success:
        log.error(report.text())
        if on_failed_suite is not None:
            on_failed_suite(report)
        raise ExpectationsFailed(report)
    log.info(report.text())
    result.suite = report.as_dict()
    log.info("publishing %d rows", len(rows))
    started = time.perf_counter()
    result.written = write_predictions(output, to_table(rows), context.day, f"part-{context.run_id}-{shard.index:05d}",
                                       before_move=LeaseGuard(context.lease, output))
    result.publish_seconds = time.perf_counter() - started
    log.info("published %d rows to %s", len(rows), result.written)
    return result
