"""Which 95% interval for the figures per group? Coverage measured by simulation.

    python benchmarks/interval_coverage.py [--trials 4000] [--resamples 1000] [--seed 7]

A group's accuracy is a share of n faces; its interval should hold the true accuracy in
95% of test sets. For each group size and true accuracy, draws `--trials` test sets,
builds each interval and counts how often it holds the truth (coverage) and how wide it
is on average:

* accuracy: Wilson's score interval (models.metrics.wilson) against the percentile
  bootstrap (`--resamples` resamples of the group's faces);
* the gap between two groups' accuracies: Newcombe's interval from the two Wilson
  intervals (models.metrics.share_difference) against the bootstrap of both groups;
* a group's age MAE, errors drawn from a long-tailed distribution like age errors (most
  within 5 years, a few off by 20): the normal interval of the mean
  (models.metrics.mean_interval) against the bootstrap; and the gap between two groups'
  MAE: Welch's interval (models.metrics.mean_difference) against the bootstrap.

A coverage under 95% means the interval claims more certainty than the data hold.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gender_pipeline.models.metrics import mean_difference, mean_interval, share_difference, wilson  # noqa: E402

SIZES = (20, 50, 100, 190, 500)
ACCURACIES = (0.80, 0.90, 0.95, 0.97, 0.99)
PAIRS = ((20, 200, 0.90, 0.97), (100, 100, 0.95, 0.97), (190, 1000, 0.947, 0.98), (500, 500, 0.97, 0.97))


def percentile(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.percentile(samples, 2.5, axis=-1), np.percentile(samples, 97.5, axis=-1)


def share_rows(rng: np.random.Generator, trials: int, resamples: int) -> list[tuple]:
    rows = []
    for n in SIZES:
        for p in ACCURACIES:
            k = rng.binomial(n, p, trials)
            intervals = np.array([wilson(x, n) for x in k])
            boot_low, boot_high = percentile(rng.binomial(n, (k / n)[:, None], (trials, resamples)) / n)
            rows.append((f"n={n} p={p:.2f}",
                         np.mean((intervals[:, 0] <= p) & (p <= intervals[:, 1])),
                         np.mean(intervals[:, 1] - intervals[:, 0]),
                         np.mean((boot_low <= p) & (p <= boot_high)), np.mean(boot_high - boot_low)))
    return rows


def gap_rows(rng: np.random.Generator, trials: int, resamples: int) -> list[tuple]:
    rows = []
    for n1, n2, p1, p2 in PAIRS:
        k1, k2 = rng.binomial(n1, p1, trials), rng.binomial(n2, p2, trials)
        truth = p2 - p1
        intervals = np.array([share_difference((b, n2), (a, n1)) for a, b in zip(k1, k2)])
        boot = (rng.binomial(n2, (k2 / n2)[:, None], (trials, resamples)) / n2
                - rng.binomial(n1, (k1 / n1)[:, None], (trials, resamples)) / n1)
        boot_low, boot_high = percentile(boot)
        rows.append((f"n={n1} p={p1:.3f} against n={n2} p={p2:.3f}",
                     np.mean((intervals[:, 0] <= truth) & (truth <= intervals[:, 1])),
                     np.mean(intervals[:, 1] - intervals[:, 0]),
                     np.mean((boot_low <= truth) & (truth <= boot_high)), np.mean(boot_high - boot_low)))
    return rows


def age_errors(rng: np.random.Generator, size) -> np.ndarray:
    """Absolute age errors in years: |N(0, 6)| for most faces, |N(0, 20)| for one in twenty."""
    wide = rng.random(size) < 0.05
    return np.abs(rng.normal(0, np.where(wide, 20.0, 6.0), size))


def bootstrap_means(rng: np.random.Generator, sample: np.ndarray, resamples: int) -> np.ndarray:
    return sample[rng.integers(0, len(sample), (resamples, len(sample)))].mean(axis=1)


def mae_rows(rng: np.random.Generator, trials: int, resamples: int) -> list[tuple]:
    truth = age_errors(rng, 2_000_000).mean()
    rows = []
    for n in SIZES[:4]:
        hits = boot_hits = 0
        width = boot_width = 0.0
        for _ in range(trials):
            sample = age_errors(rng, n)
            low, high = mean_interval(sample)
            boot_low, boot_high = percentile(bootstrap_means(rng, sample, resamples))
            hits += low <= truth <= high
            boot_hits += boot_low <= truth <= boot_high
            width += high - low
            boot_width += boot_high - boot_low
        rows.append((f"MAE n={n} (true {truth:.2f} y)", hits / trials, width / trials, boot_hits / trials,
                     boot_width / trials))
    for n1, n2 in ((20, 200), (100, 100), (190, 1000)):
        hits = boot_hits = 0
        width = boot_width = 0.0
        for _ in range(trials):
            first, second = age_errors(rng, n1), age_errors(rng, n2)
            low, high = mean_difference(first, second)
            boot_low, boot_high = percentile(bootstrap_means(rng, first, resamples)
                                             - bootstrap_means(rng, second, resamples))
            hits += low <= 0 <= high
            boot_hits += boot_low <= 0 <= boot_high
            width += high - low
            boot_width += boot_high - boot_low
        rows.append((f"MAE gap n={n1} against n={n2}", hits / trials, width / trials, boot_hits / trials,
                     boot_width / trials))
    return rows


def table(title: str, ours: str, rows: list[tuple], unit: str) -> None:
    print(f"\n{title}\n")
    print(f"| case | {ours} coverage | {ours} width | bootstrap coverage | bootstrap width |")
    print("| --- | --- | --- | --- | --- |")
    for name, cover, width, boot_cover, boot_width in rows:
        print(f"| {name} | {100 * cover:.1f}% | {width:.3f}{unit} | {100 * boot_cover:.1f}% | {boot_width:.3f}{unit} |")
    worst = min(r[1] for r in rows), min(r[3] for r in rows)
    print(f"\nlowest coverage: {ours} {100 * worst[0]:.1f}%, bootstrap {100 * worst[1]:.1f}% (nominal 95%)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=4000)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    started = time.perf_counter()
    table("Accuracy of one group", "Wilson", share_rows(rng, args.trials, args.resamples), "")
    table("Largest accuracy gap (second group minus first)", "Newcombe", gap_rows(rng, args.trials, args.resamples),
          "")
    table("Age MAE of one group, and the MAE gap between two groups of equal true MAE", "normal",
          mae_rows(rng, max(1, args.trials // 4), args.resamples // 2), " y")
    print(f"\n{time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
