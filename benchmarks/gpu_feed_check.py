"""End to end on the GPU path: phone-sized JPEG uploads (and optionally a mixed uploads
folder) scored through the ScoringEngine with the GPU front end, JPEGs decoded on the device.

Prints photos per second end to end, the GPU's mean utilisation (nvidia-smi, sampled
twice a second), seconds per stage and the stage that limits the run. The uploads are
made from the public sample faces (matplotlib's Grace Hopper, scikit-image's astronaut)
pasted at random places and sizes into 4032 x 3024 photos; `--distinct` different files
are linked under `--count` keys (every key is read, hashed and scored).

    python benchmarks/gpu_feed_check.py --count 10000 [--mixed /tmp/uploads/uploads]
    python benchmarks/gpu_feed_check.py --count 64 --device cpu      # the same path on the CPU
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _phone_photo(seed: int) -> bytes:
    import numpy as np

    from gender_pipeline import samples

    rng = np.random.default_rng(seed)
    face = samples.grace_hopper() if seed % 2 else samples.astronaut()
    from PIL import Image

    scale = rng.uniform(1.5, 4.0)
    face = np.asarray(Image.fromarray(face).resize((int(face.shape[1] * scale), int(face.shape[0] * scale))))
    at = (int(rng.integers(0, 4032 - face.shape[1])), int(rng.integers(0, 3024 - face.shape[0])))
    photo = samples.pasted_into(face, (4032, 3024), at, seed=seed)
    return samples.encode(photo, "JPEG", quality=int(rng.integers(80, 95)))


def make_jpegs(root: str, count: int, distinct: int) -> str:
    folder = os.path.join(root, "phone-jpegs")
    with ProcessPoolExecutor() as pool:
        payloads = list(pool.map(_phone_photo, range(distinct)))
    originals = []
    os.makedirs(os.path.join(folder, "_originals"), exist_ok=True)
    for index, data in enumerate(payloads):
        path = os.path.join(folder, "_originals", f"{index}.jpg")
        with open(path, "wb") as handle:
            handle.write(data)
        originals.append(path)
    for index in range(count):
        user = os.path.join(folder, "uploads", f"user-{index:06d}")
        os.makedirs(user, exist_ok=True)
        os.link(originals[index % distinct], os.path.join(user, "IMG.jpg"))
    return os.path.join(folder, "uploads")


class Utilisation:
    """nvidia-smi's GPU utilisation, sampled every half second while the block runs."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.done.wait(0.5):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout.strip()
            except (OSError, subprocess.SubprocessError):
                return
            if out:
                self.samples.append(float(out.splitlines()[0]))

    def __enter__(self) -> "Utilisation":
        self.thread.start()
        return self

    def __exit__(self, *_) -> None:
        self.done.set()
        self.thread.join()

    @property
    def mean(self) -> float | None:
        return round(sum(self.samples) / len(self.samples), 1) if self.samples else None


def run(folder: str, predictor, batch: int, gpu_batch: int, label: str) -> dict:
    import torch

    from gender_pipeline.engine.engine import ScoringOptions
    from gender_pipeline.engine.engine import RunStamp, ScoringEngine
    from gender_pipeline.lake.storage import Store

    store = Store(folder)
    objects = store.list_objects()
    with Utilisation() as busy:
        start = time.perf_counter()
        rows, stats = ScoringEngine(predictor, ScoringOptions(front_end="gpu", gpu_batch=gpu_batch, batch_size=batch),
                                    RunStamp("gpu-feed", datetime.now(timezone.utc))).score(store, objects, {})
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    stages = {k: round(v, 2) for k, v in sorted(stats.stage_seconds.items(), key=lambda kv: -kv[1])}
    # The main process runs header, device decode, detect, landmarks, warp and model one
    # after the other; reading runs in its own thread; `decode` adds the CPU workers' time
    # for the photos the device does not decode.
    main_thread = sum(v for k, v in stats.stage_seconds.items() if k not in ("read",))
    limiting = max(stages, key=stages.get) if stages else None
    return {"set": label, "photos": len(rows), "scored": stats.scored, "rejected": stats.rejected,
            "reasons": dict(stats.reasons), "seconds": round(seconds, 2),
            "photos_per_s": round(len(rows) / seconds, 1), "gpu_utilisation_mean_pct": busy.mean,
            "stage_seconds": stages, "limiting_stage": limiting,
            "stage_seconds_outside_reading": round(main_thread, 2),
            "peak_gpu_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20) if torch.cuda.is_available()
            else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--distinct", type=int, default=200)
    parser.add_argument("--mixed", help="a {user_id}/{file} tree of mixed uploads (benchmarks/make_uploads.py)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="dlib-gender-v1")
    parser.add_argument("--gpu-batch", type=int, default=64)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()

    from gender_pipeline.models.registry import Registry

    work = tempfile.mkdtemp(prefix="gpu-feed-")
    try:
        started = time.perf_counter()
        folder = make_jpegs(work, args.count, min(args.distinct, args.count))
        print(json.dumps({"made_uploads": args.count, "distinct": min(args.distinct, args.count),
                          "seconds": round(time.perf_counter() - started, 1)}), flush=True)
        predictor = Registry(os.path.join(work, "registry")).load_predictor(args.model, args.device)
        warm = os.path.join(work, "warm")
        os.makedirs(warm)
        for name in sorted(os.listdir(folder))[:args.gpu_batch]:
            os.symlink(os.path.join(folder, name), os.path.join(warm, name))
        run(warm, predictor, args.batch, args.gpu_batch, "warm-up")  # kernels, cuDNN choices, worker start
        print(json.dumps(run(folder, predictor, args.batch, args.gpu_batch, "phone JPEGs")), flush=True)
        if args.mixed:
            print(json.dumps(run(args.mixed, predictor, args.batch, args.gpu_batch, "mixed uploads")), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
