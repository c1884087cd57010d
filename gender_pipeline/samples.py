"""Sample uploads for the demo, the tests and the benchmarks: real face photos that
installed packages ship, re-encoded the ways phones and browsers send them, plus the
broken files a public upload form receives."""

from __future__ import annotations

import io
import os
import struct
import zlib

import matplotlib.cbook
import numpy as np
import pillow_heif
from PIL import Image


def grace_hopper() -> np.ndarray:
    """matplotlib's sample portrait (RGB uint8)."""
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as handle:
        return np.asarray(Image.open(handle).convert("RGB"))


def astronaut() -> np.ndarray | None:
    """scikit-image's astronaut portrait, when scikit-image is installed."""
    try:
        from skimage import data  # lazy: scikit-image is a test extra
    except ImportError:
        return None
    return np.ascontiguousarray(data.astronaut())


def no_face_photo() -> np.ndarray:
    """A real photo without a human face (scikit-image's coffee), else a gradient."""
    try:
        from skimage import data  # lazy: scikit-image is a test extra

        return np.ascontiguousarray(data.coffee())
    except ImportError:
        y, x = np.mgrid[0:300, 0:400]
        return np.stack([x % 256, y % 256, (x + y) % 256], axis=2).astype(np.uint8)


def encode(rgb: np.ndarray, fmt: str, **options) -> bytes:
    """Encode an RGB array; fmt is a Pillow format name (JPEG, PNG, WEBP, HEIF, GIF...)."""
    image = Image.fromarray(rgb)
    if fmt == "HEIF":
        pillow_heif.register_heif_opener()
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def jpeg_with_orientation(rgb: np.ndarray, orientation: int) -> bytes:
    """A JPEG whose pixels are stored rotated, with the EXIF tag that undoes it, as
    phone cameras write them. Orientation 6: displayed rotated 90 degrees clockwise."""
    undo = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90,
            8: Image.Transpose.ROTATE_270}[orientation]
    stored = Image.fromarray(rgb).transpose(undo)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", quality=92, exif=exif.tobytes())
    return buffer.getvalue()


def cmyk_jpeg(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def png_16bit_gray(rgb: np.ndarray) -> bytes:
    gray = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.uint16) * 257
    buffer = io.BytesIO()
    Image.fromarray(gray).save(buffer, format="PNG")
    return buffer.getvalue()


def png_rgba(rgb: np.ndarray) -> bytes:
    alpha = np.full(rgb.shape[:2] + (1,), 255, dtype=np.uint8)
    alpha[:10] = 0
    return encode(np.concatenate([rgb, alpha], axis=2), "PNG")


def png_palette(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=256).save(buffer, format="PNG")
    return buffer.getvalue()


def pasted_into(rgb: np.ndarray, size: tuple[int, int], at: tuple[int, int], seed: int = 0) -> np.ndarray:
    """The photo pasted into a larger noisy background: a face that fills less of the frame."""
    rng = np.random.default_rng(seed)
    width, height = size
    canvas = rng.integers(60, 200, size=(height, width, 3), dtype=np.uint8)
    canvas = np.asarray(Image.fromarray(canvas).resize((width // 8 or 1, height // 8 or 1)).resize((width, height)))
    canvas = canvas.copy()
    h, w = min(rgb.shape[0], height - at[1]), min(rgb.shape[1], width - at[0])
    canvas[at[1]:at[1] + h, at[0]:at[0] + w] = rgb[:h, :w]
    return canvas


def decompression_bomb_png(side: int = 20_000) -> bytes:
    """A tiny PNG that claims side x side grey pixels (hundreds of MB when decoded)."""
    raw_row = b"\x00" + b"\x00" * side
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(raw_row) for _ in range(side)) + compressor.flush()

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def broken_files(seed: int = 0) -> dict[str, tuple[bytes, str]]:
    """File name -> (bytes, expected reject reason)."""
    rng = np.random.default_rng(seed)
    portrait = grace_hopper()
    jpeg = encode(portrait, "JPEG", quality=90)
    corrupt = bytearray(jpeg)
    corrupt[200:2000] = rng.integers(0, 256, 1800, dtype=np.uint8).tobytes()
    svg = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'
    return {
        "empty.jpg": (b"", "empty"),
        "truncated.jpg": (jpeg[: len(jpeg) // 3], "truncated"),
        "notes.txt.jpg": (b"this is not a photo\n" * 20, "not_an_image"),
        "drawing.svg": (svg, "not_an_image"),
        "random.bin": (rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), "not_an_image"),
        "layers.psd": (b"8BPS\x00\x01" + bytes(60), "unsupported_format"),
        "tiny.png": (encode(portrait[:40, :40].copy(), "PNG"), "too_small"),
        "bomb.png": (decompression_bomb_png(), "decompression_bomb"),
        "coffee.jpg": (encode(no_face_photo(), "JPEG", quality=90), "no_face"),
        "scrambled.jpg": (bytes(corrupt), "corrupt"),
    }


def face_variants() -> dict[str, bytes]:
    """File name -> bytes of a real face photo in each accepted encoding."""
    portrait = grace_hopper()
    variants = {
        "baseline.jpg": encode(portrait, "JPEG", quality=90),
        "progressive.jpg": encode(portrait, "JPEG", quality=90, progressive=True),
        "cmyk.jpg": cmyk_jpeg(portrait),
        "rotated-exif6.jpg": jpeg_with_orientation(portrait, 6),
        "gray16.png": png_16bit_gray(portrait),
        "rgba.png": png_rgba(portrait),
        "palette.png": png_palette(portrait),
        "photo.webp": encode(portrait, "WEBP", quality=90),
        "photo.heic": encode(portrait, "HEIF", quality=90),
        "first-frame.gif": encode(portrait, "GIF"),
        "scan.tiff": encode(portrait, "TIFF"),
        "old.bmp": encode(portrait, "BMP"),
        "grayscale.jpg": encode(np.asarray(Image.fromarray(portrait).convert("L")), "JPEG"),
        "no extension": encode(portrait, "JPEG", quality=85),
        "große Datei ü.jpeg": encode(pasted_into(portrait, (1600, 1200), (500, 300)), "JPEG", quality=88),
    }
    other = astronaut()
    if other is not None:
        variants["astronaut.png"] = encode(other, "PNG")
    return variants


# The demo's two public photos and who they show: Grace Hopper (matplotlib's sample) and the
# astronaut Eileen Collins (scikit-image's `astronaut`).
DEMO_SUBJECTS = {"grace-hopper": "female", "eileen-collins": "female"}


def demo_uploads() -> list[tuple[str, str, bytes]]:
    """(subject, file name, bytes): each subject in half of the encodings phones and
    browsers send, so the demo shows both faces equally often."""
    portraits = {"grace-hopper": grace_hopper(), "eileen-collins": astronaut()}
    if portraits["eileen-collins"] is None:  # scikit-image missing: one subject only
        del portraits["eileen-collins"]
    encoders = [
        ("baseline.jpg", lambda p: encode(p, "JPEG", quality=90)),
        ("progressive.jpg", lambda p: encode(p, "JPEG", quality=90, progressive=True)),
        ("cmyk.jpg", cmyk_jpeg),
        ("rotated-exif6.jpg", lambda p: jpeg_with_orientation(p, 6)),
        ("gray16.png", png_16bit_gray),
        ("rgba.png", png_rgba),
        ("palette.png", png_palette),
        ("photo.webp", lambda p: encode(p, "WEBP", quality=90)),
        ("photo.heic", lambda p: encode(p, "HEIF", quality=90)),
        ("first-frame.gif", lambda p: encode(p, "GIF")),
        ("scan.tiff", lambda p: encode(p, "TIFF")),
        ("old.bmp", lambda p: encode(p, "BMP")),
        ("grayscale.jpg", lambda p: encode(np.asarray(Image.fromarray(p).convert("L")), "JPEG")),
        ("no extension", lambda p: encode(p, "JPEG", quality=85)),
        ("große Datei ü.jpeg", lambda p: encode(pasted_into(p, (1600, 1200), (500, 300)), "JPEG", quality=88)),
        ("photo.png", lambda p: encode(p, "PNG")),
    ]
    names = list(portraits)
    return [(names[i % len(names)], name, make(portraits[names[i % len(names)]]))
            for i, (name, make) in enumerate(encoders)]


def write_tree(root: str, files: dict[str, bytes]) -> None:
    """Write {relative key: bytes} under a local folder."""
    for key, data in files.items():
        path = os.path.join(root, *key.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(data)


def face_dataset_images(count: int, seed: int = 0, side: int = 240) -> list[tuple[bytes, str]]:
    """`count` varied JPEGs of the two sample portraits (cropped, scaled, flipped,
    brightened), alternating between two classes. For tests of the training machinery:
    the labels are a stand-in, not a statement about the people pictured."""
    rng = np.random.default_rng(seed)
    sources = [grace_hopper(), astronaut() if astronaut() is not None else grace_hopper()[:, ::-1]]
    out = []
    for index in range(count):
        source = sources[index % 2]
        h, w = source.shape[:2]
        margin = int(rng.integers(0, 40))
        crop = source[margin:h - margin // 2, margin // 2:w - margin]
        image = Image.fromarray(np.ascontiguousarray(crop)).resize((side, int(side * crop.shape[0] / crop.shape[1])))
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = np.clip(np.asarray(image, dtype=np.float32) * rng.uniform(0.8, 1.2), 0, 255).astype(np.uint8)
        out.append((encode(pixels, "JPEG", quality=90), ("female", "male")[index % 2]))
    return out


def write_manifest_dataset(root: str, count: int, seed: int = 0, extra: bool = True, ages: bool = False) -> None:
    """A `manifest` dataset: labels.csv (image, gender, age_band; with `ages` an age in
    years too) and images/."""
    rows = ["image,gender" + (",age_band" if extra else "") + (",age" if ages else "")]
    files = {}
    for index, (data, gender) in enumerate(face_dataset_images(count, seed)):
        name = f"img_{index:04d}.jpg"
        files[f"images/{name}"] = data
        rows.append(f"{name},{gender}" + (f",{('20-39', '40-59')[(index // 2) % 2]}" if extra else "")
                    + (f",{18 + (index * 7 + seed) % 60}" if ages else ""))
    files["labels.csv"] = ("\n".join(rows) + "\n").encode()
    write_tree(root, files)


CELEBA_ATTRIBUTES = ("5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips "
                     "Big_Nose Black_Hair Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin "
                     "Eyeglasses Goatee Gray_Hair Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open "
                     "Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose Receding_Hairline "
                     "Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat "
                     "Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young").split()


def write_celeba_dataset(root: str, count: int, seed: int = 0) -> None:
    """The official CelebA layout in miniature: img_align_celeba/, the attribute list
    (label = Male) and the evaluation partition."""
    male = CELEBA_ATTRIBUTES.index("Male")
    attributes = [str(count), " ".join(CELEBA_ATTRIBUTES)]
    partition, files = [], {}
    for index, (data, gender) in enumerate(face_dataset_images(count, seed)):
        name = f"{index + 1:06d}.jpg"
        files[f"img_align_celeba/{name}"] = data
        values = ["-1"] * len(CELEBA_ATTRIBUTES)
        values[male] = "1" if gender == "male" else "-1"
        attributes.append(f"{name} " + " ".join(f"{v:>2}" for v in values))
        partition.append(f"{name} {(0, 0, 0, 1, 2)[(index // 2) % 5]}")  # 0 train, 1 val, 2 test
    files["list_attr_celeba.txt"] = ("\n".join(attributes) + "\n").encode()
    files["list_eval_partition.txt"] = ("\n".join(partition) + "\n").encode()
    write_tree(root, files)
