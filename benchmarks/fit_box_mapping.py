"""Fit the map from RetinaFace's face box to dlib HOG's box convention, on face crops.

dlib's five-point landmark model was trained on HOG's boxes; handing it RetinaFace's box
as is moves the landmarks. This measures, on images where both detectors find the same
single face, HOG's box centre and size relative to RetinaFace's (medians, robust), and how
far the five landmarks land from HOG's, before and after the mapping (in % of the face's
width). The printed constants are `faces.framing.HOG_FROM_RETINAFACE`.

    python benchmarks/fit_box_mapping.py --data PATH/utkface-dev/images --limit 2000
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gender_pipeline.faces import framing, front_end  # noqa: E402
from gender_pipeline.faces.decoding import DecodedPhoto, decode_photo  # noqa: E402


def landmarks(front, rgb, box) -> np.ndarray:
    shape = front._landmarks(rgb, front._dlib.rectangle(*[int(v) for v in box]))
    return np.array([(p.x, p.y) for p in shape.parts()], dtype=float)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a folder of face images")
    parser.add_argument("--limit", type=int, default=2000)
    args = parser.parse_args()

    hog = front_end.FaceFrontEnd(detector="hog")
    retina = front_end.FaceFrontEnd(detector="retinaface")
    saved = dict(framing.HOG_FROM_RETINAFACE)
    framing.HOG_FROM_RETINAFACE.update(dx=0.0, dy=0.0, sw=1.0, sh=1.0)  # RetinaFace's own boxes
    names = sorted(os.listdir(args.data))[: args.limit]
    pairs = []
    for name in names:
        with open(os.path.join(args.data, name), "rb") as handle:
            decoded = decode_photo(handle.read())
        if not isinstance(decoded, DecodedPhoto):
            continue
        a, b = hog.detect(decoded.rgb), retina.detect(decoded.rgb)
        if len(a) == 1 and len(b) == 1:
            pairs.append((decoded.rgb, np.array(a[0].box, float), np.array(b[0].box, float)))
    framing.HOG_FROM_RETINAFACE.update(saved)
    hog_boxes = np.array([p[1] for p in pairs])
    rf_boxes = np.array([p[2] for p in pairs])
    rf_w, rf_h = rf_boxes[:, 2] - rf_boxes[:, 0], rf_boxes[:, 3] - rf_boxes[:, 1]
    fit = {
        "dx": float(np.median(((hog_boxes[:, 0] + hog_boxes[:, 2]) - (rf_boxes[:, 0] + rf_boxes[:, 2])) / 2 / rf_w)),
        "dy": float(np.median(((hog_boxes[:, 1] + hog_boxes[:, 3]) - (rf_boxes[:, 1] + rf_boxes[:, 3])) / 2 / rf_h)),
        "sw": float(np.median((hog_boxes[:, 2] - hog_boxes[:, 0]) / rf_w)),
        "sh": float(np.median((hog_boxes[:, 3] - hog_boxes[:, 1]) / rf_h)),
    }
    print(f"{len(pairs)} of {len(names)} images with one face found by both detectors")
    print("HOG_FROM_RETINAFACE = {" + ", ".join(f'"{k}": {v:.4f}' for k, v in fit.items()) + "}")

    framing.HOG_FROM_RETINAFACE.update(fit)
    raw, mapped = [], []
    for rgb, hog_box, rf_box in pairs[:500]:
        reference = landmarks(hog, rgb, hog_box)
        width = hog_box[2] - hog_box[0]
        raw.append(np.abs(landmarks(hog, rgb, rf_box) - reference).mean() / width)
        mapped.append(np.abs(landmarks(hog, rgb, framing.hog_box(*rf_box)) - reference).mean() / width)
    print(f"landmarks from HOG's: RetinaFace's box as is {100 * np.mean(raw):.2f}% of the face width "
          f"(p90 {100 * np.percentile(raw, 90):.2f}%), mapped {100 * np.mean(mapped):.2f}% "
          f"(p90 {100 * np.percentile(mapped, 90):.2f}%), over {len(raw)} faces")
    return 0


if __name__ == "__main__":
    sys.exit(main())
