"""Several registered models on the same held-out faces, per attribute, in one run.

    python benchmarks/holdout_manifest.py --data PATH/utkface-dev --out /tmp/utk --holdout 2000
    python benchmarks/compare_models.py --data /tmp/utk/holdout --registry /tmp/utk/registry \\
        --models dlib-gender-v1@1,dlib-age-v1@1,gender-classifier@2,gender-classifier@3 [--edge-fill]

Every model sees each image through the scoring face front end with its own framing.
Gender (models that answer it): accuracy, ROC-AUC, ECE, coverage at the model's abstain
threshold, the largest accuracy gap between race groups and between age bands (groups of
at least 20 faces), and McNemar's exact test against the first model that answers gender,
on the faces every such model answered. Age (models that answer it): MAE in years (all,
adults), the age band's accuracy (exact, within one band), its calibration (ECE), coverage
at the band threshold, MAE by gender, and the largest MAE gap between race groups and
between age bands; a paired test of the absolute errors against the first such model.
images/s counts decoding, detection, alignment and the model on this machine.
`--edge-fill` adds each model again with the chip's outside-the-photo part filled with the
photo's edge pixels.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gender_pipeline.models.datasets import load_dataset  # noqa: E402
from gender_pipeline.models.experiment import (evaluate_predictor, faces_in_common, mcnemar_p, outcomes_on,  # noqa: E402
                               paired_error_p)
from gender_pipeline.models.registry import Registry  # noqa: E402


def gender_table(runs: list[tuple[str, dict]], images: int) -> None:
    runs = [(n, r) for n, r in runs if "accuracy" in r]
    if not runs:
        return
    common = faces_in_common([r for _, r in runs])
    reference = outcomes_on(runs[0][1], common, "correct")
    print(f"\nGender: {images} held-out images; McNemar against {runs[0][0]} on the {len(common)} faces every "
          f"model answered.\n")
    print("| model | faces | accuracy | ROC-AUC | ECE | coverage / accuracy at threshold | largest race gap "
          "| largest age-band gap | accuracy on common faces | McNemar p | images/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, report in runs:
        correct = outcomes_on(report, common, "correct")
        groups = report["groups"]
        race = groups.get("race", {}).get("max_gap", float("nan"))
        age = groups.get("age", {}).get("max_gap", float("nan"))
        p = "—" if name == runs[0][0] else f"{mcnemar_p(correct, reference):.2g}"
        print(f"| {name} | {report['evaluated']} | {100 * report['accuracy']:.2f} | {report['roc_auc']:.4f} "
              f"| {report['ece']:.4f} | {report['coverage']:.3f} / {100 * report['accuracy_when_answering']:.2f} "
              f"| {100 * race:.2f} | {100 * age:.2f} | {100 * correct.mean():.2f} | {p} "
              f"| {report['images_per_second']:.1f} |")


def age_table(runs: list[tuple[str, dict]], images: int) -> None:
    runs = [(n, r) for n, r in runs if r.get("age", {}).get("count")]
    if not runs:
        return
    common = faces_in_common([r for _, r in runs])
    known = outcomes_on(runs[0][1], common, "age_known")
    reference = outcomes_on(runs[0][1], common, "age_error")[known]
    print(f"\nAge: {images} held-out images; paired test of the absolute errors against {runs[0][0]} on the "
          f"{int(known.sum())} faces with an age every model answered.\n")
    print("| model | faces | MAE | MAE adults | band accuracy | within one band | band ECE "
          "| coverage / band accuracy at threshold | MAE female / male | largest race gap (MAE) "
          "| largest age-band gap (MAE) | paired p | images/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, report in runs:
        age = report["age"]
        errors = outcomes_on(report, common, "age_error")[known]
        by = age["groups_mae"]
        gender = by.get("gender", {}).get("groups", {})
        p = "—" if name == runs[0][0] else f"{paired_error_p(errors, reference):.2g}"
        print(f"| {name} | {age['count']} | {age['mae']:.2f} | {age['mae_adults']:.2f} "
              f"| {100 * age['band_accuracy']:.1f} | {100 * age['band_accuracy_within_one']:.1f} "
              f"| {age['band_ece']:.3f} | {age['coverage']:.3f} / {100 * age['band_accuracy_when_answering']:.1f} "
              f"| {gender.get('female', {}).get('mae', float('nan')):.2f} / "
              f"{gender.get('male', {}).get('mae', float('nan')):.2f} "
              f"| {by.get('race', {}).get('max_gap', float('nan')):.2f} "
              f"| {by.get('age', {}).get('max_gap', float('nan')):.2f} | {p} | {report['images_per_second']:.1f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a held-out manifest dataset")
    parser.add_argument("--format", default="manifest", choices=("manifest", "celeba"))
    parser.add_argument("--registry", required=True)
    parser.add_argument("--models", required=True, help="comma-separated NAME@VERSION, the first is the reference")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=None, help="face alignment processes (default: one per core)")
    parser.add_argument("--edge-fill", action="store_true", help="also evaluate each model with edge-filled chips")
    args = parser.parse_args()

    data = load_dataset(args.data, args.format)
    registry = Registry(args.registry)
    runs = []
    for ref in args.models.split(","):
        predictor = registry.load_predictor(ref.strip(), device=args.device)
        variants = [("", predictor.framing)]
        if args.edge_fill:
            variants.append((" (edge fill)", dataclasses.replace(predictor.framing, fill="edge")))
        for suffix, framing in variants:
            predictor.framing = framing
            report = evaluate_predictor(predictor, data, workers=args.workers, keep_faces=True)
            runs.append((f"{predictor.name}@{predictor.version}{suffix}", report))
            print(f"evaluated {runs[-1][0]}: {report['evaluated']} faces, {report['images_per_second']:.1f} "
                  f"images/s", file=sys.stderr, flush=True)
    gender_table(runs, len(data.images))
    age_table(runs, len(data.images))
    return 0


if __name__ == "__main__":
    sys.exit(main())
