"""`gender-pipeline`: score photos, serve the nightly deployment."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from datetime import date

# Offline by default: no telemetry from Prefect's server or from Great Expectations.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
os.environ.setdefault("DO_NOT_TRACK", "1")

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_STORAGE = 3
EXIT_EXPECTATIONS = 4


def _date(text: str) -> str:
    try:
        return date.fromisoformat(text).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"dates are YYYY-MM-DD, got {text!r}") from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of at least 1, got {value}")
    return value


def _model_ref(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9._-]+)?", text):
        raise argparse.ArgumentTypeError(f"--model is NAME or NAME@VERSION, got {text!r}")
    return text


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0.5, 1], got {text!r}") from None
    if not 0.5 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"the abstain threshold is a confidence in [0.5, 1], got {value}")
    return value


def _add_storage(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint-url", default=os.environ.get("AWS_ENDPOINT_URL"),
                        help="S3-compatible endpoint (MinIO, Ceph...); default $AWS_ENDPOINT_URL")


def _add_scoring(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--source", required=required, help="URL or path of the uploads: {user_id}/{file}")
    parser.add_argument("--output", required=required, help="URL or path; Parquet goes to OUTPUT/predictions/")
    parser.add_argument("--registry", default=None,
                        help="model registry URL (default $GENDER_PIPELINE_REGISTRY or ~/.gender-pipeline/registry)")
    parser.add_argument("--model", type=_model_ref, default="gender-classifier",
                        help="NAME[@VERSION]; default: the production model, else the dlib baseline")
    parser.add_argument("--batch-size", type=_positive, default=64)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--workers", type=int, default=None,
                        help="decoding processes (default: one per core; 0 decodes in-process)")
    parser.add_argument("--abstain-below", type=_probability, default=None,
                        help="confidence under which gender is 'unknown' (default: the model card's)")
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
    serve.add_argument("--cron", default="0 2 * * *", help="schedule (default 02:00 every day)")
    serve.add_argument("--timezone", default="UTC")
    return parser


def _score(args: argparse.Namespace) -> int:
    from flows.scoring import nightly_scoring
    from tasks.summary import render_text

    if args.workers is not None and args.workers < 0:
        print("gender-pipeline: --workers must be 0 or more", file=sys.stderr)
        return EXIT_USAGE
    summary = nightly_scoring(
        source=args.source, output=args.output, registry=args.registry, model=args.model,
        scoring_date=args.date, batch_size=args.batch_size, device=args.device,
        workers=args.workers, endpoint_url=args.endpoint_url, abstain_threshold=args.abstain_below)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print()
        print(render_text(summary))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from flows.scoring import nightly_scoring

    nightly_scoring.serve(
        name="nightly-scoring", cron=args.cron,
        parameters={"source": args.source, "output": args.output, "registry": args.registry,
                    "model": args.model, "batch_size": args.batch_size, "device": args.device,
                    "workers": args.workers, "endpoint_url": args.endpoint_url,
                    "abstain_threshold": args.abstain_below},
        tags=["scoring"])
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from models.registry import RegistryError
    from tasks.expectations import ExpectationsFailed
    from tasks.storage import StorageError

    handlers = {"score": _score, "serve": _serve}
    try:
        return handlers[args.command](args)
    except ExpectationsFailed as error:
        print(f"gender-pipeline: a data check failed, nothing was published:\n{error}", file=sys.stderr)
        return EXIT_EXPECTATIONS
    except (StorageError, FileNotFoundError, PermissionError) as error:
        print(f"gender-pipeline: storage problem: {error}", file=sys.stderr)
        return EXIT_STORAGE
    except (RegistryError, ValueError) as error:
        print(f"gender-pipeline: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("gender-pipeline: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
