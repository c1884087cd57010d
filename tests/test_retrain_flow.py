"""The retrain flow end to end on a tiny generated dataset, and evaluate/promote from the CLI."""

import json

import pytest

from gender_pipeline import samples
from gender_pipeline.cli import main
from gender_pipeline.models.promotion import decide_promotion

pytestmark = pytest.mark.usefixtures("prefect_harness")

TINY = """
experiment: tiny
model_name: gender-classifier
data: {format: manifest, split: [0.6, 0.2, 0.2], seed: 1}
framing: {kind: dlib_chip, padding: 0.25}
training: {image_size: 32, batch_size: 8, optimizer: adam, seed: 1, workers: 0}
runs:
  - {name: resnet18, arch: resnet18, lr: 1.0e-3, epochs: 2, pretrained: none}
  - {name: resnet18-tuned, arch: resnet18, lr: 1.0e-4, epochs: 1, pretrained: none,
     init_from: resnet18, freeze: [layer1, layer2], dropout: 0.5}
selection: {max_train_val_gap: 1.0}
calibration: {target_coverage: 0.9}
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    samples.write_manifest_dataset(str(root / "data"), 30, seed=2)
    (root / "tiny.yaml").write_text(TINY)
    return root


def test_retrain_registers_reports_and_gates_promotion(tiny, capsys):
    registry = tiny / "registry"
    status = main(["retrain", "--config", str(tiny / "tiny.yaml"), "--data", str(tiny / "data"),
                   "--registry", str(registry), "--device", "cpu"])
    assert status == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{"):])
    assert [row["model"] for row in summary["table"]] == ["resnet18", "resnet18-tuned"]
    assert summary["winner"] == "gender-classifier@1"
    version = registry / "gender-classifier" / "1"
    card = json.loads((version / "card.json").read_text())
    assert card["framing"] == {"kind": "dlib_chip", "size": 32, "padding": 0.25, "fill": "black",
                               "detector": "retinaface"}
    assert card["initial_weights"] == "none" and card["calibration"]["temperature"] > 0
    assert 0.5 <= card["abstain_threshold"] <= 1 and len(card["data"]["fingerprint"]) == 64
    for name in ("model.pt", "config.yaml", "report/results.json", "report/confusion_matrix.png",
                 "report/learning_curves.png", "report/faces.png", "report/groups.png", "promotion.json"):
        assert (version / name).stat().st_size > 0, name
    gender_groups = card["metrics"]["test"]["groups"]["gender"]["groups"]
    assert all(v["low"] <= v["accuracy"] <= v["high"] and v["too_small"] for v in gender_groups.values())
    decision = json.loads((version / "promotion.json").read_text())
    assert decision["production"]["model"] == "dlib-gender-v1@1"
    # Six test faces: every group is listed, none big enough for the gate to test.
    assert {row["column"] for row in decision["groups"]} >= {"gender", "age_band"}
    assert not any(row["tested"] for row in decision["groups"]) and decision["group_rule"]["min_faces"] == 100
    promoted = decision["candidate"]["accuracy"] > decision["production"]["accuracy"]
    assert decision["promote"] == promoted
    pointer = registry / "production.json"
    assert pointer.exists() == promoted
    assert not promoted or json.loads(pointer.read_text())["name"] == "gender-classifier"

    # Scoring uses what the registry says, through the same interface.
    from gender_pipeline.models.registry import Registry

    predictor = Registry(str(registry)).load_predictor("gender-classifier@1", "cpu")
    assert predictor.framing.size == 32 and predictor.temperature == card["calibration"]["temperature"]

    # A rerun with the same inputs resumes from the checkpoints instead of training again.
    status = main(["retrain", "--config", str(tiny / "tiny.yaml"), "--data", str(tiny / "data"),
                   "--registry", str(registry), "--device", "cpu", "--no-promote"])
    assert status == 0
    again = json.loads((out := capsys.readouterr().out)[out.index("{"):])
    assert again["table"] == summary["table"] and again["winner"] == "gender-classifier@2"


def test_evaluate_prints_the_report(tiny, capsys):
    status = main(["evaluate", "--model", "dlib-gender-v1", "--data", str(tiny / "data"), "--format",
                   "manifest", "--registry", str(tiny / "eval-registry"), "--workers", "0"])
    assert status == 0
    printed = capsys.readouterr()
    report = json.loads(printed.out)
    # The figures per group, readable on stderr: 30 faces, every group too small to compare.
    assert "dlib-gender-v1@1: gender accuracy per group, 95% intervals" in printed.err
    assert "too small to compare (under 20 faces): female, male" in printed.err
    for key in ("accuracy", "per_class", "roc_auc", "ece", "coverage", "accuracy_when_answering",
                "groups", "images_per_second", "abstain_threshold"):
        assert key in report, key
    assert report["evaluated"] == 30 and "age_band" in report["groups"]
    assert "max_gap" in report["groups"]["age_band"]


def test_promote_and_rollback_from_the_cli(tmp_path, capsys):
    from gender_pipeline.models.registry import Registry
    from tests.test_registry import _register_torch

    registry = str(tmp_path / "registry")
    for version in ("1", "2"):
        _register_torch(Registry(registry), version)
    assert main(["promote", "gender-classifier@1", "--reason", "manual", "--registry", registry]) == 0
    assert main(["promote", "gender-classifier@2", "--reason", "newer", "--registry", registry]) == 0
    assert main(["promote", "gender-classifier@1", "--reason", "rollback", "--registry", registry]) == 0
    record = json.loads(capsys.readouterr().out.split("\n}\n")[-2] + "\n}")
    assert record["version"] == "1" and [h["version"] for h in record["history"]][-2:] == ["1", "2"]
    assert main(["promote", "gender-classifier", "--reason", "x", "--registry", registry]) == 2


def test_gate_refuses_a_worse_or_equal_model():
    worse = decide_promotion({"model": "new@2", "accuracy": 0.91, "images": 100},
                             {"model": "dlib-gender-v1@1", "accuracy": 0.95})
    assert not worse["promote"] and "not promoted" in worse["reason"]
    tie = decide_promotion({"model": "new@2", "accuracy": 0.95, "images": 100},
                           {"model": "dlib-gender-v1@1", "accuracy": 0.95})
    assert not tie["promote"]
    assert decide_promotion({"model": "n", "accuracy": 0.96, "images": 1}, {"model": "p", "accuracy": 0.95})["promote"]


def test_bad_dataset_is_a_clear_cli_error(tmp_path, capsys):
    status = main(["retrain", "--config", "configs/cpu_dev.yaml", "--data", str(tmp_path), "--device", "cpu",
                   "--registry", str(tmp_path / "reg")])
    assert status == 2
    assert "labels.csv is missing" in capsys.readouterr().err
