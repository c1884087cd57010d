import io
import json

import pytest
import torch

from gender_pipeline.faces.framing import Framing
from gender_pipeline.models.networks import build_network
from gender_pipeline.models.predictor import OnnxGenderPredictor, TorchPredictor
from gender_pipeline.models.registry import BASELINE_NAME, ModelRef, Registry, RegistryError


def test_empty_registry_falls_back_to_the_dlib_baseline(tmp_path):
    registry = Registry(str(tmp_path))
    assert registry.resolve(ModelRef.parse("gender-classifier")) == (BASELINE_NAME, "1")
    card = json.loads((tmp_path / BASELINE_NAME / "1" / "card.json").read_text())
    assert card["framing"] == {"kind": "dlib_chip", "size": 32, "padding": 0.2, "fill": "black",
                               "detector": "retinaface"}
    assert card["class_order"] == ["female", "male"]
    assert (tmp_path / BASELINE_NAME / "1" / "model.onnx").stat().st_size > 100_000
    assert registry.production() == (BASELINE_NAME, "1") and registry.pointer() is None  # nothing promoted yet
    assert isinstance(registry.load_predictor("gender-classifier", "cpu"), OnnxGenderPredictor)


@pytest.mark.parametrize("text", ["", "@1", "a/b", "../x", "name@1/2"])
def test_bad_model_references(text):
    with pytest.raises(ValueError):
        ModelRef.parse(text)


def test_unknown_model_and_version_are_clear_errors(tmp_path):
    registry = Registry(str(tmp_path))
    with pytest.raises(RegistryError, match="no production alias"):
        registry.resolve(ModelRef.parse("somebody-else"))
    with pytest.raises(RegistryError, match="no model gender-classifier@7"):
        registry.resolve(ModelRef.parse("gender-classifier@7"))


def _register_torch(registry, version, temperature=2.0):
    torch.manual_seed(0)
    net = build_network("resnet18", pretrained="none")
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    card = {"arch": "resnet18", "format": "torch", "weights": "model.pt",
            "framing": Framing(size=64, padding=0.25).to_dict(), "class_order": ["female", "male"],
            "calibration": {"temperature": temperature}, "abstain_threshold": 0.7}
    registry.register("gender-classifier", version, card, {"model.pt": buffer.getvalue()})


def test_trained_checkpoint_plugs_into_the_same_interface(tmp_path):
    registry = Registry(str(tmp_path))
    _register_torch(registry, "1")
    registry.promote("gender-classifier", "1", "promoted in a test")
    predictor = registry.load_predictor("gender-classifier", "cpu")
    assert isinstance(predictor, TorchPredictor)
    assert (predictor.name, predictor.version, predictor.temperature) == ("gender-classifier", "1", 2.0)
    assert predictor.abstain_threshold == 0.7
    assert registry.load_predictor("gender-classifier", "cpu", abstain_threshold=0.55).abstain_threshold == 0.55
    import numpy as np

    out = predictor.predict(np.zeros((2, 64, 64, 3), dtype=np.uint8))
    assert out.p_male.shape == (2,)


def test_the_production_pointer_keeps_history_and_versions_are_immutable(tmp_path):
    registry = Registry(str(tmp_path))
    _register_torch(registry, "1")
    _register_torch(registry, "2")
    first = registry.promote("gender-classifier", "1", "first")
    assert (first["from"], first["to"]) == (f"{BASELINE_NAME}@1", "gender-classifier@1")
    record = registry.promote("gender-classifier", "2", "better")
    assert record["version"] == "2" and record["history"][0]["version"] == "1"
    assert (record["from"], record["to"], record["reason"]) == ("gender-classifier@1", "gender-classifier@2", "better")
    assert registry.versions("gender-classifier") == ["1", "2"]
    with pytest.raises(RegistryError, match="already registered"):
        _register_torch(registry, "2")


def test_tampered_weights_are_refused(tmp_path):
    registry = Registry(str(tmp_path))
    registry.ensure_baseline()
    path = tmp_path / BASELINE_NAME / "1" / "model.onnx"
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(RegistryError, match="do not match"):
        registry.load_predictor("gender-classifier", "cpu")


def test_registry_on_memory_filesystem():
    registry = Registry("memory://registry-test")
    assert registry.resolve(ModelRef.parse("gender-classifier"))[0] == BASELINE_NAME


def test_a_registry_written_before_the_pointer_keeps_its_production_model(tmp_path):
    """0.1 kept production as `gender-classifier/aliases/production.json`: it still answers,
    and the first promotion moves the one pointer from it."""
    registry = Registry(str(tmp_path))
    _register_torch(registry, "1")
    _register_torch(registry, "2")
    legacy = tmp_path / "gender-classifier" / "aliases" / "production.json"
    legacy.parent.mkdir(parents=True)
    legacy.write_text(json.dumps({"version": "2", "reason": "written by 0.1", "at": "2026-11-01T02:00:00+00:00"}))
    assert registry.resolve(ModelRef.parse("production")) == ("gender-classifier", "2")
    assert registry.resolve(ModelRef.parse("gender-classifier")) == ("gender-classifier", "2")
    moved = registry.promote("dlib-attributes-v1", "1", "gender and age")
    assert (moved["from"], moved["to"]) == ("gender-classifier@2", "dlib-attributes-v1@1")
    assert registry.resolve(ModelRef.parse("production")) == ("dlib-attributes-v1", "1")
    assert registry.resolve(ModelRef.parse("gender-classifier")) == ("gender-classifier", "2")  # its own alias
    listing = registry.listing()
    assert listing["production"] == "dlib-attributes-v1@1" and listing["reason"] == "gender and age"
    assert [m["model"] for m in listing["models"] if m["production"]] == ["dlib-attributes-v1@1"]


def test_a_model_that_cannot_score_is_never_production(tmp_path):
    registry = Registry(str(tmp_path))
    with pytest.raises(RegistryError, match="answers age only"):
        registry.promote("dlib-age-v1", "1", "it cannot answer gender")
    with pytest.raises(RegistryError, match="no model nope@1"):
        registry.promote("nope", "1", "there is no such model")
    assert registry.pointer() is None
