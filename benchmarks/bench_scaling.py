"""How scoring time and peak memory grow with the number of photos, and how close the
pipeline gets to its own limits (the model alone, the face front end alone).

    python benchmarks/make_uploads.py --data PATH/utkface-dev --out /tmp/bench --count 1000
    python benchmarks/bench_scaling.py --uploads /tmp/bench --sizes 100,1000,5000

Larger sizes reuse the generated uploads under new user ids (hard links), so every key is
a distinct photo object. Peak memory is the summed RSS of this process and its workers,
sampled every 50 ms.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import psutil  # noqa: E402


class PeakMemory:
    """Peak of the summed resident memory of this process and its children."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for process in [me, *me.children(recursive=True)]:
                try:
                    total += process.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.05)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def build_source(uploads: str, count: int, into: str) -> None:
    files = sorted(os.path.relpath(os.path.join(d, f), uploads)
                   for d, _, names in os.walk(uploads) for f in names)
    for index in range(count):
        key = files[index % len(files)]
        user, rest = key.split(os.sep, 1)
        target = os.path.join(into, f"{user}-c{index // len(files)}", rest)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.link(os.path.join(uploads, key), target)


def model_ceiling(predictor, batch_size: int, seconds: float = 5.0) -> float:
    chips = np.random.default_rng(0).integers(0, 256, (batch_size, predictor.framing.size,
                                                      predictor.framing.size, 3), dtype=np.uint8)
    predictor.predict(chips)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        predictor.predict(chips)
        done += batch_size
    return done / (time.perf_counter() - started)


def front_end_ceiling(uploads: str, framing, sample: int = 60) -> float:
    """Photos per second of read+decode+detect+align on one core, times the cores."""
    from gender_pipeline.runtime.processes import cpu_count
    from gender_pipeline.faces.decoding import DecodeLimits
    from gender_pipeline.faces.chip import face_chip

    files = sorted(os.path.join(d, f) for d, _, names in os.walk(uploads) for f in names)[:sample]
    started = time.perf_counter()
    for path in files:
        with open(path, "rb") as handle:
            face_chip(handle.read(), framing, DecodeLimits())
    return len(files) / (time.perf_counter() - started) * cpu_count()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uploads", required=True, help="folder made by make_uploads.py")
    parser.add_argument("--sizes", default="100,1000,5000")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--model", default="gender-classifier")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    from gender_pipeline.models.registry import Registry
    from gender_pipeline.engine.engine import ScoringOptions
    from gender_pipeline.engine.engine import RunStamp, ScoringEngine
    from gender_pipeline.lake.storage import Store

    uploads = os.path.join(args.uploads, "uploads")
    work = tempfile.mkdtemp(prefix="bench-scaling-")
    predictor = Registry(os.path.join(work, "registry")).load_predictor(args.model, args.device)
    batch_size = args.batch_size or predictor.auto_batch_size()
    options = ScoringOptions(batch_size=batch_size, workers=args.workers)
    print(f"model {predictor.name}@{predictor.version} on {predictor.device}, batch {batch_size}")
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        source = os.path.join(work, f"n{size}")
        build_source(uploads, size, source)
        store = Store(source)
        objects = store.list_objects()
        with PeakMemory() as memory:
            started = time.perf_counter()
            results, stats = ScoringEngine(predictor, options,
                                           RunStamp("bench", datetime.now(timezone.utc))).score(store, objects, {})
            seconds = time.perf_counter() - started
        assert len(results) == size
        rows.append((size, seconds, size / seconds, memory.peak / 2**20))
        shutil.rmtree(source)
        print(f"n={size}: {seconds:.1f}s, {size / seconds:.2f} photos/s, peak {memory.peak / 2**20:.0f} MiB",
              flush=True)

    base = rows[0]
    print(f"\n{'photos':>8}{'seconds':>10}{'photos/s':>10}{'s per 1k':>10}{'time ratio':>12}"
          f"{'size ratio':>12}{'peak MiB':>10}{'mem ratio':>10}")
    for size, seconds, rate, peak in rows:
        print(f"{size:8d}{seconds:10.1f}{rate:10.2f}{1000 * seconds / size:10.1f}{seconds / base[1]:12.2f}"
              f"{size / base[0]:12.1f}{peak:10.0f}{peak / base[3]:10.2f}")

    ceiling = model_ceiling(predictor, batch_size)
    front = front_end_ceiling(uploads, predictor.framing)
    best = max(r[2] for r in rows)
    print(f"\nmodel alone (random chips, batch {batch_size}): {ceiling:.0f} images/s; "
          f"end to end reaches {best / ceiling:.1%} of it")
    print(f"face front end alone (read+decode+detect+align, one core x cores): {front:.2f} photos/s; "
          f"end to end reaches {best / front:.0%} of it")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
