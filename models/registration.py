"""A retraining run's winner registered as a new version: calibrated on validation, its
weights, card (what it is, how it frames faces, how it is calibrated, what it was trained
on, how it measured) and report files (results, pictures) written to the registry."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
import torch

from gender_pipeline.lake.answers import AGE_BANDS, band_answers
from gender_pipeline.models.chips import extract_chips
from gender_pipeline.models.datasets import LabelledSet, dataset_ages
from gender_pipeline.models.dlib_resnet import BLOCKS, load_dlib_face_resnet
from gender_pipeline.models.experiment import (Experiment, RunResult, age_metrics, calibration_for, metrics_report,
                                               results_json)
from gender_pipeline.models.face_attributes import (AGES, ATTRIBUTES, FORMAT as ATTRIBUTES_FORMAT,
                                                    KIND as ATTRIBUTES_KIND, band_threshold, fit_age_temperature,
                                                    softmax)
from gender_pipeline.models.face_embedding import BACKBONE, FORMAT as EMBEDDING_FORMAT, HeadSpec, KIND as EMBEDDING_KIND
from gender_pipeline.models.predictor import calibrate
from gender_pipeline.models.report_plots import (plot_age, plot_calibration, plot_confusion, plot_curves,
                                                 plot_face_grid, plot_groups)
from gender_pipeline.models.retrain_options import TrainingRun


@dataclass
class Winner:
    """The run the selection chose, why, the whole table it was chosen from, and how many
    faces the dataset gave."""

    result: RunResult
    why: str
    results: list[RunResult]
    faces_used: int


@dataclass
class Calibration:
    """The winner calibrated on validation and measured on test with it."""

    temperature: float
    threshold: float
    p_test: np.ndarray
    test: dict  # metrics_report on the test split, with `age` for a model that answers age
    age: dict  # the card's `age` entry (empty for a gender-only model)
    years: np.ndarray | None = None  # test ages and band confidences, for the age pictures
    confidence: np.ndarray | None = None


@dataclass
class Registered:
    version: str
    temperature: float
    threshold: float
    test: dict
    files: list[str]


def model_entries(winner: RunResult, experiment: Experiment) -> tuple[str, dict]:
    """The weights' file name and the card entries that depend on the kind of model."""
    if experiment.kind == ATTRIBUTES_KIND:
        settings = experiment.backbone
        return "model.pt", {
            "arch": "dlib-face-resnet+attributes", "format": ATTRIBUTES_FORMAT, "attributes": list(ATTRIBUTES),
            "backbone": {"name": BACKBONE, "sha256": load_dlib_face_resnet().dat_sha256,
                         "train_from": settings.train_from},
            "settings": settings.to_dict(), "head": winner.spec,
            "initial_weights": f"dlib face-recognition ResNet, fine-tuned from block {settings.train_from + 1} of "
                               f"{len(BLOCKS)}" if settings.train_from else
                               "dlib face-recognition ResNet, fine-tuned whole"}
    if experiment.kind == EMBEDDING_KIND:
        spec = HeadSpec(**winner.spec)
        return "head.pt", {
            "arch": winner.arch, "format": EMBEDDING_FORMAT,
            "backbone": {"name": BACKBONE, "sha256": load_dlib_face_resnet().dat_sha256,
                         "frozen_blocks": experiment.embedding.frozen_blocks},
            "embedding": experiment.embedding.to_dict(), "head": spec.to_dict(),
            "initial_weights": "dlib face-recognition ResNet (frozen)" if not experiment.embedding.train_blocks
            else f"dlib face-recognition ResNet, last {experiment.embedding.train_blocks} blocks fine-tuned"}
    spec = next(s for s in experiment.runs if s.name == winner.name)
    return "model.pt", {"arch": spec.arch, "format": "torch", "dropout": spec.dropout,
                        "initial_weights": spec.pretrained}




def calibrated(winner: RunResult, experiment: Experiment, data: LabelledSet) -> Calibration:
    """The temperatures and the abstain thresholds fitted on validation; test metrics with them."""
    temperature, threshold = calibration_for(winner, experiment.target_coverage)
    p_test = calibrate(winner.test_logits, temperature)
    found = Calibration(temperature, threshold, p_test, metrics_report(data, winner.test_index, p_test, threshold), {})
    if winner.age is not None:  # the age distribution's temperature and the band threshold, on val
        age_temperature = fit_age_temperature(winner.age.val_logits, winner.age.val_ages)
        _, _, val_confidence = band_answers(softmax(winner.age.val_logits, age_temperature), AGES)
        age_threshold = band_threshold(val_confidence, experiment.age_target_coverage)
        found.years, _, found.confidence = band_answers(softmax(winner.age.test_logits, age_temperature), AGES)
        found.test["age"] = age_metrics(data, winner.test_index, dataset_ages(data), found.years, found.confidence,
                                        age_threshold)
        found.age = {"age": {"temperature": age_temperature, "abstain_threshold": age_threshold,
                             "target_coverage": experiment.age_target_coverage, "bins": len(AGES),
                             "bands": list(AGE_BANDS), "fitted_on": "val"}}
    return found


def card_of(winner: Winner, experiment: Experiment, data: LabelledSet, calibration: Calibration,
            weights: bytes) -> tuple[str, dict]:
    """The weights' file name and the version's card."""
    result = winner.result
    weights_name, entries = model_entries(result, experiment)
    return weights_name, {
        **entries, "weights": weights_name, "weights_sha256": hashlib.sha256(weights).hexdigest(),
        "framing": experiment.framing.to_dict(), "class_order": ["female", "male"],
        "calibration": {"temperature": calibration.temperature, "fitted_on": "val"},
        "abstain_threshold": calibration.threshold, "target_coverage": experiment.target_coverage, **calibration.age,
        "training": {"experiment": experiment.name, "kind": experiment.kind, "run": result.spec,
                     "config": experiment.raw},
        "data": {"format": experiment.data_format, "fingerprint": data.fingerprint(),
                 "images": len(data.images), "faces_used": int(winner.faces_used),
                 "splits": {s: int((data.split == s).sum()) for s in ("train", "val", "test")}},
        "metrics": {"acc_train": result.acc_train, "acc_val": result.acc_val, "acc_test": result.acc_test,
                    "test": calibration.test},
        "selection": winner.why,
    }


def report_files(run: TrainingRun, winner: Winner, data: LabelledSet, calibration: Calibration, card: dict,
                 weights: bytes) -> dict[str, bytes]:
    """The report beside the version: results.json and the pictures. The face grid shows
    what the version itself answers, through the scoring path."""
    result, name = winner.result, f"{winner.result.name} (test)"
    sample = data.subset(result.test_index[:12])
    grid = extract_chips(sample, run.experiment.framing, run.stores.options, workers=0, max_skipped=1.0)
    shown = run.registry.predictor_from_card(card, weights, device="cpu").predict(grid.chips)
    sample_ages = dataset_ages(sample)
    files = {"report/results.json": results_json(winner.results, result, winner.why, {
                 "temperature": calibration.temperature, "abstain_threshold": calibration.threshold,
                 "winner_test": calibration.test, **calibration.age}),
             "report/confusion_matrix.png": plot_confusion(calibration.test["confusion_matrix"], name),
             "report/learning_curves.png": plot_curves(winner.results),
             "report/groups.png": plot_groups(calibration.test, name),
             "report/faces.png": plot_face_grid(grid.chips, sample.labels[grid.kept], shown.p_male,
                                                ages=shown.age_years, bands=shown.age_band,
                                                band_confidence=shown.age_confidence,
                                                true_ages=None if sample_ages is None else sample_ages[grid.kept])}
    if result.age is not None:
        files["report/age.png"] = plot_age(result.age.test_ages, calibration.years, calibration.test["age"], name)
        files["report/calibration.png"] = plot_calibration(result.test_labels, calibration.p_test,
                                                           result.age.test_ages, calibration.years,
                                                           calibration.confidence)
    return files


def register_version(run: TrainingRun, winner: Winner, data: LabelledSet) -> Registered:
    """Calibrate, then write weights, config, card and report as the model's next version."""
    experiment, registry = run.experiment, run.registry
    calibration = calibrated(winner.result, experiment, data)
    buffer = io.BytesIO()
    torch.save(winner.result.state_dict, buffer)
    weights = buffer.getvalue()
    weights_name, card = card_of(winner, experiment, data, calibration, weights)
    files = {weights_name: weights, "config.yaml": run.config_text.encode(),
             **report_files(run, winner, data, calibration, card, weights)}
    versions = registry.versions(experiment.model_name)
    version = str(max((int(v) for v in versions if v.isdigit()), default=0) + 1)
    registry.register(experiment.model_name, version, card, files)
    return Registered(version, calibration.temperature, calibration.threshold, calibration.test, list(files))
