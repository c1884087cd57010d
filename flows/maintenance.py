"""compact-output: the weekly upkeep of an output's Delta tables (the users table and the
photo state): small files merged, the log checkpointed, files older than the retention
vacuumed. Nightly runs add a few files each; compacting every night would rewrite the
tables every night, so it runs on its own schedule (deployments/prefect.yaml: Sundays)."""

from prefect import flow, get_run_logger
from pydantic import NonNegativeInt

from gender_pipeline.lake.tables import RETENTION_HOURS
from gender_pipeline.tasks.upkeep_tasks import compact_tables

COMPACT_LOCK_WAIT = 3600.0  # a weekly upkeep waits for the night to finish


@flow(name="compact-output", description="Compact the users table and the photo state of an output (weekly).")
def compact_output(output: str, endpoint_url: str | None = None, retention_hours: NonNegativeInt = RETENTION_HOURS,
                   lock_wait_seconds: float = COMPACT_LOCK_WAIT) -> dict:
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
