"""nightly-scoring: list new photos, check them, score them, check the rows, publish."""

from __future__ import annotations

from datetime import date, datetime, timezone

from prefect import flow, get_run_logger, unmapped
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from models.predictor import resolve_device
from models.registry import DEFAULT_MODEL
from core.decoding import DecodeLimits
from core.scoring import ScoringOptions
from tasks.run_control import finish_all, stoppable_run, stopped
from tasks.scoring_tasks import (check_photo_metadata_task, list_new_photos, lock_output,
                                 publish_run_summary, score_shard, split_listing, unlock_output)
from core.stopping import StopRequested


# One shard at a time in this process by default; `--task-runner dask` maps shards over a
# Dask cluster instead (see gender_pipeline.cli).
@flow(name="nightly-scoring", description="Score new signup photos and publish predictions to Parquet.",
      task_runner=ThreadPoolTaskRunner(max_workers=1))
def nightly_scoring(source: str, output: str, registry: str | None = None, model: str = DEFAULT_MODEL,
                    scoring_date: str | None = None, batch_size: int | None = None, device: str = "auto",
                    workers: int | None = None, endpoint_url: str | None = None,
                    abstain_threshold: float | None = None, max_bytes: int | None = None,
                    max_pixels: int | None = None, max_photos: int | None = None, compile: bool = False,
                    gpu_decode: bool = False, shard_size: int = 2000, lock_lease_seconds: float = 300,
                    lock_wait_seconds: float = 0, front_end: str = "auto") -> dict:
    logger = get_run_logger()
    run_id = str(flow_run.id or "local")
    listed_at = datetime.now(timezone.utc)
    day = date.fromisoformat(scoring_date) if scoring_date else listed_at.date()
    limits = DecodeLimits(**{k: v for k, v in (("max_bytes", max_bytes), ("max_pixels", max_pixels))
                             if v is not None})
    options = ScoringOptions(batch_size=batch_size, workers=workers, limits=limits,
                             abstain_threshold=abstain_threshold, front_end=front_end,
                             jpeg_device="cuda" if gpu_decode and resolve_device(device) == "cuda" else None)

    with stoppable_run() as stop:
        try:
            with stop.interruptible():
                lease = lock_output(output, endpoint_url, run_id, lock_lease_seconds, lock_wait_seconds)
        except StopRequested:
            return stopped(stop, "before taking the output lock; nothing was written")
        futures = []
        try:
            with stop.interruptible():
                listing = list_new_photos(source, output, endpoint_url, listed_at, max_photos)
                check_photo_metadata_task(listing)
            shards = split_listing(listing, shard_size)
            futures = score_shard.map(shards, unmapped(source), unmapped(output), unmapped(endpoint_url),
                                      unmapped(registry), unmapped(model), unmapped(device), unmapped(options),
                                      unmapped(run_id), unmapped(day), unmapped(compile), unmapped(lease.ref()))
            finish_all(futures)
            results = futures.result() if not stop.requested else []
        except Exception:
            if not stop.requested:
                raise
        finally:
            finish_all(futures)  # stop, then let go: no shard of this run can write after this
            unlock_output(lease)
        if stop.requested:
            files = [f.result().written for f in futures if f.state.is_completed() and f.result().written]
            return stopped(stop, f"{len(files)} shard file(s) were published before the stop; "
                                 "every other photo is new again for the next run")
    if not any(r.rows for r in results):
        logger.info("nothing new to score under %s: no file written", source)
    answered = next((row for r in results for row in r.rows if row.model_name), None)
    used = f"{answered.model_name}@{answered.model_version}" if answered else model
    summary = publish_run_summary(results, listing, used)
    summary.update(run_id=run_id, scoring_date=day.isoformat())
    return summary
