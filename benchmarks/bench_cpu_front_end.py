"""The CPU path against the limit decoding sets, side by side in one run.

On the same uploads and the same number of worker processes:

* decode only: the project's `decode_photo` over every upload in `--workers` processes
  (bytes read beforehand), the rate at which decoding alone could feed the pipeline;
* the scoring stage (`ScoringEngine`, CPU front end, reading from the folder) with the
  detector's first look at `--first-sides` (0: RetinaFace at 640 px only, as before; 256,
  the default: a look at a 256 x 192 canvas first, 640 px where it finds nothing or a
  small face).

Rounds are interleaved (decode only, then each setting) and medians reported: a shared
machine's rate moves by several percent from one minute to the next.

Both rates are steady state: photos between the moments 10% and 90% of them were done,
over the time between (worker start-up and the last stragglers are left out; the wall
time with start-up is printed too). With `truth.csv` (benchmarks/make_uploads.py) it
prints `no_face` among real faces and the accuracy of the answers.

    python benchmarks/bench_cpu_front_end.py --uploads /tmp/uploads --workers 2
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from gender_pipeline.faces.decoding import DecodedPhoto, decode_photo  # noqa: E402
from gender_pipeline.faces.front_end import FIRST_SIDE  # noqa: E402
from benchmarks.bench_scoring import load_truth  # noqa: E402


def _decode(data: bytes) -> bool:
    return isinstance(decode_photo(data), DecodedPhoto)


def _ping() -> None:
    return None


def steady(marks: list[float], total: int) -> float:
    """Photos per second between the 10% and the 90% marks."""
    low, high = int(total * 0.1), int(total * 0.9)
    if high <= low or len(marks) <= high:
        return float("nan")
    return (high - low) / (marks[high] - marks[low])


def decode_only(payloads: list[bytes], workers: int) -> tuple[float, float]:
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for future in [pool.submit(_ping) for _ in range(workers)]:
            future.result()  # started
        start = time.perf_counter()
        marks = []
        for _ in pool.map(_decode, payloads, chunksize=1):
            marks.append(time.perf_counter())
    return steady(marks, len(payloads)), time.perf_counter() - start


def score(root: str, predictor, workers: int, first_side: int) -> tuple[float, float, dict]:
    from gender_pipeline.engine.engine import RunStamp, ScoringEngine, ScoringOptions
    from gender_pipeline.lake.storage import Store

    store = Store(root)
    objects = store.list_objects()
    marks: list[float] = []
    seen = [0]

    def progress(done: int, total: int) -> None:
        while seen[0] < done:
            marks.append(time.perf_counter())
            seen[0] += 1

    cpu = time.process_time()
    start = time.perf_counter()
    options = ScoringOptions(workers=workers, front_end="cpu", detect_first_side=first_side)
    engine = ScoringEngine(predictor, options, RunStamp("bench", datetime.now(timezone.utc)), progress=progress)
    rows, stats = engine.score(store, objects, {})
    wall = time.perf_counter() - start
    main_cpu = time.process_time() - cpu
    return steady(marks, len(objects)), wall, {"rows": {r.photo_key: r for r in rows}, "stats": stats,
                                               "main_cpu": main_cpu, "first": marks[0] - start if marks else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uploads", required=True, help="a folder from make_uploads.py (uploads/ and truth.csv)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--first-sides", default=f"0,{FIRST_SIDE}",
                        help="first-look sides to compare (0: RetinaFace at 640 px only)")
    parser.add_argument("--model", default="dlib-gender-v1")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; medians are reported")
    args = parser.parse_args()

    from gender_pipeline.models.registry import Registry

    root = os.path.join(args.uploads, "uploads")
    if not os.path.isdir(root):
        root = args.uploads
    truth = load_truth(args.uploads) if os.path.exists(os.path.join(args.uploads, "truth.csv")) else {}
    paths = sorted(os.path.join(d, n) for d, _, names in os.walk(root) for n in names)
    payloads = []
    for path in paths:
        with open(path, "rb") as handle:
            payloads.append(handle.read())
    predictor = Registry(tempfile.mkdtemp(prefix="bench-registry-")).load_predictor(args.model, "cpu")
    print(f"{len(paths)} uploads, {args.workers} worker processes, model {predictor.name}")

    sides = [int(v) for v in args.first_sides.split(",")]
    decode_rates, results = [], {side: [] for side in sides}
    for round_ in range(args.rounds):  # interleaved, so that both see the same machine
        decode_rate, decode_wall = decode_only(payloads, args.workers)
        decode_rates.append(decode_rate)
        print(f"round {round_ + 1}: decode only {decode_rate:.1f} photos/s steady ({decode_wall:.1f} s for all)",
              flush=True)
        for side in sides:
            rate, wall, out = score(root, predictor, args.workers, side)
            results[side].append((rate, wall, out))
            print(f"round {round_ + 1}: scoring, first look {side or 'off'}: {rate:.1f} photos/s steady "
                  f"({rate / decode_rate:.0%})", flush=True)
    decode_rate = statistics.median(decode_rates)
    print(f"decode only: {decode_rate:.1f} photos/s steady (median of {args.rounds})")
    for side in sides:
        rate = statistics.median(r for r, _, _ in results[side])
        _, wall, out = results[side][-1]
        stats, rows = out["stats"], out["rows"]
        line = (f"scoring, first look {side or 'off'}: {rate:.1f} photos/s steady (median) = {rate / decode_rate:.0%} "
                f"of decode only (last round: {wall:.1f} s wall, the first answer after {out['first']:.1f} s; "
                f"the main process used {out['main_cpu']:.1f} s of CPU); stage seconds "
                + ", ".join(f"{k} {v:.1f}" for k, v in sorted(stats.stage_seconds.items())))
        if truth:
            faces = [k for k, v in truth.items() if v in ("male", "female")]
            no_face = sum(1 for k in faces if rows[k].reject_reason == "no_face")
            answered = [k for k in faces if rows[k].status == "scored"]
            right = sum(1 for k in answered if rows[k].gender == truth[k])
            decided = [k for k in answered if rows[k].gender in ("male", "female")]
            right_decided = sum(1 for k in decided if rows[k].gender == truth[k])
            broken_ok = sum(1 for k, v in truth.items() if v not in ("male", "female")
                            and rows[k].reject_reason == v)
            broken = sum(1 for v in truth.values() if v not in ("male", "female"))
            line += (f"; no_face {no_face}/{len(faces)} real faces; accuracy {right / len(faces):.2%} of faces "
                     f"({right_decided / max(1, len(decided)):.2%} of decided answers); broken files with the "
                     f"expected reason {broken_ok}/{broken}")
        print(line, flush=True)

if __name__ == "__main__":
    main()
