"""Where photos are decoded and their faces found: two interchangeable strategies of the
scoring engine.

- CpuDecoding: each photo is decoded, its face found and aligned in a decoder worker
  process (faces.chip), and comes back as a chip.
- DeviceDecoding: each photo's header is read here first (limits refused from it);
  plain JPEGs are decoded on the device in batches, other formats by the workers (their
  pixels through shared memory); the decoded photos' faces are found in batches on the
  device (faces.device). A batch that fails on the device is retried photo by photo on
  the CPU path, and a photo the device decoder read but finds no face in is read again on
  the CPU path, whose answer stands (a damaged JPEG that a device decoder pads silently is
  rejected as the CPU path rejects it).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

from gender_pipeline.engine.pool import DecoderPool, Item
from gender_pipeline.engine.prepared import Prepared, prepare_photo
from gender_pipeline.faces.chip import original_box
from gender_pipeline.faces.decoding import DecodedPhoto, Rejection
from gender_pipeline.faces.framing import NO_FACE
from gender_pipeline.faces.headers import inspect
from gender_pipeline.lake.keys import user_of
from gender_pipeline.runtime.timing import timed

if TYPE_CHECKING:
    from gender_pipeline.engine.engine import ScoringEngine

log = logging.getLogger(__name__)


class CpuDecoding:
    """Photos to the decoder workers; what they prepare to the engine."""

    def __init__(self, engine: "ScoringEngine", pool: DecoderPool) -> None:
        self.engine, self.pool = engine, pool

    def take(self, item: Item) -> None:
        """A photo's bytes, to be prepared."""
        self.feed(item)

    def feed(self, item: Item) -> None:
        """A photo to the decoder workers (prepared at once when there are none); while
        they are all busy, what they finish goes on."""
        prepared = self.pool.submit(item)
        if prepared is not None:
            self.found(prepared)
        while self.pool.full():
            for result in self.pool.next_result():
                self.found(result)

    def found(self, prepared: Prepared) -> None:
        self.engine.accept(prepared)

    def finish(self) -> None:
        """Every photo in flight prepared."""
        while self.pool.pending():
            for result in self.pool.next_result():
                self.found(result)


class DeviceDecoding(CpuDecoding):
    """Headers here, JPEGs decoded and faces found in batches on `device` (see the module)."""

    def __init__(self, engine: "ScoringEngine", pool: DecoderPool, device: str) -> None:
        super().__init__(engine, pool)
        from gender_pipeline.faces.device import GpuFaceFrontEnd  # lazy: torch and RetinaFace's graph, device path only

        options = engine.options
        self.front_end = GpuFaceFrontEnd(engine.model.framing, device, options.detect_side)
        self.batch = options.gpu_batch
        self.on_cpu = dataclasses.replace(pool.recipe, jpeg_device=None)
        self.jpegs: list[Item] = []  # JPEG bytes waiting for the device decoder
        self.decoded: list[Prepared] = []  # photos decoded, faces not yet found

    def take(self, item: Item) -> None:
        """The header read here: a refusal answered from it, a plain JPEG kept for the
        device decoder, anything else to the CPU decoders."""
        key, data, sha = item
        with timed(self.engine.stats.stage_seconds, "header"):
            header = inspect(data, self.pool.recipe.limits)
        if isinstance(header, Rejection):
            self.engine.accept(Prepared.rejected(key, sha, header.reason, header.detail, header.format))
        elif header.device_jpeg:
            self.jpegs.append(item)
            if len(self.jpegs) >= self.batch:
                self.decode_jpegs()
        else:
            self.feed(item)

    def found(self, prepared: Prepared) -> None:
        if not prepared.needs_faces:
            self.engine.accept(prepared)
            return
        self.engine.stats.stage_seconds.update(prepared.seconds)
        self.decoded.append(prepared)
        if len(self.decoded) >= self.batch:
            self.find_faces()

    def finish(self) -> None:
        self.decode_jpegs()
        super().finish()
        self.find_faces()

    def decode_jpegs(self) -> None:
        """The waiting JPEGs decoded on the device in one call; a photo the device decoder
        refuses goes to the CPU decoders."""
        if not self.jpegs:
            return
        self.engine.checkpoint()
        items, self.jpegs = self.jpegs, []
        timings: dict = {}
        images = self.front_end.decode_jpegs([data for _, data, _ in items], self.pool.recipe.limits.working_side,
                                             timings)
        self.engine.stats.stage_seconds.update(timings)
        for (key, data, sha), image in zip(items, images):
            if image is None:
                log.debug("the device decoder refused %s; decoding it on the CPU", key)
                self.feed((key, data, sha))
                continue
            tensor, width, height = image
            photo = DecodedPhoto(rgb=None, format="JPEG", width=width, height=height, scale=tensor.shape[2] / width)
            self.found(Prepared(key, user_of(key), sha, format="JPEG", decoded=photo, data=data, image=tensor,
                                on_device=True))

    def find_faces(self) -> None:
        """The decoded photos' faces in one batch on the device."""
        if not self.decoded:
            return
        self.engine.checkpoint()
        items, self.decoded = self.decoded, []
        timings: dict = {}
        try:
            faces = self.front_end.faces([p.image if p.image is not None else p.decoded.rgb for p in items], timings)
        except Exception as error:  # noqa: BLE001 - any failure of the device path
            log.warning("the GPU front end failed on %d photos (%s); each is retried on the CPU", len(items), error)
            for p in items:
                self.engine.accept(self._again_on_cpu(p))
            return
        self.engine.stats.stage_seconds.update(timings)
        for p, face in zip(items, faces):
            if face is None and p.on_device:
                self.engine.accept(self._again_on_cpu(p))
            elif face is None:
                self.engine.accept(Prepared(p.key, p.user_id, p.sha256, reject_reason=NO_FACE,
                                            detail="no face detected", format=p.format))
            else:
                self.engine.accept(Prepared(p.key, p.user_id, p.sha256, chip=face.chip,
                                            box=original_box(face.box, p.decoded), face_count=face.count,
                                            format=p.format))

    def _again_on_cpu(self, p: Prepared) -> Prepared:
        return prepare_photo(p.key, p.data, p.sha256, self.on_cpu)
