"""The face front end on a GPU, batched: JPEG bytes or decoded photos in, aligned chips out,
on the device.

JPEG bytes are decoded on the device in one call per batch (faces.jpeg_device: TorchCodec's
`decode_jpeg`, nvJPEG on CUDA, libjpeg-turbo when the device is the CPU, as in the tests),
with their EXIF orientation, and shrunk there (antialiased) to the working size: their
pixels never travel to host memory.

Photos are letterboxed to a few fixed sizes (their longest side scaled to `detect_side`,
padded to multiples of 32, so few shapes reach the GPU), RetinaFace runs in PyTorch on the
batch, priors, decoding and NMS run on the device, and each photo's largest face is warped
to its chip there (`affine_grid`/`grid_sample`): the chips go straight to the classifier.

A `retinaface_5pt` framing is warped from RetinaFace's own points. A `dlib_chip` framing
(the shipped model's, and that of models trained on it) needs dlib's five landmarks: they
are found on the CPU copy of the photo inside the mapped box (a millisecond a face) and
only the warp runs on the device. The landmark model reads a small crop around the face,
copied to the host (the same landmarks as on the whole photo: the model samples pixels
near the face only). The same code runs on the CPU for tests.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from gender_pipeline.faces.decoding import shrunk_tensor
from gender_pipeline.faces.framing import Framing, clip_box, hog_box, template_points
from gender_pipeline.faces.front_end import FaceFrontEnd, image_tensor
from gender_pipeline.faces.jpeg_device import decode_jpegs
from gender_pipeline.faces.retinaface import RetinaFaceTorch, detect_batch, letterbox
from gender_pipeline.faces.warp import dlib_chip_matrix, similarity, warp_chips
from gender_pipeline.runtime.timing import timed

log = logging.getLogger(__name__)


@dataclass
class GpuFace:
    chip: torch.Tensor  # 3 x size x size float (0..255) on the device
    box: tuple[int, int, int, int]  # left, top, right, bottom in HOG's convention, image pixels
    count: int


class GpuFaceFrontEnd:
    """RetinaFace in PyTorch on `device` and the chip warp, for batches of photos."""

    def __init__(self, framing: Framing, device: str, detect_side: int = 640) -> None:
        if framing.detector != "retinaface":
            raise ValueError(f"the GPU front end detects with RetinaFace; this model's framing asks for "
                             f"{framing.detector}")
        self.framing, self.device, self.detect_side = framing, device, detect_side
        self.model = RetinaFaceTorch().eval().to(device)
        if device.startswith("cuda"):
            self.model = self.model.to(memory_format=torch.channels_last)
        self._landmarks: FaceFrontEnd | None = None
        if framing.kind == "dlib_chip":
            log.warning("this model was trained on dlib_chip faces: dlib's landmarks are found on the CPU, "
                        "detection and the warp stay on %s", device)
            self._landmarks = FaceFrontEnd(detector="hog")  # only its landmark model is used

    @torch.inference_mode()
    def decode_jpegs(self, payloads: list[bytes], working_side: int,
                     timings: dict | None = None) -> list[tuple[torch.Tensor, int, int] | None]:
        """JPEG bytes to working images on the device: (3 x H x W uint8 tensor, original
        width, original height), EXIF orientation applied, longest side at most
        `working_side`. One call decodes the batch, ordered against this stream
        (faces.jpeg_device); one the device decoder refuses comes back as None (for the
        CPU path)."""
        with timed(timings, "device_decode"):
            images = decode_jpegs(payloads, self.device)
            out = [None if image is None else self._working(image, working_side) for image in images]
            self._settle()
            return out

    def _settle(self) -> None:
        """Wait for the device's queued work, so that a stage's seconds are its own (the
        next stage needs the results anyway)."""
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)

    @staticmethod
    def _working(image: torch.Tensor, side: int) -> tuple[torch.Tensor, int, int]:
        height, width = image.shape[-2:]
        return shrunk_tensor(image, side), int(width), int(height)

    @torch.inference_mode()
    def faces(self, images: list, timings: dict | None = None) -> list[GpuFace | None]:
        """The largest face of each photo, or None. A photo is an RGB array (H x W x 3
        uint8, as decoded on the CPU) or a 3 x H x W uint8 tensor on the device."""
        with timed(timings, "detect"):
            on_device = [image if isinstance(image, torch.Tensor) else
                         image_tensor(image).to(self.device, non_blocking=True) for image in images]
            batch, scales, valid = letterbox(on_device, self.detect_side)
            detections = detect_batch(self.model, batch, valid)
            self._settle()
        out: list[GpuFace | None] = []
        for image, scale, found in zip(on_device, scales, detections):
            if len(found.scores) == 0:
                out.append(None)
                continue
            boxes = found.boxes / scale
            areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            best = int(torch.argmax(areas))
            box = clip_box(hog_box(*boxes[best].tolist()), image.shape[2], image.shape[1])
            matrix = self._matrix(image, box, found.points[best] / scale, timings)
            with timed(timings, "warp"):
                chip = self._warp(image, matrix)
            out.append(GpuFace(chip, box, len(found.scores)))
        return out

    def _matrix(self, image: torch.Tensor, box, points: torch.Tensor, timings: dict | None) -> torch.Tensor:
        if self._landmarks is None:
            target = torch.as_tensor(template_points(self.framing), dtype=torch.float32, device=points.device)
            return similarity(points.float()[None], target)[0]
        with timed(timings, "landmarks"):
            dlib = self._landmarks._dlib
            shape = face_landmarks(self._landmarks, image, box)
            details = dlib.get_face_chip_details(shape, self.framing.size, self.framing.padding)
            r = details.rect
            matrix = dlib_chip_matrix(r.left(), r.top(), r.right(), r.bottom(), details.angle, self.framing.size)
        return torch.as_tensor(matrix, dtype=torch.float32, device=self.device)

    def _warp(self, image: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        # dlib_chip models saw dlib's own chips: its pyramid and sampling, reproduced
        if self.framing.kind == "dlib_chip":
            chip = warp_chips(image, matrix[None], self.framing.size, method="dlib", fill=self.framing.fill)[0]
            return torch.floor(chip + 1e-3)  # dlib's chips are truncated to whole values
        chip = warp_chips(image, matrix[None], self.framing.size, method="antialias", fill=self.framing.fill)[0]
        return chip.round().clamp(0, 255)  # as the CPU path's uint8 chips


def face_landmarks(front_end: FaceFrontEnd, image: torch.Tensor, box: tuple[int, int, int, int]):
    """dlib's five landmarks of the face in `box` of a 3 x H x W image on any device, read
    from a crop of the face and a face-sized margin on each side (copied to the host):
    the landmark model's pixel samples stay that close to the face, so the points are those
    it finds on the whole photo."""
    dlib = front_end._dlib
    left, top, right, bottom = box
    margin = max(right - left, bottom - top) + 1
    height, width = image.shape[1:]
    x0, y0 = max(0, left - margin), max(0, top - margin)
    x1, y1 = min(width, right + margin + 1), min(height, bottom + margin + 1)
    crop = np.ascontiguousarray(image[:, y0:y1, x0:x1].permute(1, 2, 0).cpu().numpy())
    shape = front_end._landmarks(crop, dlib.rectangle(left - x0, top - y0, right - x0, bottom - y0))
    points = dlib.points([dlib.point(p.x + x0, p.y + y0) for p in shape.parts()])
    return dlib.full_object_detection(dlib.rectangle(*box), points)
