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
    return 0


def promote(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    ref = ModelRef.parse(args.model)
    if not ref.version:
        print("gender-pipeline: promote needs NAME@VERSION", file=sys.stderr)
        return EXIT_USAGE
    record = Registry(args.registry, Stores(args.endpoint_url).options).set_alias(ref.name, ref.version, args.reason)
    print(json.dumps(record, indent=2))
    return 0


def fetch_models(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    for name, path in fetch_all().items():
        print(f"{name}: {path}")
    return 0
