"""Decoded photos from decoder processes to the main process through shared memory.

The main process owns a pool of slots, each large enough for one working image (its
longest side at most `DecodeLimits.working_side`). A job is given a free slot's name; the
worker writes the RGB pixels there and returns only the shape; the main process copies
them once, to the device, and frees the slot. Nothing of the picture is pickled. Slots are
made only as far as /dev/shm has room (containers often give it 64 MB); a job that finds
no free slot returns its pixels the old way, by pickling.
"""

from __future__ import annotations

import logging
import os
from multiprocessing import shared_memory

import numpy as np

log = logging.getLogger(__name__)


def slot_bytes(working_side: int) -> int:
    return working_side * working_side * 3


class SlotPool:
    """`count` slots of `nbytes` each, made and unlinked by this (the main) process."""

    def __init__(self, count: int, nbytes: int) -> None:
        room = _shm_room()
        if room is not None:  # at most half of what /dev/shm has free
            count = min(count, int(room // 2 // max(nbytes, 1)))
        self.segments: dict[str, shared_memory.SharedMemory] = {}
        for _ in range(max(0, count)):
            try:
                segment = shared_memory.SharedMemory(create=True, size=nbytes)
            except OSError as error:  # pragma: no cover - depends on the host
                log.warning("shared memory for decoded photos is short (%s); the rest are pickled", error)
                break
            self.segments[segment.name] = segment
        self.free = list(self.segments)

    def __len__(self) -> int:
        return len(self.segments)

    def acquire(self) -> str | None:
        return self.free.pop() if self.free else None

    def release(self, name: str | None) -> None:
        if name is not None and name in self.segments and name not in self.free:
            self.free.append(name)

    def view(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        return np.ndarray(shape, dtype=np.uint8, buffer=self.segments[name].buf)

    def close(self) -> None:
        for segment in self.segments.values():
            try:
                segment.close()
                segment.unlink()
            except (FileNotFoundError, BufferError):  # pragma: no cover
                pass
        self.segments.clear()
        self.free.clear()

    def __enter__(self) -> "SlotPool":
        return self

    def __exit__(self, *_) -> None:
        self.close()


def _shm_room() -> int | None:
    try:
        stats = os.statvfs("/dev/shm")
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


_attached: dict[str, shared_memory.SharedMemory] = {}


def write(name: str, rgb: np.ndarray) -> bool:
    """In a worker: copy `rgb` into the slot `name`; False when it does not fit."""
    segment = _attached.get(name)
    if segment is None:
        # Attaching registers the name with the resource tracker again; decoder processes
        # are spawned and share the main process's tracker, so that is the same entry,
        # removed when the main process unlinks the slot.
        segment = shared_memory.SharedMemory(name=name)
        _attached[name] = segment
    if rgb.nbytes > segment.size:
        return False
    np.ndarray(rgb.shape, dtype=np.uint8, buffer=segment.buf)[...] = rgb
    return True
