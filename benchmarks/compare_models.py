"""Several registered models on the same held-out faces, in one table from one run.

    python benchmarks/holdout_manifest.py --data PATH/utkface-dev --out /tmp/utk --holdout 2000
    python benchmarks/compare_models.py --data /tmp/utk/holdout --registry /tmp/utk/registry \\
        --models dlib-gender-v1@1,gender-classifier@1,gender-classifier@2 [--edge-fill]

Every model sees each image through the scoring face front end with its own framing. The
table gives accuracy, ROC-AUC, ECE, coverage at the model's abstain threshold, the largest
accuracy gap between race groups and between age bands (groups of at least 20 faces),
images/s (decode, detect, align and model, on this machine), and McNemar's exact test
against the first model on the faces every model answered. `--edge-fill` adds each model
again with the chip's outside-the-photo part filled with the photo's edge pixels.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.chips import iter_chips  # noqa: E402
from models.datasets import load_dataset  # noqa: E402
from models.experiment import metrics_report  # noqa: E402
from models.registry import Registry  # noqa: E402


def mcnemar(a: np.ndarray, b: np.ndarray) -> tuple[int, int, float]:
    """Discordant counts (a right b wrong, a wrong b right) and the exact two-sided p."""
    n01, n10 = int((a & ~b).sum()), int((~a & b).sum())
    n, k = n01 + n10, min(n01, n10)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0
    return n01, n10, p


def evaluate(predictor, data, workers: int | None) -> tuple[np.ndarray, np.ndarray, float]:
    started = time.perf_counter()
    kept, p_male = [], []
    for indices, chips, _ in iter_chips(data, predictor.framing, workers=workers, chunk=128):
        kept.append(indices)
        if len(chips):
            p_male.append(predictor.predict(chips).p_male)
    return np.concatenate(kept), np.concatenate(p_male), len(data.images) / (time.perf_counter() - started)


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
            kept, p_male, rate = evaluate(predictor, data, args.workers)
            report = metrics_report(data, kept, p_male, predictor.abstain_threshold)
            runs.append((f"{predictor.name}@{predictor.version}{suffix}", kept, p_male, rate, report))
            print(f"evaluated {runs[-1][0]}: {len(kept)} faces, {rate:.1f} images/s", file=sys.stderr, flush=True)

    common = set(runs[0][1].tolist())
    for _, kept, *_ in runs[1:]:
        common &= set(kept.tolist())
    common = np.array(sorted(common))

    def correct_on_common(kept, p_male):
        position = {index: i for i, index in enumerate(kept.tolist())}
        rows = np.array([position[i] for i in common])
        return (p_male[rows] >= 0.5).astype(int) == data.labels[common]

    reference = correct_on_common(runs[0][1], runs[0][2])
    print(f"\n{len(data.images)} held-out images; McNemar against {runs[0][0]} on the {len(common)} faces "
          f"every model answered.\n")
    print("| model | faces | accuracy | ROC-AUC | ECE | coverage / accuracy at threshold | largest race gap "
          "| largest age-band gap | accuracy on common faces | McNemar p | images/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, kept, p_male, rate, report in runs:
        correct = correct_on_common(kept, p_male)
        _, _, p = mcnemar(correct, reference)
        groups = report["groups"]
        race = groups.get("race", {}).get("max_gap", float("nan"))
        age = groups.get("age", {}).get("max_gap", float("nan"))
        print(f"| {name} | {len(kept)} | {100 * report['accuracy']:.2f} | {report['roc_auc']:.4f} "
              f"| {report['ece']:.4f} | {report['coverage']:.3f} / {100 * report['accuracy_when_answering']:.2f} "
              f"| {100 * race:.2f} | {100 * age:.2f} | {100 * correct.mean():.2f} "
              f"| {'—' if name == runs[0][0] else f'{p:.2g}'} | {rate:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
