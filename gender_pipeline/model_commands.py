"""The commands on models: evaluate, promote, fetch-models. Parse, call, print."""

from __future__ import annotations

import argparse
import json
import sys

from gender_pipeline.faces.model_files import fetch_all
from gender_pipeline.lake.answers import ModelRef
from gender_pipeline.lake.storage import Stores
from gender_pipeline.models.datasets import load_dataset, stratified_sample
from gender_pipeline.models.experiment import evaluate_predictor
from gender_pipeline.models.metrics import group_figures, group_lines
from gender_pipeline.models.registry import Registry
from gender_pipeline.runtime.errors import EXIT_USAGE


def evaluate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    options = Stores(args.endpoint_url).options
    data = load_dataset(args.data, args.format, options)
    if args.limit:
        data = data.subset(stratified_sample(data.labels, args.limit, seed=0))
    predictor = Registry(args.registry, options).load_predictor(args.model, device=args.device)
    report = evaluate_predictor(predictor, data, workers=args.workers, options=options)
    print(json.dumps(report, indent=2, default=float))
    for title, lines in group_summary(report):
        print(title, *lines, sep="\n  ", file=sys.stderr)
    return 0


GROUP_TITLES = {"accuracy": "gender accuracy per group", "mae": "age MAE in years per group"}


def group_summary(report: dict) -> list[tuple[str, list[str]]]:
    """The figures per group, with their 95% intervals, as readable lines (for stderr)."""
    return [(f"{report['model']}: {GROUP_TITLES[metric]}, 95% intervals", group_lines(part, metric))
            for metric, part in group_figures(report)]


def promote(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    ref = ModelRef.parse(args.model)
    if not ref.version:
        print("gender-pipeline: promote needs NAME@VERSION", file=sys.stderr)
        return EXIT_USAGE
    record = Registry(args.registry, Stores(args.endpoint_url).options).promote(ref.name, ref.version, args.reason)
    print(f"gender-pipeline: production is now {record['to']} (was {record['from']}): {record['reason']}",
          file=sys.stderr)
    print(json.dumps(record, indent=2))
    return 0


def models(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    listing = Registry(args.registry, Stores(args.endpoint_url).options).listing()
    if args.json:
        print(json.dumps(listing, indent=2, default=str))
        return 0
    print(f"registry    {listing['registry']}")
    print(f"production  {listing['production']}" + (f"  (since {listing['promoted_at']}: {listing['reason']})"
                                                     if listing["promoted_at"] else "  (the shipped network: nothing "
                                                                                    "promoted yet)"))
    for earlier in reversed(listing["history"][-5:]):
        print(f"            before: {earlier.get('name')}@{earlier.get('version')} ({earlier.get('at')}: "
              f"{earlier.get('reason')})")
    for model in listing["models"]:
        accuracy = f"{100 * model['test_accuracy']:.2f}% on its test faces" if model["test_accuracy"] else ""
        print(f"{'*' if model['production'] else ' '} {model['model']:<28} {', '.join(model['attributes']):<12} "
              f"{model['format'] or '?':<16} {accuracy}")
    return 0


def fetch_models(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    for name, path in fetch_all().items():
        print(f"{name}: {path}")
    return 0
