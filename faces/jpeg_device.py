"""JPEG bytes decoded on a device (nvJPEG on CUDA, libjpeg-turbo on the CPU), in one call
per batch, ordered against the stream that uses the images.

The decoder is TorchCodec's `decode_jpeg` (torchvision 0.29 deprecates its own image
decoders for it), else torchvision's where TorchCodec is not installed. Both return
3 x H x W uint8 RGB with the EXIF orientation applied.

Ordering, on CUDA, and why:
- before the call, the caller's current stream is drained: nvJPEG's hardware batched path
  (A100, H100) writes its output without waiting for work still queued on the caller's
  stream, so a block the allocator just handed back while a kernel still read it was
  overwritten (meta-pytorch/torchcodec#1634; 134 of 200 corrupted decodes on an H100
  before that fix). Draining costs one host wait per batch, and holds whichever release
  is installed;
- after the call, TorchCodec has decoded on the caller's stream and synchronized it, so
  its images are ready for the next kernel; torchvision decodes on a private stream that is
  never ordered against the caller's (pytorch/vision#9606, closed unmerged: corrupted
  images on an H100 in 199 of 200 runs), so after it the whole device is synchronized
  before anything reads the images.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings

import torch

log = logging.getLogger(__name__)

DECODER = "torchcodec" if importlib.util.find_spec("torchcodec") is not None else "torchvision"
REFUSED = (RuntimeError, ValueError)  # what both raise for bytes they cannot decode


def _torchcodec(encoded: list[torch.Tensor], device: str) -> list[torch.Tensor]:
    from torchcodec.decoders import decode_jpeg  # lazy: loads its C++ decoders

    return decode_jpeg(encoded, mode="RGB", device=device)


def _torchvision(encoded: list[torch.Tensor], device: str) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg  # lazy: torchvision's decoder, only without TorchCodec

    return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)


def _decode(encoded: list[torch.Tensor], device: str) -> list[torch.Tensor]:
    return (_torchcodec if DECODER == "torchcodec" else _torchvision)(encoded, device)


def _drain(device: str) -> None:
    """Wait for the caller's queued work before a decode may write (see the module's note)."""
    if device.startswith("cuda"):
        torch.cuda.current_stream(device).synchronize()


def _ordered(device: str) -> None:
    """The decoded images are safe to read on the caller's stream (see the module's note)."""
    if device.startswith("cuda") and DECODER == "torchvision":
        torch.cuda.synchronize(device)


def decode_jpegs(payloads: list[bytes], device: str) -> list[torch.Tensor | None]:
    """JPEG bytes to 3 x H x W uint8 RGB tensors on `device`, EXIF orientation applied.
    One call decodes the batch; when it fails, each photo is tried alone, and one the
    decoder refuses comes back as None (for the CPU path, which names the reason)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only bytes: the decoders never write them
        encoded = [torch.frombuffer(data, dtype=torch.uint8) for data in payloads]
    if not encoded:
        return []
    _drain(device)
    try:
        images: list[torch.Tensor | None] = list(_decode(encoded, device))
    except REFUSED as error:
        log.debug("batch JPEG decode failed (%s); decoding one by one", error)
        images = []
        for one in encoded:
            try:
                images.append(_decode([one], device)[0])
            except REFUSED:
                images.append(None)
    _ordered(device)
    return images
