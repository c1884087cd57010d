"""nightly-scoring: list new photos, check them, score them, check the rows, publish."""

from __future__ import annotations

from datetime import date, datetime, timezone

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from models.predictor import resolve_device
from models.registry import DEFAULT_MODEL
from tasks.decoding import DecodeLimits
from tasks.scoring import ScoringOptions
from tasks.scoring_tasks import (check_photo_metadata_task, check_predictions_task,
                                 list_new_photos, publish_run_summary, score_photos,
                                 write_predictions_task)


@flow(name="nightly-scoring", description="Score new signup photos and publish predictions to Parquet.")
def nightly_scoring(source: str, output: str, registry: str | None = None, model: str = DEFAULT_MODEL,
                    scoring_date: str | None = None, batch_size: int | None = None, device: str = "auto",
                    workers: int | None = None, endpoint_url: str | None = None,
                    abstain_threshold: float | None = None, max_bytes: int | None = None,
                    max_pixels: int | None = None, max_photos: int | None = None, compile: bool = False,
                    gpu_decode: bool = False) -> dict:
    logger = get_run_logger()
    run_id = str(flow_run.id or "local")
    listed_at = datetime.now(timezone.utc)
    day = date.fromisoformat(scoring_date) if scoring_date else listed_at.date()
    limits = DecodeLimits(**{k: v for k, v in (("max_bytes", max_bytes), ("max_pixels", max_pixels))
                             if v is not None})
    options = ScoringOptions(batch_size=batch_size, workers=workers, limits=limits,
                             abstain_threshold=abstain_threshold,
                             jpeg_device="cuda" if gpu_decode and resolve_device(device) == "cuda" else None)

    listing = list_new_photos(source, output, endpoint_url, listed_at, max_photos)
    check_photo_metadata_task(listing)
    rows, stats = score_photos(source, endpoint_url, listing, registry, model, device, options, run_id,
                               compile)
    written = None
    if rows:
        check_predictions_task(rows)
        written = write_predictions_task(rows, output, endpoint_url, day, f"part-{run_id}")
    else:
        logger.info("nothing new to score under %s: no file written", source)
    used = f"{rows[0].model_name}@{rows[0].model_version}" if rows else model
    summary = publish_run_summary(rows, stats, listing, used, written)
    summary.update(run_id=run_id, scoring_date=day.isoformat())
    return summary
