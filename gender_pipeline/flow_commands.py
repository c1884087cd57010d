"""The commands that run a Prefect flow: score (the night, once), serve (the nightly
deployment on its schedule), retrain. Parse, call, print."""

from __future__ import annotations

import argparse
import json
import logging
import os

from prefect.client.schemas.schedules import CronSchedule
from prefect.deployments.runner import EntrypointType
from prefect.logging.handlers import PrefectConsoleHandler
from pydantic import ValidationError

from gender_pipeline.cli import night_options
from gender_pipeline.flows.retrain import retrain as retrain_flow
from gender_pipeline.flows.schedule import NIGHTLY_CONCURRENCY, schedule_text
from gender_pipeline.flows.scoring import nightly_scoring
from gender_pipeline.lake.storage import Stores
from gender_pipeline.models.retrain_options import RetrainOptions
from gender_pipeline.night.render import render_text
from gender_pipeline.runtime import timeline
from gender_pipeline.server import TemporaryServer


class _RunLogsOnly(logging.Filter):
    """Log records a run marks `console=False` (an expected failure's traceback) reach the
    run's logs in Prefect, not this terminal."""

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "console", True)


def _quiet_console() -> None:
    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler) and not any(isinstance(f, _RunLogsOnly)
                                                                  for f in handler.filters):
            handler.addFilter(_RunLogsOnly())


def with_task_runner(flow, args: argparse.Namespace):
    """The flow as asked: shards in this process, or mapped over a Dask cluster with
    prefect-dask (each Dask worker loads its own model on its own device)."""
    if args.task_runner != "dask":
        return flow
    import dask  # lazy: the `dask` extra, installed where shards run on Dask
    from prefect_dask import DaskTaskRunner

    dask.config.set({"distributed.worker.daemon": False})  # workers start their own decoder processes
    if not os.environ.get("PREFECT_API_URL"):
        # Dask worker processes report to the same Prefect API as this process; without a
        # configured server each would start a temporary one of its own.
        server = TemporaryServer()
        server.wait()
        server.use()
    if args.dask_address:
        return flow.with_options(task_runner=DaskTaskRunner(address=args.dask_address))
    return flow.with_options(task_runner=DaskTaskRunner(
        cluster_kwargs={"n_workers": args.dask_workers, "threads_per_worker": 1, "processes": True,
                        "host": "127.0.0.1", "dashboard_address": None}))


def score(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    options = night_options(args, parser)  # refused here, before anything starts
    if options.users.exclude_users:  # so is an opt-out list the night would refuse
        Stores(options.where.endpoint_url).user_ids(options.users.exclude_users)
    _quiet_console()
    summary = with_task_runner(nightly_scoring, args)(options=options)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print()
        print(render_text(summary, command_seconds=timeline.since_start()))
    return 0


def serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    options = night_options(args, parser)
    _quiet_console()
    print(f"gender-pipeline: serving nightly-scoring, {schedule_text(args.cron, args.timezone)}", flush=True)
    nightly_scoring.serve(
        name="nightly-scoring", schedules=[CronSchedule(cron=args.cron, timezone=args.timezone)],
        global_limit=NIGHTLY_CONCURRENCY, entrypoint_type=EntrypointType.MODULE_PATH,
        description=f"{nightly_scoring.description} Runs {schedule_text(args.cron, args.timezone)}.",
        parameters={"options": options.model_dump(mode="json", exclude_unset=True)}, tags=["scoring", "nightly"])
    return 0


def retrain(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    archs = [a.strip() for a in args.archs.split(",") if a.strip()] if args.archs else None
    overrides = {"epochs": args.epochs, "image_size": args.image_size, "archs": archs, "sample_size": args.sample_size,
                 "batch_size": args.batch_size, "pretrained": args.pretrained, "workers": args.workers}
    given = {"config": args.config} if args.config else {}
    try:
        options = RetrainOptions(data=args.data, data_format=args.format, registry=args.registry,
                                 endpoint_url=args.endpoint_url, device=args.device, promote=not args.no_promote,
                                 overrides={k: v for k, v in overrides.items() if v is not None}, **given)
    except ValidationError as error:
        first = error.errors()[0]
        parser.error(f"--{'-'.join(str(p) for p in first['loc'][-1:])}: "
                     + str(first.get("ctx", {}).get("error") or first["msg"]))
    _quiet_console()
    summary = retrain_flow(options)
    print(json.dumps(summary, indent=2, default=str))
    return 0
