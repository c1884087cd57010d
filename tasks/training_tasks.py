"""Prefect tasks for the retrain flow, wrapping models.datasets/chips/train/experiment."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

import numpy as np
import torch
from prefect import get_run_logger, task
from prefect.artifacts import (create_link_artifact, create_markdown_artifact, create_progress_artifact,
                               create_table_artifact, update_progress_artifact)
from prefect.cache_policies import NO_CACHE

from gender_pipeline.models.chips import ChipSet, Parts, Reading, cached_parts, check_skipped, extract_chips
from gender_pipeline.models.datasets import DatasetError, LabelledSet, dataset_ages, load_dataset
from gender_pipeline.models.dlib_resnet import load_dlib_face_resnet
from gender_pipeline.models.experiment import AgeResult, Experiment, RunResult, evaluate_predictor
from gender_pipeline.models.face_attributes import (AttributeSpec, Inputs, KIND as ATTRIBUTES_KIND, cached_views,
                                                    fit_attributes, predict_inputs, split_metrics)
from gender_pipeline.models.face_embedding import (BACKBONE, Embedder, Embeddings, HeadSpec, KIND as EMBEDDING_KIND,
                                                   embed_dataset, fit_head, head_logits)
from gender_pipeline.models.metrics import MIN_GROUP, classification_report, group_figures, group_lines
from gender_pipeline.models.networks import build_network
from gender_pipeline.models.predictor import calibrate
from gender_pipeline.models.presets import eval_preset
from gender_pipeline.models.promotion import decide_promotion
from gender_pipeline.models.registration import Winner, register_version
from gender_pipeline.models.registry import BASELINE_NAME, BASELINE_VERSION, ModelRef, PRODUCTION_MODEL
from gender_pipeline.models.retrain_options import TrainingRun
from gender_pipeline.models.train import Checkpoint, FitOptions, evaluate, fit, make_loader


@task(name="check-pretrained-weights", cache_policy=NO_CACHE)
def check_pretrained_weights(experiment: Experiment) -> None:
    """Fail at the start, not after hours, when ImageNet weights are asked for but absent."""
    for spec in experiment.runs:
        if spec.pretrained != "none":
            build_network(spec.arch, pretrained=spec.pretrained)
    get_run_logger().info("initial weights: %s", {s.name: s.pretrained for s in experiment.runs})


@task(name="load-labelled-dataset", cache_policy=NO_CACHE)
def load_labelled_dataset(run: TrainingRun, url: str) -> LabelledSet:
    experiment = run.experiment
    data = load_dataset(url, experiment.data_format, run.stores.options, ratios=experiment.split,
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
def align_faces(run: TrainingRun, data: LabelledSet) -> ChipSet:
    logger = get_run_logger()
    artifact = create_progress_artifact(0.0, key="face-alignment-progress", description="images aligned")

    def progress(done: int, total: int) -> None:
        update_progress_artifact(artifact, 100.0 * done / max(total, 1))
        if done == total or done % 1024 < 64:
            logger.info("aligned %d/%d images", done, total)

    chips = extract_chips(data, run.experiment.framing, run.stores.options, progress=progress)
    logger.info(chips.summary())
    return chips


def _reading(run: TrainingRun) -> Reading:
    """How this run reads and aligns its dataset's images."""
    return Reading(run.stores.options, run.experiment.workers, run.experiment.batch_size)


def _split(data: LabelledSet, chips: ChipSet, name: str) -> tuple[np.ndarray, np.ndarray]:
    mask = data.split[chips.kept] == name
    return chips.chips[mask], data.labels[chips.kept][mask]


@task(name="train-run", cache_policy=NO_CACHE)
def train_run(run: TrainingRun, spec, data: LabelledSet, chips: ChipSet, init_state: dict | None = None) -> RunResult:
    """One row of the study: train with per-epoch checkpoints, then measure train/val/test."""
    logger = get_run_logger()
    experiment, device = run.experiment, run.device
    train, val, test = (_split(data, chips, s) for s in ("train", "val", "test"))
    store = run.registry.store
    key = f"{experiment.model_name}/_runs/{spec.key(data.fingerprint())}/checkpoint.pt"
    progress = create_progress_artifact(0.0, key=f"train-{spec.name}".lower(), description=f"{spec.name} epochs")

    def on_epoch(record) -> None:
        logger.info("%s epoch %d/%d: train loss %.4f acc %.4f | val loss %.4f acc %.4f | %.1fs, %.0f img/s",
                    spec.name, record.epoch, spec.epochs, record.train_loss, record.train_acc,
                    record.val_loss, record.val_acc, record.seconds, record.images_per_second)
        update_progress_artifact(progress, 100.0 * record.epoch / spec.epochs)

    result = fit(spec, train, val, Checkpoint(store, key), FitOptions(device, experiment.workers, init_state),
                 on_epoch=on_epoch, logger=logger)
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
def embed_faces(run: TrainingRun, data: LabelledSet) -> Embeddings:
    """Every training image through the face front end and the backbone, once per dataset:
    the outputs are kept in the registry's run folder part by part (a stopped run resumes
    at the first missing part; a rerun on the same data reads them back)."""
    logger = get_run_logger()
    experiment, device, reg = run.experiment, run.device, run.registry
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
        logger.info("embedded %d/%d images (%.1f images/s)", done, total,
                    done / max(time.perf_counter() - started, 1e-9))

    logger.info("backbone %s on %s; outputs kept in %s/%s", BACKBONE, device, reg.url, folder)
    embeddings, skipped = embed_dataset(data, experiment.framing, embedder, Parts(reg.store, folder),
                                        _reading(run), progress=progress)
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
def cache_attribute_inputs(run: TrainingRun, data: LabelledSet) -> AttributeData:
    """Every training image through the face front end once, and on the CPU way of
    training through the frozen blocks too (the chip, its mirror and augmented views of the
    training faces): kept in the registry's run folder part by part, so a stopped run
    resumes and a rerun on the same data reads them back."""
    logger = get_run_logger()
    ages = dataset_ages(data)  # checked when the dataset was loaded
    experiment, device, reg = run.experiment, run.device, run.registry
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
    arrays, skipped = cached_parts(data, experiment.framing, compute, Parts(reg.store, folder), _reading(run),
                                   progress=progress)
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
def train_attributes(run: TrainingRun, spec: AttributeSpec, data: LabelledSet, faces: AttributeData) -> RunResult:
    """One candidate (one row of the table): the backbone from its chosen block on and both
    heads, early-stopped on validation; measured on train/val/test."""
    logger = get_run_logger()
    device, settings = run.device, run.experiment.backbone
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
def train_head(run: TrainingRun, spec: HeadSpec, data: LabelledSet, embeddings: Embeddings) -> RunResult:
    """One candidate head (one row of the table): trained on train, measured on train/val/test."""
    logger = get_run_logger()
    device, settings = run.device, run.experiment.embedding
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
def publish_results(run: TrainingRun, results: list[RunResult]) -> None:
    experiment = run.experiment
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
def register_winner(run: TrainingRun, winner: RunResult, why: str, results: list[RunResult], data: LabelledSet,
                    faces_used: int) -> str:
    """Calibrate on validation, write weights, card and report files as a new version
    (models.registration); the report's pictures, the accuracy per group and the
    registration's summary as artifacts."""
    registered = register_version(run, Winner(winner, why, results, faces_used), data)
    name, version, reg = run.experiment.model_name, registered.version, run.registry
    for file in registered.files:
        if file.startswith("report/"):
            create_link_artifact(reg.store.full_url(f"{name}/{version}/{file}"), link_text=file,
                                 key=file.replace("report/", "report-").replace(".", "-").replace("_", "-"))
    get_run_logger().info("registered %s@%s (temperature %.3f, abstain below %.3f)", name, version,
                          registered.temperature, registered.threshold)
    calibrated = registered.test
    fairness = fairness_rows(calibrated)
    if fairness:
        create_table_artifact(fairness, key="fairness",
                              description=f"{name}@{version}: test figures per group, with 95% intervals")
    figures = dict(group_figures(calibrated))
    groups = _bullets(group_lines(figures.get("accuracy", {})))
    age_groups = _bullets(group_lines(figures.get("mae", {}), "mae"))
    create_markdown_artifact(
        f"## Registered {name}@{version}\n\n{why}\n\n"
        f"Test accuracy {calibrated['accuracy']:.4f}, ROC-AUC {calibrated['roc_auc']:.4f}, "
        f"ECE {calibrated['ece']:.4f}; coverage {calibrated['coverage']:.3f} at the abstain threshold, "
        f"accuracy {calibrated['accuracy_when_answering']:.4f} when answering.\n\n"
        f"Gender accuracy per group (95% intervals; the largest gap over groups of at least {MIN_GROUP} faces):\n\n"
        f"{groups or '- no group columns'}\n\n"
        + (f"Age MAE in years per group (95% intervals):\n\n{age_groups}\n\n" if age_groups else "")
        + f"Temperature {registered.temperature:.3f}, abstain below {registered.threshold:.3f} "
        f"(target coverage {run.experiment.target_coverage:.0%}).\n\n"
        f"Report files: `{reg.url}/{name}/{version}/report/`",
        key="registered-model", description="the winner of this retraining run")
    return version


@task(name="promotion-gate", cache_policy=NO_CACHE)
def promotion_gate(run: TrainingRun, version: str, data: LabelledSet) -> dict:
    """Promote only when, on the same test images, no attribute of production gets worse
    beyond noise and one gets better (or is new): models.promotion.decide_promotion."""
    logger = get_run_logger()
    experiment, device, reg, options = run.experiment, run.device, run.registry, run.stores.options
    test = data.subset(data.indices("test"))
    candidate = evaluate_predictor(reg.load_predictor(ModelRef(experiment.model_name, version), device),
                                   test, options=options, keep_faces=True)
    current = evaluate_predictor(reg.load_predictor(ModelRef(PRODUCTION_MODEL), device), test,
                                 options=options, keep_faces=True)
    decision = decide_promotion(candidate, current)
    if decision["promote"]:
        reg.promote(experiment.model_name, version, decision["reason"])
    reg.store.write_atomic(f"{experiment.model_name}/{version}/promotion.json",
                           json.dumps(decision, indent=2, default=float).encode())
    logger.info(decision["reason"])
    tested = [row for row in decision["groups"] if row["tested"]]
    table = "".join(f"| {row['attribute']} | {row['column']} | {row['group']} | {row['faces']} "
                    f"| {row['candidate']:.4f} | {row['production']:.4f} | {row['change']:+.4f} | {row['p']:.3g} "
                    f"| {row['p_holm']:.3g} | {'worse' if row['worse'] else 'no'} |\n" for row in tested)
    create_markdown_artifact(
        f"## Promotion\n\n{decision['reason']}\n\n"
        + (f"Groups of at least {decision['group_rule']['min_faces']} test faces, paired tests, Holm-adjusted:\n\n"
           "| attribute | column | group | faces | candidate | production | change | p | Holm p | blocks |\n"
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n" + table if tested else
           f"No group had {decision['group_rule']['min_faces']} test faces to test."),
        key="promotion", description="promotion decision")
    return decision


def _bullets(lines: list[str]) -> str:
    """metrics.group_lines as a Markdown list (its indented lines one level down)."""
    return "\n".join(f"  - {line.strip()}" if line.startswith("  ") else f"- {line}" for line in lines)


def fairness_rows(report: dict) -> list[dict]:
    """The fairness table: gender accuracy and age MAE per group with their 95% intervals."""
    names = {"accuracy": "gender accuracy", "mae": "age MAE (years)"}
    rows = []
    for metric, part in group_figures(report):
        for column, column_report in part.items():
            for group, v in column_report["groups"].items():
                rows.append({"figure": names[metric], "column": column, "group": group, "value": round(v[metric], 4),
                             "low": round(v["low"], 4), "high": round(v["high"], 4), "faces": v["count"],
                             "note": "too small to compare" if v["too_small"] else ""})
    return rows


def train_candidates(run: TrainingRun, dataset: LabelledSet) -> tuple[list[RunResult], int]:
    """Every candidate of the experiment, by its kind: the fine-tuned face network (gender
    and age), heads on dlib's face embedding, or the study's torchvision networks on
    aligned chips (the tuned ResNet18 starting from the base one). Returns the results and
    how many faces the dataset gave."""
    experiment = run.experiment
    if experiment.kind == ATTRIBUTES_KIND:
        faces = cache_attribute_inputs(run, dataset)
        return [train_attributes(run, spec, dataset, faces) for spec in experiment.candidates], faces.faces
    if experiment.kind == EMBEDDING_KIND:
        embeddings = embed_faces(run, dataset)
        return [train_head(run, spec, dataset, embeddings) for spec in experiment.heads], len(embeddings.index)
    chips = align_faces(run, dataset)
    results, states = [], {}
    for spec in experiment.runs:
        result = train_run(run, spec, dataset, chips, init_state=states.get(experiment.init_from.get(spec.name)))
        states[spec.name] = result.state_dict
        results.append(result)
    return results, len(chips.kept)
