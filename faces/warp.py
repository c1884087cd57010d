"""Face chips by similarity transforms, on any torch device.

Coordinates are pixel coordinates with integer values at pixel centres (x right, y down),
the convention dlib uses. A chip matrix (2 x 3) maps image pixel coordinates to chip
pixel coordinates; `warp_chips` samples every chip pixel at the image point it maps from.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def similarity(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity (scale, rotation, translation; no reflection) mapping each
    set of `src` points (N, K, 2) onto `dst` (K, 2): (N, 2, 3). This is Umeyama's solution,
    which in 2-D has a closed form: with centred points, a = sum(s.d) / sum|s|^2 and
    b = sum(s x d) / sum|s|^2 give the matrix [[a, -b], [b, a]]."""
    src = torch.as_tensor(src)
    if src.ndim == 2:
        src = src[None]
    dtype = src.dtype if src.is_floating_point() else torch.float32
    src = src.to(dtype)
    dst = torch.as_tensor(dst, dtype=dtype, device=src.device)
    if src.shape[-2:] != dst.shape or dst.shape[-1] != 2 or dst.shape[0] < 2:
        raise ValueError(f"expected src (N, K, 2) and dst (K, 2) with K >= 2, got {tuple(src.shape)} "
                         f"and {tuple(dst.shape)}")
    src_mean = src.mean(dim=1, keepdim=True)
    dst_mean = dst.mean(dim=0, keepdim=True)
    s = src - src_mean
    d = (dst - dst_mean)[None]
    norm = (s ** 2).sum(dim=(1, 2)).clamp_min(torch.finfo(dtype).tiny)
    a = (s * d).sum(dim=(1, 2)) / norm
    b = (s[..., 0] * d[..., 1] - s[..., 1] * d[..., 0]).sum(dim=1) / norm
    linear = torch.stack([torch.stack([a, -b], dim=-1), torch.stack([b, a], dim=-1)], dim=-2)  # N x 2 x 2
    shift = dst_mean[0] - (linear @ src_mean[:, 0, :, None])[..., 0]
    return torch.cat([linear, shift[..., None]], dim=-1)


def dlib_chip_matrix(rect_left: float, rect_top: float, rect_right: float, rect_bottom: float,
                     angle: float, size: int) -> torch.Tensor:
    """The image -> chip matrix (2 x 3, float64) of dlib's extract_image_chip for a
    chip_details(rect, chip_dims(size, size), angle), e.g. from get_face_chip_details.

    dlib maps chip pixel (0, 0) to the rect's top-left corner, (size-1, 0) to its top-right
    and (0, size-1) to its bottom-left, each corner rotated by `angle` (radians, dlib's
    rotate_point: x' = cos*x - sin*y, y' = sin*x + cos*y in y-down pixels) about the rect's
    centre. This is the inverse of that chip -> image mapping."""
    if size < 2:
        raise ValueError(f"chip size must be at least 2, got {size}")
    sx = (rect_right - rect_left) / (size - 1)
    sy = (rect_bottom - rect_top) / (size - 1)
    if sx <= 0 or sy <= 0:
        raise ValueError("the chip rectangle is empty")
    cos, sin = math.cos(angle), math.sin(angle)
    cx, cy = (rect_left + rect_right) / 2, (rect_top + rect_bottom) / 2
    # chip -> image: p = R (D u + o - c) + c ; image -> chip: u = D^-1 (R^T (p - c) + c - o)
    r_t = torch.tensor([[cos, sin], [-sin, cos]], dtype=torch.float64)
    inverse_d = torch.diag(torch.tensor([1 / sx, 1 / sy], dtype=torch.float64))
    centre = torch.tensor([cx, cy], dtype=torch.float64)
    origin = torch.tensor([rect_left, rect_top], dtype=torch.float64)
    linear = inverse_d @ r_t
    shift = inverse_d @ (centre - origin - r_t @ centre)
    return torch.cat([linear, shift[:, None]], dim=1)


def _homogeneous(matrix: torch.Tensor) -> torch.Tensor:
    bottom = torch.tensor([[0.0, 0.0, 1.0]], dtype=matrix.dtype, device=matrix.device)
    return torch.cat([matrix, bottom.expand(*matrix.shape[:-2], 1, 3)], dim=-2)


def pyramid_level(matrix: torch.Tensor, size: int) -> int:
    """How many times dlib's extract_image_chip halves the image (its pyramid_down<2>)
    before bilinear sampling a size x size chip for this image -> chip matrix: while the
    chip rectangle halved once more still covers more pixels than the chip, halve. So the
    bilinear step never shrinks by more than about 2x."""
    span_x, span_y = _rect_spans(matrix, size)
    level = 0
    while (span_x / 2 ** (level + 1) + 1) * (span_y / 2 ** (level + 1) + 1) > size * size:
        level += 1
    return level


def _rect_spans(matrix: torch.Tensor, size: int) -> tuple[float, float]:
    """right - left and bottom - top of the (unrotated) chip rectangle in image pixels."""
    inverse = torch.linalg.inv(matrix[:2, :2].double())  # chip -> image linear part
    return (size - 1) * float(inverse[:, 0].norm()), (size - 1) * float(inverse[:, 1].norm())


def _chip_points(matrices: torch.Tensor, size: int) -> torch.Tensor:
    """Image pixel coordinates (M, size*size, 2), float64 on the CPU, of every chip pixel."""
    v, u = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
                          indexing="ij")
    chip = torch.stack([u.reshape(-1), v.reshape(-1), torch.ones(size * size, dtype=torch.float64)], dim=1)
    to_image = torch.linalg.inv(_homogeneous(matrices))[:, :2]  # chip -> image pixels
    return torch.einsum("mij,pj->mpi", to_image, chip)


def _grid(points: torch.Tensor, height: int, width: int, device, dtype) -> torch.Tensor:
    """Pixel coordinates -> grid_sample coordinates with align_corners=False (-1 and +1 are
    the outer edges of the border pixels, so pixel centres sit at (2x + 1) / W - 1)."""
    scale = torch.tensor([width, height], dtype=torch.float64)
    return ((2 * points + 1) / scale - 1).to(device=device, dtype=dtype)


METHODS = ("antialias", "dlib", "bilinear")


def warp_chips(image: torch.Tensor, matrices: torch.Tensor, size: int, method: str = "antialias",
               fill: str = "black") -> torch.Tensor:
    """Chips (M x 3 x size x size float32, on the image's scale, e.g. 0..255 for uint8) from one
    image (3 x H x W, uint8 or float, any device) for M image -> chip matrices (M x 2 x 3).

    Bilinear sampling with pixel centres lined up: a chip pixel gets the image interpolated
    at the exact point the inverse matrix gives; zeros outside the image. `method`:

    * "antialias" (default): a chip that shrinks the image by more than 2x samples a copy
      downscaled by a power of two (the level dlib would use) with F.interpolate(antialias=
      True), cropped to the footprint of the level's chips; the faces of one image that
      share a level are sampled in one grid_sample call.
    * "dlib": reproduces dlib.extract_image_chip for dlib_chip_matrix(...): its crop, its
      5-tap pyramid_down<2> (integer truncation for uint8 images), its level geometry
      (point_down = p/2 - (1.25, 0.75), while the pyramid really keeps pixel 2c + 2, so at
      level k dlib samples (2^k - 1)/2 image pixels left of and below the exact point) and
      its border rule (no partial samples at the image's edge).
      dlib then truncates to uint8: floor(chip + 1e-3) gives its chip (float rounding aside).
    * "bilinear": plain bilinear sampling of the full image (aliases when shrinking a lot).

    `fill` "edge" samples the nearest border pixel where a chip reaches past the image
    (the framing's edge fill) instead of zeros."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if image.ndim != 3:
        raise ValueError(f"expected a 3 x H x W image, got shape {tuple(image.shape)}")
    matrices = torch.as_tensor(matrices).detach().to("cpu", torch.float64)
    if matrices.ndim == 2:
        matrices = matrices[None]
    # float32 at least: half precision grid coordinates would be off by pixels on big images
    dtype = torch.float64 if image.dtype == torch.float64 else torch.float32
    source = image.to(dtype)
    channels = source.shape[0]
    out = torch.zeros((matrices.shape[0], channels, size, size), dtype=dtype, device=image.device)
    if matrices.shape[0] == 0:
        return out
    points = _chip_points(matrices, size)
    if fill == "edge":
        height, width = image.shape[1:]
        points = torch.stack([points[..., 0].clamp(0, width - 1), points[..., 1].clamp(0, height - 1)], dim=-1)
    levels = [0 if method == "bilinear" else pyramid_level(m, size) for m in matrices]
    for level in sorted(set(levels)):
        chosen = [i for i, lv in enumerate(levels) if lv == level]
        if method == "dlib":
            chips = _dlib_chips(source, points[chosen], level, size, truncate=not image.is_floating_point())
        else:
            chips = _shared_level_chips(source, points[chosen], level, size)
        if chips is not None:
            out[chosen] = chips
    return out


def _shared_level_chips(source: torch.Tensor, points: torch.Tensor, level: int, size: int) -> torch.Tensor | None:
    """All chips of one level from one (cropped, antialiased) downscaled copy of the image."""
    channels, height, width = source.shape
    sample = source
    if level > 0:
        # crop to the chips' footprint plus the filter's reach, on a grid of 2**level pixels
        # (so a chip does not depend on which other chips share its level), then downscale
        step = 2 ** level
        margin = 2 * step + 2

        def span(low: float, high: float, limit: int) -> tuple[int, int]:
            start = max(0, (int(math.floor(low)) - margin) // step * step)
            end = start + -(-(int(math.ceil(high)) + margin + 1 - start) // step) * step
            return start, min(limit, end)

        left, right = span(float(points[..., 0].min()), float(points[..., 0].max()), width)
        top, bottom = span(float(points[..., 1].min()), float(points[..., 1].max()), height)
        if right <= left or bottom <= top:
            return None  # every chip of this level lies outside the image: zeros
        crop = source[:, top:bottom, left:right]
        crop_h, crop_w = crop.shape[1:]
        small_h, small_w = max(1, round(crop_h / 2 ** level)), max(1, round(crop_w / 2 ** level))
        sample = F.interpolate(crop[None], size=(small_h, small_w), mode="bilinear", antialias=True,
                               align_corners=False)[0]
        offset = torch.tensor([left, top], dtype=torch.float64)
        factor = torch.tensor([small_w / crop_w, small_h / crop_h], dtype=torch.float64)
        # image pixel -> downscaled pixel: pixel centres map as (x + 0.5) * factor - 0.5
        points = (points - offset + 0.5) * factor - 0.5
    count = points.shape[0]
    grid = _grid(points, sample.shape[1], sample.shape[2], source.device, source.dtype)
    chips = F.grid_sample(sample[None], grid.reshape(1, count * size, size, 2), mode="bilinear",
                          padding_mode="zeros", align_corners=False)
    return chips[0].reshape(channels, count, size, size).transpose(0, 1)


def _dlib_pyramid_down(batch: torch.Tensor, truncate: bool) -> torch.Tensor:
    """dlib's pyramid_down<2> on N x C x H x W: a separable [1 4 6 4 1] filter (rows, then
    columns) keeping every other pixel, output (H - 3) // 2 x (W - 3) // 2; output pixel c
    is centred on input pixel 2c + 2. Elementwise (no convolution), so it is exact in
    float32 on every device (cuDNN may use TF32 for convolutions)."""
    height, width = batch.shape[-2:]
    out_w, out_h = (width - 3) // 2, (height - 3) // 2

    def taps(x: torch.Tensor, dim: int, count: int) -> torch.Tensor:
        def take(offset: int) -> torch.Tensor:
            return x.narrow(dim, offset, 2 * count - 1)[(slice(None),) * (dim % x.ndim) + (slice(None, None, 2),)]

        return take(0) + 4 * take(1) + 6 * take(2) + 4 * take(3) + take(4)

    rows = taps(batch, -1, out_w)  # N x C x H x out_w, unscaled (as dlib's uint16 temp image)
    down = taps(rows, -2, out_h) / 256
    return torch.floor(down) if truncate else down


def _dlib_chips(source: torch.Tensor, points: torch.Tensor, level: int, size: int, truncate: bool) -> torch.Tensor:
    """Chips of one pyramid level, each from its own crop as dlib.extract_image_chip does."""
    channels, height, width = source.shape
    count = points.shape[0]
    grow = 2.0
    for _ in range(level):
        grow = grow * 2 + 2
    corner_index = [0, size - 1, (size - 1) * size, size * size - 1]  # the rotated rect's corners
    crops, boxes = [], []
    for index in range(count):
        corners = points[index, corner_index]
        left = max(float(corners[:, 0].min()) - grow, 0.0)
        top = max(float(corners[:, 1].min()) - grow, 0.0)
        right = min(float(corners[:, 0].max()) + grow, width - 1.0)
        bottom = min(float(corners[:, 1].max()) + grow, height - 1.0)
        # dlib rounds the crop's drectangle to a rectangle with lround (all values >= 0 here)
        box = [int(math.floor(v + 0.5)) for v in (left, top, right, bottom)]
        if box[2] < box[0] or box[3] < box[1]:
            box = [0, 0, -1, -1]
        boxes.append(box)
        crops.append(source[:, box[1]:box[3] + 1, box[0]:box[2] + 1])
    crop_h = max(1, max(c.shape[1] for c in crops))
    crop_w = max(1, max(c.shape[2] for c in crops))
    batch = source.new_zeros((count, channels, crop_h, crop_w))
    for index, crop in enumerate(crops):
        batch[index, :, :crop.shape[1], :crop.shape[2]] = crop
    dims = torch.tensor([[c.shape[1], c.shape[2]] for c in crops], dtype=torch.float64)  # h, w per chip
    local = points - torch.tensor([[b[0], b[1]] for b in boxes], dtype=torch.float64)[:, None, :]
    for _ in range(level):
        if batch.shape[-1] <= 8 or batch.shape[-2] <= 8:
            return None  # dlib's pyramid is empty below 9 pixels: all zeros
        batch = _dlib_pyramid_down(batch, truncate)
        small = dims <= 8
        dims = torch.where(small, torch.zeros_like(dims), torch.div(dims - 3, 2, rounding_mode="floor"))
        local = local / 2 - torch.tensor([1.25, 0.75], dtype=torch.float64)  # dlib's point_down
    # dlib interpolates only where all four neighbours are inside the level image
    inside = ((local[..., 0] >= 0) & (local[..., 0] < dims[:, None, 1] - 1)
              & (local[..., 1] >= 0) & (local[..., 1] < dims[:, None, 0] - 1))
    grid = _grid(local, batch.shape[2], batch.shape[3], source.device, source.dtype)
    chips = F.grid_sample(batch, grid.reshape(count, size, size, 2), mode="bilinear", padding_mode="zeros",
                          align_corners=False)
    mask = inside.to(device=source.device, dtype=source.dtype).reshape(count, 1, size, size)
    return chips * mask
