"""When the nightly scoring runs: one place for `gender-pipeline serve`, the flow module and
deployments/prefect.yaml (a test holds the yaml to these values). No Prefect import here:
the CLI reads the defaults before it imports anything heavy."""

NIGHTLY_CRON = "0 2 * * *"  # 02:00 in the shop's time zone
NIGHTLY_TIMEZONE = "Europe/Berlin"
NIGHTLY_CONCURRENCY = 1  # one run at a time
