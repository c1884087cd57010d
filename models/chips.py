"""Run a labelled dataset through the face front end once: aligned chips in memory.

Training, evaluation and scoring share tasks.scoring.face_chip, so a model sees the same
face framing in all three. Images without a usable face are skipped and counted.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from models.datasets import DatasetError, LabelledSet
from models.predictor import cpu_count
from tasks.decoding import DecodeLimits
from tasks.faces import Framing
from tasks.child_processes import quiet_worker
from tasks.scoring import face_chip, kill_pool
from tasks.stopping import STOP, result_unless_stopped
from tasks.storage import Store

log = logging.getLogger(__name__)


@dataclass
class ChipSet:
    chips: np.ndarray  # N x S x S x 3 uint8, for the images kept
    kept: np.ndarray  # indices into the dataset
    skipped: Counter  # reason -> count

    def summary(self) -> str:
        total = len(self.kept) + sum(self.skipped.values())
        reasons = ", ".join(f"{k}={v}" for k, v in self.skipped.most_common()) or "none"
        return f"{len(self.kept)}/{total} images gave a face chip (skipped: {reasons})"


def _chip_job(data: bytes, framing: Framing) -> tuple[np.ndarray | None, str | None]:
    chip, _, _, reason, _, _ = face_chip(data, framing, DecodeLimits())
    return chip, reason


def _results(pool: ProcessPoolExecutor | None, jobs: list[tuple[bytes, Framing]]):
    """Chip results in order; between waits, a run asked to stop stops."""
    if pool is None:
        for job in jobs:
            STOP.check()
            yield _chip_job(*job)
        return
    for future in [pool.submit(_chip_job, *job) for job in jobs]:
        yield result_unless_stopped(future)


def extract_chips(data: LabelledSet, framing: Framing, options: dict | None = None,
                  workers: int | None = None, max_skipped: float = 0.1,
                  progress: Callable[[int, int], None] | None = None, chunk: int = 64) -> ChipSet:
    """Chips for every image of `data`. Fails when more than `max_skipped` of the images
    are unreadable or faceless: that is a broken dataset, not noise."""
    store = Store(data.root, options)
    workers = cpu_count() if workers is None else workers
    chips = np.zeros((len(data.images), framing.size, framing.size, 3), dtype=np.uint8)
    ok = np.zeros(len(data.images), dtype=bool)
    skipped: Counter = Counter()
    pool = (ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                initializer=quiet_worker, initargs=(os.getpid(),))
            if workers > 0 else None)
    finished = False
    try:
        for start in range(0, len(data.images), chunk):
            names = data.images[start:start + chunk]
            raw = store.read_many([f"{data.image_dir}/{n}" for n in names])
            jobs = []
            for offset, name in enumerate(names):
                value = raw[f"{data.image_dir}/{name}"]
                if isinstance(value, BaseException):
                    skipped["read_error"] += 1
                    continue
                jobs.append((start + offset, (value, framing)))
            for (index, _), (chip, reason) in zip(jobs, _results(pool, [j for _, j in jobs])):
                if chip is None:
                    skipped[reason] += 1
                else:
                    chips[index], ok[index] = chip, True
            if progress:
                progress(min(start + chunk, len(data.images)), len(data.images))
        finished = True
    finally:
        if pool and finished:
            pool.shutdown()
        elif pool:  # stopping or failing: do not wait for the images in flight
            kill_pool(pool)
    total = len(data.images)
    if total and sum(skipped.values()) > max_skipped * total:
        raise DatasetError(f"{sum(skipped.values())} of {total} images gave no face chip "
                           f"({dict(skipped)}), over the limit of {max_skipped:.0%}")
    kept = np.flatnonzero(ok)
    return ChipSet(chips[kept], kept, skipped)
