"""Training: flat and explicit, after torchvision's references/classification.

`fit` runs one configuration epoch by epoch, writes a checkpoint after each to the
registry, and resumes from the last one when run again with the same inputs.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from gender_pipeline.lake.storage import Store
from gender_pipeline.models.networks import build_network
from gender_pipeline.models.predictor import autocast  # bf16 on CUDA (no loss scaling needed), fp32 on the CPU
from gender_pipeline.models.presets import eval_preset, train_preset
from gender_pipeline.runtime.processes import quiet_worker
from gender_pipeline.runtime.stopping import STOP

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSpec:
    """One training run of the experiment (one row of the study's table)."""

    name: str
    arch: str
    lr: float
    epochs: int
    image_size: int
    batch_size: int
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    freeze: tuple[str, ...] = ()
    dropout: float = 0.0
    pretrained: str = "none"
    seed: int = 0

    def key(self, data_fingerprint: str) -> str:
        """Same spec and same data: same key, so a rerun resumes its checkpoint."""
        text = json.dumps({**asdict(self), "data": data_fingerprint}, sort_keys=True)
        return f"{self.name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    seconds: float
    images_per_second: float


@dataclass
class FitResult:
    spec: RunSpec
    model: nn.Module
    history: list[EpochRecord] = field(default_factory=list)
    resumed_from: int = 0


class ChipDataset(Dataset):
    """Aligned uint8 chips and labels, transformed on the fly."""

    def __init__(self, chips: np.ndarray, labels: np.ndarray, transform) -> None:
        self.chips, self.labels, self.transform = chips, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.transform(Image.fromarray(self.chips[index])), int(self.labels[index])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _init_loader_worker(_worker_id: int, parent_pid: int) -> None:
    quiet_worker(parent_pid)  # ends with the run, and leaves stopping to it


def make_loader(chips, labels, transform, batch_size: int, shuffle: bool, workers: int, seed: int,
                device: str) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(ChipDataset(chips, labels, transform), batch_size=batch_size, shuffle=shuffle,
                      num_workers=workers, generator=generator, pin_memory=device.startswith("cuda"),
                      persistent_workers=False, drop_last=False,
                      worker_init_fn=partial(_init_loader_worker, parent_pid=os.getpid()) if workers else None)


def _batches(loader, device: str):
    """Batches on the device: non-blocking copies from pinned memory, channels_last on CUDA.
    Between batches, a run that was asked to stop stops (the epoch in progress is dropped;
    the last complete epoch's checkpoint stays)."""
    cuda = device.startswith("cuda")
    for images, targets in loader:
        STOP.check()
        images = images.to(device, non_blocking=cuda)
        targets = targets.to(device, non_blocking=cuda)
        if cuda:
            images = images.contiguous(memory_format=torch.channels_last)
        yield images, targets


def train_one_epoch(model, loader, criterion, optimizer, device: str) -> tuple[float, float, int]:
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    for images, targets in _batches(loader, device):
        with autocast(device):
            outputs = model(images)
            loss = criterion(outputs.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(targets)
        correct += (outputs.argmax(1) == targets).sum().item()
        seen += len(targets)
    return total_loss / max(seen, 1), correct / max(seen, 1), seen


@torch.inference_mode()
def evaluate(model, loader, criterion, device: str) -> tuple[float, float, np.ndarray, np.ndarray]:
    """Loss, accuracy, male logit (male minus female) and labels over a loader."""
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    logits, labels = [], []
    for images, targets in _batches(loader, device):
        with autocast(device):
            outputs = model(images).float()
        total_loss += criterion(outputs, targets).item() * len(targets)
        correct += (outputs.argmax(1) == targets).sum().item()
        seen += len(targets)
        logits.append((outputs[:, 1] - outputs[:, 0]).cpu().numpy())
        labels.append(targets.cpu().numpy())
    return (total_loss / max(seen, 1), correct / max(seen, 1),
            np.concatenate(logits) if logits else np.zeros(0), np.concatenate(labels) if labels else np.zeros(0))


def load_compatible(model: nn.Module, state: dict) -> None:
    """Start from another run's weights; a head with or without dropout maps either way
    (`fc.weight` <-> `fc.1.weight`, `classifier.6.weight` <-> `classifier.6.1.weight`)."""
    expected = model.state_dict()
    mapped = {}
    for key, value in state.items():
        if key in expected:
            mapped[key] = value
            continue
        head, _, leaf = key.rpartition(".")
        for candidate in (f"{head}.1.{leaf}", key.replace(".1.", ".", 1)):
            if candidate in expected:
                mapped[candidate] = value
                break
    missing = set(expected) - set(mapped)
    if missing:
        raise ValueError(f"initial weights do not fit the network: missing {sorted(missing)[:3]}")
    model.load_state_dict(mapped)


def _optimizer(spec: RunSpec, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if spec.optimizer == "adam":
        return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay)
    if spec.optimizer == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    raise ValueError(f"optimizer must be adam or sgd, got {spec.optimizer!r}")


def _save(store: Store, key: str, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    store.write_atomic(key, buffer.getvalue())


def _load(store: Store, key: str) -> dict | None:
    try:
        data = store.read(key)
    except FileNotFoundError:
        return None
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


@dataclass(frozen=True)
class Checkpoint:
    """Where a run's checkpoint lives: `key` in `store` (written after every epoch)."""

    store: Store
    key: str


@dataclass(frozen=True)
class FitOptions:
    """How a run trains: its device and DataLoader workers, the weights it starts from
    (`init_state`, e.g. the base ResNet18's for the tuned one), and `stop_after` epochs in
    this call (tests use it to simulate an interruption)."""

    device: str = "cpu"
    workers: int = 0
    init_state: dict | None = None
    stop_after: int | None = None


def fit(spec: RunSpec, train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
        checkpoint: Checkpoint, options: FitOptions = FitOptions(),
        on_epoch: Callable[[EpochRecord], None] | None = None,
        logger: logging.Logger | logging.LoggerAdapter = log) -> FitResult:
    """Train `spec` on chips, checkpointing each epoch.

    Every epoch's randomness (shuffle, augmentation, dropout) is seeded from the spec's
    seed and the epoch number, so a resumed run gives the same result as one that never
    stopped.
    """
    device, workers, init_state, stop_after = options.device, options.workers, options.init_state, options.stop_after
    checkpoints, checkpoint_key = checkpoint.store, checkpoint.key
    seed_everything(spec.seed)
    model = build_network(spec.arch, num_classes=2, dropout=spec.dropout, freeze=spec.freeze,
                          pretrained=spec.pretrained)
    if init_state is not None:
        load_compatible(model, init_state)
    model = model.to(device)
    if device.startswith("cuda"):
        model = model.to(memory_format=torch.channels_last)
    optimizer = _optimizer(spec, model)
    criterion = nn.CrossEntropyLoss()
    result = FitResult(spec, model)

    state = _load(checkpoints, checkpoint_key)
    if state is not None and state.get("spec") == asdict(spec):
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        result.history = [EpochRecord(**r) for r in state["history"]]
        result.resumed_from = len(result.history)
        logger.info("%s: resuming after epoch %d from %s", spec.name, result.resumed_from, checkpoint_key)

    val_loader = make_loader(*val, eval_preset(spec.image_size), spec.batch_size * 2, False, workers,
                             spec.seed, device)
    ran = 0
    for epoch in range(len(result.history) + 1, spec.epochs + 1):
        if stop_after is not None and ran >= stop_after:
            break
        epoch_seed = spec.seed * 100_003 + epoch
        seed_everything(epoch_seed)
        train_loader = make_loader(*train, train_preset(spec.image_size), spec.batch_size, True, workers,
                                   epoch_seed, device)
        started = time.perf_counter()
        train_loss, train_acc, seen = train_one_epoch(model, train_loader, criterion, optimizer, device)
        train_seconds = time.perf_counter() - started
        val_loss, val_acc, _, _ = evaluate(model, val_loader, criterion, device)
        record = EpochRecord(epoch, train_loss, train_acc, val_loss, val_acc,
                             round(time.perf_counter() - started, 3), round(seen / max(train_seconds, 1e-9), 2))
        result.history.append(record)
        _save(checkpoints, checkpoint_key, {"spec": asdict(spec), "model": model.state_dict(),
                                            "optimizer": optimizer.state_dict(),
                                            "history": [asdict(r) for r in result.history]})
        ran += 1
        if on_epoch:
            on_epoch(record)
    return result
