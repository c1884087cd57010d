"""Several registered models on the same held-out faces, per attribute, in one run.

    python benchmarks/holdout_manifest.py --data PATH/utkface-dev --out /tmp/utk --holdout 2000
    python benchmarks/compare_models.py --data /tmp/utk/holdout --registry /tmp/utk/registry \\
        --models dlib-gender-v1@1,dlib-age-v1@1,gender-classifier@2,gender-classifier@3 [--edge-fill]

Every model sees each image through the scoring face front end with its own framing.
Gender (models that answer it): accuracy with its 95% interval, ROC-AUC, ECE, coverage at
the model's abstain threshold, the largest accuracy gap between race groups and between
age bands (groups of at least 20 faces) with its 95% interval, and McNemar's exact test
against the first model that answers gender, on the faces every such model answered; then
the accuracy of every group (true gender, race, age band) per model with its interval,
groups too small to compare marked. Age (models that answer it): MAE in years (all,
adults), the age band's accuracy (exact, within one band), its calibration (ECE), coverage
at the band threshold, MAE by gender, and the largest MAE gap between race groups and
between age bands with its interval; a paired test of the absolute errors against the
first such model; then every group's MAE with its interval. Last, the promotion gate's
verdict on each model as a challenger to the first (models.promotion: overall and within
every group of at least 100 faces, Holm-adjusted). Intervals: models.metrics.
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
from gender_pipeline.models.experiment import evaluate_predictor  # noqa: E402
from gender_pipeline.models.metrics import wilson  # noqa: E402
from gender_pipeline.models.promotion import (decide_promotion, faces_in_common, mcnemar_p, outcomes_on,  # noqa: E402
                                              paired_error_p)
from gender_pipeline.models.registry import Registry  # noqa: E402


def gap(part: dict, scale: float = 100, digits: int = 2) -> str:
    """A column's largest gap with its 95% interval, or why there is none."""
    if not part:
        return "—"
    if not part.get("max_gap_between"):
        return f"no two groups of {part['max_gap_over_groups_of_at_least']} faces"
    return (f"{scale * part['max_gap']:.{digits}f} ({scale * part['max_gap_low']:.{digits}f} to "
            f"{scale * part['max_gap_high']:.{digits}f}; {' − '.join(part['max_gap_between'])})")


def groups_table(runs: list[tuple[str, dict]], title: str, parts, metric: str, scale: float, digits: int) -> None:
    """Every group's figure per model with its 95% interval; groups too small to compare
    are marked."""
    print(f"\n{title}\n")
    print("| column | group | " + " | ".join(name for name, _ in runs) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in runs) + " |")
    by_run = [parts(report) for _, report in runs]
    columns = sorted({column for part in by_run for column in part})
    for column in columns:
        groups = sorted({group for part in by_run for group in part.get(column, {}).get("groups", {})})
        for group in groups:
            cells = []
            for part in by_run:
                v = part.get(column, {}).get("groups", {}).get(group)
                if v is None:
                    cells.append("—")
                    continue
                value, low, high = (scale * v[key] for key in (metric, "low", "high"))
                cells.append(f"{value:.{digits}f} ({low:.{digits}f}–{high:.{digits}f}), {v['count']}"
                             + (" too small" if v["too_small"] else ""))
            print(f"| {column} | {group} | " + " | ".join(cells) + " |")


def gender_table(runs: list[tuple[str, dict]], images: int) -> None:
    runs = [(n, r) for n, r in runs if "accuracy" in r]
    if not runs:
        return
    common = faces_in_common([r for _, r in runs])
    reference = outcomes_on(runs[0][1], common, "correct")
    print(f"\nGender: {images} held-out images; McNemar against {runs[0][0]} on the {len(common)} faces every "
          f"model answered.\n")
    print("| model | faces | accuracy (95% interval) | ROC-AUC | ECE | coverage / accuracy at threshold "
          "| largest race gap (95% interval) | largest age-band gap (95% interval) | accuracy on common faces "
          "| McNemar p | images/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, report in runs:
        correct = outcomes_on(report, common, "correct")
        groups = report["groups"]
        low, high = wilson(int(round(report["accuracy"] * report["evaluated"])), report["evaluated"])
        p = "—" if name == runs[0][0] else f"{mcnemar_p(correct, reference):.2g}"
        print(f"| {name} | {report['evaluated']} | {100 * report['accuracy']:.2f} ({100 * low:.2f}–{100 * high:.2f}) "
              f"| {report['roc_auc']:.4f} | {report['ece']:.4f} "
              f"| {report['coverage']:.3f} / {100 * report['accuracy_when_answering']:.2f} "
              f"| {gap(groups.get('race', {}))} | {gap(groups.get('age', {}))} | {100 * correct.mean():.2f} | {p} "
              f"| {report['images_per_second']:.1f} |")
    groups_table(runs, "Gender accuracy per group, % (95% Wilson interval), faces", lambda r: r["groups"],
                 "accuracy", 100, 1)


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
          "| coverage / band accuracy at threshold | MAE female / male | largest race gap (MAE, 95% interval) "
          "| largest age-band gap (MAE, 95% interval) | paired p | images/s |")
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
              f"| {gap(by.get('race', {}), 1)} | {gap(by.get('age', {}), 1)} | {p} "
              f"| {report['images_per_second']:.1f} |")
    groups_table(runs, "Age MAE per group, years (95% interval), faces", lambda r: r["age"]["groups_mae"], "mae", 1, 2)


def gate_verdicts(runs: list[tuple[str, dict]]) -> None:
    """The promotion gate's verdict on each model as a challenger to the first."""
    if len(runs) < 2:
        return
    print(f"\nThe promotion gate (models.promotion.decide_promotion), each model against {runs[0][0]}:\n")
    for name, report in runs[1:]:
        decision = decide_promotion(report, runs[0][1])
        print(f"- {name}: {decision['reason']}")
        for row in decision["groups"]:
            if row["tested"]:
                print(f"  - {row['attribute']} {row['column']} {row['group']} ({row['faces']} faces): "
                      f"{row['candidate']:.4f} vs {row['production']:.4f}, change {row['change']:+.4f}, "
                      f"p {row['p']:.3g}, Holm {row['p_holm']:.3g}" + (" — blocks" if row["worse"] else ""))


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
    gate_verdicts(runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
