"""Prefect tasks for the retrain flow, wrapping models.datasets/chips/train/experiment."""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass

import numpy as np
import torch
from prefect import get_run_logger, task
from prefect.artifacts import (create_link_artifact, create_markdown_artifact, create_progress_artifact,
                               create_table_artifact, update_progress_artifact)
from prefect.cache_policies import NO_CACHE

from gender_pipeline.models.chips import ChipSet, cached_parts, check_skipped, extract_chips
from gender_pipeline.models.datasets import DatasetError, LabelledSet, dataset_ages, load_dataset
from gender_pipeline.models.dlib_resnet import BLOCKS, load_dlib_face_resnet
from gender_pipeline.models.experiment import (AgeResult, Experiment, RunResult, age_metrics, calibration_for, decide_promotion,
                               evaluate_predictor,
                               metrics_report, plot_age, plot_calibration, plot_confusion, plot_curves,
                               plot_face_grid, results_json)
from gender_pipeline.models.face_attributes import KIND as ATTRIBUTES_KIND
from gender_pipeline.models.face_attributes import FORMAT as ATTRIBUTES_FORMAT
from gender_pipeline.models.face_attributes import (AGES, ATTRIBUTES, AttributeSpec, Inputs, band_answers, band_threshold, cached_views,
                                    fit_age_temperature, fit_attributes, predict_inputs, softmax, split_metrics)
from gender_pipeline.models.face_embedding import BACKBONE, Embedder, Embeddings, HeadSpec, embed_dataset, fit_head, head_logits
from gender_pipeline.models.face_embedding import FORMAT as EMBEDDING_FORMAT
from gender_pipeline.models.face_embedding import KIND as EMBEDDING_KIND
from gender_pipeline.models.metrics import classification_report
from gender_pipeline.models.networks import build_network
from gender_pipeline.models.predictor import calibrate
from gender_pipeline.models.registry import BASELINE_NAME, BASELINE_VERSION, ModelRef, Registry
from gender_pipeline.models.train import evaluate, fit, make_loader
from gender_pipeline.models.presets import eval_preset
from gender_pipeline.lake.answers import AGE_BANDS
from gender_pipeline.lake.storage import Stores


@task(name="check-pretrained-weights", cache_policy=NO_CACHE)
def check_pretrained_weights(experiment: Experiment) -> None:
    """Fail at the start, not after hours, when ImageNet weights are asked for but absent."""
    for spec in experiment.runs:
        if spec.pretrained != "none":
            build_network(spec.arch, pretrained=spec.pretrained)
    get_run_logger().info("initial weights: %s", {s.name: s.pretrained for s in experiment.runs})


@task(name="load-labelled-dataset", cache_policy=NO_CACHE)
def load_labelled_dataset(url: str, experiment: Experiment, endpoint_url: str | None) -> LabelledSet:
    data = load_dataset(url, experiment.data_format, Stores(endpoint_url).options, ratios=experiment.split,
                        seed=experiment.data_seed, sample_size=experiment.sample_size)
    if experiment.kind == ATTRIBUTES_KIND:  # it learns age: say so before any work if the labels have none
        ages = dataset_ages(data)
        if ages is None:
            raise DatasetError(f"a {ATTRIBUTES_KIND} model learns age: {url} has no age column "
                               f"(a manifest's labels.csv needs image,gender,age)")
        if not (ages >= 0).any():
            raise DatasetError(f"{url}: the age column is empty for every image")
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

    chips = extract_chips(data, experiment.framing, Stores(endpoint_url).options, progress=progress)
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
    store = Registry(registry, Stores(endpoint_url).options).store
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
        state_dict={k: v.detach().cpu() for k, v in result.model.state_dict().items()},
        test_index=chips.kept[data.split[chips.kept] == "test"], spec=dict(spec.__dict__))


@task(name="embed-training-faces", cache_policy=NO_CACHE)
def embed_faces(data: LabelledSet, experiment: Experiment, registry: str | None, endpoint_url: str | None,
                device: str) -> Embeddings:
    """Every training image through the face front end and the backbone, once per dataset:
    the outputs are kept in the registry's run folder part by part (a stopped run resumes
    at the first missing part; a rerun on the same data reads them back)."""
    logger = get_run_logger()
    reg = Registry(registry, Stores(endpoint_url).options)
    settings = experiment.embedding
    backbone = load_dlib_face_resnet()
    shipped = (reg.load_predictor(ModelRef(BASELINE_NAME, BASELINE_VERSION), device="cpu")
               if settings.stack_shipped_logit else None)
    embedder = Embedder(backbone, settings, experiment.framing, device, shipped)
    key = hashlib.sha256(json.dumps({"data": data.fingerprint(), "framing": experiment.framing.to_dict(),
                                     "backbone": backbone.dat_sha256, "frozen_blocks": settings.frozen_blocks,
                                     "flip": settings.flip_average, "shipped": settings.stack_shipped_logit},
                                    sort_keys=True).encode()).hexdigest()[:16]
    folder = f"{experiment.model_name}/_runs/embeddings-{key}"
    artifact = create_progress_artifact(0.0, key="embedding-progress", description="training images embedded")
    started = time.perf_counter()

    def progress(done: int, total: int) -> None:
        update_progress_artifact(artifact, 100.0 * done / max(total, 1))
        logger.info("embedded %d/%d images (%.1f images/s)", done, total, done / max(time.perf_counter() - started, 1e-9))

    logger.info("backbone %s on %s; outputs kept in %s/%s", BACKBONE, device, reg.url, folder)
    embeddings, skipped = embed_dataset(data, experiment.framing, embedder, reg.store, folder,
                                        Stores(endpoint_url).options, experiment.workers,
                                        batch_size=experiment.batch_size, progress=progress)
    check_skipped(skipped, len(data.images), 0.1)
    logger.info("%d/%d images gave a face (skipped: %s)", len(embeddings.index), len(data.images),
                dict(skipped) or "none")
    return embeddings


@dataclass
class AttributeData:
    """The faces of each split as the attribute training reads them."""

    splits: dict[str, tuple[Inputs, np.ndarray, np.ndarray, np.ndarray]]  # inputs, male, ages (-1: none), index
    faces: int


@task(name="cache-training-faces", cache_policy=NO_CACHE)
def cache_attribute_inputs(data: LabelledSet, experiment: Experiment, registry: str | None,
                           endpoint_url: str | None, device: str) -> AttributeData:
    """Every training image through the face front end once, and on the CPU way of
    training through the frozen blocks too (the chip, its mirror and augmented views of the
    training faces): kept in the registry's run folder part by part, so a stopped run
    resumes and a rerun on the same data reads them back."""
    logger = get_run_logger()
    ages = dataset_ages(data)  # checked when the dataset was loaded
    reg = Registry(registry, Stores(endpoint_url).options)
    settings = experiment.backbone
    backbone = load_dlib_face_resnet().eval().to(device)
    key = hashlib.sha256(json.dumps({"data": data.fingerprint(), "framing": experiment.framing.to_dict(),
                                     "backbone": backbone.dat_sha256, "settings": settings.to_dict()},
                                    sort_keys=True).encode()).hexdigest()[:16]
    folder = f"{experiment.model_name}/_runs/attributes-{key}"
    artifact = create_progress_artifact(0.0, key="caching-progress", description="training images prepared")
    started = time.perf_counter()

    def compute(indices: np.ndarray, chips: np.ndarray) -> dict:
        if not settings.cached:
            return {"chips": chips}
        return cached_views(backbone, settings, chips, data.split[indices] == "train", device,
                            experiment.batch_size, seed=int(indices[0]))

    def progress(done: int, total: int) -> None:
        update_progress_artifact(artifact, 100.0 * done / max(total, 1))
        logger.info("prepared %d/%d images (%.1f images/s)", done, total,
                    done / max(time.perf_counter() - started, 1e-9))

    what = (f"the output of blocks 1-{settings.train_from} for each chip, its mirror and "
            f"{max(settings.views - 2, 0)} augmented views" if settings.cached and settings.train_from
            else "the aligned chips")
    logger.info("caching %s in %s/%s", what, reg.url, folder)
    arrays, skipped = cached_parts(data, experiment.framing, compute, reg.store, folder,
                                   Stores(endpoint_url).options, experiment.workers,
                                   batch_size=experiment.batch_size, progress=progress)
    check_skipped(skipped, len(data.images), 0.1)
    splits = {}
    for name in ("train", "val", "test"):
        rows = np.flatnonzero(data.split[arrays["index"]] == name)
        index = arrays["index"][rows]
        inputs = (Inputs(base=arrays["base"][rows], extra=arrays["extra"][rows] if name == "train" else None)
                  if settings.cached else Inputs(chips=arrays["chips"][rows]))
        splits[name] = (inputs, data.labels[index], ages[index], index)
    logger.info("%d/%d images gave a face (skipped: %s); %s", len(arrays["index"]), len(data.images),
                dict(skipped) or "none", {k: len(v[3]) for k, v in splits.items()})
    return AttributeData(splits, len(arrays["index"]))


@task(name="train-attribute-model", cache_policy=NO_CACHE)
def train_attributes(spec: AttributeSpec, data: LabelledSet, faces: AttributeData, experiment: Experiment,
                     device: str) -> RunResult:
    """One candidate (one row of the table): the backbone from its chosen block on and both
    heads, early-stopped on validation; measured on train/val/test."""
    logger = get_run_logger()
    settings = experiment.backbone
    backbone = load_dlib_face_resnet()
    progress = create_progress_artifact(0.0, key=f"train-{spec.name}".lower(), description=f"{spec.name} epochs")
    started = time.perf_counter()

    def on_epoch(record: dict) -> None:
        logger.info("%s epoch %d/%d: train loss %.4f acc %.4f MAE %.2f | val acc %.4f MAE %.2f (score %.3f) | %.1f s",
                    spec.name, record["epoch"], spec.epochs, record["train_loss"], record["train_acc"],
                    record["train_mae"], record["val_acc"], record["val_mae"], record["val_score"], record["seconds"])
        update_progress_artifact(progress, 100.0 * record["epoch"] / spec.epochs)

    train, val, test = (faces.splits[name] for name in ("train", "val", "test"))
    fit = fit_attributes(spec, settings, backbone, train[:3], val[:3], device, on_epoch)
    seconds = time.perf_counter() - started
    outputs = {name: predict_inputs(fit.net, part[0], backbone, settings, device)
               for name, part in faces.splits.items()}
    measured = {name: split_metrics(*outputs[name], part[1], part[2]) for name, part in faces.splits.items()}
    best = fit.history[fit.best_epoch - 1]
    logger.info("%s: gender %.4f/%.4f/%.4f, age MAE %.2f/%.2f/%.2f (train/val/test; best epoch %d of %d%s, "
                "%.0f s)", spec.name, *(measured[n]["accuracy"] for n in ("train", "val", "test")),
                *(measured[n]["mae"] for n in ("train", "val", "test")), fit.best_epoch, len(fit.history),
                ", stopped early" if fit.stopped_early else "", seconds)
    create_table_artifact([{k: round(v, 4) if isinstance(v, float) else v for k, v in h.items()} for h in fit.history],
                          key=f"epochs-{spec.name}".lower(), description=f"{spec.name}: loss, accuracy and MAE per epoch")
    return RunResult(
        name=spec.name, arch=f"dlib-face-resnet+attributes (from block {settings.train_from + 1})",
        acc_train=best["train_acc"], acc_val=measured["val"]["accuracy"], acc_test=measured["test"]["accuracy"],
        gap=best["train_acc"] - measured["val"]["accuracy"],
        test=classification_report(test[1], calibrate(outputs["test"][0], 1.0)),
        val_logits=outputs["val"][0], val_labels=val[1], test_logits=outputs["test"][0], test_labels=test[1],
        history=[{**h, "val_loss": h["val_score"]} for h in fit.history],
        seconds_per_epoch=seconds / max(len(fit.history), 1),
        images_per_second=len(train[3]) * len(fit.history) / max(seconds, 1e-9),
        state_dict={k: v.detach().cpu() for k, v in fit.net.state_dict().items()},
        test_index=test[3], spec=spec.to_dict(),
        age=AgeResult(mae_train=measured["train"]["mae"], mae_val=measured["val"]["mae"],
                      mae_test=measured["test"]["mae"], val_logits=outputs["val"][1], val_ages=val[2],
                      test_logits=outputs["test"][1], test_ages=test[2], best_epoch=fit.best_epoch))


@task(name="train-head", cache_policy=NO_CACHE)
def train_head(spec: HeadSpec, data: LabelledSet, embeddings: Embeddings, experiment: Experiment,
               device: str) -> RunResult:
    """One candidate head (one row of the table): trained on train, measured on train/val/test."""
    logger = get_run_logger()
    settings = experiment.embedding
    parts = {name: embeddings.take(np.flatnonzero(data.split[embeddings.index] == name))
             for name in ("train", "val", "test")}
    labelled = {name: (part, data.labels[part.index]) for name, part in parts.items()}
    started = time.perf_counter()

    def on_epoch(record: dict) -> None:
        logger.info("%s epoch %d: train loss %.4f acc %.4f | val loss %.4f acc %.4f", spec.name, record["epoch"],
                    record["train_loss"], record["train_acc"], record["val_loss"], record["val_acc"])

    fit = fit_head(spec, settings, load_dlib_face_resnet(), labelled["train"], labelled["val"], device, on_epoch)
    seconds = time.perf_counter() - started
    logits = {name: head_logits(fit.head, part, settings, device) for name, part in parts.items()}
    accuracy = {name: float(((logits[name] >= 0).astype(int) == labelled[name][1]).mean()) for name in parts}
    logger.info("%s: train %.4f, val %.4f, test %.4f (best epoch %d, %.1f s)", spec.name, accuracy["train"],
                accuracy["val"], accuracy["test"], fit.best_epoch, seconds)
    return RunResult(
        name=spec.name, arch=f"dlib-face-resnet+{spec.kind}", acc_train=accuracy["train"], acc_val=accuracy["val"],
        acc_test=accuracy["test"], gap=accuracy["train"] - accuracy["val"],
        test=classification_report(labelled["test"][1], calibrate(logits["test"], 1.0)),
        val_logits=logits["val"], val_labels=labelled["val"][1], test_logits=logits["test"],
        test_labels=labelled["test"][1], history=fit.history,
        seconds_per_epoch=seconds / max(len(fit.history), 1),
        images_per_second=len(parts["train"].index) * len(fit.history) / max(seconds, 1e-9),
        state_dict={k: v.detach().cpu() for k, v in fit.head.state_dict().items()},
        test_index=parts["test"].index, spec=spec.to_dict())


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


def _model_card(winner: RunResult, experiment: Experiment) -> tuple[str, dict]:
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


@task(name="register-winner", cache_policy=NO_CACHE)
def register_winner(winner: RunResult, why: str, results: list[RunResult], experiment: Experiment,
                    data: LabelledSet, faces_used: int, registry: str | None, endpoint_url: str | None,
                    config_text: str) -> str:
    """Calibrate on validation, write weights, card and report files as a new version. The
    report holds calibration (ECE, coverage at the threshold) and accuracy per group."""
    logger = get_run_logger()
    options = Stores(endpoint_url).options
    reg = Registry(registry, options)
    temperature, threshold = calibration_for(winner, experiment.target_coverage)
    buffer = io.BytesIO()
    torch.save(winner.state_dict, buffer)
    weights = buffer.getvalue()
    weights_name, model_entries = _model_card(winner, experiment)
    p_test = calibrate(winner.test_logits, temperature)
    calibrated = metrics_report(data, winner.test_index, p_test, threshold)
    age_entries = {}
    if winner.age is not None:  # the age distribution's temperature and the band threshold, on val
        age_temperature = fit_age_temperature(winner.age.val_logits, winner.age.val_ages)
        _, _, val_confidence = band_answers(softmax(winner.age.val_logits, age_temperature), AGES)
        age_threshold = band_threshold(val_confidence, experiment.age_target_coverage)
        years, _, confidence = band_answers(softmax(winner.age.test_logits, age_temperature), AGES)
        calibrated["age"] = age_metrics(data, winner.test_index, dataset_ages(data), years, confidence, age_threshold)
        age_entries = {"age": {"temperature": age_temperature, "abstain_threshold": age_threshold,
                               "target_coverage": experiment.age_target_coverage, "bins": len(AGES),
                               "bands": list(AGE_BANDS), "fitted_on": "val"}}
    card = {
        **model_entries, "weights": weights_name, "weights_sha256": hashlib.sha256(weights).hexdigest(),
        "framing": experiment.framing.to_dict(), "class_order": ["female", "male"],
        "calibration": {"temperature": temperature, "fitted_on": "val"},
        "abstain_threshold": threshold, "target_coverage": experiment.target_coverage, **age_entries,
        "training": {"experiment": experiment.name, "kind": experiment.kind, "run": winner.spec,
                     "config": experiment.raw},
        "data": {"format": experiment.data_format, "fingerprint": data.fingerprint(),
                 "images": len(data.images), "faces_used": int(faces_used),
                 "splits": {s: int((data.split == s).sum()) for s in ("train", "val", "test")}},
        "metrics": {"acc_train": winner.acc_train, "acc_val": winner.acc_val, "acc_test": winner.acc_test,
                    "test": calibrated},
        "selection": why,
    }
    # The face grid shows what the version itself answers, through the scoring path.
    sample = data.subset(winner.test_index[:12])
    grid = extract_chips(sample, experiment.framing, options, workers=0, max_skipped=1.0)
    shown = reg.predictor_from_card(card, weights, device="cpu").predict(grid.chips)
    versions = reg.versions(experiment.model_name)
    version = str(max((int(v) for v in versions if v.isdigit()), default=0) + 1)
    sample_ages = dataset_ages(sample)
    files = {weights_name: weights, "config.yaml": config_text.encode(),
             "report/results.json": results_json(results, winner, why, {
                 "temperature": temperature, "abstain_threshold": threshold, "winner_test": calibrated,
                 **age_entries}),
             "report/confusion_matrix.png": plot_confusion(calibrated["confusion_matrix"], f"{winner.name} (test)"),
             "report/learning_curves.png": plot_curves(results),
             "report/faces.png": plot_face_grid(grid.chips, sample.labels[grid.kept], shown.p_male,
                                                ages=shown.age_years, bands=shown.age_band,
                                                band_confidence=shown.age_confidence,
                                                true_ages=None if sample_ages is None else sample_ages[grid.kept])}
    if winner.age is not None:
        files["report/age.png"] = plot_age(winner.age.test_ages, years, calibrated["age"], f"{winner.name} (test)")
        files["report/calibration.png"] = plot_calibration(winner.test_labels, p_test, winner.age.test_ages, years,
                                                           confidence)
    reg.register(experiment.model_name, version, card, files)
    for name in files:
        if name.startswith("report/"):
            create_link_artifact(reg.store.full_url(f"{experiment.model_name}/{version}/{name}"),
                                 link_text=name, key=name.replace("report/", "report-").replace(".", "-").replace("_", "-"))
    logger.info("registered %s@%s (temperature %.3f, abstain below %.3f)", experiment.model_name,
                version, temperature, threshold)
    fairness = [{"column": column, "group": group, "accuracy": round(v["accuracy"], 4), "faces": v["count"]}
                for column, report in calibrated["groups"].items() for group, v in report["groups"].items()]
    if fairness:
        create_table_artifact(fairness, key="fairness", description=f"{experiment.model_name}@{version}: "
                              "test accuracy per group")
    gaps = "; ".join(f"{column} {report['max_gap']:.3f}" for column, report in calibrated["groups"].items())
    create_markdown_artifact(
        f"## Registered {experiment.model_name}@{version}\n\n{why}\n\n"
        f"Test accuracy {calibrated['accuracy']:.4f}, ROC-AUC {calibrated['roc_auc']:.4f}, "
        f"ECE {calibrated['ece']:.4f}; coverage {calibrated['coverage']:.3f} at the abstain threshold, "
        f"accuracy {calibrated['accuracy_when_answering']:.4f} when answering.\n\n"
        f"Largest accuracy gap between groups (of at least 20 faces): {gaps or 'no group columns'}.\n\n"
        f"Temperature {temperature:.3f}, abstain below {threshold:.3f} "
        f"(target coverage {experiment.target_coverage:.0%}).\n\n"
        f"Report files: `{reg.url}/{experiment.model_name}/{version}/report/`",
        key="registered-model", description="the winner of this retraining run")
    return version


@task(name="promotion-gate", cache_policy=NO_CACHE)
def promotion_gate(experiment: Experiment, version: str, data: LabelledSet, registry: str | None,
                   endpoint_url: str | None, device: str) -> dict:
    """Promote only when, on the same test images, no attribute of production gets worse
    beyond noise and one gets better (or is new): models.experiment.decide_promotion."""
    logger = get_run_logger()
    reg = Registry(registry, Stores(endpoint_url).options)
    options = Stores(endpoint_url).options
    test = data.subset(data.indices("test"))
    candidate = evaluate_predictor(reg.load_predictor(ModelRef(experiment.model_name, version), device),
                                   test, options=options, keep_faces=True)
    current = evaluate_predictor(reg.load_predictor(ModelRef(experiment.model_name), device), test,
                                 options=options, keep_faces=True)
    decision = decide_promotion(candidate, current)
    if decision["promote"]:
        reg.set_alias(experiment.model_name, version, decision["reason"])
    reg.store.write_atomic(f"{experiment.model_name}/{version}/promotion.json",
                           json.dumps(decision, indent=2, default=float).encode())
    logger.info(decision["reason"])
    create_markdown_artifact(f"## Promotion\n\n{decision['reason']}", key="promotion",
                             description="promotion decision")
    return decision
