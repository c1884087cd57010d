"""Split a `manifest` dataset into a development part and a held-out part, as two
manifest folders whose images are symbolic links (nothing is copied).

    python benchmarks/holdout_manifest.py --data PATH/utkface-dev --out /tmp/utk --holdout 2000
    gender-pipeline retrain --config configs/cpu_dev.yaml --data /tmp/utk/dev --format manifest
    gender-pipeline evaluate --model gender-classifier@1 --data /tmp/utk/holdout --format manifest
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--holdout", type=int, required=True, help="images held out")
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args()
    with open(os.path.join(args.data, "labels.csv"), newline="") as handle:
        reader = csv.DictReader(handle)
        columns, rows = reader.fieldnames, list(reader)
    order = np.random.default_rng(args.seed).permutation(len(rows))
    parts = {"holdout": sorted(order[: args.holdout]), "dev": sorted(order[args.holdout:])}
    images = os.path.abspath(os.path.join(args.data, "images"))
    for name, indices in parts.items():
        folder = os.path.join(args.out, name)
        os.makedirs(os.path.join(folder, "images"), exist_ok=True)
        with open(os.path.join(folder, "labels.csv"), "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            for i in indices:
                writer.writerow(rows[i])
                link = os.path.join(folder, "images", rows[i]["image"])
                if not os.path.lexists(link):
                    os.symlink(os.path.join(images, rows[i]["image"]), link)
        print(f"{name}: {len(indices)} images in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
