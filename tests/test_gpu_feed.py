"""The GPU path's feed: headers read on the CPU, JPEG bytes decoded on the device (the CPU
device here: TorchCodec's decode_jpeg runs there too), everything else decoded by the
CPU workers and handed over through shared memory. Its rows are the CPU path's rows."""

import struct
from datetime import datetime, timezone

import numpy as np
import pytest
import torch

from gender_pipeline import samples
from gender_pipeline.engine.engine import RunStamp, ScoringEngine, ScoringOptions
from gender_pipeline.faces.decoding import DecodeLimits, Rejection, decode_photo
from gender_pipeline.faces.device import GpuFaceFrontEnd
from gender_pipeline.faces.headers import Header, inspect
from gender_pipeline.lake.storage import Store
from gender_pipeline.runtime import shm


# ----------------------------------------------------------------------------- headers

def test_header_rejections_are_the_decoders(broken_files):
    """Every broken kind the header can judge is refused with the decoder's reason and
    detail; the rest pass on to the decoder."""
    for name, (data, reason) in broken_files.items():
        header = inspect(data)
        decoded = decode_photo(data)
        if isinstance(header, Rejection):
            assert (header.reason, header.detail) == (decoded.reason, decoded.detail), name
        else:
            assert reason in ("truncated", "corrupt", "no_face"), name


def _jpeg_claiming(width: int, height: int, components: int = 3, precision: int = 8, sof: int = 0xC0) -> bytes:
    """A JPEG header with the given frame and no picture behind it."""
    frame = struct.pack(">BHHB", precision, height, width, components) + b"\x01\x22\x00" * components
    return (b"\xff\xd8" + b"\xff" + bytes([sof]) + struct.pack(">H", len(frame) + 2) + frame
            + b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00" + bytes(64) + b"\xff\xd9")


@pytest.mark.parametrize("width,height,reason", [(60_000, 60_000, "decompression_bomb"),
                                                 (9_000, 7_000, "decompression_bomb"),
                                                 (5_000, 40, "too_small")])
def test_a_jpeg_is_refused_from_its_header_with_the_decoders_words(width, height, reason):
    data = _jpeg_claiming(width, height)
    header = inspect(data)
    decoded = decode_photo(data)
    assert isinstance(header, Rejection) and header.reason == reason
    assert (header.reason, header.detail) == (decoded.reason, decoded.detail)


def test_an_honest_large_photo_is_too_large_from_its_header():
    data = _jpeg_claiming(9_000, 7_000) + bytes(4_000_000)
    assert inspect(data).reason == decode_photo(data).reason == "too_large"


def test_header_fields(face_files):
    rotated = inspect(face_files["rotated-exif6.jpg"])
    assert isinstance(rotated, Header) and rotated.orientation == 6 and rotated.device_jpeg
    assert inspect(face_files["progressive.jpg"]).progressive
    assert inspect(face_files["grayscale.jpg"]).components == 1
    assert inspect(face_files["astronaut.png"]) == Header("PNG", 512, 512)
    assert inspect(face_files["photo.heic"]) == Header("HEIF")


@pytest.mark.parametrize("data,why", [
    (samples.cmyk_jpeg(samples.grace_hopper()), "CMYK"),
    (_jpeg_claiming(640, 480, precision=12, sof=0xC1), "12-bit"),
    (_jpeg_claiming(640, 480, sof=0xC3), "lossless"),
    (_jpeg_claiming(640, 480, sof=0xC9), "arithmetic"),
    (samples.encode(samples.grace_hopper(), "JPEG")[:-2000], "truncated"),
])
def test_jpegs_a_device_decoder_cannot_take_go_to_the_cpu(data, why):
    header = inspect(data)
    assert isinstance(header, Header) and not header.device_jpeg, why


def test_a_header_that_cannot_be_parsed_goes_to_the_decoder():
    header = inspect(b"\xff\xd8\xff\xe0\x00\x10JFIF" + bytes(3))
    assert isinstance(header, Header) and not header.device_jpeg


# ------------------------------------------------------------------ device decoding

def test_device_decoding_applies_orientation_and_shrinks_on_the_device(face_files):
    front = GpuFaceFrontEnd.__new__(GpuFaceFrontEnd)
    front.device = "cpu"
    big = samples.encode(samples.pasted_into(samples.grace_hopper(), (4000, 3000), (1500, 1000)), "JPEG", quality=85)
    out = front.decode_jpegs([face_files["rotated-exif6.jpg"], big, b"\xff\xd8\xff garbage \xff\xd9"], 1600)
    (rotated, width, height), (shrunk, big_w, big_h), refused = out
    pillow = decode_photo(face_files["rotated-exif6.jpg"])
    assert (width, height) == (pillow.width, pillow.height)
    assert np.abs(rotated.permute(1, 2, 0).numpy().astype(int) - pillow.rgb.astype(int)).mean() < 3
    assert (big_w, big_h) == (4000, 3000) and tuple(shrunk.shape) == (3, 1200, 1600)
    assert refused is None


# --------------------------------------------------------------------- shared memory

def test_slots_carry_pixels_and_are_reused():
    rgb = np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    with shm.SlotPool(2, shm.slot_bytes(64)) as pool:
        assert len(pool) == 2
        name = pool.acquire()
        assert shm.write(name, rgb)
        assert np.array_equal(pool.view(name, rgb.shape), rgb)
        assert not shm.write(name, np.zeros((100, 100, 3), np.uint8))  # too big: the caller pickles
        pool.release(name)
        assert sorted([pool.acquire(), pool.acquire()]) == sorted(pool.segments) and pool.acquire() is None


# -------------------------------------------------------------- same rows, both paths

@pytest.fixture(scope="module")
def mixed_uploads(tmp_path_factory, face_files, broken_files):
    """Every accepted encoding, every broken kind, a large photo, a photo on its side."""
    files = {f"u{i:02d}/{name}": data for i, (name, data) in enumerate(sorted(face_files.items()))}
    for name, (data, _reason) in broken_files.items():
        files[f"bad-{name.split('.')[0]}/{name}"] = data
    files["big/phone.jpg"] = samples.encode(samples.pasted_into(samples.grace_hopper(), (4032, 3024), (1700, 1100)),
                                            "JPEG", quality=85)
    files["side/exif8.jpg"] = samples.jpeg_with_orientation(samples.astronaut(), 8)
    root = tmp_path_factory.mktemp("mixed")
    samples.write_tree(str(root), files)
    return str(root), files


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    from gender_pipeline.models.registry import Registry

    return Registry(str(tmp_path_factory.mktemp("registry"))).load_predictor("dlib-gender-v1", "cpu")


def _score(root, predictor, front_end, workers, **extra):
    store = Store(root)
    rows, stats = ScoringEngine(predictor, ScoringOptions(workers=workers, front_end=front_end, gpu_batch=4, **extra),
                                RunStamp("r", datetime.now(timezone.utc))).score(store, store.list_objects(), {})
    return {r.photo_key: r for r in rows}, stats


@pytest.fixture(scope="module")
def cpu_rows(mixed_uploads, predictor):
    """The CPU path with RetinaFace at 640 px, the detection the GPU path runs (the CPU
    path's cheaper first look is compared below)."""
    return _score(mixed_uploads[0], predictor, "cpu", 0, detect_first_side=0)[0]


def test_the_cpu_paths_first_look_changes_no_status(mixed_uploads, predictor, cpu_rows):
    rows, _ = _score(mixed_uploads[0], predictor, "cpu", 2)
    assert {k: (r.status, r.reject_reason) for k, r in rows.items()} == \
           {k: (r.status, r.reject_reason) for k, r in cpu_rows.items()}


def _assert_same_rows(rows, reference):
    assert sorted(rows) == sorted(reference)
    for key, row in reference.items():
        other = rows[key]
        assert (other.status, other.reject_reason, other.face_count) == \
               (row.status, row.reject_reason, row.face_count), key
        if row.p_male is not None:
            assert abs(other.p_male - row.p_male) < 0.05, key
            width = row.face_box[2] - row.face_box[0]
            assert max(abs(a - b) for a, b in zip(other.face_box, row.face_box)) <= 0.04 * width + 3, key


def test_the_gpu_path_gives_the_cpu_paths_rows_through_workers_and_shared_memory(mixed_uploads, predictor, cpu_rows):
    rows, stats = _score(mixed_uploads[0], predictor, "gpu", 2)
    _assert_same_rows(rows, cpu_rows)
    seconds = stats.stage_seconds
    assert seconds["header"] > 0 and seconds["device_decode"] > 0 and seconds["decode"] > 0  # workers: the rest


def test_the_gpu_path_without_workers_gives_the_same_rows(mixed_uploads, predictor, cpu_rows):
    rows, _ = _score(mixed_uploads[0], predictor, "gpu", 0)
    _assert_same_rows(rows, cpu_rows)


def test_jpegs_the_device_decoder_refuses_are_answered_by_the_cpu(mixed_uploads, predictor, cpu_rows, monkeypatch):
    refused = []

    def refuse(self, payloads, working_side, timings=None):
        refused.extend(payloads)
        return [None] * len(payloads)

    monkeypatch.setattr(GpuFaceFrontEnd, "decode_jpegs", refuse)
    rows, _ = _score(mixed_uploads[0], predictor, "gpu", 0)
    assert len(refused) >= 5
    _assert_same_rows(rows, cpu_rows)


def test_a_damaged_jpeg_a_device_decoder_pads_is_still_rejected_as_the_cpu_rejects_it(
        mixed_uploads, predictor, cpu_rows, monkeypatch):
    """nvJPEG may decode a damaged entropy stream into grey blocks without an error; a
    photo the device decoded and found no face in is read again on the CPU path."""
    real = GpuFaceFrontEnd.decode_jpegs
    scrambled = mixed_uploads[1]["bad-scrambled/scrambled.jpg"]

    def padding(self, payloads, working_side, timings=None):
        out = real(self, [p for p in payloads if p is not scrambled and p != scrambled], working_side, timings)
        grey = (torch.full((3, 600, 512), 128, dtype=torch.uint8), 512, 600)
        it = iter(out)
        return [grey if p == scrambled else next(it) for p in payloads]

    monkeypatch.setattr(GpuFaceFrontEnd, "decode_jpegs", padding)
    rows, _ = _score(mixed_uploads[0], predictor, "gpu", 0)
    assert rows["bad-scrambled/scrambled.jpg"].reject_reason == cpu_rows["bad-scrambled/scrambled.jpg"].reject_reason
    _assert_same_rows(rows, cpu_rows)


def test_shared_memory_is_released_after_the_run(mixed_uploads, predictor):
    import os

    before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    _score(mixed_uploads[0], predictor, "gpu", 2)
    after = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    assert not {n for n in after - before if n.startswith("psm_")}


def test_limits_from_the_options_apply_to_headers(mixed_uploads, predictor):
    rows, _ = _score(mixed_uploads[0], predictor, "gpu", 0, limits=DecodeLimits(min_side=700))
    assert rows["big/phone.jpg"].status == "scored"
    baseline = next(key for key in rows if key.endswith("/baseline.jpg"))
    assert rows[baseline].reject_reason == "too_small" and "under 700 pixels" in rows[baseline].reject_detail
