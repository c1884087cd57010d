import io

import numpy as np
import pytest
from PIL import Image
from hypothesis import HealthCheck, given, settings, strategies as st

from gender_pipeline import samples
from gender_pipeline.faces.decoding import DecodeLimits, DecodedPhoto, Rejection, decode_photo, sniff_format


@pytest.mark.parametrize("name", sorted(samples.broken_files()))
def test_each_broken_upload_gets_its_reason(broken_files, name):
    data, reason = broken_files[name]
    result = decode_photo(data)
    if reason == "no_face":  # decodes fine; the face front end rejects it
        assert isinstance(result, DecodedPhoto)
        return
    assert isinstance(result, Rejection), name
    assert result.reason == reason, (name, result.detail)
    assert result.detail


@pytest.mark.parametrize("name", sorted(samples.face_variants()))
def test_every_accepted_encoding_decodes_to_rgb(face_files, name):
    result = decode_photo(face_files[name])
    assert isinstance(result, DecodedPhoto), getattr(result, "detail", "")
    assert result.rgb.dtype == np.uint8 and result.rgb.ndim == 3 and result.rgb.shape[2] == 3
    assert result.rgb.flags["C_CONTIGUOUS"]


def test_format_is_sniffed_from_bytes_not_extension(face_files):
    assert sniff_format(face_files["photo.heic"]) == "HEIF"
    assert sniff_format(face_files["no extension"]) == "JPEG"
    assert sniff_format(face_files["photo.webp"]) == "WEBP"
    assert sniff_format(b"<svg></svg>") is None
    assert sniff_format(b"\x00\x00\x00\x18ftypmp42" + bytes(20)) is None  # a video


def test_exif_orientation_is_applied():
    portrait = samples.grace_hopper()  # 600 high, 512 wide
    result = decode_photo(samples.jpeg_with_orientation(portrait, 6))
    assert result.rgb.shape[:2] == portrait.shape[:2]
    assert (result.width, result.height) == (portrait.shape[1], portrait.shape[0])
    difference = np.abs(result.rgb.astype(int) - portrait.astype(int)).mean()
    assert difference < 8, difference


def test_alpha_is_flattened_onto_white():
    rgba = np.zeros((80, 80, 4), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgba).save(buffer, format="PNG")
    result = decode_photo(buffer.getvalue())
    assert (result.rgb == 255).all()


def test_sixteen_bit_png_keeps_its_range():
    gray = (np.arange(100 * 100, dtype=np.uint32).reshape(100, 100) * 6).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(gray).save(buffer, format="PNG")
    result = decode_photo(buffer.getvalue())
    assert result.rgb.max() > 200 and result.rgb.min() < 10


def test_byte_limit():
    data = samples.encode(samples.grace_hopper(), "PNG")
    result = decode_photo(data, DecodeLimits(max_bytes=len(data) - 1))
    assert result.reason == "too_large"


def test_pixel_limit_honest_large_photo_is_too_large():
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)  # incompressible: low ratio
    result = decode_photo(samples.encode(noisy, "PNG"), DecodeLimits(max_pixels=300 * 299))
    assert result.reason == "too_large"


def test_pixel_limit_flat_image_is_a_bomb():
    flat = np.zeros((3000, 3000, 3), dtype=np.uint8)  # 27 MB of pixels in a few KB
    result = decode_photo(samples.encode(flat, "PNG"), DecodeLimits(max_pixels=1_000_000))
    assert result.reason == "decompression_bomb"


def test_large_jpeg_is_decoded_in_draft_mode_and_scale_is_reported():
    big = samples.pasted_into(samples.grace_hopper(), (4000, 3000), (1500, 1000))
    result = decode_photo(samples.encode(big, "JPEG", quality=85), DecodeLimits(working_side=1000))
    assert max(result.rgb.shape[:2]) <= 1000
    assert (result.width, result.height) == (4000, 3000)
    assert result.scale == pytest.approx(result.rgb.shape[1] / 4000)


def test_animated_gif_first_frame():
    frames = [Image.new("RGB", (100, 100), color) for color in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    result = decode_photo(buffer.getvalue())
    assert result.rgb[50, 50, 0] > 200 and result.rgb[50, 50, 2] < 50


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_random_bytes_never_crash(data):
    assert isinstance(decode_photo(data), (DecodedPhoto, Rejection))


_JPEG = samples.encode(samples.grace_hopper()[:128, :128].copy(), "JPEG")


@settings(max_examples=150, deadline=None)
@given(st.integers(0, len(_JPEG) - 1), st.binary(min_size=1, max_size=16))
def test_mutated_jpeg_never_crashes(offset, patch):
    data = _JPEG[:offset] + patch + _JPEG[offset + len(patch):]
    assert isinstance(decode_photo(data), (DecodedPhoto, Rejection))


@pytest.mark.parametrize("name", ["baseline.jpg", "progressive.jpg", "rotated-exif6.jpg", "grayscale.jpg"])
def test_device_jpeg_decoder_matches_pillow(face_files, name):
    """The nvJPEG path (exercised here with torchvision's CPU decoder) gives the same picture."""
    pillow = decode_photo(face_files[name])
    device = decode_photo(face_files[name], jpeg_device="cpu")
    assert device.rgb.shape == pillow.rgb.shape and (device.width, device.height) == (pillow.width, pillow.height)
    assert np.abs(device.rgb.astype(int) - pillow.rgb.astype(int)).mean() < 3


def test_device_jpeg_decoder_downscales_large_photos():
    big = samples.pasted_into(samples.grace_hopper(), (4000, 3000), (1500, 1000))
    result = decode_photo(samples.encode(big, "JPEG", quality=85), DecodeLimits(working_side=1000), jpeg_device="cpu")
    assert max(result.rgb.shape[:2]) == 1000 and (result.width, result.height) == (4000, 3000)


def test_device_jpeg_decoder_leaves_cmyk_and_broken_files_to_pillow(face_files, broken_files):
    assert decode_photo(face_files["cmyk.jpg"], jpeg_device="cpu").rgb.shape == (600, 512, 3)
    assert decode_photo(broken_files["truncated.jpg"][0], jpeg_device="cpu").reason == "truncated"


def test_a_truncated_jpeg_is_described_in_our_words(broken_files):
    data = broken_files["truncated.jpg"][0]
    result = decode_photo(data)
    assert result.reason == "truncated" and f"after {len(data):,} bytes" in result.detail
    assert "not processed" not in result.detail  # Pillow's count of its buffer, not of what is missing


def test_a_bomb_pillow_refuses_is_described_with_our_limit():
    result = decode_photo(samples.decompression_bomb_png(), DecodeLimits())
    assert result.reason == "decompression_bomb"
    assert "limit 50,000,000" in result.detail and "400,000,000 pixels" in result.detail
    assert "178956970" not in result.detail and "DOS" not in result.detail


def test_the_device_jpeg_decoder_on_the_cpu_gives_pillows_pixels():
    """benchmarks/decode_check.py's comparison, on the CPU: TorchCodec's decoder (the one
    faces.jpeg_device uses) against Pillow's, EXIF orientation included."""
    from benchmarks.decode_check import compare, sample_jpegs
    from gender_pipeline.faces.jpeg_device import DECODER

    assert DECODER == "torchcodec"  # a dependency: torchvision's decoders are deprecated
    found = compare(sample_jpegs(), "cpu", queued=False)
    assert len(found) >= 30 and all(d.decoded and d.sum_matches for d in found)
    assert {d.name for d in found} >= {"face0-640-progressive.jpg", "face0-640-gray.jpg", "face0-640-exif6.jpg",
                                       "cmyk.jpg", "rotated-exif6.jpg"}
    assert max(d.max_abs for d in found) == 0  # the same libjpeg-turbo: not a level apart


def test_the_device_jpeg_decoder_takes_a_batch_with_a_broken_file_one_by_one(face_files, broken_files):
    from gender_pipeline.faces.jpeg_device import decode_jpegs

    images = decode_jpegs([face_files["baseline.jpg"], broken_files["truncated.jpg"][0], b"\xff\xd8\xff junk",
                           face_files["rotated-exif6.jpg"]], "cpu")
    assert images[1] is None and images[2] is None
    assert images[0].shape == (3, 600, 512) and images[3].shape[0] == 3
    assert decode_jpegs([], "cpu") == []


def test_without_torchcodec_torchvisions_deprecated_decoder_gives_the_same_pixels(monkeypatch, face_files):
    """Where TorchCodec does not install, faces.jpeg_device falls back to torchvision's
    decoder: the same images, and its deprecation shows (it is not hidden)."""
    import torch

    from gender_pipeline.faces import jpeg_device

    payloads = [face_files["baseline.jpg"], face_files["progressive.jpg"], face_files["rotated-exif6.jpg"]]
    expected = jpeg_device.decode_jpegs(payloads, "cpu")
    monkeypatch.setattr(jpeg_device, "DECODER", "torchvision")
    with pytest.warns(DeprecationWarning, match="TorchCodec"):
        fallback = jpeg_device.decode_jpegs(payloads + [b"\xff\xd8\xff junk"], "cpu")
    assert fallback[3] is None
    assert all(torch.equal(a, b) for a, b in zip(expected, fallback[:3]))
