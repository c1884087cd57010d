"""Build a realistic uploads folder from a labelled face dataset in the `manifest` format.

Each face crop is pasted into a larger photo (phone and webcam sizes), saved as JPEG
(baseline or progressive), PNG, WEBP or HEIC, some with EXIF rotation the way phones
store portraits, and a share of uploads are broken files. `truth.csv` records, for every
key, the true gender (or the reject reason a broken file must get) and the user's gender.
With `--second-photo-share`, that share of users also uploads a second, newer photo (another
face of the same gender, or a broken file), one hour after the first.

    python benchmarks/make_uploads.py --data PATH/utkface-dev --out /tmp/uploads --count 2000
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gender_pipeline import samples  # noqa: E402

SIZES = [((640, 480), 0.30), ((1280, 960), 0.30), ((2048, 1536), 0.25), ((4032, 3024), 0.15)]
FORMATS = [("jpeg", 0.45), ("jpeg-progressive", 0.15), ("png", 0.10), ("webp", 0.15), ("heic", 0.15)]
BROKEN = ["empty", "truncated", "text", "random", "tiny"]


def _pick(rng, options):
    values, weights = zip(*options)
    return values[rng.choice(len(values), p=np.array(weights) / sum(weights))]


def make_one(job: tuple) -> tuple[str, str, str]:
    index, image_path, gender, seed, broken_share, *second = job
    rng = np.random.default_rng(seed)
    user = f"user-{index:06d}"
    suffix = "-2" if second and second[0] else ""
    if rng.random() < broken_share:
        kind = BROKEN[rng.integers(len(BROKEN))]
        face = np.asarray(Image.open(image_path).convert("RGB"))
        jpeg = samples.encode(face, "JPEG", quality=90)
        data, reason = {
            "empty": (b"", "empty"),
            "truncated": (jpeg[: len(jpeg) // 3], "truncated"),
            "text": (b"not a photo, sorry\n" * 40, "not_an_image"),
            "random": (rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(), "not_an_image"),
            "tiny": (samples.encode(face[:40, :40].copy(), "PNG"), "too_small"),
        }[kind]
        return f"{user}/upload-{kind}{suffix}.jpg", reason, data
    (width, height) = _pick(rng, SIZES)
    if rng.random() < 0.3:
        width, height = height, width  # portrait
    face = Image.open(image_path).convert("RGB")
    side = int(min(width, height) * rng.uniform(0.3, 0.55))
    face = np.asarray(face.resize((side, side), Image.Resampling.BICUBIC))
    at = (int(rng.integers(0, width - side)), int(rng.integers(0, height - side)))
    photo = samples.pasted_into(face, (width, height), at, seed=seed)
    fmt = _pick(rng, FORMATS)
    rotate = rng.random() < 0.15
    name = f"{user}/IMG_{index:05d}{suffix}"
    if rotate and fmt.startswith("jpeg"):
        data = samples.jpeg_with_orientation(photo, int(rng.choice([3, 6, 8])))
        return name + ".jpg", gender, data
    if fmt == "jpeg":
        data, ext = samples.encode(photo, "JPEG", quality=88), ".jpg"
    elif fmt == "jpeg-progressive":
        data, ext = samples.encode(photo, "JPEG", quality=88, progressive=True), ".jpeg"
    elif fmt == "png":
        data, ext = samples.encode(photo, "PNG", compress_level=3), ".png"
    elif fmt == "webp":
        data, ext = samples.encode(photo, "WEBP", quality=85), ".webp"
    else:
        data, ext = samples.encode(photo, "HEIF", quality=80), ".heic"
    if rng.random() < 0.1:
        ext = ""  # browsers and apps drop extensions
    return name + ext, gender, data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="manifest dataset: labels.csv + images/")
    parser.add_argument("--out", required=True)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--offset", type=int, default=0, help="first manifest row to use")
    parser.add_argument("--broken-share", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--second-photo-share", type=float, default=0.0,
                        help="share of users who also upload a second, newer photo (default 0)")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    args = parser.parse_args()

    with open(os.path.join(args.data, "labels.csv"), newline="") as handle:
        rows = list(csv.DictReader(handle))[args.offset:args.offset + args.count]
    if not rows:
        parser.error("no rows in that range of labels.csv")
    jobs = [(args.offset + i, os.path.join(args.data, "images", r["image"]), r["gender"],
             args.seed * 1_000_003 + args.offset + i, args.broken_share) for i, r in enumerate(rows)]
    rng = np.random.default_rng(args.seed)
    by_gender = {g: [i for i, r in enumerate(rows) if r["gender"] == g] for g in {r["gender"] for r in rows}}
    seconds = []
    for i in np.flatnonzero(rng.random(len(rows)) < args.second_photo_share):
        other = int(rng.choice([j for j in by_gender[rows[i]["gender"]] if j != i] or [i]))
        seconds.append((args.offset + int(i), os.path.join(args.data, "images", rows[other]["image"]),
                        rows[i]["gender"], args.seed * 1_000_003 + 500_009 + args.offset + int(i),
                        args.broken_share, True))
    os.makedirs(args.out, exist_ok=True)
    uploads = os.path.join(args.out, "uploads")
    user_gender = {f"user-{args.offset + i:06d}": r["gender"] for i, r in enumerate(rows)}
    truth, newer = [], []
    with ProcessPoolExecutor(args.workers) as pool:
        for done, (key, expected, data) in enumerate(pool.map(make_one, jobs + seconds, chunksize=8), 1):
            samples.write_tree(uploads, {key: data})
            truth.append((key, expected, user_gender[key.split("/")[0]]))
            if done > len(jobs):
                newer.append(key)
            if done % 200 == 0 or done == len(jobs) + len(seconds):
                print(f"{done}/{len(jobs) + len(seconds)} uploads written", file=sys.stderr, flush=True)
    if newer:  # the second photos were uploaded an hour after the first ones (both in the past)
        now = time.time()
        for key, _, _ in truth:
            stamp = now - (3600 if key in set(newer) else 7200)
            os.utime(os.path.join(uploads, key), (stamp, stamp))
    with open(os.path.join(args.out, "truth.csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["photo_key", "expected", "user_gender"])
        writer.writerows(sorted(truth))
    print(f"uploads in {os.path.join(args.out, 'uploads')}, truth in {os.path.join(args.out, 'truth.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
