"""The face-attributes model kind: dlib's face ResNet fine-tuned for gender and age, trained
by the retrain flow, calibrated per attribute, registered, promoted per attribute, and
used by evaluate and scoring (age columns in the history and the users table)."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from gender_pipeline import samples
from gender_pipeline.cli import main
from gender_pipeline.lake.answers import band_answers
from gender_pipeline.models.face_attributes import (AGES, AttributeSettings, AttributeSpec, Augment, Inputs,
                                                    age_targets, augment_chips, band_threshold, fit_age_temperature,
                                                    fit_attributes, predict_inputs, softmax, split_metrics)
from tests.conftest import retrain_on_generated_faces

CONFIG = open("configs/face_attributes.yaml").read()


@pytest.fixture(scope="module")
def backbone():
    from gender_pipeline.models.dlib_resnet import load_dlib_face_resnet

    return load_dlib_face_resnet()


def _maps(n, seed, views=2):
    """Synthetic outputs of blocks 1-12 (256 x 4 x 4 maps): the label shifts some channels,
    the age others, so both are learnable."""
    rng = np.random.default_rng(seed)
    male = rng.integers(0, 2, n)
    ages = rng.uniform(18, 80, n)
    x = rng.normal(size=(n, views, 256, 4, 4)).astype(np.float32)
    x[:, :, :8] += (2.0 * male - 1.0)[:, None, None, None, None]
    x[:, :, 8:16] += ((ages - 49) / 15)[:, None, None, None, None]
    base, extra = x[:, :2].astype(np.float16), x[:, 2:].astype(np.float16)
    return Inputs(base=base, extra=extra if views > 2 else None), male, ages


@pytest.mark.parametrize("age_loss", ["dldl", "l1"])
def test_both_heads_learn_and_training_is_deterministic(backbone, age_loss):
    settings = AttributeSettings(train_from=12, views=3)
    train, val = _maps(256, 0, views=3), _maps(128, 1)
    spec = AttributeSpec(name=age_loss, age_loss=age_loss, epochs=5, patience=5, batch_size=64,
                         age_weight=1.0 if age_loss == "dldl" else 0.1)
    first = fit_attributes(spec, settings, backbone, train, val)
    second = fit_attributes(spec, settings, backbone, train, val)
    logits, ages = predict_inputs(first.net, val[0], backbone, settings, "cpu")
    measured = split_metrics(logits, ages, val[1], val[2])
    assert measured["accuracy"] > 0.9 and measured["mae"] < 12  # a constant guess of 49 gives ~15.5
    assert np.array_equal(logits, predict_inputs(second.net, val[0], backbone, settings, "cpu")[0])
    assert [set(r) >= {"train_loss", "train_acc", "train_mae", "val_acc", "val_mae", "val_score"}
            for r in first.history] == [True] * len(first.history)
    assert first.history[first.best_epoch - 1]["val_score"] == min(r["val_score"] for r in first.history)


def test_early_stopping_keeps_the_best_epoch(backbone):
    settings = AttributeSettings(train_from=12, views=2)
    train, val = _maps(200, 2), _maps(100, 3)
    # Learning rate 0 everywhere: no epoch beats the first, so patience 2 stops after epoch 3.
    spec = AttributeSpec(name="still", epochs=10, patience=2, lr=0.0, backbone_lr=0.0, batch_size=64)
    fit = fit_attributes(spec, settings, backbone, train, val)
    assert fit.stopped_early and len(fit.history) == 3 and fit.best_epoch == 1


def test_a_face_without_an_age_trains_gender_only(backbone):
    settings = AttributeSettings(train_from=12, views=2)
    inputs, male, ages = _maps(128, 4)
    ages[::2] = -1  # half the labels have no age
    spec = AttributeSpec(name="partial", epochs=2, batch_size=32)
    fit = fit_attributes(spec, settings, backbone, (inputs, male, ages), (inputs, male, ages))
    assert all(np.isfinite(r["train_loss"]) and np.isfinite(r["val_mae"]) for r in fit.history)


def test_the_whole_network_trains_from_chips_with_augmentation_every_batch(backbone):
    """The GPU way (views 0, train_from 0), run here on the CPU with a few tiny chips."""
    rng = np.random.default_rng(5)
    chips = rng.integers(0, 255, (8, 150, 150, 3), dtype=np.uint8)
    male, ages = np.array([0, 1] * 4), np.linspace(20, 70, 8)
    settings = AttributeSettings(train_from=0, views=0)
    spec = AttributeSpec(name="full", epochs=1, batch_size=4)
    before = backbone.conv.weight.detach().clone()
    fit = fit_attributes(spec, settings, backbone, (Inputs(chips=chips), male, ages),
                         (Inputs(chips=chips[:4]), male[:4], ages[:4]))
    assert not torch.equal(fit.net.conv.weight, before), "the stem is trained"
    assert torch.equal(backbone.conv.weight, before), "the shared backbone is left as it was"
    logits, age_logits = predict_inputs(fit.net, Inputs(chips=chips), backbone, settings, "cpu")
    assert logits.shape == (8,) and age_logits.shape == (8, 101)


def test_augmentation_changes_chips_within_bounds_and_is_seeded():
    x = torch.rand(4, 3, 150, 150) * 255
    spec = Augment()
    a = augment_chips(x, spec, torch.Generator().manual_seed(1))
    b = augment_chips(x, spec, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == x.shape and not torch.equal(a, x)
    assert a.min() >= 0 and a.max() <= 255
    still = augment_chips(x, Augment(0, 0, 0, 0, 0, flip=False), torch.Generator().manual_seed(1))
    assert torch.allclose(still, x, atol=0.05)  # nothing asked, nothing changed (but resampling rounding)


def test_age_calibration_bands_and_abstention():
    rng = np.random.default_rng(0)
    ages = rng.uniform(18, 80, 500)
    logits = np.log(age_targets(torch.tensor(ages, dtype=torch.float32), 6.0).numpy() + 1e-9) * 2.0  # too sharp
    temperature = fit_age_temperature(logits, np.clip(ages + rng.normal(0, 6, 500), 0, 100))
    assert temperature > 1.2  # the sharp distributions are softened
    years, band, confidence = band_answers(softmax(logits, temperature), AGES)
    assert np.abs(years - ages).mean() < 2 and ((0 < confidence) & (confidence <= 1)).all()
    threshold = band_threshold(confidence, 0.8)
    assert (confidence >= threshold).mean() == pytest.approx(0.8, abs=0.01)
    from gender_pipeline.lake.answers import age_bands_of

    bands = age_bands_of(years, confidence, threshold)
    assert bands.count("unknown") == pytest.approx(100, abs=5)
    assert set(bands) <= {"18-24", "25-34", "35-44", "45-54", "55-64", "65+", "unknown"}


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="train_from"):
        AttributeSettings(train_from=14)
    with pytest.raises(ValueError, match="views"):
        AttributeSettings(views=1)
    with pytest.raises(ValueError, match="age_loss"):
        AttributeSpec(name="x", age_loss="mse")


def _config(tmp_path):
    """The CPU config, two epochs and three views (a test's budget)."""
    path = tmp_path / "face_attributes.yaml"
    path.write_text(CONFIG.replace("epochs: 16", "epochs: 2").replace("views: 6 ", "views: 3 "))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, prefect_harness):
    """The retrain flow on a small generated dataset with ages, with the CPU config."""
    root = tmp_path_factory.mktemp("face-attributes")
    return retrain_on_generated_faces(root, _config(root), ages=True)


def test_retrain_registers_a_model_that_answers_gender_and_age(trained):
    version = trained / "registry" / "gender-classifier" / "1"
    card = json.loads((version / "card.json").read_text())
    assert card["format"] == "face-attributes" and card["attributes"] == ["gender", "age"]
    assert card["settings"]["train_from"] == 10 and card["framing"]["size"] == 150
    assert card["age"]["temperature"] > 0 and 0 <= card["age"]["abstain_threshold"] <= 1
    test = card["metrics"]["test"]
    assert {"accuracy", "ece", "coverage", "groups"} <= set(test)
    age = test["age"]
    for key in ("mae", "mae_adults", "band_accuracy", "band_ece", "coverage", "groups_mae",
                "groups_band_accuracy"):
        assert key in age, key
    assert {"gender", "age_band", "age"} <= set(age["groups_mae"])  # by gender, by the columns, by age band
    results = json.loads((version / "report" / "results.json").read_text())
    assert [row["model"] for row in results["table"]] == ["dldl", "l1"]
    assert all("mae_val" in row for row in results["table"]) and "age" in results
    for name in ("model.pt", "report/faces.png", "report/confusion_matrix.png", "report/age.png",
                 "report/calibration.png", "report/learning_curves.png", "promotion.json"):
        assert (version / name).stat().st_size > 0, name
    assert not list((trained / "registry").rglob("*.dat")), "the backbone's weights are never copied"
    decision = json.loads((version / "promotion.json").read_text())
    assert "age" in decision["attributes"] and decision["attributes"]["age"]["production"] is None
    assert "age is new" in decision["reason"] or "worse: gender" in decision["reason"]


def test_evaluate_reports_each_attribute_and_dlibs_age_predictor(trained, capsys):
    registry = str(trained / "registry")
    data = str(trained / "data")
    assert main(["evaluate", "--model", "gender-classifier@1", "--data", data, "--format", "manifest",
                 "--registry", registry, "--workers", "0"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["attributes"] == ["gender", "age"] and "accuracy" in report
    assert report["age"]["count"] == 40 and report["age"]["mae"] >= 0
    assert main(["evaluate", "--model", "dlib-age-v1", "--data", data, "--format", "manifest",
                 "--registry", registry, "--workers", "0"]) == 0
    dlib = json.loads(capsys.readouterr().out)
    assert dlib["attributes"] == ["age"] and "accuracy" not in dlib and dlib["age"]["count"] == 40


def test_the_refresh_moves_users_to_the_attribute_model_and_ages_reach_the_users_table(trained, tmp_path, uploads,
                                                                                       capsys):
    from deltalake import DeltaTable

    registry = str(trained / "registry")
    source, files = uploads
    lake = str(tmp_path / "lake")
    # First night: the shipped gender network (no age), then the attribute model with a
    # refresh budget of 2 photos a night.
    assert main(["score", "--source", str(source), "--output", lake, "--registry", registry, "--model",
                 "dlib-gender-v1@1", "--workers", "0"]) == 0
    users = DeltaTable(f"{lake}/users").to_pandas()
    assert len(users) == 4 and users["age_band"].isna().all()
    capsys.readouterr()
    assert main(["score", "--source", str(source), "--output", lake, "--registry", registry, "--model",
                 "gender-classifier@1", "--workers", "0", "--refresh-budget", "2", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["refreshed"] == 2 and summary["users"]["behind"] == 2 and summary["users"]["nights_left"] == 1
    assert sum(summary["age_bands"].values()) == 2  # the night's scored photos, by band
    users = DeltaTable(f"{lake}/users").to_pandas()
    assert users["age_band"].notna().sum() == 2 and set(users.dropna(subset=["age_band"])["schema_version"]) == {2}
    assert main(["score", "--source", str(source), "--output", lake, "--registry", registry, "--model",
                 "gender-classifier@1", "--workers", "0", "--refresh-budget", "2"]) == 0
    frame = pd.read_parquet(f"{lake}/predictions")
    scored, rejected = frame[frame["status"] == "scored"], frame[frame["status"] == "rejected"]
    mine = scored[scored["model_name"] == "gender-classifier"]
    assert len(mine) == 4 and mine["age_years"].between(0, 100).all() and mine["age_band"].notna().all()
    assert mine["age_confidence"].between(0, 1).all() and set(frame["schema_version"]) == {2}
    assert rejected["age_years"].isna().all() and rejected["age_band"].isna().all()
    users = DeltaTable(f"{lake}/users").to_pandas()
    assert users["age_band"].notna().all() and set(users["model_name"]) == {"gender-classifier"}
    by_key = mine.set_index("photo_key")
    for _, user in users.iterrows():
        assert user["age_years"] == pytest.approx(by_key.loc[user["photo_key"], "age_years"])
    capsys.readouterr()
    assert main(["status", "--output", lake]) == 0
    assert "age bands    " in capsys.readouterr().out


def test_the_age_band_abstains_under_its_threshold(trained):
    from gender_pipeline.models.registry import Registry
    from gender_pipeline.faces.front_end import FaceFrontEnd

    reg = Registry(str(trained / "registry"))
    predictor = reg.load_predictor("gender-classifier@1", "cpu")
    front = FaceFrontEnd()
    chips = np.stack([front.largest_face(p, predictor.framing).chip
                      for p in (samples.grace_hopper(), samples.astronaut())])
    answered = predictor.predict(chips)
    assert all(b != "unknown" for b in answered.age_band) or predictor.age_abstain_threshold > 0
    predictor.age_abstain_threshold = 1.01  # nothing is that sure: every band is unknown, the ages stay
    abstained = predictor.predict(chips)
    assert abstained.age_band == ["unknown", "unknown"]
    assert np.allclose(abstained.age_years, answered.age_years) and abstained.p_male.tolist() == answered.p_male.tolist()


def test_a_model_without_age_stays_valid(tmp_path, uploads, prefect_harness):
    """The shipped network answers gender only: its rows and users have null ages."""
    from deltalake import DeltaTable

    source, _ = uploads
    assert main(["score", "--source", str(source), "--output", str(tmp_path / "lake"),
                 "--registry", str(tmp_path / "registry"), "--workers", "0"]) == 0
    frame = pd.read_parquet(str(tmp_path / "lake" / "predictions"))
    assert frame["age_years"].isna().all() and frame["age_band"].isna().all()
    assert DeltaTable(str(tmp_path / "lake" / "users")).to_pandas()["age_band"].isna().all()


def test_an_age_only_model_cannot_score(tmp_path, uploads, capsys, prefect_harness):
    source, _ = uploads
    assert main(["score", "--source", str(source), "--output", str(tmp_path / "lake"),
                 "--registry", str(tmp_path / "registry"), "--model", "dlib-age-v1@1", "--workers", "0"]) != 0
    assert "answers age only" in capsys.readouterr().err


def test_a_dataset_without_ages_is_a_clear_error(tmp_path, capsys):
    samples.write_manifest_dataset(str(tmp_path / "data"), 12, seed=1)
    status = main(["retrain", "--config", str(_config(tmp_path)), "--data", str(tmp_path / "data"),
                   "--registry", str(tmp_path / "registry"), "--device", "cpu"])
    assert status == 2 and "no age column" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    samples.write_manifest_dataset(str(tmp_path / "bad"), 12, seed=1, ages=True)
    labels = tmp_path / "bad" / "labels.csv"
    lines = labels.read_text().splitlines()
    lines[1] = lines[1].rsplit(",", 1)[0] + ",twenty"
    labels.write_text("\n".join(lines) + "\n")
    status = main(["retrain", "--config", str(_config(tmp_path)), "--data", str(tmp_path / "bad"),
                   "--registry", str(tmp_path / "registry"), "--device", "cpu"])
    assert status == 2 and "age must be a number of years" in capsys.readouterr().err
