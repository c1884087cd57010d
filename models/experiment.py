"""The experiment configuration (configs/*.yaml) and the pieces of a retraining run that
do not need Prefect: evaluate, calibrate, select, plot, register."""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import yaml

from gender_pipeline.faces.framing import Framing
from gender_pipeline.models.chips import iter_chips
from gender_pipeline.models.datasets import LabelledSet, dataset_ages
from gender_pipeline.models.dlib_resnet import CHIP_SIZE
from gender_pipeline.models.face_attributes import (AttributeSettings, AttributeSpec, KIND as ATTRIBUTES_KIND,
                                                    validation_score)
from gender_pipeline.models.face_embedding import EmbeddingSettings, HeadSpec, KIND as EMBEDDING_KIND
from gender_pipeline.models.metrics import (age_report, banded, classification_report, fit_temperature, group_report,
                                            threshold_for_coverage)
from gender_pipeline.models.predictor import Predictor, calibrate
from gender_pipeline.models.train import RunSpec


STUDY = "study"  # torchvision networks trained on aligned chips (configs/celeba_experiment.yaml)


@dataclass
class Experiment:
    name: str
    model_name: str
    data_format: str
    sample_size: int | None
    split: tuple[float, float, float]
    data_seed: int
    framing: Framing
    runs: list[RunSpec]
    init_from: dict[str, str] = field(default_factory=dict)  # run -> run whose weights it starts from
    max_train_val_gap: float = 0.03
    target_coverage: float = 0.95
    workers: int | None = 0
    reference: dict = field(default_factory=dict)
    raw: dict = field(default_factory=dict)
    kind: str = STUDY  # or face_embedding.KIND (heads on dlib's face embedding), face_attributes.KIND
    embedding: EmbeddingSettings | None = None
    heads: list[HeadSpec] = field(default_factory=list)
    batch_size: int = 128  # face-embedding and face-attributes: chips per backbone call
    backbone: AttributeSettings | None = None  # face-attributes: how the backbone is fine-tuned
    candidates: list[AttributeSpec] = field(default_factory=list)  # face-attributes
    age_target_coverage: float = 0.8  # face-attributes: answers given an age band (the rest `unknown`)


def load_experiment(path: str, overrides: dict | None = None) -> Experiment:
    """Read a config and apply command-line overrides (None values are ignored)."""
    with open(path) as handle:
        raw = yaml.safe_load(handle)
    if not isinstance(raw, dict):
        raise ValueError(f"{path} is not a YAML mapping")
    o = {k: v for k, v in (overrides or {}).items() if v is not None}
    kind = raw.get("kind", STUDY)
    if kind == EMBEDDING_KIND:
        return _embedding_experiment(raw, o)
    if kind == ATTRIBUTES_KIND:
        return _attributes_experiment(raw, o)
    if kind != STUDY:
        raise ValueError(f"{path}: kind must be {STUDY}, {EMBEDDING_KIND} or {ATTRIBUTES_KIND}, got {kind!r}")
    training = raw.get("training", {})
    data = raw.get("data", {})
    image_size = int(o.get("image_size", training.get("image_size", 224)))
    framing_raw = dict(raw.get("framing", {"kind": "dlib_chip", "padding": 0.25}))
    framing_raw["size"] = image_size  # the chip is the model input: no resize at scoring
    runs, init_from = [], {}
    for entry in raw["runs"]:
        spec = RunSpec(
            name=entry["name"], arch=entry["arch"], lr=float(entry["lr"]),
            epochs=int(o.get("epochs", entry.get("epochs", training.get("epochs", 1)))),
            image_size=image_size,
            batch_size=int(o.get("batch_size", training.get("batch_size", 32))),
            optimizer=training.get("optimizer", "adam"),
            momentum=float(training.get("momentum", 0.9)),
            weight_decay=float(training.get("weight_decay", 0.0)),
            freeze=tuple(entry.get("freeze", ())), dropout=float(entry.get("dropout", 0.0)),
            pretrained=str(o.get("pretrained", entry.get("pretrained", training.get("pretrained", "none")))),
            seed=int(training.get("seed", 0)))
        runs.append(spec)
        if entry.get("init_from"):
            init_from[spec.name] = entry["init_from"]
    if o.get("archs"):
        wanted = set(o["archs"])
        unknown = wanted - {r.arch for r in runs}
        if unknown:
            raise ValueError(f"--archs {sorted(unknown)} not in the config (has {sorted({r.arch for r in runs})})")
        runs = [r for r in runs if r.arch in wanted]
        init_from = {k: v for k, v in init_from.items() if v in {r.name for r in runs}}
    names = [r.name for r in runs]
    for run, parent in init_from.items():
        if parent not in names or names.index(parent) > names.index(run):
            raise ValueError(f"run {run} starts from {parent}, which must be an earlier run")
    return Experiment(
        name=raw.get("experiment", "experiment"), model_name=raw.get("model_name", "gender-classifier"),
        data_format=o.get("format", data.get("format", "manifest")),
        sample_size=o.get("sample_size", data.get("sample_size")),
        split=tuple(data.get("split", (0.7, 0.15, 0.15))), data_seed=int(data.get("seed", 0)),
        framing=Framing.from_dict(framing_raw), runs=runs, init_from=init_from,
        max_train_val_gap=float(raw.get("selection", {}).get("max_train_val_gap", 0.03)),
        target_coverage=float(raw.get("calibration", {}).get("target_coverage", 0.95)),
        workers=int(o.get("workers", training.get("workers", 0))),
        reference=raw.get("study_reference", {}), raw=raw)


def _embedding_experiment(raw: dict, o: dict) -> Experiment:
    """A face-embedding config: the backbone's settings and the candidate heads."""
    not_here = sorted(set(o) & {"archs", "image_size", "pretrained"})
    if not_here:
        raise ValueError(f"{', '.join('--' + k.replace('_', '-') for k in not_here)} do not apply to a "
                         f"{EMBEDDING_KIND} config (its backbone takes 150-pixel chips)")
    data = raw.get("data", {})
    training = raw.get("training", {})
    framing = Framing.from_dict({**raw.get("framing", {}), "size": CHIP_SIZE})
    heads = [HeadSpec(**{**h, **({"epochs": int(o["epochs"])} if "epochs" in o else {})}) for h in raw.get("heads", [])]
    if not heads:
        raise ValueError(f"a {EMBEDDING_KIND} config needs at least one entry under heads")
    workers = o.get("workers", training.get("workers"))
    return Experiment(
        name=raw.get("experiment", "face-embedding"), model_name=raw.get("model_name", "gender-classifier"),
        data_format=o.get("format", data.get("format", "manifest")), sample_size=o.get("sample_size", data.get("sample_size")),
        split=tuple(data.get("split", (0.7, 0.15, 0.15))), data_seed=int(data.get("seed", 0)), framing=framing,
        runs=[], max_train_val_gap=float(raw.get("selection", {}).get("max_train_val_gap", 0.03)),
        target_coverage=float(raw.get("calibration", {}).get("target_coverage", 0.95)),
        workers=None if workers is None else int(workers), raw=raw, kind=EMBEDDING_KIND,
        embedding=EmbeddingSettings(**raw.get("embedding", {})), heads=heads,
        batch_size=int(o.get("batch_size", training.get("batch_size", 128))))


def _attributes_experiment(raw: dict, o: dict) -> Experiment:
    """A face-attributes config: how the backbone is fine-tuned, and the candidates."""
    not_here = sorted(set(o) & {"archs", "image_size", "pretrained"})
    if not_here:
        raise ValueError(f"{', '.join('--' + k.replace('_', '-') for k in not_here)} do not apply to a "
                         f"{ATTRIBUTES_KIND} config (its backbone takes 150-pixel chips)")
    data, training = raw.get("data", {}), raw.get("training", {})
    candidates = [AttributeSpec(**{**c, **({"epochs": int(o["epochs"])} if "epochs" in o else {})})
                  for c in raw.get("candidates", [])]
    if not candidates:
        raise ValueError(f"a {ATTRIBUTES_KIND} config needs at least one entry under candidates")
    if "batch_size" in o:  # --batch-size: the training batch
        candidates = [AttributeSpec(**{**c.to_dict(), "batch_size": int(o["batch_size"])}) for c in candidates]
    workers = o.get("workers", training.get("workers"))
    calibration = raw.get("calibration", {})
    return Experiment(
        name=raw.get("experiment", ATTRIBUTES_KIND), model_name=raw.get("model_name", "gender-classifier"),
        data_format=o.get("format", data.get("format", "manifest")),
        sample_size=o.get("sample_size", data.get("sample_size")),
        split=tuple(data.get("split", (0.7, 0.15, 0.15))), data_seed=int(data.get("seed", 0)),
        framing=Framing.from_dict({**raw.get("framing", {}), "size": CHIP_SIZE}), runs=[],
        max_train_val_gap=float(raw.get("selection", {}).get("max_train_val_gap", 0.03)),
        target_coverage=float(calibration.get("target_coverage", 0.95)),
        age_target_coverage=float(calibration.get("age_target_coverage", 0.8)),
        workers=None if workers is None else int(workers), raw=raw, kind=ATTRIBUTES_KIND,
        backbone=AttributeSettings(**raw.get("backbone", {})), candidates=candidates,
        batch_size=int(training.get("batch_size", 128)))


@dataclass
class RunResult:
    name: str
    arch: str
    acc_train: float
    acc_val: float
    acc_test: float
    gap: float
    test: dict
    val_logits: np.ndarray
    val_labels: np.ndarray
    test_logits: np.ndarray
    test_labels: np.ndarray
    history: list
    seconds_per_epoch: float
    images_per_second: float
    state_dict: dict | None = None
    test_index: np.ndarray | None = None  # dataset indices of the test faces (for group metrics)
    spec: dict = field(default_factory=dict)  # what was trained (a RunSpec or a HeadSpec, as a dict)
    age: AgeResult | None = None  # a model that answers age too

    def row(self) -> dict:
        row = {"model": self.name, "acc_train": round(self.acc_train, 4), "acc_val": round(self.acc_val, 4),
               "acc_test": round(self.acc_test, 4),
               "precision_male": round(self.test["per_class"]["male"]["precision"], 4),
               "recall_male": round(self.test["per_class"]["male"]["recall"], 4),
               "f1_macro": round(self.test["macro_f1"], 4), "roc_auc": round(self.test["roc_auc"], 4),
               "gap_train_val": round(self.gap, 4), "s_per_epoch": round(self.seconds_per_epoch, 1)}
        if self.age is not None:
            row.update(mae_train=round(self.age.mae_train, 3), mae_val=round(self.age.mae_val, 3),
                       mae_test=round(self.age.mae_test, 3), best_epoch=self.age.best_epoch)
        return row

    @property
    def score(self) -> float:
        """What selection minimises: the validation error in points, plus the validation
        age MAE in years for a model that answers age."""
        return validation_score(self.acc_val, self.age.mae_val if self.age is not None else 0.0)


@dataclass
class AgeResult:
    """The age side of a run: MAE per split and the raw outputs calibration needs."""

    mae_train: float
    mae_val: float
    mae_test: float
    val_logits: np.ndarray  # N x 101 age logits (validation)
    val_ages: np.ndarray
    test_logits: np.ndarray
    test_ages: np.ndarray
    best_epoch: int = 0


def select_winner(results: list[RunResult], max_gap: float) -> tuple[RunResult | None, str]:
    """Best validation accuracy among the runs that do not overfit (gap within the limit);
    for models that answer age, the best validation score (error points plus MAE years)."""
    eligible = [r for r in results if r.gap <= max_gap]
    if not eligible:
        return None, (f"no run kept its train-val gap within {max_gap:.3f} "
                      f"(gaps: {', '.join(f'{r.name}={r.gap:.3f}' for r in results)})")
    others = [r.name for r in results if r.gap > max_gap]
    if any(r.age is not None for r in eligible):
        winner = min(eligible, key=lambda r: (r.score, r.gap))
        why = (f"{winner.name}: best validation score {winner.score:.3f} (gender error {100 * (1 - winner.acc_val):.2f} "
               f"points + age MAE {winner.age.mae_val:.2f} years) among runs within the gap limit")
    else:
        winner = max(eligible, key=lambda r: (r.acc_val, -r.gap))
        why = f"{winner.name}: best validation accuracy {winner.acc_val:.4f} among runs within the gap limit"
    if others:
        why += f" (excluded for overfitting: {', '.join(others)})"
    return winner, why


def calibration_for(result: RunResult, target_coverage: float) -> tuple[float, float]:
    temperature = fit_temperature(result.val_logits, result.val_labels)
    threshold = threshold_for_coverage(calibrate(result.val_logits, temperature), target_coverage)
    return temperature, threshold


def evaluate_predictor(predictor: Predictor, data: LabelledSet, batch_size: int = 128,
                       workers: int | None = None, options: dict | None = None, keep_faces: bool = False) -> dict:
    """The `evaluate` report: metrics over every image of `data` that yields a face,
    through the same face front end as scoring, plus per-group accuracy and speed, for
    each attribute the model answers. `keep_faces` adds the per-face outcomes (`faces`:
    dataset index, gender right or not, age error) for paired comparisons."""
    started = time.perf_counter()
    kept, parts, skipped = [], {"p_male": [], "years": [], "confidence": []}, Counter()
    for indices, chips, reasons in iter_chips(data, predictor.framing, options, workers, chunk=batch_size):
        kept.append(indices)
        skipped.update(reasons)
        if len(chips):
            prediction = predictor.predict(chips)
            parts["p_male"].append(prediction.p_male)
            if prediction.age_years is not None:
                parts["years"].append(prediction.age_years)
                parts["confidence"].append(prediction.age_confidence)
    seconds = time.perf_counter() - started
    kept = np.concatenate(kept) if kept else np.zeros(0, np.int64)
    joined = {k: np.concatenate(v) if v else np.zeros(0, np.float32) for k, v in parts.items()}
    if "gender" in predictor.attributes:
        report = metrics_report(data, kept, joined["p_male"], predictor.abstain_threshold)
    else:
        report = {"count": int(len(kept))}
    ages = dataset_ages(data)
    if "age" in predictor.attributes and ages is not None:
        report["age"] = age_metrics(data, kept, ages, joined["years"], joined["confidence"],
                                    predictor.age_abstain_threshold)
    report["attributes"] = list(predictor.attributes)
    if keep_faces:
        report["faces"] = {"index": kept, "correct": (joined["p_male"] >= 0.5).astype(int) == data.labels[kept]
                           if "gender" in predictor.attributes else None,
                           "age_error": np.abs(joined["years"] - ages[kept]) if "age" in report else None,
                           "age_known": ages[kept] >= 0 if "age" in report else None,
                           "groups": {column: banded(values, column)
                                      for column, values in face_groups(data, kept).items()}}
    report["model"] = f"{predictor.name}@{predictor.version}"
    report["images"] = len(data.images)
    report["evaluated"] = int(len(kept))
    report["skipped"] = dict(skipped)
    report["images_per_second"] = round(len(data.images) / seconds, 2) if seconds > 0 else None
    return report


def face_groups(data: LabelledSet, kept: np.ndarray) -> dict[str, list]:
    """The groups of the faces `kept`: their true gender, and every extra column of the dataset."""
    return {"gender": ["male" if data.labels[i] else "female" for i in kept],
            **{k: [v[i] for i in kept] for k, v in data.groups.items() if k != "gender"}}


def age_metrics(data: LabelledSet, kept: np.ndarray, ages: np.ndarray, years: np.ndarray, confidence: np.ndarray,
                abstain_threshold: float) -> dict:
    """The age report for the faces `kept`, by gender, by every extra column, and by the
    true age's band."""
    return age_report(ages[kept], years, confidence, abstain_threshold, face_groups(data, kept))


def metrics_report(data: LabelledSet, kept: np.ndarray, p_male: np.ndarray, abstain_threshold: float) -> dict:
    """Accuracy, calibration (ECE), coverage at the threshold, and accuracy per group (the
    true gender and every extra column) with its interval and the largest gap: for the
    faces `kept` of `data`."""
    labels = data.labels[kept]
    report = classification_report(labels, p_male, abstain_threshold)
    report["groups"] = group_report(labels, p_male, face_groups(data, kept))
    return report


def results_json(results: list[RunResult], winner: RunResult | None, why: str, extra: dict) -> bytes:
    document = {"table": [r.row() for r in results], "winner": winner.name if winner else None,
                "selection": why, **extra}
    return json.dumps(document, indent=2, default=float).encode()
