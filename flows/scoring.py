"""nightly-scoring: lock the output, list the new photos, check them, score them in shards,
update the users table, report.

No `from __future__ import annotations` here: Prefect validates parameters against the
signature in the process a deployment runs in, where string annotations cannot be resolved."""

from typing import Any

from prefect import Flow, get_run_logger
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from gender_pipeline.flows.schedule import NIGHTLY_CONCURRENCY, NIGHTLY_CRON, NIGHTLY_TIMEZONE  # noqa: F401
from gender_pipeline.night.checks import warm_up as warm_up_expectations
from gender_pipeline.night.night import Night
from gender_pipeline.night.options import NightOptions, flat_names
from gender_pipeline.runtime import timeline
from gender_pipeline.runtime.timing import timed
from gender_pipeline.tasks.night_tasks import (NightRun, check_listing_task, list_new_photos, lock_output,
                                               resolved_model, update_users_table)
from gender_pipeline.tasks.reports import report_night
from gender_pipeline.tasks.run_control import scoring_run_name, stoppable_run, tag_run


class NightlyScoringFlow(Flow):
    """The flow, reading the flat parameters of earlier versions too: a deployment that
    still sends `source`, `output`, … runs with them grouped into `options` (its logs say
    what to change); a name that never was a parameter is refused."""

    def validate_parameters(self, parameters: dict[str, Any]) -> dict[str, Any]:
        flat = {name: value for name, value in parameters.items() if name != "options"}
        if flat and "options" not in parameters and set(flat) <= set(flat_names()):
            parameters = {"options": NightOptions.from_flat(flat)}
        return super().validate_parameters(parameters)

    def with_options(self, **changes) -> "NightlyScoringFlow":
        flow = super().with_options(**changes)
        flow.__class__ = type(self)  # Prefect's with_options builds a plain Flow
        return flow


def nightly_scoring(options: NightOptions) -> dict:
    """Score the photos uploaded since the last run and publish one Parquet row per photo,
    then bring the users table up to date.

    Args:
        options: Where the photos are and the answers go, which model answers and how sure
            it must be, compute, limits, guards, the listing, and the users table's refresh
            and opt-outs (gender_pipeline.night.options.NightOptions).
    """
    timeline.mark("flow run started")
    warm_up_expectations()  # Great Expectations' start-up overlaps with the lock and the listing
    night = Night(options, run_id=str(flow_run.id or "local"))
    sent = flow_run.parameters
    if "options" not in sent:
        get_run_logger().warning("this run was sent the flat parameters of gender-pipeline 0.1 (%s): they were read "
                                 "as `options`; send them grouped under `options` instead (docs/operating.md, "
                                 "upgrading)", ", ".join(sorted(sent)))
    with stoppable_run() as stop, NightRun(night, stop) as run:
        with stop.interruptible():
            lock_output(night)
        night.answer_with(resolved_model(night))
        tag_run(scoring_date=night.context.day.isoformat(), model=night.context.model)
        with stop.interruptible(), timed(night.timings, "list"):
            found = list_new_photos(night)
        timeline.mark("source listed")
        night.stage = "checking the listing (suite)"
        with stop.interruptible(), timed(night.timings, "listing_suite"):
            listing_suite = check_listing_task(found)
        with timed(night.timings, "score"):
            night.results = run.score_shards()
        with timed(night.timings, "users"):
            users = update_users_table(night)
        run.completed(report_night(night, users, listing_suite))
    return run.state


# One shard at a time in this process by default; `--task-runner dask` maps shards over a
# Dask cluster instead (see gender_pipeline.cli).
nightly_scoring = NightlyScoringFlow(
    nightly_scoring, name="nightly-scoring", description="Score new signup photos and publish predictions to Parquet.",
    task_runner=ThreadPoolTaskRunner(max_workers=1), flow_run_name=scoring_run_name)
