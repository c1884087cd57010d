"""compact-output: the weekly upkeep of an output's Delta tables (the users table and the
photo state): small files merged, the log checkpointed, files older than the retention
vacuumed. Nightly runs add a few files each; compacting every night would rewrite the
tables every night, so it runs on its own schedule (deployments/prefect.yaml: Sundays)."""

from pydantic import NonNegativeInt

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from gender_pipeline.lake.lock import acquire
from gender_pipeline.lake.state import OutputState
from gender_pipeline.lake.storage import Store, retry_if_transient, storage_options


@task(name="compact-tables", retries=2, retry_delay_seconds=[30, 120], retry_condition_fn=retry_if_transient,
      cache_policy=NO_CACHE)
def compact_tables(output: str, endpoint_url: str | None, retention_hours: int, lock_wait_seconds: float) -> dict:
    """Hold the output (no nightly run writes meanwhile), then compact each table."""
    store = Store(output, storage_options(endpoint_url))
    lease = acquire(store, "compact-output", wait_seconds=lock_wait_seconds)
    try:
        return OutputState(store).compact(retention_hours)
    finally:
        lease.release()


@flow(name="compact-output", description="Compact the users table and the photo state of an output (weekly).")
def compact_output(output: str, endpoint_url: str | None = None, retention_hours: NonNegativeInt = 168,
                   lock_wait_seconds: float = 3600) -> dict:
    """Merge the small files nightly runs add, checkpoint the logs, vacuum old files.

    Args:
        output: The output whose tables to compact (as given to nightly-scoring).
        endpoint_url: An S3-compatible endpoint (MinIO, Ceph); default AWS.
        retention_hours: Files that no version of the last this many hours uses are
            deleted (time travel reaches this far back).
        lock_wait_seconds: How long to wait for a nightly run on the output to finish.
    """
    result = compact_tables(output, endpoint_url, retention_hours, lock_wait_seconds)
    get_run_logger().info("compacted %s: %s", output, result)
    return result
