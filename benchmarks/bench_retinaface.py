"""Face detection photos per second on the CPU: RetinaFace (mobilenet0.25) through
onnxruntime and through the PyTorch interpreter of the same graph, against dlib's HOG
detector, on the same copies (longest side at most --side), in one run.

    python benchmarks/bench_retinaface.py --data PATH/utkface-dev/images --limit 200
    python benchmarks/bench_retinaface.py            # the sample portraits pasted into photos

Each engine runs with one CPU thread and with all of this process's cores; dlib's HOG is
single-threaded, so it runs once. Images are decoded and downscaled before timing; each
engine's first image is a warm-up, not timed. Needs the model file (gender-pipeline
fetch-models).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dlib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from gender_pipeline.faces.decoding import shrunk  # noqa: E402
from gender_pipeline.runtime.processes import cpu_count  # noqa: E402
from gender_pipeline.faces.retinaface import RetinaFaceOnnx, RetinaFaceTorch, detect_batch, padded_size  # noqa: E402
from gender_pipeline import samples  # noqa: E402

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def shrink(rgb: np.ndarray, side: int) -> np.ndarray:
    """A copy whose longest side is at most `side` (as FaceFrontEnd.detect makes)."""
    return np.ascontiguousarray(np.asarray(shrunk(Image.fromarray(rgb), side)))


def load_folder(folder: str, limit: int | None) -> list[np.ndarray]:
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES))
    if limit:
        names = names[:limit]
    images = []
    for name in names:
        with Image.open(os.path.join(folder, name)) as image:
            images.append(np.asarray(ImageOps.exif_transpose(image).convert("RGB")))
    return images


def sample_photos(count: int) -> list[np.ndarray]:
    """The sample portraits pasted into larger photos at varied places and scales."""
    rng = np.random.default_rng(0)
    portraits = [samples.grace_hopper()]
    if samples.astronaut() is not None:
        portraits.append(samples.astronaut())
    photos = []
    for index in range(count):
        face = portraits[index % len(portraits)]
        scale = rng.uniform(0.4, 1.0)
        face = np.asarray(Image.fromarray(face).resize((int(face.shape[1] * scale), int(face.shape[0] * scale))))
        width, height = (1600, 1200) if index % 3 else (1200, 1600)
        at = (int(rng.integers(0, width - face.shape[1])), int(rng.integers(0, height - face.shape[0])))
        photos.append(samples.pasted_into(face, (width, height), at, seed=index))
    return photos


def timed(run, images: list[np.ndarray]) -> tuple[float, int]:
    """(photos per second, images with at least one face); the first image warms up."""
    run(images[0])
    found = 0
    start = time.perf_counter()
    for rgb in images:
        found += run(rgb) > 0
    return len(images) / (time.perf_counter() - start), found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="folder of face images (default: sample portraits pasted into photos)")
    parser.add_argument("--limit", type=int, default=None, help="use at most this many images (sorted by name)")
    parser.add_argument("--side", type=int, default=640, help="longest side of the detection copies")
    parser.add_argument("--samples", type=int, default=24, help="photos to make when --data is not given")
    parser.add_argument("--threads", type=int, default=None, help="'all threads' count (default: this process's cores)")
    args = parser.parse_args(argv)

    originals = load_folder(args.data, args.limit) if args.data else sample_photos(args.limit or args.samples)
    if not originals:
        parser.error("no images found")
    images = [shrink(rgb, args.side) for rgb in originals]
    shapes = {i.shape[:2] for i in images}
    all_threads = args.threads or cpu_count()
    print(f"{len(images)} images from {args.data or 'the sample portraits'}; detection copies <= {args.side} px "
          f"({len(shapes)} distinct sizes, e.g. {sorted(shapes)[0]}); cores available: {cpu_count()}; "
          f"torch {torch.__version__}")

    rows = []
    detector = dlib.get_frontal_face_detector()
    hog_rate, hog_found = timed(lambda rgb: len(detector(rgb, 0)), images)
    rows.append(("dlib HOG (upsample 0)", 1, hog_rate, hog_found))

    saved_threads = torch.get_num_threads()
    torch_model = RetinaFaceTorch().eval()
    for threads in sorted({1, all_threads}):
        ort_model = RetinaFaceOnnx(threads=threads)
        rate, found = timed(lambda rgb: len(ort_model.detect(rgb)), images)
        rows.append(("RetinaFace onnxruntime", threads, rate, found))

        torch.set_num_threads(threads)

        def torch_detect(rgb: np.ndarray) -> int:
            height, width = padded_size(*rgb.shape[:2])
            batch = torch.zeros((1, 3, height, width), dtype=torch.uint8)
            batch[0, :, :rgb.shape[0], :rgb.shape[1]] = torch.from_numpy(np.array(rgb)).permute(2, 0, 1)
            return len(detect_batch(torch_model, batch, [rgb.shape[:2]])[0])

        rate, found = timed(torch_detect, images)
        rows.append(("RetinaFace torch (CPU)", threads, rate, found))
    torch.set_num_threads(saved_threads)

    print()
    print(f"{'engine':<24} {'threads':>7} {'photos/s':>9} {'x HOG':>7} {'with a face':>12}")
    for name, threads, rate, found in rows:
        print(f"{name:<24} {threads:>7} {rate:>9.1f} {rate / hog_rate:>7.2f} {found:>6}/{len(images):<5}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
