"""What an upload is, read from its header alone: format, size, orientation, and whether
its JPEG bytes can go to the device decoder as they are.

No pixel is decoded here and nothing is allocated in proportion to the picture: an
over-size photo or a decompression bomb is refused from its dimensions, with the reasons
and details of `faces.decoding` (one rule, `size_rejection`, serves both). A few
microseconds a photo, so the process that feeds a GPU can afford it for every upload.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from gender_pipeline.faces.decoding import DecodeLimits, Rejection, jpeg_is_whole, precheck, size_rejection

# Start-of-frame markers: baseline and extended (C0, C1), progressive (C2), lossless (C3),
# and the arithmetic-coded variants (C5..CF except DHT C4, JPG C8, DAC CC).
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_HUFFMAN_DCT = {0xC0, 0xC1, 0xC2}  # what device decoders (nvJPEG, libjpeg in torchvision) take
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM and RSTn carry no length


@dataclass(frozen=True)
class Header:
    """An upload that passed every header check."""

    format: str
    width: int | None = None  # as stored, before EXIF orientation (None: read by Pillow later)
    height: int | None = None
    orientation: int = 1  # EXIF orientation 1..8
    components: int | None = None  # JPEG: 1 gray, 3 YCbCr/RGB, 4 CMYK/YCCK
    progressive: bool = False
    sof: int | None = None  # JPEG start-of-frame marker
    precision: int | None = None  # JPEG bits per sample
    adobe_transform: int | None = None  # JPEG APP14: 0 means RGB or CMYK stored as they are
    complete: bool = True  # JPEG: the bytes end with EOI

    @property
    def device_jpeg(self) -> bool:
        """A JPEG a device decoder takes as it is: 8-bit Huffman DCT, gray or YCbCr, whole.
        CMYK/YCCK, 12-bit, lossless, arithmetic-coded and truncated files go to the CPU
        decoder, which rejects or converts them as it always has."""
        return (self.format == "JPEG" and self.sof in _HUFFMAN_DCT and self.precision == 8
                and self.components in (1, 3) and self.complete
                and not (self.components == 3 and self.adobe_transform == 0))


def inspect(data: bytes, limits: DecodeLimits = DecodeLimits()) -> Header | Rejection:
    """The upload's header, or the rejection the decoder would give before decoding.

    JPEG and PNG headers are parsed here; other formats keep `width` None and are checked
    by Pillow's lazy open in the decoder process. A JPEG whose header cannot be parsed is
    left to the decoder too (it names the damage)."""
    found = precheck(data, limits)
    if isinstance(found, Rejection):
        return found
    fmt = found
    try:
        if fmt == "JPEG":
            header = _jpeg(data)
        elif fmt == "PNG":
            header = _png(data)
        else:
            return Header(fmt)
    except (ValueError, IndexError, struct.error):
        return Header(fmt, complete=False)  # damaged header: the CPU decoder says how
    if header.width is None or header.height is None:
        return header
    refused = size_rejection(header.width, header.height, len(data), fmt, limits)
    return refused or header


def _png(data: bytes) -> Header:
    if data[12:16] != b"IHDR":
        raise ValueError("no IHDR chunk")
    width, height = struct.unpack(">II", data[16:24])
    return Header("PNG", width, height)


def _jpeg(data: bytes) -> Header:
    """Walk the marker segments up to the first scan: SOF (size, components, process),
    APP1 Exif (orientation), APP14 Adobe (colour transform)."""
    position, size = 2, len(data)
    fields: dict = {"orientation": 1}
    while position + 4 <= size:
        if data[position] != 0xFF:
            raise ValueError(f"no marker at byte {position}")
        marker = data[position + 1]
        if marker == 0xFF:  # fill bytes
            position += 1
            continue
        if marker in _STANDALONE:
            position += 2
            continue
        length = struct.unpack(">H", data[position + 2:position + 4])[0]
        segment = data[position + 4:position + 2 + length]
        if marker in _SOF:
            precision, height, width, components = struct.unpack(">BHHB", segment[:6])
            fields.update(sof=marker, precision=precision, height=height, width=width, components=components,
                          progressive=marker in (0xC2, 0xC6, 0xCA, 0xCE))
        elif marker == 0xE1 and segment[:6] == b"Exif\x00\x00":
            fields["orientation"] = _exif_orientation(segment[6:])
        elif marker == 0xEE and segment[:5] == b"Adobe" and len(segment) >= 12:
            fields["adobe_transform"] = segment[11]
        elif marker == 0xDA:  # start of scan: the header is over
            break
        position += 2 + length
    if "width" not in fields:
        raise ValueError("no start-of-frame segment")
    return Header("JPEG", complete=jpeg_is_whole(data), **fields)


def _exif_orientation(tiff: bytes) -> int:
    """Tag 0x0112 of IFD0; 1 when it is missing or out of range."""
    if tiff[:2] == b"II":
        order = "<"
    elif tiff[:2] == b"MM":
        order = ">"
    else:
        return 1
    offset = struct.unpack(order + "I", tiff[4:8])[0]
    count = struct.unpack(order + "H", tiff[offset:offset + 2])[0]
    for index in range(count):
        entry = offset + 2 + 12 * index
        tag, kind = struct.unpack(order + "HH", tiff[entry:entry + 4])
        if tag == 0x0112 and kind == 3:
            value = struct.unpack(order + "H", tiff[entry + 8:entry + 10])[0]
            return value if 1 <= value <= 8 else 1
    return 1
