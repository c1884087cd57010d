"""Score a list of photo objects: read, decode, find the face, classify in batches.

Reading runs in a background thread (concurrent reads on async stores), decoding and
face alignment run in worker processes, and the model runs on full batches in this
process while the next photos are prepared. Memory holds a bounded number of photos.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

import numpy as np

from gender_pipeline.runtime import shm
from gender_pipeline.faces.decoding import TOO_LARGE, DecodedPhoto, DecodeLimits, Rejection, decode_photo
from gender_pipeline.faces.front_end import FIRST_SIDE, NO_FACE, FaceFrontEnd, Framing
from gender_pipeline.faces.headers import inspect
from gender_pipeline.lake.history import PhotoResult, gender_of
from gender_pipeline.runtime.processes import cpu_count, kill_pool, quiet_worker
from gender_pipeline.runtime.stopping import STOP, result_unless_stopped
from gender_pipeline.runtime import timeline
from gender_pipeline.runtime.timing import timed
from gender_pipeline.lake.storage import ObjectInfo, Store

log = logging.getLogger(__name__)

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


BAD_KEY = "bad_key"
READ_ERROR = "read_error"
DECODER_CRASH = "decoder_crash"


@dataclass(frozen=True)
class ScoringOptions:
    batch_size: int | None = None  # None: 64 on CPU, sized from free memory on CUDA
    workers: int | None = None  # None: one per core, none at all for small runs
    limits: DecodeLimits = DecodeLimits()
    detect_side: int = 640
    detect_first_side: int = FIRST_SIDE  # CPU path: RetinaFace first looks at a copy this small (0: off)
    read_chunk: int = 32
    abstain_threshold: float | None = None  # None: the model card's value
    jpeg_device: str | None = None  # "cuda": decode plain JPEGs with nvJPEG
    # Where faces are found and aligned: "gpu" (batched on the model's device, see
    # faces.device), "cpu" (in the worker processes), "auto" (gpu when the model is on CUDA).
    front_end: str = "auto"
    gpu_batch: int = 32  # photos per GPU detection batch

    def __post_init__(self) -> None:
        if self.front_end not in ("auto", "cpu", "gpu"):
            raise ValueError(f"front end must be auto, cpu or gpu, got {self.front_end!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {self.batch_size}")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"workers must be 0 or more, got {self.workers}")
        if self.read_chunk < 1:
            raise ValueError(f"read chunk must be at least 1, got {self.read_chunk}")


def user_of(key: str) -> str | None:
    """The user id is the first path segment; None when the key has no usable one."""
    parts = key.split("/")
    if len(parts) < 2 or any(p in ("", ".", "..") for p in parts):
        return None
    return parts[0]


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
    decoded: DecodedPhoto | None = None  # decoded only (GPU front end): its faces are found later
    data: bytes | None = None  # with `decoded`: the bytes, for a retry on the CPU path
    shape: tuple[int, int, int] | None = None  # set when `decoded`'s pixels went to its shared-memory slot
    image: object = None  # the pixels as a 3 x H x W uint8 tensor on the GPU front end's device
    on_device: bool = False  # decoded by the device decoder (a photo it finds no face in is checked on the CPU)


_frontend: FaceFrontEnd | None = None
_worker_setup: tuple[Framing, DecodeLimits, int, str | None, bool, int] | None = None
_threads: int | None = None  # detector threads in this process (None: every core)


def init_face_worker(parent_pid: int | None = None, threads: int | None = None) -> None:
    """A worker process of the face front end: it never outlives the run (which ends it
    when asked to stop) and its detector shares the cores with the other workers."""
    global _threads, _frontend
    quiet_worker(parent_pid)
    _threads, _frontend = threads, None
    if threads:
        import torch  # the detector's post-processing and the warp: no more threads than the cores' share

        torch.set_num_threads(threads)


def _init_worker(framing: Framing, limits: DecodeLimits, detect_side: int, jpeg_device: str | None,
                 decode_only: bool = False, parent_pid: int | None = None, threads: int | None = None,
                 first_side: int = FIRST_SIDE) -> None:
    global _worker_setup
    init_face_worker(parent_pid, threads)
    _worker_setup = (framing, limits, detect_side, jpeg_device, decode_only, first_side)


def worker_threads(workers: int) -> int:
    """Detector threads per worker process so that the workers share the cores."""
    return max(1, cpu_count() // max(1, workers))


def _frontend_for(detector: str, detect_side: int, first_side: int = FIRST_SIDE) -> FaceFrontEnd:
    global _frontend
    wanted = FaceFrontEnd.settings(detector, detect_side, first_side)
    if _frontend is None or (_frontend.detector, _frontend.detect_side, _frontend.first_side) != wanted:
        _frontend = FaceFrontEnd(detector=detector, detect_side=detect_side, threads=_threads, first_side=first_side)
    return _frontend


def face_chip(data: bytes, framing: Framing, limits: DecodeLimits, detect_side: int = 640,
              jpeg_device: str | None = None, timings: dict | None = None, first_side: int = FIRST_SIDE
              ) -> tuple[np.ndarray | None, list[int] | None, int, str | None, str, str | None]:
    """Bytes to an aligned chip: (chip, box in original pixels, face count, reject reason,
    detail, format). The one path from a photo to a model input. `timings` (when given)
    adds the seconds of each stage."""
    with timed(timings, "decode"):
        decoded = decode_photo(data, limits, jpeg_device)
    if isinstance(decoded, Rejection):
        return None, None, 0, decoded.reason, decoded.detail, decoded.format
    face = _frontend_for(framing.detector, detect_side, first_side).largest_face(decoded.rgb, framing, timings)
    if face is None:
        return None, None, 0, NO_FACE, "no face detected", decoded.format
    return face.chip, original_box(face.box, decoded), face.count, None, "", decoded.format


def original_box(box, decoded: DecodedPhoto) -> list[int]:
    """A box in the working image's pixels, in the original photo's (after EXIF rotation)."""
    return [min(int(round(v / decoded.scale)), limit - 1) for v, limit in
            zip(box, (decoded.width, decoded.height, decoded.width, decoded.height))]


def prepare_photo(key: str, data: bytes, sha256: str, framing: Framing, limits: DecodeLimits,
                  detect_side: int = 640, jpeg_device: str | None = None, decode_only: bool = False,
                  first_side: int = FIRST_SIDE) -> Prepared:
    """Decode, validate and align one photo (or only decode and validate it, for the GPU
    front end). Plain function: no storage, no model."""
    user_id = user_of(key)
    if user_id is None:
        return Prepared(key, None, sha256, reject_reason=BAD_KEY,
                        detail="key is not {user_id}/{file name}")
    seconds: dict = {}
    if decode_only:
        with timed(seconds, "decode"):
            decoded = decode_photo(data, limits, jpeg_device)
        if isinstance(decoded, Rejection):
            return Prepared(key, user_id, sha256, reject_reason=decoded.reason, detail=decoded.detail,
                            format=decoded.format, seconds=seconds)
        return Prepared(key, user_id, sha256, format=decoded.format, seconds=seconds, decoded=decoded, data=data)
    chip, box, count, reason, detail, fmt = face_chip(data, framing, limits, detect_side, jpeg_device, seconds,
                                                      first_side)
    return Prepared(key, user_id, sha256, chip=chip, box=box, face_count=count, reject_reason=reason,
                    detail=detail, format=fmt, seconds=seconds)


def _ping() -> bool:
    return True


def _prepare_in_worker(key: str, data: bytes, sha256: str) -> Prepared:
    assert _worker_setup is not None
    return prepare_photo(key, data, sha256, *_worker_setup)


def _decode_into_slot(key: str, data: bytes, sha256: str, slot: str) -> Prepared:
    """Decode only; the pixels go into the shared-memory slot `slot`, not into the reply."""
    prepared = _prepare_in_worker(key, data, sha256)
    decoded = prepared.decoded
    if decoded is not None and shm.write(slot, decoded.rgb):
        prepared.shape = tuple(decoded.rgb.shape)
        decoded.rgb = None
    return prepared


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


_DONE = object()


def _read_ahead(store: Store, objects: list[ObjectInfo], chunk: int, out: queue.Queue,
                stop: threading.Event, seconds: Counter) -> None:
    """Reader thread: fetch chunks concurrently and hash them (`seconds["read"]` adds the time)."""

    def put(item) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.25)
                return True
            except queue.Full:
                continue
        return False

    try:
        for start in range(0, len(objects), chunk):
            if stop.is_set():
                return
            keys = [o.key for o in objects[start:start + chunk]]
            started = time.perf_counter()
            timeline.mark("first photo read")
            found = [(key, data, None if isinstance(data, BaseException) else hashlib.sha256(data).hexdigest())
                     for key, data in store.read_many(keys).items()]
            seconds["read"] += time.perf_counter() - started
            for item in found:
                if not put(item):
                    return
    except BaseException as error:  # pragma: no cover - surfaced by the consumer
        put((None, error, None))
    finally:
        put(_DONE)


class _Preparer:
    """Runs prepare_photo inline or on a process pool that survives crashing decoders."""

    def __init__(self, options: ScoringOptions, framing: Framing, workers: int,
                 job: Callable[[str, bytes, str], Prepared] | None = None,
                 checkpoint: Callable[[], None] = STOP.check, decode_only: bool = False,
                 device: str | None = None) -> None:
        self.options, self.framing, self.workers, self.decode_only = options, framing, workers, decode_only
        self.job = job or _prepare_in_worker  # an importable function: workers are spawned
        self.inline_job = job  # a given job runs in this process too when there are no workers
        self.checkpoint = checkpoint
        self.pool: ProcessPoolExecutor | None = None
        self.inflight: deque[tuple[tuple, Future, str | None]] = deque()
        # Decoded photos for the GPU front end come back through shared memory, copied
        # once to `device`.
        self.device = device
        self.slots: shm.SlotPool | None = None

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(self.framing, self.options.limits, self.options.detect_side,
                      self.options.jpeg_device, self.decode_only, os.getpid(), worker_threads(self.workers),
                      self.options.detect_first_side))

    def __enter__(self) -> "_Preparer":
        if self.workers > 0:
            self.pool = self._new_pool()
            if self.decode_only and self.job is _prepare_in_worker:
                self.slots = shm.SlotPool(self.capacity, shm.slot_bytes(self.options.limits.working_side))
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

    def submit(self, item: tuple) -> Prepared | None:
        if self.pool is None:
            if self.inline_job is not None:
                return self.inline_job(*item)
            key, data, sha = item
            return prepare_photo(key, data, sha, self.framing, self.options.limits,
                                 self.options.detect_side, self.options.jpeg_device, self.decode_only,
                                 self.options.detect_first_side)
        slot = self.slots.acquire() if self.slots is not None else None
        if slot is not None:
            self.inflight.append((item, self.pool.submit(_decode_into_slot, *item, slot), slot))
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

    def _first_done(self) -> tuple[tuple, Future, str | None]:
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
                import torch

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

    def _isolated(self, item: tuple) -> Prepared:
        key, _, sha = item
        try:
            return self._wait(self.pool.submit(self.job, *item))
        except BrokenProcessPool:
            self._restart()
            self._check_pool()
            log.error("photo %s crashes the decoder; rejected", key)
            return Prepared(key, user_of(key), sha, reject_reason=DECODER_CRASH,
                            detail="the decoder process died on this photo")

    def _wait(self, future: Future) -> Prepared:
        return result_unless_stopped(future, self.checkpoint)

    def _check_pool(self) -> None:
        """A fresh pool that cannot run an empty job is broken by itself, not by a photo:
        stop the run rather than reject every photo as a decoder crash."""
        try:
            self.pool.submit(_ping).result(timeout=300)
        except BrokenProcessPool as error:
            raise RuntimeError("decoder worker processes cannot start; see the worker's error above") from error


def age_answers(prediction, count: int) -> list[tuple[float | None, str | None, float | None]]:
    """(age in years, band, the band's probability) per face: nulls for a model that
    answers no age."""
    years = getattr(prediction, "age_years", None)
    if years is None:
        return [(None, None, None)] * count
    return [(float(y), b, float(c)) for y, b, c in zip(years, prediction.age_band, prediction.age_confidence)]


def gpu_front_end(options: ScoringOptions, predictor: FaceModel):
    """The GPU front end on the model's device when asked for (or, by default, when the
    model runs on CUDA and its faces come from RetinaFace); None for the CPU path."""
    device = getattr(predictor, "device", "cpu")
    wanted = options.front_end == "gpu" or (options.front_end == "auto" and device.startswith("cuda")
                                            and predictor.framing.detector == "retinaface")
    if not wanted:
        return None
    from gender_pipeline.faces.device import GpuFaceFrontEnd

    return GpuFaceFrontEnd(predictor.framing, device, options.detect_side)


def _stack(chips: list):
    """Chips as one batch: a uint8 array, or (from the GPU front end) a device tensor."""
    if all(isinstance(c, np.ndarray) for c in chips):
        return np.stack(chips)
    import torch

    device = next(c.device for c in chips if not isinstance(c, np.ndarray))
    return torch.stack([torch.from_numpy(c).permute(2, 0, 1).float().to(device) if isinstance(c, np.ndarray)
                        else c for c in chips])


def score_objects(store: Store, objects: list[ObjectInfo], known_hashes: dict[str, set[str]],
                  predictor: FaceModel, options: ScoringOptions, run_id: str, scored_at: datetime,
                  progress: Callable[[int, int], None] | None = None,
                  worker_job: Callable[[str, bytes, str], Prepared] | None = None,
                  checkpoint: Callable[[], None] = STOP.check
                  ) -> tuple[list[PhotoResult], ScoringStats]:
    """Answer every object in `objects` with one row (unless its content is already known).

    `checkpoint` is called between photos and while waiting; when it raises (the run was
    asked to stop), reading stops, the decoder processes are killed and the error
    propagates: nothing of this call is returned."""
    stats = ScoringStats(listed=len(objects))
    started = time.perf_counter()
    workers = options.workers
    if workers is None:
        workers = cpu_count() if len(objects) >= 64 else 0
    if workers and multiprocessing.current_process().daemon:
        # e.g. a Dask worker started with distributed.worker.daemon=True: no child processes
        log.warning("this process is daemonic and cannot start decoder processes; decoding in-process")
        workers = 0
    batch_size = options.batch_size or predictor.auto_batch_size()
    threshold = (options.abstain_threshold if options.abstain_threshold is not None
                 else predictor.abstain_threshold)
    gpu = gpu_front_end(options, predictor)
    results: list[PhotoResult] = []
    batch: list[Prepared] = []
    decoded: list[Prepared] = []  # GPU front end: photos decoded, faces not yet found
    jpegs: list[tuple[str, bytes, str]] = []  # GPU front end: JPEG bytes waiting for the device decoder

    def stamp(row: PhotoResult) -> PhotoResult:
        row.run_id, row.scored_at = run_id, scored_at
        row.model_name, row.model_version = predictor.name, predictor.version
        return row

    def flush() -> None:
        if not batch:
            return
        checkpoint()
        t0 = time.perf_counter()
        prediction = predictor.predict(_stack([p.chip for p in batch]))
        stats.stage_seconds["model"] += time.perf_counter() - t0
        genders = gender_of(prediction.p_male, threshold)
        ages = age_answers(prediction, len(batch))
        for prepared, p_male, gender, (years, band, band_confidence) in zip(batch, prediction.p_male, genders, ages):
            p_male = float(p_male)
            results.append(stamp(PhotoResult(
                user_id=prepared.user_id, photo_key=prepared.key, photo_sha256=prepared.sha256,
                status="scored", gender=gender, p_male=p_male, p_female=1.0 - p_male,
                confidence=max(p_male, 1.0 - p_male), face_count=prepared.face_count,
                face_box=prepared.box, age_years=years, age_band=band, age_confidence=band_confidence)))
        stats.scored += len(batch)
        batch.clear()
        timeline.mark("first photo answered")

    def find_faces() -> None:
        """GPU front end: the decoded photos' faces in one batch; when the batch fails on
        the GPU, each of its photos is retried on the CPU path alone. A photo the device
        decoder read and finds no face in is read again on the CPU path, whose answer
        stands: a damaged JPEG that a device decoder pads silently is rejected as the CPU
        path rejects it."""
        if not decoded:
            return
        checkpoint()
        items, timings = list(decoded), {}
        decoded.clear()
        try:
            faces = gpu.faces([p.image if p.image is not None else p.decoded.rgb for p in items], timings)
        except Exception as error:  # noqa: BLE001 - any failure of the GPU path
            log.warning("the GPU front end failed on %d photos (%s); each is retried on the CPU", len(items), error)
            for p in items:
                accept(on_cpu(p))
            return
        stats.stage_seconds.update(timings)
        for p, face in zip(items, faces):
            if face is None and p.on_device:
                accept(on_cpu(p))
            elif face is None:
                accept(Prepared(p.key, p.user_id, p.sha256, reject_reason=NO_FACE, detail="no face detected",
                                format=p.format))
            else:
                accept(Prepared(p.key, p.user_id, p.sha256, chip=face.chip, box=original_box(face.box, p.decoded),
                                face_count=face.count, format=p.format))

    def on_cpu(p: Prepared) -> Prepared:
        return prepare_photo(p.key, p.data, p.sha256, predictor.framing, options.limits, options.detect_side,
                             first_side=options.detect_first_side)

    def decode_on_device() -> None:
        """GPU front end: the waiting JPEGs decoded on the device in one call; a photo the
        device decoder refuses goes to the CPU decoders."""
        if not jpegs:
            return
        checkpoint()
        items = list(jpegs)
        jpegs.clear()
        timings: dict = {}
        images = gpu.decode_jpegs([data for _, data, _ in items], options.limits.working_side, timings)
        stats.stage_seconds.update(timings)
        for (key, data, sha), image in zip(items, images):
            if image is None:
                log.debug("the device decoder refused %s; decoding it on the CPU", key)
                feed((key, data, sha))
                continue
            tensor, width, height = image
            photo = DecodedPhoto(rgb=None, format="JPEG", width=width, height=height,
                                 scale=tensor.shape[2] / width)
            accept(Prepared(key, user_of(key), sha, format="JPEG", decoded=photo, data=data, image=tensor,
                            on_device=True))

    def accept(prepared: Prepared) -> None:
        stats.stage_seconds.update(prepared.seconds)
        if prepared.decoded is not None:
            decoded.append(prepared)
            if len(decoded) >= options.gpu_batch:
                find_faces()
            return
        if prepared.reject_reason:
            stats.rejected += 1
            stats.reasons[prepared.reject_reason] += 1
            row = PhotoResult.rejected(prepared.user_id, prepared.key, prepared.sha256,
                                       prepared.reject_reason, prepared.face_count, prepared.detail)
            results.append(stamp(row))
            log.debug("rejected %s: %s (%s)", prepared.key, prepared.reject_reason, prepared.detail)
        else:
            batch.append(prepared)
            if len(batch) >= batch_size:
                flush()
        done = stats.scored + stats.rejected + len(batch)
        if progress:
            progress(done + stats.skipped_same_hash, stats.listed)

    # Keys without a user id (or that try to climb out of the source) and objects over the
    # byte limit are answered from the listing, without a download.
    to_read = []
    for obj in objects:
        if user_of(obj.key) is None:
            accept(Prepared(obj.key, None, None, reject_reason=BAD_KEY, detail="key is not {user_id}/{file name}"))
        elif obj.size > options.limits.max_bytes:
            accept(Prepared(obj.key, user_of(obj.key), None, reject_reason=TOO_LARGE,
                            detail=f"{obj.size} bytes > limit {options.limits.max_bytes}"))
        else:
            to_read.append(obj)

    incoming: queue.Queue = queue.Queue(maxsize=max(options.read_chunk * 2, workers * 8))
    stop = threading.Event()
    reader = threading.Thread(target=_read_ahead, name="photo-reader", daemon=True,
                              args=(store, to_read, options.read_chunk, incoming, stop, stats.stage_seconds))
    reader.start()
    preparer = _Preparer(options, predictor.framing, workers, worker_job, checkpoint,
                         decode_only=gpu is not None, device=gpu.device if gpu is not None else None)

    def feed(item: tuple[str, bytes, str]) -> None:
        """A photo to the CPU decoders (answered at once when there are no workers)."""
        prepared = preparer.submit(item)
        if prepared is not None:
            accept(prepared)
        while preparer.full():
            for result in preparer.next_result():
                accept(result)

    def route(item: tuple[str, bytes, str]) -> None:
        """GPU front end: the header read here; a refusal answered from it, a plain JPEG
        kept for the device decoder, anything else to the CPU decoders."""
        key, data, sha = item
        with timed(stats.stage_seconds, "header"):
            header = inspect(data, options.limits)
        if isinstance(header, Rejection):
            accept(Prepared(key, user_of(key), sha, reject_reason=header.reason, detail=header.detail,
                            format=header.format))
        elif header.device_jpeg:
            jpegs.append(item)
            if len(jpegs) >= options.gpu_batch:
                decode_on_device()
        else:
            feed(item)

    try:
        with preparer:
            while True:
                checkpoint()
                try:
                    item = incoming.get(timeout=0.25)
                except queue.Empty:
                    continue
                if item is _DONE:
                    break
                key, data, sha = item
                if key is None:
                    raise data
                stats.read += 1
                if isinstance(data, BaseException):
                    accept(Prepared(key, user_of(key), None, reject_reason=READ_ERROR, detail=str(data)))
                    continue
                if sha in known_hashes.get(key, ()):
                    stats.skipped_same_hash += 1
                    stats.same_content.append(key)
                    continue
                if gpu is not None:
                    route(item)
                else:
                    feed(item)
            decode_on_device()
            while preparer.pending():
                for result in preparer.next_result():
                    accept(result)
        find_faces()
        flush()
        checkpoint()
    finally:
        stop.set()  # the reader stops within a chunk read; it never writes anything
        reader.join(timeout=1)
    stats.seconds = time.perf_counter() - started
    results.sort(key=lambda r: r.photo_key)
    return results, stats

