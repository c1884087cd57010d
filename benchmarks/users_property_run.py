"""The users table's rule over long random sequences of nights (the property test's
model, tests/lake_model.py, driven by a seeded generator instead of Hypothesis).

    python benchmarks/users_property_run.py --nights 120 --seeds 1,2,3,4,5

Each seed runs its nights in a fresh temporary source and output; after every completed
night the users table is checked against the rule, the history against its invariants,
the reads against "unchanged photos are not read again", and rebuild-users against the
incremental table. Prints the operations of each kind, the nights, and the seconds; a
divergence stops the seed with the last operations that led to it (exit 1)."""

from __future__ import annotations

import argparse
import logging
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.lake_model import Lake, random_night  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nights", type=int, default=120)
    parser.add_argument("--seeds", default="1,2,3,4,5", help="comma-separated seeds")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    total, failed = Counter(), []
    started = time.perf_counter()
    for seed in (int(s) for s in args.seeds.split(",")):
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f"lake-{seed}-") as root:
            lake, rng = Lake(root), random.Random(seed)
            try:
                completed = sum(random_night(lake, rng) for _ in range(args.nights))
            except AssertionError as error:
                failed.append(seed)
                print(f"seed {seed}: DIVERGED after {lake.nights} nights: {error}")
                print("  the last operations:\n    " + "\n    ".join(lake.ops[-30:]))
                continue
        total.update(lake.counts)
        print(f"seed {seed}: {args.nights} nights ({completed} completed, {args.nights - completed} killed), "
              f"{sum(lake.counts.values()) - args.nights} changes, {time.perf_counter() - t0:.1f} s; "
              f"{len(lake.files)} objects in the source at the end")
    print(f"\n{len(args.seeds.split(','))} seeds, {time.perf_counter() - started:.0f} s; operations of each kind:")
    for kind, count in sorted(total.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {kind:<24} {count:>6}")
    print("divergences: " + (", ".join(f"seed {s}" for s in failed) if failed else "none"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
