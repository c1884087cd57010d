"""Gender and age from one face: dlib's face-recognition ResNet (models.dlib_resnet)
fine-tuned from a chosen block on, jointly with a gender head and an age head.

The age head gives a distribution over whole years (0..100): trained as label
distribution learning (the target a Gaussian around the true age, `dldl`) or on the
distribution's expectation alone (`l1`); the answer is the expectation, its band the
band with the expectation, and the band's confidence the probability mass of that band
(after a temperature fitted on validation).

Two ways to train, one loop (`fit_attributes`):
- on the CPU, the frozen blocks run once per face: their output is cached for the chip,
  its mirror image and `views - 2` augmented chips (rotation, scale, shift, brightness,
  contrast), and each epoch draws one view per face;
- on a GPU (`views: 0`), every batch is augmented afresh on the device and runs through
  the frozen blocks without gradients, under bf16 autocast, channels_last.
The backbone's own weights are public (CC0) and never copied into a model version; the
fine-tuned blocks and the heads are.
"""

from __future__ import annotations

import copy
import io
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gender_pipeline.models.dlib_resnet import BLOCKS, DlibFaceResNet, FEATURE_SIZE, backbone_for_card
from gender_pipeline.models.metrics import golden_section_minimum
from gender_pipeline.models.predictor import Predictor, autocast, cuda_batch_size, device_batch
from gender_pipeline.runtime.stopping import STOP

KIND = "face-attributes"
FORMAT = "face-attributes"
ATTRIBUTES = ("gender", "age")
AGE_MAX = 100  # the age head's bins: whole years 0..AGE_MAX
AGES = np.arange(AGE_MAX + 1, dtype=np.float64)


@dataclass(frozen=True)
class Augment:
    """Random changes to an aligned chip (all bounded, applied on the chip's own grid)."""

    rotation_degrees: float = 10.0
    scale: float = 0.07  # zoom in or out by up to this fraction
    shift: float = 0.05  # of the chip's half-width
    brightness: float = 0.2
    contrast: float = 0.2
    flip: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class AttributeSettings:
    """How the backbone is used and trained: the same at training and scoring (in the card)."""

    train_from: int = 10  # the first backbone block trained; the ones before it stay as dlib made them
    views: int = 4  # CPU: cached views per training face (chip, mirror, augmented); 0: augment every batch
    flip_average: bool = True  # average the answers for the chip and its mirror image
    augment: Augment = field(default_factory=Augment)

    def __post_init__(self) -> None:
        if not 0 <= self.train_from < len(BLOCKS):
            raise ValueError(f"train_from must be in 0..{len(BLOCKS) - 1}, got {self.train_from}")
        if self.views == 1 or self.views < 0:
            raise ValueError(f"views must be 0 (augment every batch) or at least 2 (chip and mirror), got {self.views}")
        if isinstance(self.augment, dict):
            object.__setattr__(self, "augment", Augment(**self.augment))

    @property
    def cached(self) -> bool:
        return self.views > 0

    def to_dict(self) -> dict:
        return {**asdict(self), "augment": self.augment.to_dict()}


@dataclass(frozen=True)
class AttributeSpec:
    """One candidate (one row of the results table)."""

    name: str
    age_loss: str = "dldl"  # dldl: label distributions (KL to a Gaussian) + L1 of the mean; l1: L1 of the mean
    sigma: float = 3.0  # dldl: the target Gaussian's width in years
    age_weight: float = 1.0
    label_smoothing: float = 0.0  # gender targets pulled towards 0.5 by this much (face sets carry wrong labels)
    dropout: float = 0.2
    epochs: int = 12
    patience: int = 4  # stop after this many epochs without a better validation score
    batch_size: int = 128
    lr: float = 1e-3  # heads
    backbone_lr: float = 3e-4  # the trained blocks
    weight_decay: float = 0.05
    warmup: float = 0.1  # share of the steps spent warming the learning rate up (then cosine down)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.age_loss not in ("dldl", "l1"):
            raise ValueError(f"candidate {self.name}: age_loss must be dldl or l1, got {self.age_loss!r}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"candidate {self.name}: label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.epochs < 1 or self.patience < 1 or self.batch_size < 1:
            raise ValueError(f"candidate {self.name}: epochs, patience and batch_size must be at least 1")

    def to_dict(self) -> dict:
        return asdict(self)


def validation_score(accuracy: float, mae: float) -> float:
    """What early stopping and selection minimise: a point of gender accuracy weighs as
    much as a year of age error (both attributes count; neither alone decides)."""
    return 100.0 * (1.0 - accuracy) + mae


# ---- the network ---------------------------------------------------------------------------

class AttributeNet(nn.Module):
    """The backbone from block `train_from` on (the stem too when 0), its 256 pooled
    features, dropout, then a gender logit and 101 age logits."""

    def __init__(self, backbone: DlibFaceResNet, train_from: int, dropout: float = 0.0):
        super().__init__()
        self.train_from = train_from
        if train_from == 0:
            self.register_buffer("mean", backbone.mean.clone())
            self.conv, self.affine = copy.deepcopy(backbone.conv), copy.deepcopy(backbone.affine)
        self.blocks = copy.deepcopy(backbone.blocks[train_from:])
        self.dropout = nn.Dropout(dropout)
        self.gender = nn.Linear(FEATURE_SIZE, 1)
        self.age = nn.Linear(FEATURE_SIZE, AGE_MAX + 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.train_from == 0:  # pixels in: dlib's input layer and stem
            x = (x.float() - self.mean.view(1, 3, 1, 1)) / 256
            x = F.max_pool2d(F.relu(self.affine(self.conv(x))), 3, 2)
        z = self.dropout(self.blocks(x.float() if x.dtype == torch.float16 else x).float().mean(dim=(2, 3)))
        return self.gender(z).squeeze(1), self.age(z)


def frozen_part(backbone: DlibFaceResNet, settings: AttributeSettings, x: torch.Tensor) -> torch.Tensor:
    """Pixels through the blocks that stay frozen (nothing when the whole network trains)."""
    return x if settings.train_from == 0 else backbone.trunk(x, settings.train_from)


def augment_chips(x: torch.Tensor, spec: Augment, generator: torch.Generator) -> torch.Tensor:
    """A random affine change (rotation, scale, shift, mirror) and brightness/contrast, per
    chip: float N x 3 x S x S pixel values in, the same out (0..255)."""
    n, device = x.shape[0], x.device

    def uniform(scale: float, shape=(n,)) -> torch.Tensor:
        return ((torch.rand(shape, generator=generator) * 2 - 1) * scale).to(device)

    angle = uniform(math.radians(spec.rotation_degrees))
    zoom = 1 + uniform(spec.scale)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, uniform(spec.shift)], 1),
                         torch.stack([sin, cos, uniform(spec.shift)], 1)], 1)
    if spec.flip:
        mirror = (torch.rand(n, generator=generator) < 0.5).to(device)
        theta[mirror, 0, :2] *= -1
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    y = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    brightness = 1 + uniform(spec.brightness, (n, 1, 1, 1))
    contrast = 1 + uniform(spec.contrast, (n, 1, 1, 1))
    mean = y.mean(dim=(1, 2, 3), keepdim=True)
    return ((y - mean) * contrast + mean * brightness).clamp(0, 255)


def cached_views(backbone: DlibFaceResNet, settings: AttributeSettings, chips: np.ndarray, train: np.ndarray,
                 device: str, batch_size: int, seed: int) -> dict[str, np.ndarray]:
    """What the CPU way of training reads, for a chunk of chips: the frozen blocks' output
    (float16) for every chip and its mirror image (`base`, N x 2 x …), and for the chips of
    the training split `views - 2` augmented ones (`extra`, N x (views - 2) x …; zeros for
    the other splits, which never read them). The augmentations are seeded by the chunk,
    so a resumed run caches the same views."""
    generator = torch.Generator().manual_seed(seed)
    base, extra = [], []
    with torch.inference_mode():
        for start in range(0, len(chips), batch_size):
            STOP.check()
            x = device_batch(chips[start:start + batch_size], device)
            with autocast(device):
                views = torch.stack([frozen_part(backbone, settings, x),
                                     frozen_part(backbone, settings, x.flip(3))], 1).half().cpu().numpy()
                more = np.zeros((len(views), max(settings.views - 2, 0), *views.shape[2:]), np.float16)
                rows = np.flatnonzero(train[start:start + batch_size])
                if settings.views > 2 and len(rows):
                    picked = x[torch.from_numpy(rows).to(x.device)]
                    augmented = [frozen_part(backbone, settings, augment_chips(picked, settings.augment, generator))
                                 for _ in range(settings.views - 2)]
                    more[rows] = torch.stack(augmented, 1).half().cpu().numpy()
            base.append(views)
            extra.append(more)
    return {"base": np.concatenate(base), "extra": np.concatenate(extra)}


# ---- training ------------------------------------------------------------------------------

@dataclass
class Inputs:
    """The faces of one split as the training loop reads them: cached views (the CPU
    way) or aligned chips (augmented every batch)."""

    base: np.ndarray | None = None  # N x 2 x C x H x W float16: the chip and its mirror, through the frozen blocks
    extra: np.ndarray | None = None  # N x (views - 2) x …: augmented views (training split)
    chips: np.ndarray | None = None  # N x S x S x 3 uint8 (no cache)

    def __len__(self) -> int:
        return len(self.base if self.base is not None else self.chips)


@dataclass
class AttributeFit:
    net: AttributeNet
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False


def age_targets(ages: torch.Tensor, sigma: float) -> torch.Tensor:
    """A Gaussian of width `sigma` years around each age, over the bins (sums to one)."""
    bins = torch.arange(AGE_MAX + 1, device=ages.device, dtype=torch.float32)
    target = torch.exp(-(bins[None] - ages[:, None]) ** 2 / (2 * sigma ** 2))
    return target / target.sum(1, keepdim=True)


def attribute_loss(spec: AttributeSpec, gender_logit, age_logits, male, age) -> torch.Tensor:
    """Gender: binary cross-entropy (targets smoothed by `spec.label_smoothing`). Age (only
    where the label has one, `age` >= 0): dldl's KL to the Gaussian target plus a tenth of
    the mean's L1 error, or the L1 alone."""
    target = male * (1 - spec.label_smoothing) + 0.5 * spec.label_smoothing
    loss = F.binary_cross_entropy_with_logits(gender_logit.float(), target)
    known = age >= 0
    if known.any():
        logits, years = age_logits[known].float(), age[known].clamp(0, AGE_MAX)
        log_p = logits.log_softmax(1)
        bins = torch.arange(AGE_MAX + 1, device=logits.device, dtype=torch.float32)
        l1 = ((log_p.exp() * bins).sum(1) - years).abs().mean()
        if spec.age_loss == "dldl":
            age_loss = F.kl_div(log_p, age_targets(years, spec.sigma), reduction="batchmean") + 0.1 * l1
        else:
            age_loss = l1
        loss = loss + spec.age_weight * age_loss
    return loss


class _Feed:
    """Batches of one split for the network's trainable part."""

    def __init__(self, inputs: Inputs, backbone: DlibFaceResNet, settings: AttributeSettings, device: str,
                 generator: torch.Generator):
        self.inputs, self.backbone, self.settings, self.device = inputs, backbone, settings, device
        self.generator = generator

    def training(self, rows: np.ndarray) -> torch.Tensor:
        """A random view of each face (cached), or the chips augmented afresh."""
        if self.settings.cached:
            choice = torch.randint(0, self.settings.views, (len(rows),), generator=self.generator).numpy()
            parts = np.empty((len(rows), *self.inputs.base.shape[2:]), np.float16)
            from_base = choice < 2
            parts[from_base] = self.inputs.base[rows[from_base], choice[from_base]]
            if (~from_base).any():
                parts[~from_base] = self.inputs.extra[rows[~from_base], choice[~from_base] - 2]
            return torch.from_numpy(parts).to(self.device)
        x = device_batch(self.inputs.chips[rows], self.device)
        x = augment_chips(x, self.settings.augment, self.generator)
        with torch.no_grad(), autocast(self.device):
            return frozen_part(self.backbone, self.settings, x)

    def plain(self, rows: slice, mirrored: bool) -> torch.Tensor:
        if self.settings.cached:
            return torch.from_numpy(np.ascontiguousarray(self.inputs.base[rows, int(mirrored)])).to(self.device)
        x = device_batch(self.inputs.chips[rows], self.device)
        with torch.no_grad(), autocast(self.device):
            return frozen_part(self.backbone, self.settings, x.flip(3) if mirrored else x)


def answers(net: AttributeNet, features: Callable[[bool], torch.Tensor],
            flip_average: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The male logit and age logits (float32) for `features(False)`, averaged with those
    for the mirror image, `features(True)`, when `flip_average`: the same at training,
    evaluation and scoring."""
    gender, age = net(features(False))
    if flip_average:
        gender_m, age_m = net(features(True))
        gender, age = (gender + gender_m) / 2, (age.float() + age_m.float()) / 2
    return gender.float(), age.float()


def predict_inputs(net: AttributeNet, inputs: Inputs, backbone: DlibFaceResNet, settings: AttributeSettings,
                   device: str, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Male logits and age logits (averaged with the mirror image's when the settings ask)
    for every face of a split."""
    feed = _Feed(inputs, backbone, settings, device, torch.Generator())
    net.eval()
    logits, ages = [], []
    with torch.inference_mode(), autocast(device):
        for start in range(0, len(inputs), batch_size):
            rows = slice(start, start + batch_size)
            gender, age = answers(net, lambda mirrored: feed.plain(rows, mirrored), settings.flip_average)
            logits.append(gender.cpu().numpy())
            ages.append(age.cpu().numpy())
    if not logits:
        return np.zeros(0, np.float32), np.zeros((0, AGE_MAX + 1), np.float32)
    return np.concatenate(logits), np.concatenate(ages)


def age_expectation(age_logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return softmax(age_logits, temperature) @ AGES


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def split_metrics(logits: np.ndarray, age_logits: np.ndarray, male: np.ndarray, ages: np.ndarray) -> dict:
    known = ages >= 0
    accuracy = float(((logits >= 0).astype(int) == male).mean()) if len(male) else float("nan")
    mae = float(np.abs(age_expectation(age_logits[known]) - ages[known]).mean()) if known.any() else float("nan")
    return {"accuracy": accuracy, "mae": mae}


def fit_attributes(spec: AttributeSpec, settings: AttributeSettings, backbone: DlibFaceResNet,
                   train: tuple[Inputs, np.ndarray, np.ndarray], val: tuple[Inputs, np.ndarray, np.ndarray],
                   device: str = "cpu", on_epoch: Callable[[dict], None] | None = None) -> AttributeFit:
    """Train the blocks from `settings.train_from` on and both heads (AdamW, weight decay,
    a warm-up then cosine learning rate, one step per batch); keep the epoch with the best
    validation score, and stop when `spec.patience` epochs in a row did not beat it.
    `train`/`val` are (inputs, male labels 0/1, ages in years, -1 where unknown).
    Deterministic for a given seed on the CPU."""
    torch.manual_seed(spec.seed)
    backbone = backbone.eval().to(device)
    net = AttributeNet(backbone, settings.train_from, spec.dropout).to(device)
    if device.startswith("cuda"):
        net = net.to(memory_format=torch.channels_last)
    heads = list(net.gender.parameters()) + list(net.age.parameters())
    trunk = [p for name, p in net.named_parameters() if not name.startswith(("gender.", "age."))]
    optimizer = torch.optim.AdamW([{"params": heads, "lr": spec.lr}, {"params": trunk, "lr": spec.backbone_lr}],
                                  weight_decay=spec.weight_decay)
    inputs, male, ages = train
    steps_per_epoch = math.ceil(len(inputs) / spec.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[spec.lr, spec.backbone_lr], total_steps=max(spec.epochs * steps_per_epoch, 1),
        pct_start=spec.warmup, anneal_strategy="cos")
    generator = torch.Generator().manual_seed(spec.seed)
    feed = _Feed(inputs, backbone, settings, device, generator)
    male_t = torch.from_numpy(male.astype(np.float32)).to(device)
    ages_t = torch.from_numpy(ages.astype(np.float32)).to(device)
    fit = AttributeFit(net)
    best_score, best_state, waited = math.inf, None, 0
    for epoch in range(1, spec.epochs + 1):
        started = time.perf_counter()
        net.train()
        total, seen, correct, errors = 0.0, 0, 0, []
        for rows in torch.randperm(len(inputs), generator=generator).split(spec.batch_size):
            STOP.check()
            rows_np = rows.numpy()
            with autocast(device):
                gender, age = net(feed.training(rows_np))
            rows = rows.to(device)
            loss = attribute_loss(spec, gender, age, male_t[rows], ages_t[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(rows)
            seen += len(rows)
            correct += int(((gender.detach() >= 0).float() == male_t[rows]).sum())
            known = ages_t[rows] >= 0
            expected = (age.detach().float().softmax(1) * torch.arange(AGE_MAX + 1, device=age.device)).sum(1)
            errors.append((expected[known] - ages_t[rows][known]).abs().cpu())
        train_errors = torch.cat(errors) if errors else torch.zeros(0)
        val_logits, val_age = predict_inputs(net, val[0], backbone, settings, device)
        measured = split_metrics(val_logits, val_age, val[1], val[2])
        record = {"epoch": epoch, "train_loss": total / max(seen, 1), "train_acc": correct / max(seen, 1),
                  "train_mae": float(train_errors.mean()) if len(train_errors) else float("nan"),
                  "val_acc": measured["accuracy"], "val_mae": measured["mae"],
                  "val_score": validation_score(measured["accuracy"], measured["mae"]),
                  "seconds": time.perf_counter() - started}
        fit.history.append(record)
        if on_epoch:
            on_epoch(record)
        if record["val_score"] < best_score:
            best_score, fit.best_epoch, waited = record["val_score"], epoch, 0
            best_state = copy.deepcopy(net.state_dict())
        else:
            waited += 1
            if waited >= spec.patience:
                fit.stopped_early = epoch < spec.epochs
                break
    net.load_state_dict(best_state)
    return fit


# ---- calibration ----------------------------------------------------------------------------

def fit_age_temperature(age_logits: np.ndarray, ages: np.ndarray) -> float:
    """The temperature that minimises the age distribution's negative log likelihood of
    the true year, on validation (golden-section search on log T)."""
    known = ages >= 0
    logits, years = np.asarray(age_logits, dtype=np.float64)[known], np.clip(ages[known], 0, AGE_MAX).astype(int)
    if not len(years):
        return 1.0

    def nll(log_t: float) -> float:
        p = softmax(logits, math.exp(log_t))
        return float(-np.log(np.clip(p[np.arange(len(years)), years], 1e-12, None)).mean())

    return float(math.exp(golden_section_minimum(nll, math.log(0.2), math.log(10.0), 60)))


def band_threshold(confidence: np.ndarray, coverage: float) -> float:
    """The band confidence under which the age is `unknown`, keeping `coverage` of the answers."""
    if not 0 < coverage <= 1:
        raise ValueError(f"age target coverage must be in (0, 1], got {coverage}")
    if coverage == 1 or not len(confidence):
        return 0.0
    return float(np.quantile(np.asarray(confidence, dtype=np.float64), 1 - coverage))


# ---- stored form and the predictor --------------------------------------------------------

def load_net(data: bytes, settings: AttributeSettings, backbone: DlibFaceResNet) -> AttributeNet:
    net = AttributeNet(backbone, settings.train_from)
    net.load_state_dict(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
    return net.eval()


class AttributePredictor(Predictor):
    """Chips -> a male logit and an age distribution per face, batched (pinned memory,
    non-blocking copies, channels_last and bf16 autocast on CUDA; every core on the CPU).
    The mirror image's answers are averaged in when the card says so."""

    takes_device_chips = True

    def __init__(self, backbone: DlibFaceResNet, settings: AttributeSettings, net: AttributeNet,
                 compile: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self._backbone = backbone.eval().to(self.device)
        self._net = net.eval().to(self.device)
        if self.device.startswith("cuda"):
            self._backbone = self._backbone.to(memory_format=torch.channels_last)
            self._net = self._net.to(memory_format=torch.channels_last)
        if compile:
            self._net = torch.compile(self._net, dynamic=True)
        age = self.card.get("age") or {}
        self.age_temperature = float(age.get("temperature", 1.0))
        self.age_abstain_threshold = float(age.get("abstain_threshold", 0.0))

    def auto_batch_size(self) -> int:
        return cuda_batch_size(self) if self.device.startswith("cuda") else 64

    def _outputs(self, chips) -> tuple[np.ndarray, np.ndarray]:
        x = device_batch(chips, self.device)
        with torch.inference_mode(), autocast(self.device):
            gender, age = answers(self._net, lambda mirrored: frozen_part(self._backbone, self.settings,
                                                                          x.flip(3) if mirrored else x),
                                  self.settings.flip_average)
        return gender.cpu().numpy(), age.cpu().numpy()

    def male_logits(self, chips) -> np.ndarray:
        return self._outputs(chips)[0]

    def outputs(self, chips):
        logits, age_logits = self._outputs(chips)
        return logits, softmax(age_logits, self.age_temperature), AGES


def load_attribute_predictor(weights: bytes, compile: bool = False, **common) -> AttributePredictor:
    """The predictor a `face-attributes` card (in `common`) describes; its backbone must be
    the one the card was trained on (checked by the .dat's hash)."""
    backbone = backbone_for_card(common)
    settings = AttributeSettings(**common["card"]["settings"])
    return AttributePredictor(backbone, settings, load_net(weights, settings, backbone), compile=compile, **common)
