"""The experiment configuration (configs/*.yaml) and the pieces of a retraining run that
do not need Prefect: evaluate, calibrate, select, plot, register."""

from __future__ import annotations

import io
import json
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import yaml

from models.chips import iter_chips
from models.dlib_resnet import CHIP_SIZE
from models.face_embedding import KIND as EMBEDDING_KIND
from models.face_embedding import EmbeddingSettings, HeadSpec
from models.datasets import LabelledSet
from models.metrics import (classification_report, fit_temperature, group_report,
                            threshold_for_coverage)
from models.predictor import Predictor, calibrate
from models.train import RunSpec
from core.faces import Framing


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
    kind: str = STUDY  # or face_embedding.KIND: heads on dlib's face embedding
    embedding: EmbeddingSettings | None = None
    heads: list[HeadSpec] = field(default_factory=list)
    batch_size: int = 128  # face-embedding: chips per backbone call


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
    if kind != STUDY:
        raise ValueError(f"{path}: kind must be {STUDY} or {EMBEDDING_KIND}, got {kind!r}")
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

    def row(self) -> dict:
        return {"model": self.name, "acc_train": round(self.acc_train, 4), "acc_val": round(self.acc_val, 4),
                "acc_test": round(self.acc_test, 4),
                "precision_male": round(self.test["per_class"]["male"]["precision"], 4),
                "recall_male": round(self.test["per_class"]["male"]["recall"], 4),
                "f1_macro": round(self.test["macro_f1"], 4), "roc_auc": round(self.test["roc_auc"], 4),
                "gap_train_val": round(self.gap, 4), "s_per_epoch": round(self.seconds_per_epoch, 1)}


def select_winner(results: list[RunResult], max_gap: float) -> tuple[RunResult | None, str]:
    """Best validation accuracy among the runs that do not overfit (gap within the limit)."""
    eligible = [r for r in results if r.gap <= max_gap]
    if not eligible:
        return None, (f"no run kept its train-val gap within {max_gap:.3f} "
                      f"(gaps: {', '.join(f'{r.name}={r.gap:.3f}' for r in results)})")
    winner = max(eligible, key=lambda r: (r.acc_val, -r.gap))
    others = [r.name for r in results if r.gap > max_gap]
    why = f"{winner.name}: best validation accuracy {winner.acc_val:.4f} among runs within the gap limit"
    if others:
        why += f" (excluded for overfitting: {', '.join(others)})"
    return winner, why


def calibration_for(result: RunResult, target_coverage: float) -> tuple[float, float]:
    temperature = fit_temperature(result.val_logits, result.val_labels)
    threshold = threshold_for_coverage(calibrate(result.val_logits, temperature), target_coverage)
    return temperature, threshold


def evaluate_predictor(predictor: Predictor, data: LabelledSet, batch_size: int = 128,
                       workers: int | None = None, options: dict | None = None) -> dict:
    """The `evaluate` report: metrics over every image of `data` that yields a face,
    through the same face front end as scoring, plus per-group accuracy and speed."""
    started = time.perf_counter()
    kept, p_parts, skipped = [], [], Counter()
    for indices, chips, reasons in iter_chips(data, predictor.framing, options, workers, chunk=batch_size):
        kept.append(indices)
        skipped.update(reasons)
        if len(chips):
            p_parts.append(predictor.predict(chips).p_male)
    seconds = time.perf_counter() - started
    kept = np.concatenate(kept) if kept else np.zeros(0, np.int64)
    p_male = np.concatenate(p_parts) if p_parts else np.zeros(0, np.float32)
    report = metrics_report(data, kept, p_male, predictor.abstain_threshold)
    report["model"] = f"{predictor.name}@{predictor.version}"
    report["images"] = len(data.images)
    report["evaluated"] = int(len(kept))
    report["skipped"] = dict(skipped)
    report["images_per_second"] = round(len(data.images) / seconds, 2) if seconds > 0 else None
    return report


def metrics_report(data: LabelledSet, kept: np.ndarray, p_male: np.ndarray, abstain_threshold: float) -> dict:
    """Accuracy, calibration (ECE), coverage at the threshold, and accuracy per group of
    every extra column with the largest gap: for the faces `kept` of `data`."""
    labels = data.labels[kept]
    report = classification_report(labels, p_male, abstain_threshold)
    report["groups"] = group_report(labels, p_male, {k: [v[i] for i in kept] for k, v in data.groups.items()})
    return report


# ---- plots (matplotlib, Agg) -------------------------------------------------------------

def _figure_bytes(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(figure)
    return buffer.getvalue()


def plot_confusion(matrix: list[list[int]], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(3.6, 3.2))
    axis.imshow(np.asarray(matrix), cmap="Blues")
    for i in range(2):
        for j in range(2):
            axis.text(j, i, str(matrix[i][j]), ha="center", va="center")
    axis.set_xticks([0, 1], ["Female", "Male"])
    axis.set_yticks([0, 1], ["Female", "Male"])
    axis.set_xlabel("Predicted")
    axis.set_ylabel("True")
    axis.set_title(title)
    return _figure_bytes(figure)


def plot_curves(results: list[RunResult]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, acc_axis) = plt.subplots(1, 2, figsize=(9, 3.4))
    for result in results:
        epochs = [h["epoch"] for h in result.history]
        for axis, key in ((loss_axis, "loss"), (acc_axis, "acc")):
            line, = axis.plot(epochs, [h[f"train_{key}"] for h in result.history], label=f"{result.name} train")
            axis.plot(epochs, [h[f"val_{key}"] for h in result.history], "--", color=line.get_color(),
                      label=f"{result.name} val")
    loss_axis.set_title("loss")
    acc_axis.set_title("accuracy")
    for axis in (loss_axis, acc_axis):
        axis.set_xlabel("epoch")
    acc_axis.legend(fontsize=7)
    return _figure_bytes(figure)


def plot_face_grid(chips: np.ndarray, labels: np.ndarray, p_male: np.ndarray, count: int = 12) -> bytes:
    """Faces captioned like the study: "Pred: Female (70.5%) / True: Female"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = min(count, len(chips))
    columns = 4
    rows = max(1, (count + columns - 1) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 2.6, rows * 2.9))
    for index, axis in enumerate(np.asarray(axes).reshape(-1)):
        axis.axis("off")
        if index >= count:
            continue
        male = p_male[index] >= 0.5
        confidence = p_male[index] if male else 1 - p_male[index]
        axis.imshow(chips[index])
        axis.set_title(f"Pred: {'Male' if male else 'Female'} ({100 * confidence:.1f}%)\n"
                       f"True: {'Male' if labels[index] else 'Female'}", fontsize=8)
    return _figure_bytes(figure)


def results_json(results: list[RunResult], winner: RunResult | None, why: str, extra: dict) -> bytes:
    document = {"table": [r.row() for r in results], "winner": winner.name if winner else None,
                "selection": why, **extra}
    return json.dumps(document, indent=2, default=float).encode()
