"""The face front end on a GPU, batched: decoded photos in, aligned chips out, on the device.

Photos are letterboxed to a few fixed sizes (their longest side scaled to `detect_side`,
padded to multiples of 32, so few shapes reach the GPU), RetinaFace runs in PyTorch on the
batch, priors, decoding and NMS run on the device, and each photo's largest face is warped
to its chip there (`affine_grid`/`grid_sample`): the chips go straight to the classifier.

A `retinaface_5pt` framing is warped from RetinaFace's own points. A `dlib_chip` framing
(the shipped model's, and that of models trained on it) needs dlib's five landmarks: they
are found on the CPU copy of the photo inside the mapped box (a millisecond a face) and
only the warp runs on the device. The same code runs on the CPU for tests.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from core.faces import FaceFrontEnd, Framing, clip_box, hog_box, image_tensor, template_points
from core.timing import timed

log = logging.getLogger(__name__)


@dataclass
class GpuFace:
    chip: torch.Tensor  # 3 x size x size float (0..255) on the device
    box: tuple[int, int, int, int]  # left, top, right, bottom in HOG's convention, image pixels
    count: int


class GpuFaceFrontEnd:
    """RetinaFace in PyTorch on `device` and the chip warp, for batches of photos."""

    def __init__(self, framing: Framing, device: str, detect_side: int = 640) -> None:
        from core.retinaface import RetinaFaceTorch

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
    def faces(self, images: list[np.ndarray], timings: dict | None = None) -> list[GpuFace | None]:
        """The largest face of each RGB photo (H x W x 3 uint8, as decoded), or None."""
        from core.retinaface import detect_batch, letterbox

        with timed(timings, "detect"):
            on_device = [image_tensor(image).to(self.device, non_blocking=True) for image in images]
            batch, scales, valid = letterbox(on_device, self.detect_side)
            detections = detect_batch(self.model, batch, valid)
        out: list[GpuFace | None] = []
        for image, rgb, scale, found in zip(on_device, images, scales, detections):
            if len(found.scores) == 0:
                out.append(None)
                continue
            boxes = found.boxes / scale
            areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            best = int(torch.argmax(areas))
            box = clip_box(hog_box(*boxes[best].tolist()), rgb.shape[1], rgb.shape[0])
            matrix = self._matrix(rgb, box, found.points[best] / scale, timings)
            with timed(timings, "warp"):
                chip = self._warp(image, matrix)
            out.append(GpuFace(chip, box, len(found.scores)))
        return out

    def _matrix(self, rgb: np.ndarray, box, points: torch.Tensor, timings: dict | None) -> torch.Tensor:
        from core.warp import dlib_chip_matrix, similarity

        if self._landmarks is None:
            target = torch.as_tensor(template_points(self.framing), dtype=torch.float32, device=points.device)
            return similarity(points.float()[None], target)[0]
        with timed(timings, "landmarks"):
            dlib = self._landmarks._dlib
            shape = self._landmarks._landmarks(rgb, dlib.rectangle(*box))
            details = dlib.get_face_chip_details(shape, self.framing.size, self.framing.padding)
            r = details.rect
            matrix = dlib_chip_matrix(r.left(), r.top(), r.right(), r.bottom(), details.angle, self.framing.size)
        return torch.as_tensor(matrix, dtype=torch.float32, device=self.device)

    def _warp(self, image: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        from core.warp import warp_chips

        # dlib_chip models saw dlib's own chips: its pyramid and sampling, reproduced
        if self.framing.kind == "dlib_chip":
            chip = warp_chips(image, matrix[None], self.framing.size, method="dlib", fill=self.framing.fill)[0]
            return torch.floor(chip + 1e-3)  # dlib's chips are truncated to whole values
        chip = warp_chips(image, matrix[None], self.framing.size, method="antialias", fill=self.framing.fill)[0]
        return chip.round().clamp(0, 255)  # as the CPU path's uint8 chips
