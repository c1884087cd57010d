"""The GPU path's rows against the CPU path's, photo by photo, on an uploads folder.

The GPU path (headers on the CPU, JPEGs decoded by TorchCodec's `decode_jpeg` on the device, other
formats by the CPU workers through shared memory, RetinaFace batched and the chip warp on
the device) runs here on `--device` (the CPU device by default: torchvision's decoder and
the same kernels). It prints how many rows agree on status and reject reason, on the
answer (gender), the largest difference in p_male and in the face box, and lists every
photo where they disagree.

    python benchmarks/compare_paths.py --uploads /tmp/uploads --workers 2
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections import Counter
from datetime import datetime, timezone

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uploads", required=True, help="uploads/ of make_uploads.py, or any {user}/{file} tree")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="dlib-gender-v1")
    parser.add_argument("--first-side", type=int, default=None,
                        help="the CPU path's first look (default: its default; 0: RetinaFace at 640 px only, "
                             "the detection the GPU path runs)")
    args = parser.parse_args()

    from gender_pipeline.engine.engine import ScoringOptions
    from gender_pipeline.engine.engine import RunStamp, ScoringEngine
    from gender_pipeline.lake.storage import Store
    from gender_pipeline.models.registry import Registry

    root = os.path.join(args.uploads, "uploads") if os.path.isdir(os.path.join(args.uploads, "uploads")) \
        else args.uploads
    store = Store(root)
    objects = store.list_objects()
    registry = Registry(tempfile.mkdtemp(prefix="compare-registry-"))
    rows = {}
    for front_end in ("cpu", "gpu"):
        predictor = registry.load_predictor(args.model, args.device if front_end == "gpu" else "cpu")
        options = ScoringOptions(workers=args.workers, front_end=front_end)
        if args.first_side is not None:
            options = ScoringOptions(workers=args.workers, front_end=front_end, detect_first_side=args.first_side)
        out, _ = ScoringEngine(predictor, options,
                               RunStamp(front_end, datetime.now(timezone.utc))).score(store, objects, {})
        rows[front_end] = {r.photo_key: r for r in out}
    cpu, gpu = rows["cpu"], rows["gpu"]
    same_status = same_answer = 0
    p_diff, box_diff, disagree = [], [], []
    kinds = Counter()
    for key, row in cpu.items():
        other = gpu[key]
        kinds[row.reject_reason or "scored"] += 1
        if (row.status, row.reject_reason) == (other.status, other.reject_reason):
            same_status += 1
        else:
            disagree.append(f"{key}: cpu {row.status}/{row.reject_reason} gpu {other.status}/{other.reject_reason}")
            continue
        if row.gender == other.gender:
            same_answer += 1
        else:
            disagree.append(f"{key}: cpu {row.gender} ({row.p_male:.3f}) gpu {other.gender} ({other.p_male:.3f})")
        if row.p_male is not None:
            p_diff.append(abs(row.p_male - other.p_male))
            width = max(1, row.face_box[2] - row.face_box[0])
            box_diff.append(max(abs(a - b) for a, b in zip(row.face_box, other.face_box)) / width)
    print(f"{len(cpu)} uploads ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))}); "
          f"GPU path on {args.device} vs CPU path"
          + (f" (first look {args.first_side or 'off'})" if args.first_side is not None else " (as shipped)"))
    print(f"same status and reject reason: {same_status}/{len(cpu)}; same answer: {same_answer}/{len(cpu)}")
    if p_diff:
        p_diff.sort()
        box_diff.sort()
        print(f"|p_male difference|: median {p_diff[len(p_diff) // 2]:.4f}, max {p_diff[-1]:.4f}; face box "
              f"difference (share of the face's width): median {box_diff[len(box_diff) // 2]:.3f}, "
              f"max {box_diff[-1]:.3f}")
    for line in disagree:
        print("  differs:", line)


if __name__ == "__main__":
    main()
