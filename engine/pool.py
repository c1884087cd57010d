"""The decoder processes: photos prepared on a pool of worker processes that survives a
decoder crashing on a photo (or inline, with no workers). Results come in the order
they finish; the device path's decoded pixels come back through shared memory."""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from gender_pipeline.engine import prepared as jobs
from gender_pipeline.engine.prepared import DECODER_CRASH, Prepared, prepare_photo
from gender_pipeline.faces.chip import ChipRecipe, worker_threads
from gender_pipeline.runtime import shm
from gender_pipeline.runtime.processes import kill_pool
from gender_pipeline.runtime.stopping import STOP, result_unless_stopped

log = logging.getLogger(__name__)

Item = tuple[str, bytes, str]  # key, bytes, sha256


class DecoderPool:
    """Runs prepare_photo inline (no workers) or on a process pool of `workers`. A given
    `job` (an importable function of key, bytes, sha256) replaces prepare_photo, in the
    workers and inline."""

    def __init__(self, recipe: ChipRecipe, workers: int, job: Callable[[str, bytes, str], Prepared] | None = None,
                 checkpoint: Callable[[], None] = STOP.check, decode_only: bool = False,
                 device: str | None = None) -> None:
        self.recipe, self.workers, self.decode_only = recipe, workers, decode_only
        self.job = job or jobs.prepare_in_worker
        self.inline_job = job
        self.checkpoint = checkpoint
        self.pool: ProcessPoolExecutor | None = None
        self.inflight: deque[tuple[Item, Future, str | None]] = deque()
        # Decoded photos for the device path come back through shared memory, copied once
        # to `device`.
        self.device = device
        self.slots: shm.SlotPool | None = None

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=jobs.init_worker,
            initargs=(self.recipe, self.decode_only, os.getpid(), worker_threads(self.workers)))

    def __enter__(self) -> "DecoderPool":
        if self.workers > 0:
            self.pool = self._new_pool()
            if self.decode_only and self.job is jobs.prepare_in_worker:
                self.slots = shm.SlotPool(self.capacity, shm.slot_bytes(self.recipe.limits.working_side))
        return self

    def __exit__(self, exc_type, *_) -> None:
        if self.pool is None:
            return
        try:
            if exc_type is None:
                self.pool.shutdown(wait=True, cancel_futures=True)
            else:  # stopping or failing: the photos in flight are not wanted any more
                kill_pool(self.pool)
        finally:
            if self.slots is not None:  # after the workers are gone: nobody writes there any more
                self.slots.close()

    @property
    def capacity(self) -> int:
        return max(2, self.workers * 4)

    def submit(self, item: Item) -> Prepared | None:
        """The photo prepared now (no workers), or None: it is in flight."""
        if self.pool is None:
            if self.inline_job is not None:
                return self.inline_job(*item)
            return prepare_photo(*item, self.recipe, self.decode_only)
        slot = self.slots.acquire() if self.slots is not None else None
        if slot is not None:
            self.inflight.append((item, self.pool.submit(jobs.decode_into_slot, *item, slot), slot))
        else:
            self.inflight.append((item, self.pool.submit(self.job, *item), None))
        return None

    def full(self) -> bool:
        return len(self.inflight) >= self.capacity

    def pending(self) -> bool:
        return bool(self.inflight)

    def next_result(self) -> list[Prepared]:
        """The result of the in-flight photo that finishes first; after a worker crash, the
        photos that were in flight are retried one by one, and the one that crashes again is
        rejected."""
        item, future, slot = self._first_done()
        try:
            return [self._taken(self._wait(future), slot)]
        except BrokenProcessPool:
            suspects = [item] + [i for i, _, _ in self.inflight]
            if self.slots is not None:
                for held in [slot] + [h for _, _, h in self.inflight]:
                    self.slots.release(held)
            self.inflight.clear()
            log.warning("a decoder worker crashed; retrying %d photos one at a time", len(suspects))
            self._restart()
            return [self._isolated(s) for s in suspects]

    def _first_done(self) -> tuple[Item, Future, str | None]:
        """The in-flight photo that finishes first (not the oldest: a slow HEIC must not
        leave the other workers idle once the photos queued behind it are done)."""
        while True:
            self.checkpoint()
            for index, entry in enumerate(self.inflight):
                if entry[1].done():
                    del self.inflight[index]
                    return entry
            wait([entry[1] for entry in self.inflight], timeout=0.25, return_when=FIRST_COMPLETED)

    def _taken(self, prepared: Prepared, slot: str | None) -> Prepared:
        """The photo's pixels out of its shared-memory slot, copied once onto the device
        (a tensor, 3 x H x W); the slot is free again."""
        if slot is None:
            return prepared
        try:
            if prepared.shape is not None:
                import torch  # lazy: only the device path fills slots, and it has torch loaded

                pixels = torch.from_numpy(self.slots.view(slot, prepared.shape))
                # one plain copy (H x W x 3 as it lies), viewed as 3 x H x W
                prepared.image = pixels.to(self.device or "cpu", copy=True).permute(2, 0, 1)
                prepared.shape = None
            return prepared
        finally:
            self.slots.release(slot)

    def _restart(self) -> None:
        assert self.pool is not None
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.pool = self._new_pool()

    def _isolated(self, item: Item) -> Prepared:
        key, _, sha = item
        try:
            return self._wait(self.pool.submit(self.job, *item))
        except BrokenProcessPool:
            self._restart()
            self._check_pool()
            log.error("photo %s crashes the decoder; rejected", key)
            return Prepared.rejected(key, sha, DECODER_CRASH, "the decoder process died on this photo")

    def _wait(self, future: Future) -> Prepared:
        return result_unless_stopped(future, self.checkpoint)

    def _check_pool(self) -> None:
        """A fresh pool that cannot run an empty job is broken by itself, not by a photo:
        stop the run rather than reject every photo as a decoder crash."""
        try:
            self.pool.submit(jobs.ping).result(timeout=300)
        except BrokenProcessPool as error:
            raise RuntimeError("decoder worker processes cannot start; see the worker's error above") from error
