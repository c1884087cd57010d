"""CUDA paths. Skipped without a GPU; benchmarks/gpu_check.sh runs them on a GPU machine."""

import numpy as np
import pytest
import torch

from gender_pipeline.faces.framing import Framing
from gender_pipeline.models.networks import build_network
from gender_pipeline.models.predictor import TorchPredictor, cuda_batch_size

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _predictor(device, **kwargs):
    torch.manual_seed(0)
    net = build_network("resnet18", pretrained="none")
    return TorchPredictor(net, class_order=["female", "male"], name="t", version="1",
                          framing=Framing(size=224, padding=0.25), device=device, **kwargs)


def test_cuda_autocast_matches_cpu():
    chips = np.random.default_rng(0).integers(0, 256, (8, 224, 224, 3), dtype=np.uint8)
    cpu = _predictor("cpu").predict(chips).p_male
    gpu = _predictor("cuda").predict(chips).p_male
    assert np.allclose(cpu, gpu, atol=0.03)


def test_batch_size_from_free_memory():
    batch = cuda_batch_size(_predictor("cuda"))
    assert batch >= 16 and batch & (batch - 1) == 0


def test_compiled_predictor_matches_eager():
    chips = np.random.default_rng(1).integers(0, 256, (4, 224, 224, 3), dtype=np.uint8)
    eager = _predictor("cuda").predict(chips).p_male
    compiled = _predictor("cuda", compile=True).predict(chips).p_male
    assert np.allclose(eager, compiled, atol=0.03)


def test_one_training_epoch_with_amp(tmp_path):
    from gender_pipeline.models.train import Checkpoint, FitOptions, RunSpec, fit
    from gender_pipeline.lake.storage import Store

    rng = np.random.default_rng(0)
    chips = rng.integers(0, 256, (64, 64, 64, 3), dtype=np.uint8)
    labels = rng.integers(0, 2, 64)
    spec = RunSpec(name="g", arch="resnet18", lr=1e-3, epochs=1, image_size=64, batch_size=16)
    result = fit(spec, (chips, labels), (chips[:16], labels[:16]), Checkpoint(Store(str(tmp_path)), "ck.pt"),
                 FitOptions(device="cuda"))
    assert np.isfinite(result.history[0].train_loss)


def test_nvjpeg_decode_matches_pillow():
    from gender_pipeline import samples
    from gender_pipeline.faces.decoding import decode_photo

    data = samples.encode(samples.grace_hopper(), "JPEG", quality=90)
    gpu = decode_photo(data, jpeg_device="cuda")
    cpu = decode_photo(data)
    assert gpu.rgb.shape == cpu.rgb.shape and np.abs(gpu.rgb.astype(int) - cpu.rgb.astype(int)).mean() < 3


def _embedding_predictor(device):
    from gender_pipeline.models.dlib_resnet import load_dlib_face_resnet
    from gender_pipeline.models.face_embedding import Embedder, EmbeddingPredictor, EmbeddingSettings, GenderHead, HeadSpec

    torch.manual_seed(0)
    settings, framing = EmbeddingSettings(), Framing(size=150, padding=0.25)
    head = GenderHead(HeadSpec(name="h"), settings)
    return EmbeddingPredictor(Embedder(load_dlib_face_resnet(), settings, framing, device), head, name="e",
                              version="1", framing=framing, device=device)


def test_face_embedding_model_on_cuda_matches_cpu():
    from gender_pipeline import samples
    from gender_pipeline.faces.front_end import FaceFrontEnd

    front = FaceFrontEnd()
    photos = [samples.grace_hopper(), samples.astronaut()]
    chips = np.stack([front.largest_face(p, Framing(size=150, padding=0.25)).chip for p in photos] * 8)
    cpu = _embedding_predictor("cpu").predict(chips).logits
    gpu = _embedding_predictor("cuda")
    assert gpu.auto_batch_size() >= 16
    assert np.allclose(cpu, gpu.predict(chips).logits, atol=0.05)


def test_gpu_front_end_on_cuda_matches_the_cpu_front_end():
    from gender_pipeline import samples
    from gender_pipeline.faces.front_end import FaceFrontEnd
    from gender_pipeline.faces.device import GpuFaceFrontEnd

    photos = [samples.grace_hopper(), samples.astronaut(),
              samples.pasted_into(samples.grace_hopper(), (4032, 3024), (2000, 1500))]
    for framing in (Framing(size=150, padding=0.25), Framing(kind="retinaface_5pt", size=112, padding=0.1)):
        faces = GpuFaceFrontEnd(framing, "cuda").faces(photos)
        for photo, face in zip(photos, faces):
            reference = FaceFrontEnd().largest_face(photo, framing)
            chip = face.chip.round().clamp(0, 255).byte().permute(1, 2, 0).cpu().numpy()
            assert np.abs(chip.astype(int) - reference.chip.astype(int)).mean() < 3
