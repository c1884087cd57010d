"""`make demo`: build a small uploads tree from real sample photos and broken files,
score it with the default model, and print where the Parquet went."""

from __future__ import annotations

import os
import shutil
import sys

from gender_pipeline import samples
from gender_pipeline.cli import main as cli_main


def build_uploads(root: str) -> int:
    files = {}
    for index, (name, data) in enumerate(sorted(samples.face_variants().items())):
        files[f"user-{index:03d}/{name}"] = data
    for index, (name, (data, _reason)) in enumerate(sorted(samples.broken_files().items())):
        files[f"user-{100 + index:03d}/{name}"] = data
    samples.write_tree(root, files)
    return len(files)


def main() -> int:
    base = os.path.abspath(os.environ.get("DEMO_DIR", "demo-output"))
    shutil.rmtree(base, ignore_errors=True)
    uploads, lake, registry = (os.path.join(base, d) for d in ("uploads", "lake", "registry"))
    count = build_uploads(uploads)
    print(f"demo: wrote {count} sample uploads to {uploads}", flush=True)
    status = cli_main(["score", "--source", uploads, "--output", lake, "--registry", registry])
    if status == 0:
        print(f"\nParquet dataset: {lake}/predictions  (pandas.read_parquet('{lake}/predictions'))")
    return status


if __name__ == "__main__":
    sys.exit(main())
