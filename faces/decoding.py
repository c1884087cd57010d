"""Safe decoding of uploaded photos: sniff the real format, enforce limits, return RGB.

Every failure becomes a reject reason, never an exception: one bad upload must not
stop a batch. The format is read from the bytes, never from the key's extension.
"""

from __future__ import annotations

import io
import logging
import re
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

try:  # phones upload HEIC/HEIF; the opener is optional at import time only
    import pillow_heif

    pillow_heif.register_heif_opener()
    HEIF_AVAILABLE = True
except ImportError:  # pragma: no cover - pillow-heif is a declared dependency
    HEIF_AVAILABLE = False

log = logging.getLogger(__name__)

# Truncated files must fail loudly, not decode as grey padding.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# Reject reasons produced here. The predictions contract lists them.
EMPTY = "empty"
TRUNCATED = "truncated"
CORRUPT = "corrupt"
NOT_AN_IMAGE = "not_an_image"
UNSUPPORTED_FORMAT = "unsupported_format"
TOO_SMALL = "too_small"
TOO_LARGE = "too_large"
DECOMPRESSION_BOMB = "decompression_bomb"

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "HEIF", "GIF", "TIFF", "BMP")


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds on what an upload may be. Defaults suit phone photos and webcam shots."""

    max_bytes: int = 25 * 1024 * 1024
    max_pixels: int = 50_000_000
    min_side: int = 64
    # Decoded bytes per compressed byte above which an over-size image counts as a
    # bomb rather than as an honest large photo (real photos stay well under 50).
    bomb_ratio: float = 100.0
    # Longest side of the working copy kept after decoding. JPEGs are decoded at a
    # reduced scale (draft mode) when that still leaves at least this many pixels.
    working_side: int = 1600


@dataclass
class DecodedPhoto:
    """An accepted photo: RGB pixels plus what was learned while decoding."""

    rgb: np.ndarray  # H x W x 3 uint8, EXIF orientation applied, possibly downscaled
    format: str
    width: int  # original size after EXIF orientation
    height: int
    scale: float  # working pixels per original pixel (<= 1)


@dataclass
class Rejection:
    reason: str
    detail: str
    format: str | None = None
    width: int | None = None
    height: int | None = None


def sniff_format(data: bytes) -> str | None:
    """Name the container format from magic bytes; None when nothing image-like matches.

    Names that are not in ACCEPTED_FORMATS are real image formats we do not take.
    """
    head = data[:64]
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "TIFF"
    if head.startswith(b"BM") and len(data) >= 26:
        return "BMP"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"):
            return "HEIF"
        if brand in (b"avif", b"avis"):
            return "AVIF"
        return None  # mp4, mov and other ISO media are not photos
    if head.startswith(b"\x00\x00\x00\x0cjP  ") or head.startswith(b"\xff\x4f\xff\x51"):
        return "JPEG2000"
    if head.startswith(b"\xff\x0a") or head.startswith(b"\x00\x00\x00\x0cJXL "):
        return "JXL"
    if head.startswith(b"8BPS"):
        return "PSD"
    if head.startswith(b"\x00\x00\x01\x00") or head.startswith(b"icns"):
        return "ICO"
    if head.startswith(b"qoif"):
        return "QOI"
    if head.startswith(b"DDS "):
        return "DDS"
    if head.startswith(b"\x76\x2f\x31\x01"):
        return "EXR"
    if head.startswith((b"P1", b"P2", b"P3", b"P4", b"P5", b"P6")) and head[2:3] in b" \t\r\n":
        return "PPM"
    return None


def decode_photo(data: bytes, limits: DecodeLimits = DecodeLimits(),
                 jpeg_device: str | None = None) -> DecodedPhoto | Rejection:
    """Decode upload bytes into an RGB working image, or say why not.

    With `jpeg_device` ("cuda"), plain RGB/grayscale JPEGs are decoded by
    the device's JPEG decoder (faces.jpeg_device: nvJPEG) and downscaled there; anything it
    cannot take falls back to Pillow."""
    fmt = precheck(data, limits)
    if isinstance(fmt, Rejection):
        return fmt

    # Pillow's own bomb guard stays on; the pixel limit below is ours.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return _decode(data, fmt, limits, jpeg_device)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            # Pillow's message quotes its own limit; the one that applies is ours.
            found = re.search(r"\((\d+) pixels\)", str(error))
            return _bomb(int(found.group(1)) if found else None, fmt, limits)
        except UnidentifiedImageError as error:
            return Rejection(CORRUPT, f"{fmt} header could not be parsed: {error}", format=fmt)
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError,
                struct.error, ZeroDivisionError, MemoryError, RuntimeError) as error:
            return _classify_decode_error(error, fmt, len(data))


def precheck(data: bytes, limits: DecodeLimits = DecodeLimits()) -> str | Rejection:
    """The checks before any header is read: bytes, signature, accepted format. The
    format's name, or why the upload is refused."""
    if len(data) == 0:
        return Rejection(EMPTY, "the object has no bytes")
    if len(data) > limits.max_bytes:
        return Rejection(TOO_LARGE, f"{len(data)} bytes > limit {limits.max_bytes}")
    fmt = sniff_format(data)
    if fmt is None:
        return Rejection(NOT_AN_IMAGE, "no image signature in the first bytes")
    if fmt not in ACCEPTED_FORMATS:
        return Rejection(UNSUPPORTED_FORMAT, f"{fmt} photos are not accepted", format=fmt)
    if fmt == "HEIF" and not HEIF_AVAILABLE:  # pragma: no cover
        return Rejection(UNSUPPORTED_FORMAT, "HEIF support is not installed", format=fmt)
    return fmt


def jpeg_is_whole(data: bytes) -> bool:
    """The JPEG's bytes end with its EOI marker (trailing zero padding allowed)."""
    return data.rstrip(b"\x00")[-2:] == b"\xff\xd9"


def _bomb(pixels: int | None, fmt: str, limits: DecodeLimits) -> Rejection:
    size = f"{pixels:,} pixels" if pixels is not None else "its size"
    return Rejection(DECOMPRESSION_BOMB, f"{size} > limit {limits.max_pixels:,} (refused before decoding)",
                     format=fmt)


def size_rejection(width: int, height: int, nbytes: int, fmt: str, limits: DecodeLimits) -> Rejection | None:
    """The rule on a photo's stored size, from its header: None when it may be decoded.

    Above Pillow's own bomb limit the refusal is the one Pillow's guard gives on the CPU
    path; below it, many pixels from few bytes is a bomb and many pixels from many bytes an
    honest photo that is too large."""
    pixels = width * height
    pillow_limit = Image.MAX_IMAGE_PIXELS
    if pillow_limit is not None and pixels > pillow_limit:
        return _bomb(pixels, fmt, limits)
    if pixels > limits.max_pixels:
        ratio = pixels * 3 / max(nbytes, 1)
        reason = DECOMPRESSION_BOMB if ratio > limits.bomb_ratio else TOO_LARGE
        return Rejection(reason, f"{width}x{height} pixels > limit {limits.max_pixels}",
                         format=fmt, width=width, height=height)
    if min(width, height) < limits.min_side:
        return Rejection(TOO_SMALL, f"{width}x{height} is under {limits.min_side} pixels a side",
                         format=fmt, width=width, height=height)
    return None


def _classify_decode_error(error: BaseException, fmt: str, nbytes: int) -> Rejection:
    message = str(error) or type(error).__name__
    lowered = message.lower()
    if "truncated" in lowered or "premature end" in lowered or isinstance(error, EOFError) or (
        "not enough" in lowered and "data" in lowered
    ) or "unexpected end" in lowered:
        # In our words: Pillow's "(1 bytes not processed)" counts its buffer, not what is missing.
        return Rejection(TRUNCATED, f"{fmt}: the file ends inside its image data after {nbytes:,} bytes (cut short "
                                    f"in the upload or the copy)", format=fmt)
    return Rejection(CORRUPT, f"{fmt}: {message}", format=fmt)


def _decode(data: bytes, fmt: str, limits: DecodeLimits, jpeg_device: str | None) -> DecodedPhoto | Rejection:
    image = Image.open(io.BytesIO(data), formats=None)
    width, height = image.size
    refused = size_rejection(width, height, len(data), fmt, limits)
    if refused is not None:
        return refused

    # Only complete files (ending in EOI) go to the device decoder, which may pad a
    # truncated JPEG silently; Pillow rejects those as `truncated`.
    if jpeg_device and fmt == "JPEG" and image.mode in ("RGB", "L") and jpeg_is_whole(data):
        try:
            rgb, width, height = _decode_jpeg_torch(data, jpeg_device, limits.working_side)
            return DecodedPhoto(rgb=rgb, format=fmt, width=width, height=height, scale=rgb.shape[1] / width)
        except RuntimeError as error:  # nvJPEG refuses some files (e.g. unusual sampling)
            log.debug("device JPEG decode failed (%s); using Pillow", error)

    if fmt == "JPEG" and max(width, height) > 2 * limits.working_side:
        # Draft mode decodes at 1/2, 1/4 or 1/8 scale straight from the DCT.
        target = (width * limits.working_side // max(width, height),
                  height * limits.working_side // max(width, height))
        image.draft("RGB", target)
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)  # animated GIF/WEBP, multi-page TIFF: the first frame only
    image.load()
    if image.mode in ("RGB", "L"):
        # Shrink first: rotating and converting the small copy, not the full photo, and
        # reducing by whole factors before the filter, saves a fifth of the decode time.
        image = shrunk(image, limits.working_side)

    oriented = ImageOps.exif_transpose(image)
    if oriented is None:  # pragma: no cover - exif_transpose returns a copy when not in_place
        oriented = image
    if oriented.size != image.size:
        width, height = height, width
    rgb = _to_rgb(oriented)
    if max(rgb.shape[:2]) > limits.working_side:  # modes converted at full size (palette, 16-bit, alpha)
        rgb = np.asarray(shrunk(Image.fromarray(rgb), limits.working_side))
    return DecodedPhoto(rgb=np.ascontiguousarray(rgb), format=fmt, width=width, height=height,
                        scale=rgb.shape[1] / width)


def shrunk(image: Image.Image, side: int) -> Image.Image:
    """`image` with its longest side at most `side` (antialiased; unchanged when smaller)."""
    if max(image.size) <= side:
        return image
    factor = side / max(image.size)
    size = (max(1, round(image.size[0] * factor)), max(1, round(image.size[1] * factor)))
    return image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)


def _decode_jpeg_torch(data: bytes, device: str, working_side: int) -> tuple[np.ndarray, int, int]:
    """JPEG -> RGB on `device` with EXIF orientation (faces.jpeg_device), downscaled there
    (antialiased) to the working size; only the small working copy comes back to host
    memory."""
    from gender_pipeline.faces.jpeg_device import decode_jpegs  # lazy: torch, for the device decoder only

    (tensor,) = decode_jpegs([data], device)
    if tensor is None:
        raise RuntimeError("the device JPEG decoder refused the file")
    height, width = tensor.shape[-2:]
    tensor = shrunk_tensor(tensor, working_side)
    return np.ascontiguousarray(tensor.permute(1, 2, 0).cpu().numpy()), int(width), int(height)


def shrunk_tensor(image, side: int):
    """A 3 x H x W image tensor with its longest side at most `side` (antialiased, on the
    tensor's device; unchanged when smaller)."""
    from torchvision.transforms.v2 import functional as F  # lazy: the device decoder only

    height, width = image.shape[-2:]
    if max(height, width) <= side:
        return image
    factor = side / max(height, width)
    return F.resize(image, [max(1, round(height * factor)), max(1, round(width * factor))], antialias=True)


def _to_rgb(image: Image.Image) -> np.ndarray:
    """Any Pillow mode to 8-bit RGB; transparency is flattened onto white."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if values.max(initial=0) > 255 else 255.0
        gray = np.clip(values * (255.0 / peak), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        low, high = float(values.min(initial=0)), float(values.max(initial=1))
        gray = ((values - low) / max(high - low, 1e-9) * 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "P" or mode == "PA":
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    if mode != "RGB":
        image = image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB
    return np.asarray(image)
