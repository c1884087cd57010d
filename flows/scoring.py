"""nightly-scoring: lock the output, list the new photos, check them, score them in shards,
update the users table, report.

No `from __future__ import annotations` here: Prefect validates parameters against the
signature in the process a deployment runs in, where string annotations cannot be resolved."""

import functools
import inspect
from typing import Any

from prefect import Flow, get_run_logger
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.callables import parameter_schema

from gender_pipeline.flows.schedule import NIGHTLY_CONCURRENCY, NIGHTLY_CRON, NIGHTLY_TIMEZONE  # noqa: F401
from gender_pipeline.night.checks import warm_up as warm_up_expectations
from gender_pipeline.night.night import Night
from gender_pipeline.night.options import NightOptions, flat_names
from gender_pipeline.runtime import timeline
from gender_pipeline.runtime.timing import timed
from gender_pipeline.tasks.night_tasks import (NightRun, check_inputs, check_listing_task, list_new_photos,
                                               lock_output, update_users_table)
from gender_pipeline.tasks.reports import report_night
from gender_pipeline.tasks.run_control import scoring_run_name, sent_parameters, stoppable_run, tag_run


class NightlyScoringFlow(Flow):
    """The flow, reading the flat parameters of earlier versions too: a deployment that
    still sends `source`, `output`, … runs with them read into `options` (over the
    deployment's own; its logs say what to change); a name that never was a parameter is
    refused. The form (the UI's, `serve`'s, `prefect deploy`'s schema) shows `options` alone;
    the function Prefect binds a run's parameters to also takes the flat names."""

    def __init__(self, fn, **kwargs) -> None:
        super().__init__(_taking_flat_names(fn), **kwargs)
        self.__signature__ = inspect.signature(fn)  # what the form describes (inspect.signature stops here)
        self.parameters = parameter_schema(fn)

    def validate_parameters(self, parameters: dict[str, Any]) -> dict[str, Any]:
        flat = {name: value for name, value in parameters.items() if name != "options" and value is not None}
        if set(flat) <= set(flat_names()):
            base = parameters.get("options")
            if flat:  # over the deployment's own options, if any
                base = base.model_dump(exclude_unset=True) if isinstance(base, NightOptions) else base
                base = NightOptions.from_flat(flat, base)
            parameters = {"options": base}
        return super().validate_parameters(parameters)

    def with_options(self, **changes) -> "NightlyScoringFlow":
        flow = super().with_options(**changes)
        flow.__class__ = type(self)  # Prefect's with_options builds a plain Flow
        flow.__signature__, flow.parameters = self.__signature__, self.parameters
        return flow


def _taking_flat_names(fn):
    """`fn`, also taking the flat names of 0.1 (None unless a run was sent them: they are
    read into `options` before it is called)."""
    @functools.wraps(fn)
    def taking(options: NightOptions, **_flat: Any):
        return fn(options)

    form = inspect.signature(fn)
    flat = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in flat_names()]
    taking.__signature__ = form.replace(parameters=[*form.parameters.values(), *flat])
    return taking


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
    flat = sorted(name for name, value in sent_parameters().items() if name != "options" and value is not None)
    if flat:
        get_run_logger().warning("this run was sent the flat parameters of gender-pipeline 0.1 (%s): they were read "
                                 "into `options`; send them grouped under `options` instead (docs/operating.md, "
                                 "upgrading)", ", ".join(flat))
    with stoppable_run() as stop, NightRun(night, stop) as run:
        with stop.interruptible():
            check_inputs(night)
            lock_output(night)
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
