"""A night on a large history, end to end through the CLI: does its cost follow its new
photos? The same 400 new uploads are scored twice: once into an empty output, once into
an output that already answered 1,000,000 photos still in the source.

    python benchmarks/bench_big_night.py --uploads /tmp/uh --answered 1000000 --new 400 --work /tmp/bn

The answered photos are hard links of one real photo under 1,000,000 user folders (a new
copy every 5,000 links), with their history written in the v1 Parquet contract (scored
after the files' modification time). The first night on that output builds its photo
state and users table from the history (once, after an upgrade); a second batch of new
uploads makes the measured night. Printed for each night: wall seconds of the command
(the temporary Prefect server's start included), the run's own stage times, and the peak
resident memory of the command's process and of its whole process tree.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from datetime import date, datetime, timezone

import numpy as np
import pyarrow as pa

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def real_uploads(folder: str, count: int, skip: int = 0) -> list[str]:
    """`count` upload keys of a make_uploads.py folder (first photos only)."""
    import csv

    with open(os.path.join(folder, "truth.csv"), newline="") as handle:
        keys = [row["photo_key"] for row in csv.DictReader(handle) if "-2" not in row["photo_key"].rsplit("/", 1)[-1]]
    return keys[skip:skip + count]


def copy_uploads(folder: str, keys: list[str], source: str, prefix: str) -> None:
    for key in keys:
        target = os.path.join(source, f"{prefix}{key}")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(folder, "uploads", key), target)
        stamp = time.time() - 600
        os.utime(target, (stamp, stamp))


def build_answered(source: str, output: str, count: int, photo: str) -> None:
    """`count` user folders holding a hard link of `photo`, and their history."""
    from gender_pipeline.lake.history import conform, write_predictions
    from gender_pipeline.lake.storage import Store

    links = os.path.join(source, "..", "originals")
    os.makedirs(links, exist_ok=True)
    copy = None
    stamp = time.time() - 7 * 24 * 3600
    for i in range(count):
        if i % 5000 == 0:
            copy = os.path.join(links, f"photo-{i // 5000}.jpg")
            shutil.copyfile(photo, copy)
            os.utime(copy, (stamp, stamp))
        folder = os.path.join(source, f"old{i:07d}")
        os.mkdir(folder)
        os.link(copy, os.path.join(folder, "signup.jpg"))
        if i % 100_000 == 99_999:
            print(f"  {i + 1:,} answered photos in the source", file=sys.stderr, flush=True)
    store = Store(output)
    scored_at = datetime.fromtimestamp(stamp + 3600, timezone.utc)
    rng = np.random.default_rng(0)
    for start in range(0, count, 2000):
        n = min(2000, count - start)
        p = rng.random(n).astype(np.float32)
        users = [f"old{i:07d}" for i in range(start, start + n)]
        table = conform(pa.table({
            "user_id": users, "photo_key": [f"{u}/signup.jpg" for u in users],
            "photo_sha256": ["0" * 64] * n, "status": ["scored"] * n, "reject_reason": pa.nulls(n, pa.string()),
            "gender": np.where(p >= 0.5, "male", "female"), "p_male": p, "p_female": 1 - p,
            "confidence": np.maximum(p, 1 - p), "face_count": np.ones(n, np.int16), "face_box": [[1, 2, 3, 4]] * n,
            "model_name": ["dlib-gender-v1"] * n, "model_version": ["1"] * n,
            "scored_at": pa.array([scored_at] * n, pa.timestamp("us", tz="UTC")), "run_id": ["history"] * n,
            "schema_version": np.ones(n, np.int16)}))
        write_predictions(store, table, date(2026, 1, 1 + (start // 2000) % 28), f"part-history-{start // 2000:05d}")


def night(source: str, output: str, registry: str) -> dict:
    """One `gender-pipeline score` run: wall seconds, its summary, peak memory."""
    import psutil

    command = [os.path.join(os.path.dirname(sys.executable), "gender-pipeline"), "score", "--source", source,
               "--output", output, "--registry", registry, "--json"]
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "GX_ANALYTICS_ENABLED": "False"}
    env.pop("PREFECT_API_URL", None)
    peak = {"main": 0, "tree": 0}
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    watched = psutil.Process(process.pid)
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            try:
                main = watched.memory_info().rss
                tree = main + sum(c.memory_info().rss for c in watched.children(recursive=True))
            except psutil.Error:
                continue
            peak["main"], peak["tree"] = max(peak["main"], main), max(peak["tree"], tree)

    threading.Thread(target=sample, daemon=True).start()
    out, _ = process.communicate()
    done.set()
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"the run failed ({process.returncode}):\n{out[-3000:]}")
    summary = json.loads(out[out.index("{"):])
    return {"wall": wall, "summary": summary, "peak_main_mib": peak["main"] / 2**20,
            "peak_tree_mib": peak["tree"] / 2**20}


def show(label: str, result: dict) -> None:
    s = result["summary"]
    timings = ", ".join(f"{k} {v:.1f}" for k, v in s.get("timings", {}).items())
    print(f"{label}: {result['wall']:.1f} s wall (the run itself {s['wall_seconds']:.1f} s: {timings}); "
          f"{s['new']} new, {s['scored']} scored, {s['rejected']} rejected, {s['listed']:,} listed; "
          f"peak {result['peak_main_mib']:.0f} MiB (command), {result['peak_tree_mib']:.0f} MiB (with its workers "
          f"and the temporary Prefect server)", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uploads", required=True, help="a make_uploads.py folder (uploads/ and truth.csv)")
    parser.add_argument("--answered", type=int, default=1_000_000)
    parser.add_argument("--new", type=int, default=400)
    parser.add_argument("--work", default="/tmp/big-night")
    parser.add_argument("--reuse", action="store_true", help="keep the answered photos built by an earlier run")
    args = parser.parse_args()

    big_source, big_output = os.path.join(args.work, "source"), os.path.join(args.work, "lake")
    registry = os.path.join(args.work, "registry")
    first, second = real_uploads(args.uploads, args.new), real_uploads(args.uploads, args.new, skip=args.new)
    if not args.reuse or not os.path.exists(big_source):
        shutil.rmtree(args.work, ignore_errors=True)
        os.makedirs(big_source)
        started = time.perf_counter()
        build_answered(big_source, big_output, args.answered,
                       os.path.join(args.uploads, "uploads", first[0]))
        print(f"built {args.answered:,} answered photos and their history in {time.perf_counter() - started:.0f} s",
              flush=True)
    else:
        for folder in ("lake/users", "lake/_state", "lake/_runs", "lake/_erasures", "small-lake"):
            shutil.rmtree(os.path.join(args.work, folder), ignore_errors=True)
        for day in os.listdir(os.path.join(big_output, "predictions")):
            for name in os.listdir(os.path.join(big_output, "predictions", day)):
                if "history" not in name:
                    os.remove(os.path.join(big_output, "predictions", day, name))
        for folder in os.listdir(big_source):
            if folder.startswith("new"):
                shutil.rmtree(os.path.join(big_source, folder))

    copy_uploads(args.uploads, first, big_source, "new1-")
    show("first night on the big output (builds its state from the history)",
         night(big_source, big_output, registry))
    copy_uploads(args.uploads, second, big_source, "new2-")
    big = night(big_source, big_output, registry)
    small_source, small_output = os.path.join(args.work, "small-source"), os.path.join(args.work, "small-lake")
    shutil.rmtree(small_source, ignore_errors=True)
    copy_uploads(args.uploads, second, small_source, "new2-")
    small = night(small_source, small_output, registry)
    show(f"{args.new} new photos, empty history", small)
    show(f"the same {args.new} photos, {args.answered:,} answered", big)
    print(f"ratio: {big['wall'] / small['wall']:.2f}x the time, "
          f"{big['peak_main_mib'] - small['peak_main_mib']:+.0f} MiB peak (command), "
          f"{big['peak_tree_mib'] - small['peak_tree_mib']:+.0f} MiB (tree)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
