"""Prefect tasks of the weekly upkeep (flows/maintenance.py)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from gender_pipeline.lake.output import compact_output
from gender_pipeline.lake.storage import Stores, retry_if_transient


@task(name="compact-tables", retries=2, retry_delay_seconds=[30, 120], retry_condition_fn=retry_if_transient,
      cache_policy=NO_CACHE)
def compact_tables(output: str, endpoint_url: str | None, retention_hours: int, lock_wait_seconds: float) -> dict:
    """Hold the output (no nightly run writes meanwhile), then compact each table."""
    return compact_output(Stores(endpoint_url).at(output), "compact-output", retention_hours, lock_wait_seconds)
