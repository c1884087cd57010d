"""nightly-scoring: list new photos, check them, score them, check the rows, publish.

No `from __future__ import annotations` here: Prefect validates parameters against the
signature in the process a deployment runs in, where string annotations cannot be resolved."""

import time
from datetime import date, datetime, timezone
from typing import Literal

from pydantic import NonNegativeInt, PositiveInt

from prefect import flow, get_run_logger, unmapped
from prefect.runtime import flow_run
from prefect.states import Completed
from prefect.task_runners import ThreadPoolTaskRunner

from gender_pipeline.models.predictor import resolve_device
from gender_pipeline.models.registry import PRODUCTION_MODEL
from gender_pipeline.faces.decoding import DecodeLimits
from gender_pipeline.engine.scoring import ScoringOptions
from gender_pipeline.night.checks import warm_up as warm_up_expectations
from gender_pipeline.runtime import timeline
from gender_pipeline.night.report import state_name
from gender_pipeline.night.words import plural
from gender_pipeline.runtime.timing import timed
from gender_pipeline.tasks.run_control import (failed, finish_all, one_line, resolved_model, scoring_run_name, stoppable_run,
                               stopped, tag_run)
from gender_pipeline.tasks.scoring_tasks import (check_photo_metadata_task, list_new_photos, lock_output, report_failure,
                                 report_run, score_shard, split_listing, unlock_output, update_users_table)
from gender_pipeline.runtime.stopping import StopRequested
from gender_pipeline.flows.schedule import NIGHTLY_CONCURRENCY, NIGHTLY_CRON, NIGHTLY_TIMEZONE  # noqa: F401 - the schedule


# One shard at a time in this process by default; `--task-runner dask` maps shards over a
# Dask cluster instead (see gender_pipeline.cli).
@flow(name="nightly-scoring", description="Score new signup photos and publish predictions to Parquet.",
      task_runner=ThreadPoolTaskRunner(max_workers=1), flow_run_name=scoring_run_name)
def nightly_scoring(source: str, output: str, registry: str | None = None, model: str = PRODUCTION_MODEL,
                    scoring_date: date | None = None, batch_size: PositiveInt | None = None,
                    device: Literal["auto", "cpu", "cuda"] = "auto", workers: NonNegativeInt | None = None,
                    endpoint_url: str | None = None, abstain_threshold: float | None = None,
                    max_bytes: PositiveInt | None = None, max_pixels: PositiveInt | None = None,
                    max_photos: PositiveInt | None = None, compile: bool = False, gpu_decode: bool = False,
                    shard_size: PositiveInt = 2000, lock_lease_seconds: float = 300,
                    lock_wait_seconds: float = 0, front_end: Literal["auto", "cpu", "gpu"] = "auto",
                    min_new_photos: NonNegativeInt = 0, max_listing_drop: float = 0.9,
                    file_links: str = "none", refresh_budget: NonNegativeInt = 10_000,
                    exclude_users: str | None = None, listing: str = "list",
                    listing_fanout: PositiveInt | None = None) -> dict:
    """Score the photos uploaded since the last run and publish one Parquet row per photo.

    Args:
        source: Where the uploads are: a path or fsspec URL (s3://bucket/prefix) holding
            {user_id}/{file name} objects.
        output: Where the dataset goes: predictions land in OUTPUT/predictions/dt=YYYY-MM-DD/.
        registry: The model registry (path or URL); default $GENDER_PIPELINE_REGISTRY or
            ~/.gender-pipeline/registry.
        model: production (the version promoted to production, else the shipped dlib
            network), NAME (its production version) or NAME@VERSION.
        scoring_date: The partition date (YYYY-MM-DD); default today in UTC.
        batch_size: Faces per model call; default 64 on a CPU, sized from free memory on a GPU.
        device: Where the model runs: auto (a GPU when there is one), cpu or cuda.
        workers: Decoding processes; default one per core, 0 decodes in the run's own process.
        endpoint_url: An S3-compatible endpoint (MinIO, Ceph); default AWS.
        abstain_threshold: Confidence under which gender is "unknown"; default the model card's.
        max_bytes: Largest upload accepted, in bytes (default 25 MiB).
        max_pixels: Most pixels accepted (default 50 million).
        max_photos: Photos per run, oldest first; the rest wait for the next run (default: all).
        compile: torch.compile the model (trained models on a GPU).
        gpu_decode: Decode plain JPEGs on the GPU (nvJPEG).
        shard_size: Photos per shard: scored, checked and published as one Parquet file.
        lock_lease_seconds: How long a dead run's lock on the output outlives it.
        lock_wait_seconds: How long to wait for another run on the same output (0: fail at once).
        front_end: Where faces are found and aligned: auto (the GPU when the model runs on
            one), cpu (worker processes) or gpu (batched on the device).
        min_new_photos: Fail the run (nothing scored) when fewer new photos are listed: a
            guard against a wrong source prefix (default 0: off).
        max_listing_drop: Fail the run when the source lists fewer objects than this share
            less than the previous run (0.9: under 10% of it); 1 turns the guard off.
        file_links: Clickable links to the written files in the run's artifacts: none (the
            URLs are shown as text), presigned (https URLs the store signs, e.g. S3), or an
            https:// template with {url}, {bucket} and {key} (a storage console).
        refresh_budget: Photos per run re-scored because their user's answer comes from
            another model than this run's (after a promotion or a rollback), oldest answers
            first; 0 turns it off.
        exclude_users: A text file (path or URL), one user id per line: those users' photos
            are never read and they have no row in the users table.
        listing: How the source is listed: list (the store itself; on S3, concurrent key
            ranges), or inventory:URL (an S3 Inventory report's manifest.json or its folder:
            no LIST calls, up to a day stale).
        listing_fanout: Concurrent LIST calls on S3 (default 16).
    """
    started = time.perf_counter()
    timeline.mark("flow run started")
    warm_up_expectations()  # Great Expectations' start-up overlaps with the lock and the listing
    logger = get_run_logger()
    run_id = str(flow_run.id or "local")
    listed_at = datetime.now(timezone.utc)
    day = date.fromisoformat(scoring_date) if isinstance(scoring_date, str) else scoring_date or listed_at.date()
    limits = DecodeLimits(**{k: v for k, v in (("max_bytes", max_bytes), ("max_pixels", max_pixels))
                             if v is not None})
    options = ScoringOptions(batch_size=batch_size, workers=workers, limits=limits,
                             abstain_threshold=abstain_threshold, front_end=front_end,
                             jpeg_device="cuda" if gpu_decode and resolve_device(device) == "cuda" else None)

    progress = {"stage": "taking the output lock", "found": None}
    production = model
    futures, timings, users, failure = [], {}, None, None

    def on_record(outcome: str, message: str, holds_output: bool = True, error: Exception | None = None) -> None:
        """A failed or cancelled night on the record: its summary and its row in the trend."""
        written = [f.result().written for f in futures if f.state.is_completed() and f.result().written]
        report_failure(outcome, message, progress["stage"], source, output, day, run_id, listed_at, production,
                       endpoint_url, progress["found"], written, timings, time.perf_counter() - started,
                       holds_output, error)
        tag_run(outcome=outcome)

    with stoppable_run() as stop:
        try:
            with stop.interruptible():
                lease = lock_output(output, endpoint_url, run_id, lock_lease_seconds, lock_wait_seconds)
        except StopRequested:
            on_record("cancelled", f"stopped ({stop.reason}) before taking the output lock", holds_output=False)
            return stopped(stop, "before taking the output lock; nothing was written")
        except Exception as error:  # another run holds the output, or storage is unreachable
            on_record("failed", one_line(error), holds_output=False, error=error)
            return failed(error)
        # The concrete NAME@VERSION: every shard loads it (a long-lived worker that cached the
        # model of an earlier night must not answer with it after a promotion).
        production = resolved_model(registry, model, endpoint_url)
        tag_run(scoring_date=day.isoformat(), model=production)
        try:
            progress["stage"] = "listing the source"
            with stop.interruptible(), timed(timings, "list"):
                found = progress["found"] = list_new_photos(
                    source, output, endpoint_url, listed_at, max_photos, min_new_photos, max_listing_drop,
                    production, refresh_budget, exclude_users, run_id, day, listing, listing_fanout)
            timeline.mark("source listed")
            progress["stage"] = "checking the listing (suite)"
            with stop.interruptible(), timed(timings, "listing_suite"):
                listing_suite = check_photo_metadata_task(found)
            progress["stage"] = "scoring"
            scoring_started = time.perf_counter()
            shards = split_listing(found, shard_size)
            futures = score_shard.map(shards, unmapped(source), unmapped(output), unmapped(endpoint_url),
                                      unmapped(registry), unmapped(production), unmapped(device), unmapped(options),
                                      unmapped(run_id), unmapped(day), unmapped(compile), unmapped(lease.ref()))
            finish_all(futures)
            results = futures.result() if not stop.requested else []
            timings["score"] = time.perf_counter() - scoring_started
            if not stop.requested:
                progress["stage"] = "updating the users table"
                with timed(timings, "users"):
                    users = update_users_table(output, endpoint_url, found, results, run_id, day, lease.ref())
        except Exception as error:
            if not stop.requested:
                failure = error
        finally:
            finish_all(futures)  # stop, then let go: no shard of this run can write after this
            if failure is not None:
                on_record("failed", one_line(failure), error=failure)
            elif stop.requested:
                on_record("cancelled", f"stopped ({stop.reason}) while {progress['stage']}")
            unlock_output(lease)
        if stop.requested:
            files = [f.result().written for f in futures if f.state.is_completed() and f.result().written]
            return stopped(stop, f"{plural(len(files), 'shard file')} published before the stop; "
                                 "every other photo is new again for the next run")
        if failure is not None:
            return failed(failure)
    if not any(r.rows for r in results):
        logger.info("nothing new to score under %s: no file written", source)
    answered = next((row for r in results for row in r.rows if row.model_name), None)
    used = f"{answered.model_name}@{answered.model_version}" if answered else production
    # The publish and suite times are inside "score"; the report separates them.
    timings["score"] -= sum(r.suite_seconds + r.publish_seconds for r in results)
    summary = report_run(results, found, used, source, output, day, run_id, timings, time.perf_counter() - started,
                         endpoint_url, file_links, users, registry, listing_suite)
    tag_run(outcome=summary["outcome_tag"])
    return Completed(message=summary["message"], data=summary, name=state_name(summary["outcome_tag"]))
