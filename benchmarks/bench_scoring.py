"""End-to-end scoring speed and accuracy against a simple per-photo loop, same folder, same run.

The simple loop is what a competent first script does: open each photo, apply its EXIF
orientation, shrink it to at most 1024 pixels a side, detect with dlib's HOG detector,
align with the five-point model, classify one face at a time with the same model. The
pipeline is the `nightly-scoring` flow (Prefect, expectations, Parquet) as `gender-pipeline
score` runs it, once per model and face detector asked for; its time per stage (read,
decode, detect, landmarks, warp, model; summed over the worker processes) is printed too.

    python benchmarks/make_uploads.py --data PATH/utkface-dev --out /tmp/bench --count 1000
    python benchmarks/bench_scoring.py --uploads /tmp/bench --detectors hog,retinaface
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from gender_pipeline.models.registry import Registry  # noqa: E402


def load_truth(folder: str) -> dict[str, str]:
    with open(os.path.join(folder, "truth.csv"), newline="") as handle:
        return {row["photo_key"]: row["expected"] for row in csv.DictReader(handle)}


def naive_loop(root: str, keys: list[str], predictor) -> dict[str, str | None]:
    """One photo at a time, shrunk to 1024 pixels, HOG detection, batch of one."""
    import pillow_heif

    from gender_pipeline.faces.front_end import FaceFrontEnd

    pillow_heif.register_heif_opener()
    frontend = FaceFrontEnd(detector="hog", detect_side=1024)
    answers: dict[str, str | None] = {}
    for key in keys:
        try:
            image = ImageOps.exif_transpose(Image.open(os.path.join(root, key))).convert("RGB")
            image.thumbnail((1024, 1024))
            rgb = np.ascontiguousarray(np.asarray(image))
            boxes = frontend.detect(rgb)
            if not boxes:
                answers[key] = None
                continue
            chip = frontend.align(rgb, boxes[0], predictor.framing)
            p_male = float(predictor.predict(chip[None]).p_male[0])
            answers[key] = "male" if p_male >= 0.5 else "female"
        except Exception:
            answers[key] = None
    return answers


def accuracy(answers: dict[str, str | None], truth: dict[str, str]) -> tuple[float, int, int]:
    faces = [k for k, v in truth.items() if v in ("male", "female") and k in answers]
    answered = [k for k in faces if answers[k] in ("male", "female")]
    correct = sum(answers[k] == truth[k] for k in answered)
    return (correct / len(answered) if answered else float("nan")), len(answered), len(faces)


def contenders(source: Registry, work: Registry, refs: list[str], detectors: list[str | None]) -> list[str]:
    """The models to run: each as registered, or copied into the work registry once per
    face detector with only its card's detector changed."""
    if detectors == [None]:
        if source.url != work.url:
            for ref in refs:
                copy_model(source, work, ref, None)
        return refs
    return [copy_model(source, work, ref, detector) for ref in refs for detector in detectors]


def copy_model(source: Registry, work: Registry, ref: str, detector: str | None) -> str:
    from gender_pipeline.models.registry import ModelRef

    name, version = source.resolve(ModelRef.parse(ref))
    card = source.card(name, version)
    files = {path.split(f"{name}/{version}/", 1)[1]: source.store.read(source.store.key_of(path))
             for path in source.store.fs.find(source.store.path(f"{name}/{version}"))
             if not path.endswith("/card.json")}
    target = name if detector is None else f"{name}-{detector}"
    if detector is not None:
        card = {**card, "framing": {**card["framing"], "detector": detector}}
    if (target, version) != (name, version) or source.url != work.url:
        work.register(target, version, {k: v for k, v in card.items() if k not in ("name", "version")}, files)
    return f"{target}@{version}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uploads", required=True, help="folder made by make_uploads.py")
    parser.add_argument("--limit", type=int, default=None, help="use the first N uploads only")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--registry", default=None, help="a registry to take the models from (default: a new one)")
    parser.add_argument("--models", default="gender-classifier",
                        help="comma-separated NAME[@VERSION]: the flow runs once with each (default: production)")
    parser.add_argument("--detectors", default=None,
                        help="comma-separated face detectors to run each model with (hog, retinaface); "
                             "default: what each model's card says")
    parser.add_argument("--skip-naive", action="store_true", help="time the flow only")
    args = parser.parse_args()

    from gender_pipeline.flows.scoring import nightly_scoring
    from gender_pipeline.night.options import NightOptions

    truth = load_truth(args.uploads)
    keys = sorted(truth)[: args.limit] if args.limit else sorted(truth)
    work = tempfile.mkdtemp(prefix="bench-scoring-")
    source = os.path.join(work, "uploads")
    for key in keys:  # the same subset for both contenders
        os.makedirs(os.path.dirname(os.path.join(source, key)), exist_ok=True)
        os.link(os.path.join(args.uploads, "uploads", key), os.path.join(source, key))
    registry = os.path.join(work, "registry")
    models = contenders(Registry(args.registry or registry), Registry(registry),
                        [m.strip() for m in args.models.split(",")],
                        args.detectors.split(",") if args.detectors else [None])
    n_faces = sum(truth[k] in ("male", "female") for k in keys)
    rows = []

    if not args.skip_naive:
        predictor = Registry(registry).load_predictor(models[0], "cpu")
        started = time.perf_counter()
        naive = naive_loop(source, keys, predictor)
        naive_seconds = time.perf_counter() - started
        acc_naive, n_naive, _ = accuracy(naive, truth)
        rows.append((f"naive loop ({models[0]})", naive_seconds, acc_naive, n_naive))

    # Start Prefect's temporary server before timing, as a deployment's worker has one.
    os.makedirs(os.path.join(work, "empty"))
    nightly_scoring(NightOptions.from_flat(dict(source=os.path.join(work, "empty"), output=os.path.join(work, "warm"),
                                                registry=registry)))
    import pandas as pd

    print(f"uploads: {len(keys)} ({n_faces} with a face, {len(keys) - n_faces} broken)")
    for index, model in enumerate(models):
        lake = os.path.join(work, f"lake-{index}")
        started = time.perf_counter()
        summary = nightly_scoring(NightOptions.from_flat(dict(source=source, output=lake, registry=registry, model=model,
                                  workers=args.workers, batch_size=args.batch_size)))
        seconds = time.perf_counter() - started
        frame = pd.read_parquet(os.path.join(lake, "predictions"))
        ours = {k: (g if s == "scored" else None) for k, g, s in zip(frame.photo_key, frame.gender, frame.status)}
        rows_ok = sorted(frame.photo_key) == keys and frame.photo_key.is_unique
        wrong_rejects = sum(1 for k, r in zip(frame.photo_key, frame.reject_reason)
                            if truth[k] not in ("male", "female") and r != truth[k])
        acc_ours, n_ours, _ = accuracy(ours, truth)
        print(f"{summary['model']}: every upload exactly one row: {rows_ok}; broken files with the wrong reason: "
              f"{wrong_rejects}; reject reasons: {summary['reject_reasons']}")
        stages = summary["stage_seconds"]
        print("  seconds per stage (summed over processes): "
              + ", ".join(f"{k} {stages.get(k, 0):.1f}" for k in ("read", "decode", "detect", "landmarks", "warp",
                                                                  "model")))
        rows.append((f"flow, {summary['model']}", seconds, acc_ours, n_ours))

    print(f"\n{'':40}{'photos/s':>10}{'seconds':>10}{'accuracy':>10}{'answered':>10}")
    for name, seconds, acc, answered in rows:
        print(f"{name:40}{len(keys) / seconds:10.2f}{seconds:10.1f}{acc:10.4f}{answered:10d}")
    base = rows[0][1]
    print("time relative to the first row: " + ", ".join(f"{name} {seconds / base:.2f}x" for name, seconds, *_ in rows))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
