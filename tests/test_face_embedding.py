"""The face-embedding model kind: heads on dlib's face-recognition ResNet, trained by the
retrain flow, registered, promoted, and used by evaluate and scoring."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from gender_pipeline import samples
from gender_pipeline.cli import main
from gender_pipeline.faces.framing import Framing
from gender_pipeline.models.chips import Parts, Reading
from gender_pipeline.models.experiment import load_experiment
from gender_pipeline.models.face_embedding import (EmbeddingSettings, Embeddings, HeadSpec, SHIPPED_FRAMING,
                                                   embed_dataset, fit_head, head_logits, shipped_chips)
from tests.conftest import retrain_on_generated_faces

CONFIG = open("configs/face_embedding.yaml").read()


def _config(tmp_path, **replace):
    text = CONFIG.replace("epochs: 40", "epochs: 3")
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / "face_embedding.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def backbone():
    from gender_pipeline.models.dlib_resnet import load_dlib_face_resnet

    return load_dlib_face_resnet()


def _embeddings(n, seed, maps=False):
    """Synthetic backbone outputs: the label shifts the features (a separable problem)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    shape = (n, 256, 4, 4) if maps else (n, 256)  # the last block takes 4 x 4 maps
    x = rng.normal(size=shape).astype(np.float32)
    x[:, :8] += 2.0 * (labels[:, None, None, None] if maps else labels[:, None]) - 1.0
    flipped = x + rng.normal(scale=0.1, size=shape).astype(np.float32)
    return Embeddings(np.arange(n), x, flipped, rng.normal(size=n).astype(np.float32)), labels


@pytest.mark.parametrize("kind", ["logistic", "mlp"])
def test_heads_learn_and_are_deterministic(kind, backbone):
    settings = EmbeddingSettings()
    train, val = _embeddings(400, 0), _embeddings(200, 1)
    spec = HeadSpec(name=kind, kind=kind, epochs=5)
    first = fit_head(spec, settings, backbone, train, val)
    second = fit_head(spec, settings, backbone, train, val)
    logits = head_logits(first.head, val[0], settings)
    assert ((logits >= 0) == val[1]).mean() > 0.9
    assert np.array_equal(logits, head_logits(second.head, val[0], settings))
    assert first.history and all(0 <= r["val_acc"] <= 1 for r in first.history)


def test_fine_tuning_the_last_block_and_stacking_the_shipped_logit(backbone):
    settings = EmbeddingSettings(train_blocks=1, stack_shipped_logit=True)
    train, val = _embeddings(128, 2, maps=True), _embeddings(64, 3, maps=True)
    before = {k: v.clone() for k, v in backbone.blocks[-1].state_dict().items()}
    fit = fit_head(HeadSpec(name="ft", kind="logistic", epochs=2, batch_size=32), settings, backbone, train, val)
    assert fit.head.classifier.in_features == 257  # 256 features + the shipped logit
    changed = any(not torch.equal(before[k], v) for k, v in fit.head.blocks[0].state_dict().items())
    assert changed, "the fine-tuned block should have trained"
    assert all(torch.equal(before[k], v) for k, v in backbone.blocks[-1].state_dict().items()), \
        "the shared backbone must stay untouched"


def test_the_shipped_chip_is_cut_from_the_larger_chip():
    from gender_pipeline.faces.front_end import FaceFrontEnd

    front = FaceFrontEnd()
    photo = samples.grace_hopper()
    box = front.detect(photo)[0]
    big = front.align(photo, box, Framing(size=150, padding=0.25))
    small = front.align(photo, box, SHIPPED_FRAMING)
    cut = shipped_chips(torch.from_numpy(big[None]).permute(0, 3, 1, 2).float(), Framing(size=150, padding=0.25))
    assert cut.shape == (1, 32, 32, 3)
    assert np.abs(cut[0].numpy().astype(int) - small.astype(int)).mean() < 12  # the same face, resampled


def test_config_errors_are_clear(tmp_path):
    experiment = load_experiment("configs/face_embedding.yaml")
    assert experiment.framing == Framing(size=150, padding=0.25) and len(experiment.heads) == 4
    with pytest.raises(ValueError, match="--archs"):
        load_experiment("configs/face_embedding.yaml", {"archs": ["resnet18"]})
    with pytest.raises(ValueError, match="kind must be logistic or mlp"):
        load_experiment(str(_config(tmp_path, **{"kind: mlp,": "kind: svm,"})))
    with pytest.raises(ValueError, match="train_blocks"):
        load_experiment(str(_config(tmp_path, **{"train_blocks: 0": "train_blocks: 99"})))


def test_embedding_is_resumable_part_by_part(tmp_path, backbone, monkeypatch):
    import gender_pipeline.models.chips as fe
    from gender_pipeline.models.datasets import load_manifest
    from gender_pipeline.models.face_embedding import Embedder
    from gender_pipeline.runtime.stopping import StopRequested
    from gender_pipeline.lake.storage import Store

    samples.write_manifest_dataset(str(tmp_path / "data"), 12, seed=4)
    data = load_manifest(str(tmp_path / "data"))
    embedder = Embedder(backbone, EmbeddingSettings(), Framing(size=150, padding=0.25), "cpu")
    store = Store(str(tmp_path / "cache"))
    whole, _ = embed_dataset(data, embedder.framing, embedder, Parts(Store(str(tmp_path / "other")), "e", 5),
                             Reading(workers=0))
    real, calls = fe._compute_part, []

    def stop_after_one(*args):
        if calls:
            raise StopRequested("received SIGTERM")
        calls.append(args[3])
        return real(*args)

    monkeypatch.setattr(fe, "_compute_part", stop_after_one)
    with pytest.raises(StopRequested):
        embed_dataset(data, embedder.framing, embedder, Parts(store, "e", 5), Reading(workers=0))
    monkeypatch.setattr(fe, "_compute_part", lambda *args: calls.append(args[3]) or real(*args))
    resumed, skipped = embed_dataset(data, embedder.framing, embedder, Parts(store, "e", 5), Reading(workers=0))
    assert calls == [0, 5, 10]  # the first part was not computed again
    assert np.array_equal(resumed.index, whole.index) and np.allclose(resumed.inputs, whole.inputs)
    assert len(resumed.index) + sum(skipped.values()) == 12


@pytest.fixture(scope="module")
def trained(tmp_path_factory, prefect_harness):
    """The retrain flow on a small generated dataset, with the face-embedding config."""
    root = tmp_path_factory.mktemp("face-embedding")
    return retrain_on_generated_faces(root, _config(root))


def test_retrain_registers_a_face_embedding_model(trained):
    version = trained / "registry" / "gender-classifier" / "1"
    card = json.loads((version / "card.json").read_text())
    assert card["format"] == "face-embedding" and card["framing"]["size"] == 150
    assert len(card["backbone"]["sha256"]) == 64 and card["embedding"]["flip_average"] is True
    assert card["head"]["kind"] in ("logistic", "mlp") and card["data"]["fingerprint"]
    test = card["metrics"]["test"]
    for key in ("accuracy", "roc_auc", "ece", "coverage", "accuracy_when_answering", "groups"):
        assert key in test, key
    assert "max_gap" in test["groups"]["age_band"]
    results = json.loads((version / "report" / "results.json").read_text())
    assert [row["model"] for row in results["table"]] == ["logistic-l2-0.003", "logistic-l2-0.01",
                                                          "logistic-l2-0.03", "mlp-256"]
    assert "groups" in results["winner_test"]
    for name in ("head.pt", "report/faces.png", "report/confusion_matrix.png", "promotion.json"):
        assert (version / name).stat().st_size > 0, name
    assert not list((trained / "registry").rglob("*.dat")), "the backbone's weights are never copied"
    parts = list((trained / "registry" / "gender-classifier" / "_runs").rglob("part-*.npz"))
    assert parts, "embeddings are kept in the registry's run folder"


def test_the_registered_model_answers_like_its_head_on_the_embeddings(trained):
    from gender_pipeline.models.registry import Registry
    from gender_pipeline.faces.front_end import FaceFrontEnd

    predictor = Registry(str(trained / "registry")).load_predictor("gender-classifier@1", "cpu")
    front = FaceFrontEnd()
    photos = [samples.grace_hopper(), samples.astronaut()]
    chips = np.stack([front.largest_face(p, predictor.framing).chip for p in photos])
    logits = predictor.predict(chips).logits
    inputs, flipped, _ = predictor._embedder(chips)
    by_hand = head_logits(predictor._head, Embeddings(np.arange(2), inputs.numpy(), flipped.numpy(), None),
                          EmbeddingSettings(**predictor.card["embedding"]))
    assert np.allclose(logits, by_hand, atol=1e-5)
    single = np.concatenate([predictor.predict(chips[i:i + 1]).logits for i in range(2)])
    assert np.allclose(logits, single, atol=1e-4)  # batching does not change an answer


def test_evaluate_and_scoring_use_the_new_kind(trained, tmp_path, capsys, uploads):
    registry = str(trained / "registry")
    assert main(["evaluate", "--model", "gender-classifier@1", "--data", str(trained / "data"), "--format",
                 "manifest", "--registry", registry, "--workers", "0"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "gender-classifier@1" and report["evaluated"] == 40
    assert {"ece", "coverage", "groups"} <= set(report)

    source, files = uploads
    assert main(["score", "--source", str(source), "--output", str(tmp_path / "lake"), "--registry", registry,
                 "--model", "gender-classifier@1", "--workers", "0"]) == 0
    frame = pd.read_parquet(str(tmp_path / "lake" / "predictions"))
    assert sorted(frame["photo_key"]) == sorted(files)
    scored = frame[frame["status"] == "scored"]
    assert len(scored) and set(scored["model_name"]) == {"gender-classifier"}
    assert ((scored["p_male"] >= 0) & (scored["p_male"] <= 1)).all()


def test_a_model_trained_on_other_backbone_weights_is_refused(trained, tmp_path):
    import shutil

    from gender_pipeline.models.registry import Registry

    copy = tmp_path / "registry"
    shutil.copytree(trained / "registry" / "gender-classifier" / "1", copy / "m" / "1")
    card_file = copy / "m" / "1" / "card.json"
    card = json.loads(card_file.read_text())
    card["backbone"]["sha256"] = "0" * 64
    card_file.write_text(json.dumps(card))
    with pytest.raises(ValueError, match="backbone weights"):
        Registry(str(copy)).load_predictor("m@1", "cpu")
