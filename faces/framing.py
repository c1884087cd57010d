"""How a face becomes a model input (the framing a model card records), and the boxes and
points the front ends pass around. Train and serve see the same face: the framing
travels in the model card and the scoring front end reproduces it."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

NO_FACE = "no_face"
DETECTORS = ("retinaface", "hog")
KINDS = ("dlib_chip", "retinaface_5pt")
FILLS = ("black", "edge")

# HOG's box from RetinaFace's: centre shift and size as fractions of RetinaFace's width and
# height: medians over 1,489 face crops where both found one face (benchmarks/fit_box_mapping.py).
HOG_FROM_RETINAFACE = {"dx": 0.0227, "dy": 0.0251, "sw": 1.0783, "sh": 0.9227}

# Where RetinaFace's five points (eye centres, nose tip, mouth corners) land in a square
# crop of the face: the widely used 112-pixel ArcFace template, as fractions. `padding`
# widens the chip around it as dlib's padding does around its own template.
TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                     [41.5493, 92.3655], [70.7299, 92.2041]]) / 112.0


@dataclass(frozen=True)
class Framing:
    """How a face becomes a model input: the detector, the alignment `kind` at `size`
    pixels with `padding` around the face, and what the chip shows where it reaches past
    the photo's border (`fill`: black, or the photo's edge pixels repeated outwards)."""

    kind: str = "dlib_chip"
    size: int = 32
    padding: float = 0.2
    fill: str = "black"
    detector: str = "retinaface"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown framing kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        if self.size < 8:
            raise ValueError(f"framing size must be at least 8 pixels, got {self.size}")
        if not 0 <= self.padding <= 2:
            raise ValueError(f"framing padding must be in [0, 2], got {self.padding}")
        if self.fill not in FILLS:
            raise ValueError(f"framing fill must be one of {', '.join(FILLS)}, got {self.fill!r}")
        if self.detector not in DETECTORS:
            raise ValueError(f"face detector must be one of {', '.join(DETECTORS)}, got {self.detector!r}")
        if self.kind == "retinaface_5pt" and self.detector != "retinaface":
            raise ValueError("the retinaface_5pt framing needs the retinaface detector (its five points)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Framing":
        """Cards written before `fill` and `detector` existed mean black fill and the
        default detector (whose boxes give HOG's landmarks and chips)."""
        return cls(kind=data.get("kind", "dlib_chip"), size=int(data["size"]),
                   padding=float(data.get("padding", 0.2)), fill=str(data.get("fill", "black")),
                   detector=str(data.get("detector", "retinaface")))


@dataclass
class Detection:
    box: tuple[int, int, int, int]  # left, top, right, bottom in HOG's convention, image pixels
    score: float | None = None  # RetinaFace's confidence
    points: np.ndarray | None = None  # RetinaFace's five points (5 x 2), image pixels


@dataclass
class Face:
    chip: np.ndarray  # size x size x 3 uint8
    box: tuple[int, int, int, int]  # left, top, right, bottom in working-image pixels
    count: int


def hog_box(left: float, top: float, right: float, bottom: float) -> tuple[float, float, float, float]:
    """A RetinaFace box in HOG's convention (see HOG_FROM_RETINAFACE)."""
    m = HOG_FROM_RETINAFACE
    width, height = right - left, bottom - top
    cx = (left + right) / 2 + m["dx"] * width
    cy = (top + bottom) / 2 + m["dy"] * height
    half_w, half_h = m["sw"] * width / 2, m["sh"] * height / 2
    return cx - half_w, cy - half_h, cx + half_w, cy + half_h


def clip_box(box, width: int, height: int) -> tuple[int, int, int, int]:
    """A box in whole pixels inside a width x height image."""
    left, top, right, bottom = box
    return max(0, int(left)), max(0, int(top)), min(width - 1, int(right)), min(height - 1, int(bottom))


def template_points(framing: Framing) -> np.ndarray:
    """Where the five points go in a `retinaface_5pt` chip, in chip pixels."""
    return (TEMPLATE + framing.padding) / (1 + 2 * framing.padding) * framing.size
