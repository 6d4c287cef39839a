"""RoIAlign (Mask R-CNN) and the FPN multi-scale RoIAlign, with torchvision's signatures and
sampling rules, in pure PyTorch; the RoI argument handling shared with RoI max pooling
(:mod:`cnnkit.ops.roi_pool`).

RoIAlign is vectorized over all RoIs at once (no per-RoI Python loop): the feature map is
viewed channels-last as ``[N * H * W, C]`` so that each sampled location is one contiguous
C-vector, and each output is a weighted sum of gathered rows (``embedding_bag`` with per-sample
weights: no ``[samples, C]`` intermediate, and its backward is a scatter-add of the same
weights). Work is done in chunks of RoIs to bound memory.

Precision and layout follow torchvision (whose CPU and CUDA ``roi_align`` are registered for
autocast to run in float32 and cast the result back to the input's dtype): RoI coordinates,
sampling positions, bilinear weights and the weighted sums are float32 (float64 for a float64
input) whatever the feature dtype, so bfloat16 / float16 features give the float32 result
rounded once; autocast does not change that. Outputs are contiguous ``[K, C, ph, pw]`` tensors
of the input's dtype (``out.view(K, -1)`` works, as with torchvision).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MultiScaleRoIAlign", "RoIAlign", "roi_align"]

# Upper bound per chunk of RoIs on the tap tables (int64 index and weight), counted by roi_align
# as 4 float32 words per tap: ~64 MB.
_CHUNK_ELEMENTS = 1 << 24


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the RoI coordinates and of the arithmetic for features of ``dtype``: float64 for
    float64, else float32 (bfloat16 cannot even hold x = 501: its spacing there is 4 pixels)."""
    return torch.promote_types(dtype, torch.float32)


def _pair(output_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(output_size, int):
        size = (output_size, output_size)
    else:
        size = tuple(int(s) for s in output_size)
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(
            f"output_size must be a positive int or (height, width), got {output_size!r}"
        )
    return size  # type: ignore[return-value]


def convert_boxes_to_rois(boxes: Tensor | Sequence[Tensor], like: Tensor) -> Tensor:
    """``Tensor[K, 5]`` (batch index, x1, y1, x2, y2) from ``boxes``.

    ``boxes`` is either already ``Tensor[K, 5]`` or a list with one ``Tensor[L_i, 4]`` per image.
    The RoIs have :func:`compute_dtype` of ``like`` (float32 for bfloat16 / float16 features).
    """
    dtype = compute_dtype(like.dtype)
    if isinstance(boxes, Tensor):
        if boxes.dim() != 2 or boxes.shape[1] != 5:
            raise ValueError(
                f"boxes must be Tensor[K, 5] or a list of Tensor[L, 4], got {list(boxes.shape)}"
            )
        return boxes.to(dtype)
    if not isinstance(boxes, (list, tuple)):
        raise TypeError(
            f"boxes must be a Tensor[K, 5] or a list of Tensor[L, 4], got {type(boxes).__name__}"
        )
    parts = []
    for i, b in enumerate(boxes):
        if not isinstance(b, Tensor) or b.dim() != 2 or b.shape[1] != 4:
            shape = list(b.shape) if isinstance(b, Tensor) else type(b).__name__
            raise ValueError(f"boxes[{i}] must be a Tensor[L, 4], got {shape}")
        b = b.to(device=like.device, dtype=dtype)
        parts.append(torch.cat((torch.full_like(b[:, :1], i), b), dim=1))
    if not parts:
        return like.new_zeros((0, 5), dtype=dtype)
    return torch.cat(parts, dim=0)


def _check_input(input: Tensor) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if input.dim() != 4:
        raise ValueError(f"input must be a [N, C, H, W] feature map, got {list(input.shape)}")


def _prepare(
    input: Tensor, boxes: Tensor | Sequence[Tensor], output_size: int | Sequence[int]
) -> tuple[Tensor, tuple[int, int], Tensor | None]:
    """Checked arguments of :func:`roi_align` / :func:`roi_pool`: RoIs ``[K, 5]``, ``(ph, pw)``,
    and the ``[K, C, ph, pw]`` zero output when there is nothing to sample (else ``None``).

    The zero output stays attached to ``input`` so that ``backward`` still reaches it.
    """
    _check_input(input)
    rois = convert_boxes_to_rois(boxes, input)
    ph, pw = _pair(output_size)
    k, c = rois.shape[0], input.shape[1]
    # A traced (exported) graph must not keep the branch its example took: the sampling path
    # handles K = 0 as well.
    if (k == 0 or input.numel() == 0) and not torch.jit.is_tracing():
        return rois, (ph, pw), input.new_zeros((k, c, ph, pw)) + 0 * input.sum()
    return rois, (ph, pw), None


def _channels_last_rows(input: Tensor, dtype: torch.dtype) -> Tensor:
    """``[N, C, H, W]`` -> ``[N * H * W, C]`` of ``dtype`` (differentiable; one copy at most)."""
    n, c, h, w = input.shape
    rows = input.to(dtype=dtype, memory_format=torch.channels_last)
    return rows.permute(0, 2, 3, 1).reshape(n * h * w, c)


def _chunks(total: int, per_item: int) -> list[tuple[int, int]]:
    step = max(1, _CHUNK_ELEMENTS // max(per_item, 1))
    return [(s, min(s + step, total)) for s in range(0, total, step)]


# --------------------------------------------------------------------------------- RoIAlign


class _WeightedGather(torch.autograd.Function):
    """``out[k, :, p] = sum_t weight[k * P + p, t] * rows[index[k * P + p, t]]``: a fixed sparse
    linear map of ``rows`` (``[R, C]``) into a contiguous ``[K, C, P]`` tensor of ``dtype``.

    Forward is ``embedding_bag`` (sum mode with per-sample weights, in the dtype of ``rows``),
    then one transposing copy (rounding to ``dtype``) into the output: that copy is the price of
    torchvision's contiguous layout (cache-sized chunks were no faster, and each extra parallel
    region costs on busy machines). The
    backward is the transposed map, which is again an ``embedding_bag``: taps sorted by row index
    form one bag per row over the output gradient. (The built-in backward of ``embedding_bag``
    with per-sample weights is many times slower on CPU, and an ``index_add_`` would materialize
    every tap's C-vector.)
    """

    @staticmethod
    def forward(ctx, rows, index, weight, bins, dtype):  # type: ignore[override]
        ctx.save_for_backward(index, weight)
        ctx.num_rows = rows.shape[0]
        return _gather_bins(rows, index, weight, bins, dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        index, weight = ctx.saved_tensors
        k, c, bins = grad.shape
        rows_grad = grad.new_empty((k, bins, c), dtype=weight.dtype)
        rows_grad.copy_(grad.transpose(1, 2))
        rows_grad = rows_grad.view(k * bins, c)
        return _transposed_gather(rows_grad, index, weight, ctx.num_rows), None, None, None, None


def _gather_bins(rows: Tensor, index: Tensor, weight: Tensor, bins: int, dtype) -> Tensor:
    """The forward map of :class:`_WeightedGather` -> ``[K, C, bins]``."""
    c = rows.shape[1]
    k = index.shape[0] // bins
    gathered = F.embedding_bag(index, rows, per_sample_weights=weight, mode="sum")
    if torch.jit.is_tracing():  # an exported graph: no in-place copy (ONNX has none)
        return gathered.view(k, bins, c).transpose(1, 2).to(dtype).contiguous()
    out = rows.new_empty((k, c, bins), dtype=dtype)
    return out.copy_(gathered.view(k, bins, c).transpose(1, 2))


def _transposed_gather(grad: Tensor, index: Tensor, weight: Tensor, num_rows: int) -> Tensor:
    """``g[r] = sum_{(b, t): index[b, t] = r} weight[b, t] * grad[b]`` -> ``[num_rows, C]``."""
    taps = index.shape[1]
    flat = index.reshape(-1)
    # int32 keys sort about twice as fast as int64 ones.
    key = flat.to(torch.int32) if num_rows < 2**31 else flat
    order = torch.argsort(key)
    bag_of_tap = torch.div(order, taps, rounding_mode="floor")
    counts = torch.bincount(flat, minlength=num_rows)
    offsets = torch.cumsum(counts, 0) - counts
    return F.embedding_bag(
        bag_of_tap, grad, offsets, per_sample_weights=weight.reshape(-1)[order], mode="sum"
    )


def _axis_samples(
    start: Tensor, size: Tensor, pooled: int, grid: int, limit: int
) -> tuple[Tensor, Tensor]:
    """Bilinear taps along one axis for ``grid`` regularly spaced samples in each of ``pooled`` bins.

    Returns ``(index, weight)``, each ``[K, pooled, grid, 2]`` (low and high neighbour),
    following the Mask R-CNN kernel's boundary rules: a sample beyond ``[-1, limit]`` contributes
    nothing; otherwise it is clamped into ``[0, limit - 1]``.
    """
    dtype = start.dtype
    bin_size = size / pooled  # [K]
    p = torch.arange(pooled, device=start.device, dtype=dtype)
    i = torch.arange(grid, device=start.device, dtype=dtype) + 0.5
    # Same operation order as the reference kernel: start + p * bin + (i + .5) * bin / grid.
    pos = (
        start[:, None, None]
        + p[None, :, None] * bin_size[:, None, None]
        + i[None, None, :] * bin_size[:, None, None] / grid
    )
    valid = (pos >= -1.0) & (pos <= limit)
    pos = pos.clamp(min=0)
    low = pos.floor().long()
    at_edge = low >= limit - 1
    low = torch.where(at_edge, limit - 1, low)
    high = torch.where(at_edge, limit - 1, low + 1)
    pos = torch.where(at_edge, low.to(dtype), pos)
    frac = pos - low
    weight = torch.stack((1.0 - frac, frac), dim=-1) * valid[..., None]
    return torch.stack((low, high), dim=-1), weight


def _roi_extent(
    rois: Tensor, spatial_scale: float, aligned: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Scaled RoI corner and size ``(x1, y1, w, h)``, each ``[K]``, on the feature grid.

    The grouping by sampling grid and the sampling itself must see the same sizes, bit for bit.
    """
    offset = 0.5 if aligned else 0.0
    x1 = rois[:, 1] * spatial_scale - offset
    y1 = rois[:, 2] * spatial_scale - offset
    roi_w = rois[:, 3] * spatial_scale - offset - x1
    roi_h = rois[:, 4] * spatial_scale - offset - y1
    if not aligned:
        # Legacy behaviour: misaligned RoIs are forced to be at least 1x1.
        roi_w = roi_w.clamp(min=1.0)
        roi_h = roi_h.clamp(min=1.0)
    return x1, y1, roi_w, roi_h


def _roi_align_group(
    rows: Tensor,
    rois: Tensor,
    shape: tuple[int, int, int],
    pooled: tuple[int, int],
    spatial_scale: float,
    grid: tuple[int, int],
    aligned: bool,
    dtype: torch.dtype,
) -> Tensor:
    """RoIAlign of RoIs that share one sampling grid ``(gh, gw)`` -> contiguous ``[K, C, ph, pw]``
    of ``dtype``; ``rows`` and ``rois`` have the dtype of the arithmetic."""
    _, height, width = shape
    ph, pw = pooled
    gh, gw = grid
    k = rois.shape[0]
    x1, y1, roi_w, roi_h = _roi_extent(rois, spatial_scale, aligned)
    yi, yw = _axis_samples(y1, roi_h, ph, gh, height)  # [K, ph, gh, 2]
    xi, xw = _axis_samples(x1, roi_w, pw, gw, width)  # [K, pw, gw, 2]
    batch = rois[:, 0].long()
    # Flat row index (n * H + y) * W + x and weight wy * wx / count for every tap of every sample,
    # laid out [K, ph, pw, (gh, 2, gw, 2)]: one bag of 4 * gh * gw taps per output bin.
    row_base = (batch[:, None, None, None] * height + yi) * width  # [K, ph, gh, 2]
    index = row_base[:, :, None, :, :, None, None] + xi[:, None, :, None, None, :, :]
    weight = yw[:, :, None, :, :, None, None] * xw[:, None, :, None, None, :, :]
    weight = weight / (gh * gw)
    taps = 4 * gh * gw
    index = index.reshape(k * ph * pw, taps)
    weight = weight.reshape(k * ph * pw, taps)
    if torch.jit.is_tracing():  # an exported graph holds no Python autograd Function
        out = _gather_bins(rows, index, weight, ph * pw, dtype)
    else:
        out = _WeightedGather.apply(rows, index, weight, ph * pw, dtype)
    return out.view(k, rows.shape[1], ph, pw)


def roi_align(
    input: Tensor,
    boxes: Tensor | Sequence[Tensor],
    output_size: int | Sequence[int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """RoIAlign (He et al., Mask R-CNN, sec. 3): bilinear sampling, no quantization.

    Each RoI (scaled by ``spatial_scale``, shifted by -0.5 pixel when ``aligned``) is divided into
    ``output_size`` bins; each bin averages ``gh x gw`` bilinearly interpolated samples on a regular
    grid, ``gh = sampling_ratio`` or, when ``sampling_ratio <= 0``, ``ceil(roi_height / ph)`` per
    RoI (likewise ``gw``). Semantics match ``torchvision.ops.roi_align``.

    Args:
        input: ``Tensor[N, C, H, W]``.
        boxes: ``Tensor[K, 5]`` rows ``(batch_index, x1, y1, x2, y2)`` or a list of
            ``Tensor[L_i, 4]`` (xyxy), one per image.
        output_size: ``(ph, pw)`` or an int.
        spatial_scale: feature-map size / image size (e.g. 1/16).
        sampling_ratio: samples per bin along each axis; ``<= 0`` for adaptive.
        aligned: subtract half a pixel so that sample points are pixel centres.

    Returns:
        contiguous ``Tensor[K, C, ph, pw]`` of ``input.dtype``; differentiable with respect to
        ``input``. Coordinates and sums are float32 (float64 for float64 input), with or without
        autocast, as torchvision under autocast: bfloat16 / float16 features give the float32
        result on ``input.float()`` rounded to their dtype.
    """
    rois, (ph, pw), empty = _prepare(input, boxes, output_size)
    if empty is not None:
        return empty
    device = input.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        with torch.autocast(device, enabled=False):
            return _roi_align(input, rois, (ph, pw), spatial_scale, sampling_ratio, aligned)
    return _roi_align(input, rois, (ph, pw), spatial_scale, sampling_ratio, aligned)


def _roi_align(
    input: Tensor,
    rois: Tensor,
    pooled: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    if torch.jit.is_tracing():
        # An exported graph keeps no data-dependent Python loop: one grid, one chunk.
        if sampling_ratio <= 0:
            raise ValueError(
                "roi_align: a traced (exported) model needs sampling_ratio > 0; adaptive "
                "sampling groups the RoIs by size in Python"
            )
        if torch.onnx.is_in_onnx_export():
            # ONNX's own operator: the traced gather would become a slow ONNX Loop.
            ph, pw = pooled
            return _OnnxRoIAlign.apply(input, rois, spatial_scale, ph, pw, sampling_ratio, aligned)
        return _roi_align_one_grid(input, rois, pooled, spatial_scale, sampling_ratio, aligned)
    n, c, height, width = input.shape
    ph, pw = pooled
    k = rois.shape[0]
    rows = _channels_last_rows(input, rois.dtype)
    shape = (n, height, width)
    groups = _align_grids(rois, (ph, pw), spatial_scale, sampling_ratio, aligned)
    values, where = [], []
    for (gh, gw), idx in groups:
        if gh == 0 or gw == 0:
            continue  # empty sampling grid: the bins stay 0, as in the reference kernel
        sub = rois if idx is None else rois[idx]
        # Chunks bound the tap tables (index + weight); the C-vectors are never materialized.
        for s, e in _chunks(sub.shape[0], ph * pw * 4 * gh * gw * 4):
            grid = (gh, gw)
            values.append(
                _roi_align_group(
                    rows, sub[s:e], shape, (ph, pw), spatial_scale, grid, aligned, input.dtype
                )
            )
            where.append(torch.arange(s, e, device=rois.device) if idx is None else idx[s:e])
    if len(values) == 1 and values[0].shape[0] == k and groups[0][1] is None:
        return values[0]
    out = input.new_zeros((k, c, ph, pw)) + 0 * input.sum()
    if values:
        out = out.index_copy(0, torch.cat(where), torch.cat(values))
    return out


def _roi_align_one_grid(
    input: Tensor,
    rois: Tensor,
    pooled: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    """RoIAlign of all ``rois`` on the fixed ``sampling_ratio`` grid in one piece: what a
    traced model records (no grouping, no chunks)."""
    rows = _channels_last_rows(input, rois.dtype)
    shape = (input.shape[0], input.shape[2], input.shape[3])
    grid = (sampling_ratio, sampling_ratio)
    return _roi_align_group(rows, rois, shape, pooled, spatial_scale, grid, aligned, input.dtype)


def _align_grids(
    rois: Tensor,
    pooled: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> list[tuple[tuple[int, int], Tensor | None]]:
    """Group RoIs by sampling grid ``(gh, gw)``; ``None`` indices mean "all RoIs"."""
    if sampling_ratio > 0:
        return [((sampling_ratio, sampling_ratio), None)]
    _, _, roi_w, roi_h = _roi_extent(rois, spatial_scale, aligned)
    gh = torch.ceil(roi_h / pooled[0]).long().clamp(min=0)
    gw = torch.ceil(roi_w / pooled[1]).long().clamp(min=0)
    key = gh * (int(gw.max()) + 1) + gw
    uniq, inverse = torch.unique(key, return_inverse=True)
    order = torch.argsort(inverse, stable=True)
    counts = torch.bincount(inverse, minlength=uniq.numel()).tolist()
    gh_u = gh[order].tolist()
    gw_u = gw[order].tolist()
    groups, start = [], 0
    for count in counts:
        groups.append(((gh_u[start], gw_u[start]), order[start : start + count]))
        start += count
    return groups


class _OnnxRoIAlign(torch.autograd.Function):
    """:func:`roi_align` (fixed ``sampling_ratio``) as ONNX's ``RoiAlign`` (opset 16+: the
    ``coordinate_transformation_mode`` that tells ``aligned`` apart); the values while the
    exporter traces come from :func:`_roi_align_one_grid`."""

    @staticmethod
    def forward(ctx, input, rois, spatial_scale, ph, pw, sampling_ratio, aligned):  # type: ignore[override]
        return _roi_align_one_grid(input, rois, (ph, pw), spatial_scale, sampling_ratio, aligned)

    @staticmethod
    def symbolic(g, input, rois, spatial_scale, ph, pw, sampling_ratio, aligned):  # type: ignore[override]
        if g.opset < 16:
            raise ValueError(
                f"--opset {g.opset}: ONNX's RoiAlign tells aligned from legacy boxes from opset "
                "16 on; use --opset 16 or later"
            )

        def column(start: int, end: int):
            def const(v):
                return g.op("Constant", value_t=torch.tensor([v], dtype=torch.int64))

            return g.op("Slice", rois, const(start), const(end), const(1))

        batch = g.op(
            "Cast",
            g.op(
                "Squeeze",
                column(0, 1),
                g.op("Constant", value_t=torch.tensor([1], dtype=torch.int64)),
            ),
            to_i=7,
        )  # int64
        return g.op(
            "RoiAlign",
            input,
            column(1, 5),
            batch,
            spatial_scale_f=spatial_scale,
            output_height_i=ph,
            output_width_i=pw,
            sampling_ratio_i=sampling_ratio,
            mode_s="avg",
            coordinate_transformation_mode_s="half_pixel" if aligned else "output_half_pixel",
        )


# -------------------------------------------------------------------------------- modules


class RoIAlign(nn.Module):
    """Module form of :func:`roi_align`."""

    def __init__(
        self,
        output_size: int | Sequence[int],
        spatial_scale: float,
        sampling_ratio: int,
        aligned: bool = False,
    ) -> None:
        super().__init__()
        self.output_size = _pair(output_size)
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def forward(self, input: Tensor, rois: Tensor | Sequence[Tensor]) -> Tensor:
        return roi_align(
            input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned
        )

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}"
        )


def fpn_levels(
    boxes: Tensor,
    k_min: int,
    k_max: int,
    canonical_scale: float = 224.0,
    canonical_level: int = 4,
    eps: float = 1e-6,
) -> Tensor:
    """FPN level of each RoI (Lin et al., FPN, eq. 1), relative to ``k_min``.

    ``k = floor(k0 + log2(sqrt(w h) / 224) + eps)`` clamped to ``[k_min, k_max]``; returns
    ``k - k_min`` (int64 ``[K]``). ``eps`` (as torchvision's LevelMapper) keeps a box of exactly
    ``224 * 2**j`` pixels on level ``k0 + j`` despite rounding in ``log2``.
    """
    scale = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    level = torch.floor(canonical_level + torch.log2(scale / canonical_scale) + eps)
    return (level.clamp(min=k_min, max=k_max) - k_min).to(torch.int64)


def _infer_scale(feature: Tensor, image_size: Sequence[int]) -> float:
    # Backbones downsample by powers of 2: snap the measured ratio to the nearest one.
    approx = float(feature.shape[-2]) / float(image_size[0])
    return 2.0 ** round(math.log2(approx))


class MultiScaleRoIAlign(nn.Module):
    """RoIAlign over an FPN: each RoI is pooled from the level that matches its size.

    Args:
        featmap_names: keys of the feature dict to use, from the finest to the coarsest level.
        output_size: ``(ph, pw)`` or an int.
        sampling_ratio: as in :func:`roi_align`.
        canonical_scale, canonical_level: ``224`` and ``k0 = 4`` of FPN eq. 1.

    ``forward(x, boxes, image_shapes)``: ``x`` maps names to ``[N, C, H_l, W_l]`` maps, ``boxes``
    is a list of ``Tensor[L_i, 4]`` in image coordinates, ``image_shapes`` the ``(h, w)`` of each
    (resized) image; the scales of the levels are inferred from the largest image. Returns
    ``Tensor[sum L_i, C, ph, pw]`` in the order of the boxes. ``aligned=False`` as torchvision.
    """

    def __init__(
        self,
        featmap_names: Sequence[str],
        output_size: int | Sequence[int],
        sampling_ratio: int,
        *,
        canonical_scale: int = 224,
        canonical_level: int = 4,
    ) -> None:
        super().__init__()
        if isinstance(featmap_names, str) or not featmap_names:
            raise ValueError(
                f"featmap_names must be a non-empty list of names, got {featmap_names!r}"
            )
        self.featmap_names = list(featmap_names)
        self.output_size = _pair(output_size)
        self.sampling_ratio = sampling_ratio
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level

    def forward(
        self,
        x: dict[str, Tensor],
        boxes: list[Tensor],
        image_shapes: list[tuple[int, int]],
    ) -> Tensor:
        missing = [name for name in self.featmap_names if name not in x]
        if missing:
            raise ValueError(f"x lacks the feature maps {missing}; it has {list(x)}")
        if not image_shapes:
            raise ValueError("image_shapes must not be empty")
        features = [x[name] for name in self.featmap_names]
        max_size = (max(s[0] for s in image_shapes), max(s[1] for s in image_shapes))
        scales = [_infer_scale(f, max_size) for f in features]
        rois = convert_boxes_to_rois(boxes, features[0])
        kwargs = {"output_size": self.output_size, "sampling_ratio": self.sampling_ratio}
        if len(features) == 1:
            return roi_align(features[0], rois, spatial_scale=scales[0], **kwargs)
        k_min = round(-math.log2(scales[0]))
        k_max = round(-math.log2(scales[-1]))
        levels = fpn_levels(rois[:, 1:], k_min, k_max, self.canonical_scale, self.canonical_level)
        c = features[0].shape[1]
        out = features[0].new_zeros((rois.shape[0], c, *self.output_size))
        for level, (feature, scale) in enumerate(zip(features, scales, strict=True)):
            idx = torch.where(levels == level)[0]
            pooled = roi_align(feature, rois[idx], spatial_scale=scale, **kwargs)
            out = out.index_copy(0, idx, pooled.to(out.dtype))
        return out
