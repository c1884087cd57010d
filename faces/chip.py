"""Bytes to an aligned chip: the one path from a photo to a model input, for scoring,
evaluation and training alike, in this process or in a worker process of the front end."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gender_pipeline.faces.decoding import DecodeLimits, DecodedPhoto, Rejection, decode_photo
from gender_pipeline.faces.framing import Framing, NO_FACE
from gender_pipeline.faces.front_end import FIRST_SIDE, FaceFrontEnd
from gender_pipeline.runtime.processes import cpu_count, quiet_worker
from gender_pipeline.runtime.timing import timed

DETECT_SIDE = 640  # the detector's full look: the photo's longest side, in pixels


@dataclass(frozen=True)
class ChipRecipe:
    """How a photo's bytes become a chip: the model's framing, the decoder's limits, the
    detector's looks (`first_side`, the cheap first look; `detect_side`, the full one) and
    where plain JPEGs are decoded (None: the CPU)."""

    framing: Framing
    limits: DecodeLimits = DecodeLimits()
    detect_side: int = DETECT_SIDE
    first_side: int = FIRST_SIDE
    jpeg_device: str | None = None


@dataclass
class Chip:
    """What the front end made of one photo: a chip, or why there is none."""

    chip: np.ndarray | None = None
    box: list[int] | None = None  # the face's box in the original photo's pixels (after EXIF rotation)
    count: int = 0  # faces found
    reject_reason: str | None = None
    detail: str = ""
    format: str | None = None


_frontend: FaceFrontEnd | None = None
_threads: int | None = None  # detector threads in this process (None: every core)


def init_face_worker(parent_pid: int | None = None, threads: int | None = None) -> None:
    """A worker process of the face front end: it never outlives the run (which ends it
    when asked to stop) and its detector shares the cores with the other workers."""
    global _threads, _frontend
    quiet_worker(parent_pid)
    _threads, _frontend = threads, None
    if threads:
        import torch  # lazy: the detector's post-processing and the warp, no more threads than the cores' share

        torch.set_num_threads(threads)


def worker_threads(workers: int) -> int:
    """Detector threads per worker process so that the workers share the cores."""
    return max(1, cpu_count() // max(1, workers))


def front_end(detector: str, detect_side: int, first_side: int = FIRST_SIDE) -> FaceFrontEnd:
    """This process's front end (built once, again only when the settings change)."""
    global _frontend
    wanted = FaceFrontEnd.settings(detector, detect_side, first_side)
    if _frontend is None or (_frontend.detector, _frontend.detect_side, _frontend.first_side) != wanted:
        _frontend = FaceFrontEnd(detector=detector, detect_side=detect_side, threads=_threads, first_side=first_side)
    return _frontend


def face_chip(data: bytes, recipe: ChipRecipe, timings: dict | None = None) -> Chip:
    """Bytes to an aligned chip of the photo's largest face. `timings` (when given) adds
    the seconds of each stage."""
    with timed(timings, "decode"):
        decoded = decode_photo(data, recipe.limits, recipe.jpeg_device)
    if isinstance(decoded, Rejection):
        return Chip(reject_reason=decoded.reason, detail=decoded.detail, format=decoded.format)
    framing = recipe.framing
    face = front_end(framing.detector, recipe.detect_side, recipe.first_side).largest_face(decoded.rgb, framing,
                                                                                            timings)
    if face is None:
        return Chip(reject_reason=NO_FACE, detail="no face detected", format=decoded.format)
    return Chip(face.chip, original_box(face.box, decoded), face.count, format=decoded.format)


def original_box(box, decoded: DecodedPhoto) -> list[int]:
    """A box in the working image's pixels, in the original photo's (after EXIF rotation)."""
    return [min(int(round(v / decoded.scale)), limit - 1) for v, limit in
            zip(box, (decoded.width, decoded.height, decoded.width, decoded.height))]
