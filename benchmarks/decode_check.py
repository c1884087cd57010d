"""Does the device JPEG decoder give the CPU's pixels, even while other work is queued on the
device? A check that can catch the corruption of an unordered decode (faces.jpeg_device).

    python benchmarks/decode_check.py --device cuda [--uploads DIR] [--rounds 20]

Each round queues about 100 ms of kernels on the current stream, then reductions that read
tensors which are freed while those reductions still wait (their memory goes back to the
allocator, as in meta-pytorch/torchcodec#1634), then decodes a batch of JPEGs on the device
(faces.jpeg_device.decode_jpegs) and, at once, a reduction of each image on the current
stream. Every image is compared with Pillow's decode of the same bytes (EXIF orientation
applied): the mean absolute difference must stay under --tolerance levels (nvJPEG and
libjpeg-turbo round differently; a corrupted image is off by tens), and the device's own
sum of each image must equal the sum of its host copy. It prints the largest differences
and exits 1 when any image fails. With --device cpu the same comparison checks the CPU
decoder (TorchCodec's libjpeg-turbo) against Pillow's (tests/test_decoding.py runs it).

The JPEGs: those under --uploads (a folder made by benchmarks/make_uploads.py), else faces
made from the public photos installed packages ship, at several sizes, qualities and
encodings (baseline, progressive, grayscale, EXIF-rotated).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from gender_pipeline.faces.jpeg_device import DECODER, decode_jpegs  # noqa: E402


@dataclass
class Difference:
    name: str
    width: int
    height: int
    mean_abs: float  # mean absolute difference from Pillow, in levels
    max_abs: int
    sum_matches: bool  # the device's reduction of the image equals its host copy's
    decoded: bool = True


def sample_jpegs(limit: int = 64) -> dict[str, bytes]:
    """JPEGs of real faces in the encodings uploads come in."""
    from gender_pipeline import samples

    faces = [Image.fromarray(face) for face in (samples.grace_hopper(), samples.astronaut()) if face is not None]
    found = {}
    for number, face in enumerate(faces):
        for side in (240, 640, 1600):
            scaled = np.asarray(face.resize((side, round(side * face.height / face.width))))
            for quality in (60, 90):
                found[f"face{number}-{side}-q{quality}.jpg"] = samples.encode(scaled, "JPEG", quality=quality)
            found[f"face{number}-{side}-progressive.jpg"] = samples.encode(scaled, "JPEG", quality=85,
                                                                           progressive=True)
            found[f"face{number}-{side}-gray.jpg"] = samples.encode(scaled.mean(axis=2).astype(np.uint8), "JPEG",
                                                                    quality=85)
            found[f"face{number}-{side}-exif6.jpg"] = samples.jpeg_with_orientation(scaled, 6)
    for name, data in samples.face_variants().items():
        if data[:2] == b"\xff\xd8":
            found[name] = data
    return dict(list(found.items())[:limit])


def uploads_jpegs(folder: str, limit: int) -> dict[str, bytes]:
    found = {}
    for base, _, files in os.walk(folder):
        for file in sorted(files):
            path = os.path.join(base, file)
            with open(path, "rb") as handle:
                head = handle.read(3)
            if head[:2] == b"\xff\xd8":
                with open(path, "rb") as handle:
                    found[os.path.relpath(path, folder)] = handle.read()
            if len(found) >= limit:
                return found
    return found


def pillow_rgb(data: bytes) -> np.ndarray:
    return np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))


def whole(payloads: dict[str, bytes]) -> tuple[dict[str, bytes], list[str]]:
    """The JPEGs Pillow decodes whole, and the names of the others (the broken uploads that
    make_uploads.py mixes in: the pipeline rejects them on the CPU path, naming why)."""
    kept, broken = {}, []
    for name, data in payloads.items():
        try:
            pillow_rgb(data)
        except (OSError, ValueError, SyntaxError):
            broken.append(name)
        else:
            kept[name] = data
    return kept, broken


def queue_work(device: str, milliseconds: float = 100.0) -> None:
    """About `milliseconds` of kernels on the current stream, then reductions reading
    tensors freed while they still wait: their blocks are back in the allocator's pool,
    ready to be handed to the decoder."""
    if not device.startswith("cuda"):
        return
    a = torch.randn(4096, 4096, device=device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    a = a @ a
    end.record()
    end.synchronize()
    repeats = max(1, int(milliseconds / max(start.elapsed_time(end), 0.01)))
    for _ in range(repeats):
        a = a @ a
        a = a / a.norm()
    doomed = [torch.full((3, 1024, 1024), 7, dtype=torch.uint8, device=device) for _ in range(8)]
    sums = [t.float().sum() for t in doomed]
    del doomed  # freed while the reductions above are still queued
    del sums


def compare(payloads: dict[str, bytes], device: str, queued: bool = True) -> list[Difference]:
    """Decode `payloads` on `device` in one batch (after queueing work, on CUDA) and compare
    every image with Pillow's decode."""
    if queued:
        queue_work(device)
    names = list(payloads)
    images = decode_jpegs([payloads[n] for n in names], device)
    device_sums = [None if image is None else image.to(torch.int64).sum() for image in images]  # on the stream
    found = []
    for name, image, device_sum in zip(names, images, device_sums):
        reference = pillow_rgb(payloads[name])
        if image is None:
            found.append(Difference(name, reference.shape[1], reference.shape[0], float("inf"), 255, False, False))
            continue
        host = image.permute(1, 2, 0).cpu().numpy()
        if host.shape != reference.shape:
            found.append(Difference(name, host.shape[1], host.shape[0], float("inf"), 255, False))
            continue
        diff = np.abs(host.astype(np.int16) - reference.astype(np.int16))
        found.append(Difference(name, host.shape[1], host.shape[0], float(diff.mean()), int(diff.max()),
                                int(device_sum) == int(host.astype(np.int64).sum())))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--uploads", default=None, help="a folder of uploads (benchmarks/make_uploads.py)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tolerance", type=float, default=2.0, help="largest mean absolute difference, in levels")
    parser.add_argument("--limit", type=int, default=512, help="at most this many JPEGs from --uploads")
    args = parser.parse_args(argv)
    payloads, broken = whole(uploads_jpegs(args.uploads, args.limit) if args.uploads else sample_jpegs(args.batch * 4))
    names = list(payloads)
    failures, worst_mean, worst_max, checked, seconds = [], 0.0, 0, 0, 0.0
    for round_number in range(args.rounds):
        batch = {n: payloads[n] for n in names[(round_number * args.batch) % len(names):][:args.batch]} or payloads
        started = time.perf_counter()
        found = compare(batch, args.device)
        seconds += time.perf_counter() - started
        checked += len(found)
        for d in found:
            worst_mean, worst_max = max(worst_mean, d.mean_abs), max(worst_max, d.max_abs)
            if not d.decoded or d.mean_abs > args.tolerance or not d.sum_matches:
                failures.append({"round": round_number, **asdict(d)})
    print(json.dumps({"decoder": DECODER, "device": args.device,
                      "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
                      "jpegs": len(payloads), "not_compared_broken": len(broken),
                      "images_checked": checked, "rounds": args.rounds, "largest_mean_abs_difference": worst_mean,
                      "largest_pixel_difference": worst_max, "tolerance": args.tolerance,
                      "failed": len(failures), "first_failures": failures[:5],
                      "seconds": round(seconds, 2)}, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
