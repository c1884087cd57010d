"""When the nightly scoring runs: one place for `gender-pipeline serve`, the flow module and
deployments/prefect.yaml (a test holds the yaml to these values). No Prefect import here:
the CLI reads the defaults before it imports anything heavy."""

NIGHTLY_CRON = "0 2 * * *"  # 02:00 UTC
# UTC, as every time the pipeline writes or prints (run records, the trend, `status`): one
# zone everywhere. The Prefect UI shows the schedule's time without its zone and the next
# runs in the browser's zone; the deployment's description names the zone.
NIGHTLY_TIMEZONE = "UTC"
NIGHTLY_CONCURRENCY = 1  # one run at a time


def schedule_text(cron: str, timezone: str) -> str:
    """The schedule in words, with its time zone: the Prefect UI's schedule card shows the
    time alone ("At 02:00 AM"), so the deployment's description says which zone it is."""
    parts = cron.split()
    if len(parts) == 5 and parts[2:] == ["*", "*", "*"] and parts[0].isdigit() and parts[1].isdigit():
        return f"every day at {int(parts[1]):02d}:{int(parts[0]):02d} {timezone} (cron {cron!r})"
    return f"on cron {cron!r} in the {timezone} time zone"
