"""Run a labelled dataset through the face front end: aligned chips, in memory or chunk
by chunk.

Training, evaluation and scoring share faces.chip.face_chip, so a model sees the same
face framing in all three. Images without a usable face are skipped and counted.
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import os
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from gender_pipeline.faces.chip import ChipRecipe, face_chip, init_face_worker, worker_threads
from gender_pipeline.faces.framing import Framing
from gender_pipeline.lake.storage import Store
from gender_pipeline.models.datasets import DatasetError, LabelledSet
from gender_pipeline.runtime.processes import cpu_count, kill_pool
from gender_pipeline.runtime.stopping import STOP, result_unless_stopped

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
    found = face_chip(data, ChipRecipe(framing))
    return found.chip, found.reject_reason


def _results(pool: ProcessPoolExecutor | None, jobs: list[tuple[bytes, Framing]]):
    """Chip results in order; between waits, a run asked to stop stops."""
    if pool is None:
        for job in jobs:
            STOP.check()
            yield _chip_job(*job)
        return
    for future in [pool.submit(_chip_job, *job) for job in jobs]:
        yield result_unless_stopped(future)


def iter_chips(data: LabelledSet, framing: Framing, options: dict | None = None,
               workers: int | None = None, chunk: int = 64, start: int = 0,
               progress: Callable[[int, int], None] | None = None
               ) -> Iterator[tuple[np.ndarray, np.ndarray, Counter]]:
    """Chips chunk by chunk, from image `start` on: (dataset indices kept, their chips,
    reasons for the images skipped). Memory holds one chunk, whatever the dataset's size."""
    store = Store(data.root, options)
    workers = cpu_count() if workers is None else workers
    pool = (ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                initializer=init_face_worker, initargs=(os.getpid(), worker_threads(workers)))
            if workers > 0 else None)
    finished = False
    try:
        for first in range(start, len(data.images), chunk):
            names = data.images[first:first + chunk]
            raw = store.read_many([f"{data.image_dir}/{n}" for n in names])
            skipped: Counter = Counter()
            jobs = []
            for offset, name in enumerate(names):
                value = raw[f"{data.image_dir}/{name}"]
                if isinstance(value, BaseException):
                    skipped["read_error"] += 1
                    continue
                jobs.append((first + offset, (value, framing)))
            kept, chips = [], []
            for (index, _), (chip, reason) in zip(jobs, _results(pool, [j for _, j in jobs])):
                if chip is None:
                    skipped[reason] += 1
                else:
                    kept.append(index)
                    chips.append(chip)
            yield (np.asarray(kept, dtype=np.int64),
                   np.stack(chips) if chips else np.zeros((0, framing.size, framing.size, 3), np.uint8), skipped)
            if progress:
                progress(min(first + chunk, len(data.images)), len(data.images))
        finished = True
    finally:
        if pool and finished:
            pool.shutdown()
        elif pool:  # stopping or failing: do not wait for the images in flight
            kill_pool(pool)


def check_skipped(skipped: Counter, total: int, max_skipped: float) -> None:
    """More than `max_skipped` of the images unreadable or faceless is a broken dataset."""
    if total and sum(skipped.values()) > max_skipped * total:
        raise DatasetError(f"{sum(skipped.values())} of {total} images gave no face chip "
                           f"({dict(skipped)}), over the limit of {max_skipped:.0%}")


def extract_chips(data: LabelledSet, framing: Framing, options: dict | None = None,
                  workers: int | None = None, max_skipped: float = 0.1,
                  progress: Callable[[int, int], None] | None = None, chunk: int = 64) -> ChipSet:
    """Chips for every image of `data`, in memory. Fails when more than `max_skipped` of
    the images are unreadable or faceless: that is a broken dataset, not noise."""
    kept, chips, skipped = [], [], Counter()
    for indices, part, reasons in iter_chips(data, framing, options, workers, chunk, progress=progress):
        kept.append(indices)
        chips.append(part)
        skipped.update(reasons)
    check_skipped(skipped, len(data.images), max_skipped)
    return ChipSet(np.concatenate(chips) if chips else np.zeros((0, framing.size, framing.size, 3), np.uint8),
                   np.concatenate(kept) if kept else np.zeros(0, np.int64), skipped)


@dataclass(frozen=True)
class Parts:
    """Where what a run computes of a dataset is kept: `folder` of `store`, `size` images a
    part (a stopped run resumes at the first missing part)."""

    store: Store
    folder: str
    size: int = 4096


@dataclass(frozen=True)
class Reading:
    """How a dataset's images are read and aligned: the storage options, the alignment
    processes (None: one per core) and the chips handed on at a time."""

    options: dict | None = None
    workers: int | None = None
    batch_size: int = 128


def cached_parts(data: LabelledSet, framing: Framing, compute: Callable[[np.ndarray, np.ndarray], dict],
                 parts: Parts, reading: Reading = Reading(),
                 progress: Callable[[int, int], None] | None = None) -> tuple[dict[str, np.ndarray], Counter]:
    """What `compute(dataset indices, chips)` makes of every face of `data` (a dict of arrays
    with one row per chip), computed once, part by part into `parts`, so a stopped run
    resumes at the first missing part and a rerun on the same data reads them all back.
    Returns the arrays joined, with `index` (the dataset index of each row), and the
    reasons images were skipped."""
    joined: dict[str, list] = {}
    skipped: Counter = Counter()
    for start in range(0, len(data.images), parts.size):
        key = f"{parts.folder}/part-{start:09d}.npz"
        try:
            part = dict(np.load(io.BytesIO(parts.store.read(key))))
        except FileNotFoundError:
            part = _compute_part(data, framing, compute, start, parts.size, reading)
            buffer = io.BytesIO()
            np.savez(buffer, **part)
            parts.store.write_atomic(key, buffer.getvalue())
        skipped.update(dict(zip(part.pop("skipped_reasons").tolist(), part.pop("skipped_counts").tolist())))
        for name, value in part.items():
            joined.setdefault(name, []).append(value)
        if progress:
            progress(min(start + parts.size, len(data.images)), len(data.images))
    return {name: np.concatenate(values) for name, values in joined.items()}, skipped


def _compute_part(data, framing, compute, start: int, size: int, reading: Reading) -> dict:
    part = data.subset(np.arange(start, min(start + size, len(data.images))))
    found: dict[str, list] = {"index": []}
    skipped: Counter = Counter()
    for indices, chips, reasons in iter_chips(part, framing, reading.options, reading.workers,
                                              chunk=reading.batch_size):
        skipped.update(reasons)
        if not len(chips):
            continue
        found["index"].append(indices + start)
        for name, value in compute(indices + start, chips).items():
            found.setdefault(name, []).append(value)
    if not found["index"]:  # no face in this part: empty arrays of the right shapes
        probe = compute(np.zeros(1, np.int64), np.zeros((1, framing.size, framing.size, 3), np.uint8))
        found = {"index": [np.zeros(0, np.int64)], **{k: [v[:0]] for k, v in probe.items()}}
    out = {k: np.concatenate(v) for k, v in found.items()}
    out["skipped_reasons"] = np.array(list(skipped), dtype=str)
    out["skipped_counts"] = np.array(list(skipped.values()), dtype=np.int64)
    return out
