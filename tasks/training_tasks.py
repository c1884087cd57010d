"""Prefect tasks for the retrain flow, wrapping models.datasets/chips/train/experiment."""

from __future__ import annotations

import hashlib
import io
import json
import time

import numpy as np
import torch
from prefect import get_run_logger, task
from prefect.artifacts import (create_link_artifact, create_markdown_artifact, create_progress_artifact,
                               create_table_artifact, update_progress_artifact)
from prefect.cache_policies import NO_CACHE

from models.chips import ChipSet, extract_chips
from models.datasets import LabelledSet, load_dataset
from models.experiment import (Experiment, RunResult, calibration_for, evaluate_predictor,
                               plot_confusion, plot_curves, plot_face_grid, results_json)
from models.metrics import classification_report
from models.networks import build_network
from models.predictor import calibrate
from models.registry import ModelRef, Registry
from models.train import evaluate, fit, make_loader
from models.presets import eval_preset
from tasks.storage import storage_options


@task(name="check-pretrained-weights", cache_policy=NO_CACHE)
def check_pretrained_weights(experiment: Experiment) -> None:
    """Fail at the start, not after hours, when ImageNet weights are asked for but absent."""
    for spec in experiment.runs:
        if spec.pretrained != "none":
            build_network(spec.arch, pretrained=spec.pretrained)
    get_run_logger().info("initial weights: %s", {s.name: s.pretrained for s in experiment.runs})


@task(name="load-labelled-dataset", cache_policy=NO_CACHE)
def load_labelled_dataset(url: str, experiment: Experiment, endpoint_url: str | None) -> LabelledSet:
    data = load_dataset(url, experiment.data_format, storage_options(endpoint_url), ratios=experiment.split,
                        seed=experiment.data_seed, sample_size=experiment.sample_size)
    counts = {s: int((data.split == s).sum()) for s in ("train", "val", "test")}
    get_run_logger().info("%s dataset %s: %d images %s, %d male; fingerprint %s", experiment.data_format, url,
                          len(data.images), counts, int(data.labels.sum()), data.fingerprint()[:12])
    return data


@task(name="align-training-faces", cache_policy=NO_CACHE)
def align_faces(data: LabelledSet, experiment: Experiment, endpoint_url: str | None) -> ChipSet:
    logger = get_run_logger()
    artifact = create_progress_artifact(0.0, key="face-alignment-progress", description="images aligned")

    def progress(done: int, total: int) -> None:
        update_progress_artifact(artifact, 100.0 * done / max(total, 1))
        if done == total or done % 1024 < 64:
            logger.info("aligned %d/%d images", done, total)

    chips = extract_chips(data, experiment.framing, storage_options(endpoint_url), progress=progress)
    logger.info(chips.summary())
    return chips


def _split(data: LabelledSet, chips: ChipSet, name: str) -> tuple[np.ndarray, np.ndarray]:
    mask = data.split[chips.kept] == name
    return chips.chips[mask], data.labels[chips.kept][mask]


@task(name="train-run", cache_policy=NO_CACHE)
def train_run(spec, data: LabelledSet, chips: ChipSet, experiment: Experiment, registry: str | None,
              endpoint_url: str | None, device: str, init_state: dict | None = None) -> RunResult:
    """One row of the study: train with per-epoch checkpoints, then measure train/val/test."""
    logger = get_run_logger()
    train, val, test = (_split(data, chips, s) for s in ("train", "val", "test"))
    store = Registry(registry, storage_options(endpoint_url)).store
    key = f"{experiment.model_name}/_runs/{spec.key(data.fingerprint())}/checkpoint.pt"
    progress = create_progress_artifact(0.0, key=f"train-{spec.name}".lower(), description=f"{spec.name} epochs")

    def on_epoch(record) -> None:
        logger.info("%s epoch %d/%d: train loss %.4f acc %.4f | val loss %.4f acc %.4f | %.1fs, %.0f img/s",
                    spec.name, record.epoch, spec.epochs, record.train_loss, record.train_acc,
                    record.val_loss, record.val_acc, record.seconds, record.images_per_second)
        update_progress_artifact(progress, 100.0 * record.epoch / spec.epochs)

    result = fit(spec, train, val, store, key, device=device, workers=experiment.workers, on_epoch=on_epoch,
                 init_state=init_state, logger=logger)
    create_table_artifact([r.__dict__ for r in result.history], key=f"epochs-{spec.name}".lower(),
                          description=f"{spec.name}: loss and accuracy per epoch")
    criterion = torch.nn.CrossEntropyLoss()
    preset = eval_preset(spec.image_size)
    measured = {}
    for name, (x, y) in (("train", train), ("val", val), ("test", test)):
        loader = make_loader(x, y, preset, spec.batch_size * 2, False, experiment.workers, spec.seed, device)
        _, acc, logits, labels = evaluate(result.model, loader, criterion, device)
        measured[name] = (acc, logits, labels)
    final = result.history[-1]
    # The study's acc_train is the accuracy during the training epoch (augmented images).
    test_report = classification_report(measured["test"][2], calibrate(measured["test"][1], 1.0))
    epochs_run = result.history[result.resumed_from:] or result.history
    return RunResult(
        name=spec.name, arch=spec.arch, acc_train=final.train_acc, acc_val=measured["val"][0],
        acc_test=measured["test"][0], gap=final.train_acc - measured["val"][0], test=test_report,
        val_logits=measured["val"][1], val_labels=measured["val"][2], test_logits=measured["test"][1],
        test_labels=measured["test"][2], history=[h.__dict__ for h in result.history],
        seconds_per_epoch=float(np.mean([h.seconds for h in epochs_run])),
        images_per_second=float(np.mean([h.images_per_second for h in epochs_run])),
        state_dict={k: v.detach().cpu() for k, v in result.model.state_dict().items()})


@task(name="publish-results", cache_policy=NO_CACHE)
def publish_results(results: list[RunResult], experiment: Experiment) -> None:
    rows = []
    for r in results:
        row = r.row()
        reference = experiment.reference.get(r.name, {})
        row["study_acc_train"] = reference.get("acc_train")
        row["study_acc_val"] = reference.get("acc_val")
        rows.append(row)
    create_table_artifact(rows, key="experiment-results",
                          description=f"{experiment.name}: the study's table, extended")
    get_run_logger().info("results:\n%s", "\n".join(json.dumps(r) for r in rows))


@task(name="register-winner", cache_policy=NO_CACHE)
def register_winner(winner: RunResult, why: str, results: list[RunResult], experiment: Experiment,
                    data: LabelledSet, chips: ChipSet, registry: str | None, endpoint_url: str | None,
                    config_text: str) -> str:
    """Calibrate on validation, write weights, card and report files as a new version."""
    reg = Registry(registry, storage_options(endpoint_url))
    temperature, threshold = calibration_for(winner, experiment.target_coverage)
    spec = next(s for s in experiment.runs if s.name == winner.name)
    buffer = io.BytesIO()
    torch.save(winner.state_dict, buffer)
    weights = buffer.getvalue()
    test_x, test_y = _split(data, chips, "test")
    p_test = calibrate(winner.test_logits, temperature)
    calibrated = classification_report(winner.test_labels, p_test, threshold)
    card = {
        "arch": spec.arch, "format": "torch", "weights": "model.pt",
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
        "framing": experiment.framing.to_dict(), "class_order": ["female", "male"],
        "dropout": spec.dropout, "calibration": {"temperature": temperature, "fitted_on": "val"},
        "abstain_threshold": threshold, "target_coverage": experiment.target_coverage,
        "initial_weights": spec.pretrained,
        "training": {"experiment": experiment.name, "run": spec.__dict__, "config": experiment.raw},
        "data": {"format": experiment.data_format, "fingerprint": data.fingerprint(),
                 "images": len(data.images), "faces_used": int(len(chips.kept)),
                 "splits": {s: int((data.split == s).sum()) for s in ("train", "val", "test")}},
        "metrics": {"acc_train": winner.acc_train, "acc_val": winner.acc_val, "acc_test": winner.acc_test,
                    "test": calibrated},
        "selection": why,
    }
    versions = reg.versions(experiment.model_name)
    version = str(max((int(v) for v in versions if v.isdigit()), default=0) + 1)
    files = {"model.pt": weights, "config.yaml": config_text.encode(),
             "report/results.json": results_json(results, winner, why, {"temperature": temperature,
                                                                         "abstain_threshold": threshold}),
             "report/confusion_matrix.png": plot_confusion(calibrated["confusion_matrix"], f"{winner.name} (test)"),
             "report/learning_curves.png": plot_curves(results),
             "report/faces.png": plot_face_grid(test_x[:12], test_y[:12], p_test[:12])}
    reg.register(experiment.model_name, version, card, files)
    for name in files:
        if name.startswith("report/"):
            create_link_artifact(reg.store.full_url(f"{experiment.model_name}/{version}/{name}"),
                                 link_text=name, key=name.replace("report/", "report-").replace(".", "-").replace("_", "-"))
    get_run_logger().info("registered %s@%s (temperature %.3f, abstain below %.3f)", experiment.model_name,
                          version, temperature, threshold)
    create_markdown_artifact(
        f"## Registered {experiment.model_name}@{version}\n\n{why}\n\n"
        f"Temperature {temperature:.3f}, abstain below {threshold:.3f} "
        f"(target coverage {experiment.target_coverage:.0%}).\n\n"
        f"Report files: `{reg.url}/{experiment.model_name}/{version}/report/`",
        key="registered-model", description="the winner of this retraining run")
    return version


@task(name="promotion-gate", cache_policy=NO_CACHE)
def promotion_gate(experiment: Experiment, version: str, data: LabelledSet, registry: str | None,
                   endpoint_url: str | None, device: str) -> dict:
    """Promote only when the new version beats production on the same test images."""
    logger = get_run_logger()
    reg = Registry(registry, storage_options(endpoint_url))
    options = storage_options(endpoint_url)
    test = data.subset(data.indices("test"))
    candidate = evaluate_predictor(reg.load_predictor(ModelRef(experiment.model_name, version), device),
                                   test, options=options)
    current = evaluate_predictor(reg.load_predictor(ModelRef(experiment.model_name), device), test,
                                 options=options)
    decision = decide_promotion(candidate, current)
    if decision["promote"]:
        reg.set_alias(experiment.model_name, version, decision["reason"])
    reg.store.write_atomic(f"{experiment.model_name}/{version}/promotion.json",
                           json.dumps(decision, indent=2, default=float).encode())
    logger.info(decision["reason"])
    create_markdown_artifact(f"## Promotion\n\n{decision['reason']}", key="promotion",
                             description="promotion decision")
    return decision


def decide_promotion(candidate: dict, current: dict) -> dict:
    """Strictly better accuracy on the same images, else keep production."""
    promote = candidate["accuracy"] > current["accuracy"]
    verb = "promoted" if promote else "not promoted"
    reason = (f"{candidate['model']} {verb}: test accuracy {candidate['accuracy']:.4f} "
              f"vs production {current['model']} {current['accuracy']:.4f} on the same "
              f"{candidate['images']} held-out images")
    return {"promote": promote, "reason": reason, "candidate": candidate, "production": current,
            "decided_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
