"""The scoring engine: photo objects in, one answer each out.

Reading runs in a background thread (concurrent reads on async stores), decoding and
face alignment run in worker processes (or on the device, see engine.decoders), and the
model runs on full batches in this process while the next photos are prepared. Memory
holds a bounded number of photos.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

import numpy as np

from gender_pipeline.engine.decoders import CpuDecoding, DeviceDecoding
from gender_pipeline.engine.pool import DecoderPool
from gender_pipeline.engine.prepared import BAD_KEY, BAD_KEY_DETAIL, Prepared, READ_ERROR
from gender_pipeline.engine.reader import ReadAhead
from gender_pipeline.faces.chip import ChipRecipe, DETECT_SIDE
from gender_pipeline.faces.decoding import DecodeLimits, TOO_LARGE
from gender_pipeline.faces.framing import Framing
from gender_pipeline.faces.front_end import FIRST_SIDE
from gender_pipeline.lake.answers import gender_of
from gender_pipeline.lake.history import PhotoResult
from gender_pipeline.lake.keys import user_of
from gender_pipeline.lake.storage import ObjectInfo, Store
from gender_pipeline.runtime import timeline
from gender_pipeline.runtime.processes import cpu_count
from gender_pipeline.runtime.stopping import STOP

log = logging.getLogger(__name__)

FRONT_ENDS = ("auto", "cpu", "gpu")


class FaceModel(Protocol):
    """What scoring needs of a model: models.predictor.Predictor is one."""

    name: str
    version: str
    framing: Framing
    abstain_threshold: float
    device: str

    # -> an object with a float32 `p_male` array, and for a model that answers age, float32
    # `age_years` and `age_confidence` arrays and an `age_band` list (else `age_years` None)
    def predict(self, chips: np.ndarray): ...

    def auto_batch_size(self) -> int: ...


@dataclass(frozen=True)
class ScoringOptions:
    batch_size: int | None = None  # None: 64 on CPU, sized from free memory on CUDA
    workers: int | None = None  # None: one per core, none at all for small runs
    limits: DecodeLimits = DecodeLimits()
    detect_side: int = DETECT_SIDE
    detect_first_side: int = FIRST_SIDE  # CPU path: RetinaFace first looks at a copy this small (0: off)
    read_chunk: int = 32
    abstain_threshold: float | None = None  # None: the model card's value
    jpeg_device: str | None = None  # "cuda": decode plain JPEGs with nvJPEG
    # Where faces are found and aligned: "gpu" (batched on the model's device, see
    # faces.device), "cpu" (in the worker processes), "auto" (gpu when the model is on CUDA).
    front_end: str = "auto"
    gpu_batch: int = 32  # photos per GPU detection batch

    def __post_init__(self) -> None:
        if self.front_end not in FRONT_ENDS:
            raise ValueError(f"front end must be auto, cpu or gpu, got {self.front_end!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {self.batch_size}")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"workers must be 0 or more, got {self.workers}")
        if self.read_chunk < 1:
            raise ValueError(f"read chunk must be at least 1, got {self.read_chunk}")

    def recipe(self, framing: Framing) -> ChipRecipe:
        """How the photos become chips for a model with `framing`."""
        return ChipRecipe(framing, self.limits, self.detect_side, self.detect_first_side, self.jpeg_device)


@dataclass(frozen=True)
class RunStamp:
    """Who answers and when: every row of a run carries its id and its time."""

    run_id: str
    scored_at: datetime


@dataclass
class ScoringStats:
    listed: int = 0
    read: int = 0
    skipped_same_hash: int = 0
    scored: int = 0
    rejected: int = 0
    reasons: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    # Seconds per stage, added over photos (and over worker processes working at once):
    # read, decode, detect, landmarks, warp, model.
    stage_seconds: Counter = field(default_factory=Counter)
    same_content: list[str] = field(default_factory=list)  # keys read again whose bytes were answered before

    @property
    def photos_per_second(self) -> float:
        return (self.scored + self.rejected) / self.seconds if self.seconds > 0 else 0.0


def merge_stats(parts: list[ScoringStats]) -> ScoringStats:
    """Shards' statistics added up; seconds is the longest shard (they may run in parallel)."""
    total = ScoringStats()
    for part in parts:
        for name in ("listed", "read", "skipped_same_hash", "scored", "rejected"):
            setattr(total, name, getattr(total, name) + getattr(part, name))
        total.reasons.update(part.reasons)
        total.stage_seconds.update(part.stage_seconds)
        total.same_content.extend(part.same_content)
    total.seconds = max((p.seconds for p in parts), default=0.0)
    return total


def age_answers(prediction, count: int) -> list[tuple[float | None, str | None, float | None]]:
    """(age in years, band, the band's probability) per face: nulls for a model that
    answers no age."""
    years = getattr(prediction, "age_years", None)
    if years is None:
        return [(None, None, None)] * count
    return [(float(y), b, float(c)) for y, b, c in zip(years, prediction.age_band, prediction.age_confidence)]


def _stack(chips: list):
    """Chips as one batch: a uint8 array, or (from the device path) a device tensor."""
    if all(isinstance(c, np.ndarray) for c in chips):
        return np.stack(chips)
    import torch  # lazy: only the device path hands over tensors, and it has torch loaded

    device = next(c.device for c in chips if not isinstance(c, np.ndarray))
    return torch.stack([torch.from_numpy(c).permute(2, 0, 1).float().to(device) if isinstance(c, np.ndarray)
                        else c for c in chips])


class ScoringEngine:
    """Answers every photo object with one row (unless its content is already known):
    read → decode → find the face → classify in batches.

    `checkpoint` is called between photos and while waiting; when it raises (the run was
    asked to stop), reading stops, the decoder processes are killed and the error
    propagates: nothing of that call is returned. `progress(done, of)` is told as photos
    are answered. `worker_job` replaces the front end (an importable function of key,
    bytes, sha256 returning a Prepared; tests use it)."""

    def __init__(self, model: FaceModel, options: ScoringOptions, stamp: RunStamp,
                 progress: Callable[[int, int], None] | None = None, checkpoint: Callable[[], None] = STOP.check,
                 worker_job: Callable[[str, bytes, str], Prepared] | None = None) -> None:
        self.model, self.options, self.stamp = model, options, stamp
        self.progress, self.checkpoint, self.worker_job = progress, checkpoint, worker_job
        self.batch_size = options.batch_size or model.auto_batch_size()
        self.threshold = (options.abstain_threshold if options.abstain_threshold is not None
                          else model.abstain_threshold)
        self.stats = ScoringStats()
        self.results: list[PhotoResult] = []
        self.batch: list[Prepared] = []

    def score(self, store: Store, objects: list[ObjectInfo], known_hashes: dict[str, set[str]]
              ) -> tuple[list[PhotoResult], ScoringStats]:
        """One row per object (sorted by key) and the statistics of the call."""
        self.stats, self.results, self.batch = ScoringStats(listed=len(objects)), [], []
        started = time.perf_counter()
        to_read = self._answer_from_listing(objects)
        workers = self._workers(len(objects))
        decoding = self._decoding(workers)
        depth = max(self.options.read_chunk * 2, workers * 8)
        with ReadAhead(store, to_read, self.options.read_chunk, depth, self.stats.stage_seconds) as reader, \
                decoding.pool:
            for key, data, sha in reader.items(self.checkpoint):
                self._take(decoding, key, data, sha, known_hashes)
            decoding.finish()
        self.flush()
        self.checkpoint()
        self.stats.seconds = time.perf_counter() - started
        self.results.sort(key=lambda r: r.photo_key)
        return self.results, self.stats

    # -- the stages ---------------------------------------------------------------------------

    def _answer_from_listing(self, objects: list[ObjectInfo]) -> list[ObjectInfo]:
        """Keys without a user id (or that try to climb out of the source) and objects over
        the byte limit are answered from the listing, without a download; the rest is read."""
        to_read, limit = [], self.options.limits.max_bytes
        for obj in objects:
            if user_of(obj.key) is None:
                self.accept(Prepared(obj.key, None, None, reject_reason=BAD_KEY, detail=BAD_KEY_DETAIL))
            elif obj.size > limit:
                self.accept(Prepared.rejected(obj.key, None, TOO_LARGE, f"{obj.size} bytes > limit {limit}"))
            else:
                to_read.append(obj)
        return to_read

    def _workers(self, count: int) -> int:
        workers = self.options.workers
        if workers is None:
            workers = cpu_count() if count >= 64 else 0
        if workers and multiprocessing.current_process().daemon:
            # e.g. a Dask worker started with distributed.worker.daemon=True: no child processes
            log.warning("this process is daemonic and cannot start decoder processes; decoding in-process")
            workers = 0
        return workers

    def _decoding(self, workers: int) -> CpuDecoding:
        """The device path when asked for (or, by default, when the model runs on CUDA and
        its faces come from RetinaFace), else the CPU path."""
        device = getattr(self.model, "device", "cpu")
        front_end = self.options.front_end
        on_device = front_end == "gpu" or (front_end == "auto" and device.startswith("cuda")
                                           and self.model.framing.detector == "retinaface")
        recipe = self.options.recipe(self.model.framing)
        pool = DecoderPool(recipe, workers, self.worker_job, self.checkpoint, decode_only=on_device,
                           device=device if on_device else None)
        return DeviceDecoding(self, pool, device) if on_device else CpuDecoding(self, pool)

    def _take(self, decoding: CpuDecoding, key: str, data: bytes | BaseException, sha: str | None,
              known_hashes: dict[str, set[str]]) -> None:
        """A photo as read: a failed read is answered, bytes this model answered before are
        skipped (a touch), the rest goes to the decoders."""
        self.stats.read += 1
        if isinstance(data, BaseException):
            self.accept(Prepared.rejected(key, None, READ_ERROR, str(data)))
        elif sha in known_hashes.get(key, ()):
            self.stats.skipped_same_hash += 1
            self.stats.same_content.append(key)
        else:
            decoding.take((key, data, sha))

    def accept(self, prepared: Prepared) -> None:
        """A prepared photo: rejected (its row now), or into the model's batch."""
        self.stats.stage_seconds.update(prepared.seconds)
        if prepared.reject_reason:
            self.stats.rejected += 1
            self.stats.reasons[prepared.reject_reason] += 1
            self.results.append(self._stamped(PhotoResult.rejected(
                prepared.user_id, prepared.key, prepared.sha256, prepared.reject_reason, prepared.face_count,
                prepared.detail)))
            log.debug("rejected %s: %s (%s)", prepared.key, prepared.reject_reason, prepared.detail)
        else:
            self.batch.append(prepared)
            if len(self.batch) >= self.batch_size:
                self.flush()
        if self.progress:
            done = self.stats.scored + self.stats.rejected + len(self.batch)
            self.progress(done + self.stats.skipped_same_hash, self.stats.listed)

    def flush(self) -> None:
        """The model on the batch: one scored row per face."""
        if not self.batch:
            return
        self.checkpoint()
        batch, self.batch = self.batch, []
        started = time.perf_counter()
        prediction = self.model.predict(_stack([p.chip for p in batch]))
        self.stats.stage_seconds["model"] += time.perf_counter() - started
        genders = gender_of(prediction.p_male, self.threshold)
        ages = age_answers(prediction, len(batch))
        for prepared, p_male, gender, (years, band, band_confidence) in zip(batch, prediction.p_male, genders, ages):
            p_male = float(p_male)
            self.results.append(self._stamped(PhotoResult(
                user_id=prepared.user_id, photo_key=prepared.key, photo_sha256=prepared.sha256,
                status="scored", gender=gender, p_male=p_male, p_female=1.0 - p_male,
                confidence=max(p_male, 1.0 - p_male), face_count=prepared.face_count,
                face_box=prepared.box, age_years=years, age_band=band, age_confidence=band_confidence)))
        self.stats.scored += len(batch)
        timeline.mark("first photo answered")

    def _stamped(self, row: PhotoResult) -> PhotoResult:
        row.run_id, row.scored_at = self.stamp.run_id, self.stamp.scored_at
        row.model_name, row.model_version = self.model.name, self.model.version
        return row
