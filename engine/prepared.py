"""One photo made ready for the model, in this process or in a decoder worker process:
its key checked, its bytes decoded and validated, its face found and aligned (or, for the
device path, only decoded). Plain functions: no storage, no model."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gender_pipeline.faces.chip import ChipRecipe, face_chip, init_face_worker
from gender_pipeline.faces.decoding import DecodedPhoto, Rejection, decode_photo
from gender_pipeline.lake.keys import KEY_RULE, user_of
from gender_pipeline.runtime import shm
from gender_pipeline.runtime.timing import timed

BAD_KEY = "bad_key"
READ_ERROR = "read_error"
DECODER_CRASH = "decoder_crash"
BAD_KEY_DETAIL = f"key is not {KEY_RULE}"


@dataclass
class Prepared:
    """What a worker sends back for one photo: a chip to classify, or a rejection."""

    key: str
    user_id: str | None
    sha256: str | None
    chip: np.ndarray | None = None
    box: list[int] | None = None
    face_count: int = 0
    reject_reason: str | None = None
    detail: str = ""
    format: str | None = None
    seconds: dict = field(default_factory=dict)  # per stage: decode, detect, landmarks, warp
    decoded: DecodedPhoto | None = None  # decoded only (device path): its faces are found later
    data: bytes | None = None  # with `decoded`: the bytes, for a retry on the CPU path
    shape: tuple[int, int, int] | None = None  # set when `decoded`'s pixels went to its shared-memory slot
    image: object = None  # the pixels as a 3 x H x W uint8 tensor on the device path's device
    on_device: bool = False  # decoded by the device decoder (a photo it finds no face in is checked on the CPU)

    @classmethod
    def rejected(cls, key: str, sha256: str | None, reason: str, detail: str, fmt: str | None = None) -> "Prepared":
        return cls(key, user_of(key), sha256, reject_reason=reason, detail=detail, format=fmt)

    @property
    def needs_faces(self) -> bool:
        """Decoded only: its faces are found on the device, in a batch."""
        return self.decoded is not None


def prepare_photo(key: str, data: bytes, sha256: str, recipe: ChipRecipe, decode_only: bool = False) -> Prepared:
    """Decode, validate and align one photo (or only decode and validate it, for the
    device path)."""
    user_id = user_of(key)
    if user_id is None:
        return Prepared(key, None, sha256, reject_reason=BAD_KEY, detail=BAD_KEY_DETAIL)
    seconds: dict = {}
    if decode_only:
        with timed(seconds, "decode"):
            decoded = decode_photo(data, recipe.limits, recipe.jpeg_device)
        if isinstance(decoded, Rejection):
            return Prepared(key, user_id, sha256, reject_reason=decoded.reason, detail=decoded.detail,
                            format=decoded.format, seconds=seconds)
        return Prepared(key, user_id, sha256, format=decoded.format, seconds=seconds, decoded=decoded, data=data)
    found = face_chip(data, recipe, seconds)
    return Prepared(key, user_id, sha256, chip=found.chip, box=found.box, face_count=found.count,
                    reject_reason=found.reject_reason, detail=found.detail, format=found.format, seconds=seconds)


# -- in a decoder worker process (spawned: these are importable functions) ------------------

_setup: tuple[ChipRecipe, bool] | None = None


def init_worker(recipe: ChipRecipe, decode_only: bool, parent_pid: int | None = None,
                threads: int | None = None) -> None:
    global _setup
    init_face_worker(parent_pid, threads)
    _setup = (recipe, decode_only)


def prepare_in_worker(key: str, data: bytes, sha256: str) -> Prepared:
    assert _setup is not None
    return prepare_photo(key, data, sha256, *_setup)


def decode_into_slot(key: str, data: bytes, sha256: str, slot: str) -> Prepared:
    """Decode only; the pixels go into the shared-memory slot `slot`, not into the reply."""
    prepared = prepare_in_worker(key, data, sha256)
    decoded = prepared.decoded
    if decoded is not None and shm.write(slot, decoded.rgb):
        prepared.shape = tuple(decoded.rgb.shape)
        decoded.rgb = None
    return prepared


def ping() -> bool:
    return True
