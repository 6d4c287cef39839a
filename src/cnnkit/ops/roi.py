"""RoI feature extraction: RoI max pooling (Fast R-CNN), RoIAlign (Mask R-CNN) and the FPN
multi-scale RoIAlign, with torchvision's signatures and sampling rules, in pure PyTorch.

Both operators are vectorized over all RoIs at once (no per-RoI Python loop): the feature map
is viewed channels-last as ``[N * H * W, C]`` so that each sampled location is one contiguous
C-vector. RoIAlign is then a weighted sum of gathered rows (``embedding_bag`` with per-sample
weights: no ``[samples, C]`` intermediate, and its backward is a scatter-add of the same
weights). RoI pooling looks each bin up in maps of sliding-window maximum keys (value and
first position in one int64) built for a few window sizes, and routes the gradient to the
arg-max with ``index_add_``. Work is done in chunks to bound memory.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MultiScaleRoIAlign", "RoIAlign", "RoIPool", "roi_align", "roi_pool"]

# Upper bound on gathered elements per chunk (samples x channels): ~64 MB of float32.
_CHUNK_ELEMENTS = 1 << 24
# RoI pooling's backward transposes the output gradient in chunks of ~1 MB (cache-sized).
_BACKWARD_CHUNK_ELEMENTS = 1 << 18


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
    """
    if isinstance(boxes, Tensor):
        if boxes.dim() != 2 or boxes.shape[1] != 5:
            raise ValueError(
                f"boxes must be Tensor[K, 5] or a list of Tensor[L, 4], got {list(boxes.shape)}"
            )
        return boxes.to(like.dtype)
    if not isinstance(boxes, (list, tuple)):
        raise TypeError(
            f"boxes must be a Tensor[K, 5] or a list of Tensor[L, 4], got {type(boxes).__name__}"
        )
    parts = []
    for i, b in enumerate(boxes):
        if not isinstance(b, Tensor) or b.dim() != 2 or b.shape[1] != 4:
            shape = list(b.shape) if isinstance(b, Tensor) else type(b).__name__
            raise ValueError(f"boxes[{i}] must be a Tensor[L, 4], got {shape}")
        b = b.to(device=like.device, dtype=like.dtype)
        parts.append(torch.cat((torch.full_like(b[:, :1], i), b), dim=1))
    if not parts:
        return like.new_zeros((0, 5))
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
    if k == 0 or input.numel() == 0:
        return rois, (ph, pw), input.new_zeros((k, c, ph, pw)) + 0 * input.sum()
    return rois, (ph, pw), None


def _channels_last_rows(input: Tensor) -> Tensor:
    """``[N, C, H, W]`` -> ``[N * H * W, C]`` (differentiable)."""
    n, c, h, w = input.shape
    return input.permute(0, 2, 3, 1).reshape(n * h * w, c)


def _chunks(total: int, per_item: int, budget: int = _CHUNK_ELEMENTS) -> list[tuple[int, int]]:
    step = max(1, budget // max(per_item, 1))
    return [(s, min(s + step, total)) for s in range(0, total, step)]


# --------------------------------------------------------------------------------- RoIAlign


class _WeightedGather(torch.autograd.Function):
    """``out[b] = sum_t weight[b, t] * rows[index[b, t]]``: a fixed sparse linear map of ``rows``.

    Forward is ``embedding_bag`` (sum mode with per-sample weights). The backward is the
    transposed map, which is again an ``embedding_bag``: taps sorted by row index form one bag per
    row over the output gradient. (The built-in backward of ``embedding_bag`` with per-sample
    weights is many times slower on CPU, and an ``index_add_`` would materialize every tap's
    C-vector.)
    """

    @staticmethod
    def forward(ctx, rows: Tensor, index: Tensor, weight: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(index, weight)
        ctx.num_rows = rows.shape[0]
        return F.embedding_bag(index, rows, per_sample_weights=weight, mode="sum")

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None, None
        index, weight = ctx.saved_tensors
        return _transposed_gather(grad.contiguous(), index, weight, ctx.num_rows), None, None


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
) -> tuple[Tensor, Tensor, Tensor]:
    """Bilinear taps along one axis for ``grid`` regularly spaced samples in each of ``pooled`` bins.

    Returns ``(index, weight, valid)``: index/weight ``[K, pooled, grid, 2]`` (low and high
    neighbour), following the Mask R-CNN kernel's boundary rules: a sample beyond ``[-1, limit]``
    contributes nothing; otherwise it is clamped into ``[0, limit - 1]``.
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
    return torch.stack((low, high), dim=-1), weight, valid


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
) -> Tensor:
    """RoIAlign of RoIs that share one sampling grid ``(gh, gw)`` -> ``[K, ph, pw, C]``."""
    _, height, width = shape
    ph, pw = pooled
    gh, gw = grid
    k = rois.shape[0]
    x1, y1, roi_w, roi_h = _roi_extent(rois, spatial_scale, aligned)
    yi, yw, _ = _axis_samples(y1, roi_h, ph, gh, height)  # [K, ph, gh, 2]
    xi, xw, _ = _axis_samples(x1, roi_w, pw, gw, width)  # [K, pw, gw, 2]
    batch = rois[:, 0].long()
    # Flat row index (n * H + y) * W + x and weight wy * wx / count for every tap of every sample,
    # laid out [K, ph, pw, (gh, 2, gw, 2)]: one bag of 4 * gh * gw taps per output bin.
    row_base = (batch[:, None, None, None] * height + yi) * width  # [K, ph, gh, 2]
    index = row_base[:, :, None, :, :, None, None] + xi[:, None, :, None, None, :, :]
    weight = yw[:, :, None, :, :, None, None] * xw[:, None, :, None, None, :, :]
    weight = weight / (gh * gw)
    taps = 4 * gh * gw
    index = index.reshape(k * ph * pw, taps)
    weight = weight.reshape(k * ph * pw, taps).to(rows.dtype)
    out = _WeightedGather.apply(rows, index, weight)
    return out.reshape(k, ph, pw, rows.shape[1])


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
        ``Tensor[K, C, ph, pw]``; differentiable with respect to ``input``.
    """
    rois, (ph, pw), empty = _prepare(input, boxes, output_size)
    if empty is not None:
        return empty
    n, c, height, width = input.shape
    k = rois.shape[0]
    rows = _channels_last_rows(input)
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
                _roi_align_group(rows, sub[s:e], shape, (ph, pw), spatial_scale, grid, aligned)
            )
            where.append(torch.arange(s, e, device=rois.device) if idx is None else idx[s:e])
    if len(values) == 1 and values[0].shape[0] == k and groups[0][1] is None:
        out = values[0]
    else:
        out = input.new_zeros((k, ph, pw, c)) + 0 * input.sum()
        if values:
            out = out.index_copy(0, torch.cat(where), torch.cat(values))
    # A channels-last [K, C, ph, pw] tensor: same values as torchvision's, no transposing copy.
    return out.permute(0, 3, 1, 2)


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


# ----------------------------------------------------------------------------- RoI pooling


def _round_half_away(x: Tensor) -> Tensor:
    # C's round(): halves go away from zero (torch.round rounds halves to even).
    t = torch.trunc(x)
    return t + torch.where((x - t).abs() >= 0.5, torch.sign(x), torch.zeros_like(x))


def _pool_bins(start: Tensor, end: Tensor, pooled: int, limit: int) -> tuple[Tensor, Tensor]:
    """Quantized bin limits ``[lo, hi)`` along one axis, ``[K, pooled]`` int64, clipped to ``[0, limit]``."""
    size = (end - start + 1).clamp(min=1)
    bin_size = size / pooled
    p = torch.arange(pooled, device=start.device, dtype=start.dtype)
    lo = torch.floor(p[None, :] * bin_size[:, None]).long() + start.long()[:, None]
    hi = torch.ceil((p[None, :] + 1) * bin_size[:, None]).long() + start.long()[:, None]
    return lo.clamp(0, limit), hi.clamp(0, limit)


def roi_pool(
    input: Tensor,
    boxes: Tensor | Sequence[Tensor],
    output_size: int | Sequence[int],
    spatial_scale: float = 1.0,
) -> Tensor:
    """RoI max pooling (Girshick, Fast R-CNN, sec. 2.1), torchvision's quantization.

    The scaled RoI corners are rounded to the feature grid; the ``(h + 1) x (w + 1)`` cell window
    is split into ``output_size`` bins with ``floor`` / ``ceil`` limits; each bin takes the max
    over its cells (an empty bin gives 0). The gradient flows to the arg-max (the first maximum
    in row-major order). A NaN in a window wins its max (torchvision's kernel skips NaNs).

    Memory: the forward holds a channels-last copy of ``input`` and about four int64 maps of its
    size (~9x the input's float32 bytes) while it runs: fine for the stride-16 maps of Fast
    R-CNN, large for a high-resolution FPN level (use :func:`roi_align` there, as Mask R-CNN).

    Args:
        input: ``Tensor[N, C, H, W]``.
        boxes: ``Tensor[K, 5]`` ``(batch_index, x1, y1, x2, y2)`` or a list of ``Tensor[L_i, 4]``.
        output_size: ``(ph, pw)`` or an int.
        spatial_scale: feature-map size / image size.

    Returns:
        ``Tensor[K, C, ph, pw]``.
    """
    rois, (ph, pw), empty = _prepare(input, boxes, output_size)
    if empty is not None:
        return empty
    return _RoIPoolFunction.apply(input, rois, (ph, pw), float(spatial_scale))


class _RoIPoolFunction(torch.autograd.Function):
    """Bin maxima looked up in sliding-window maximum maps; the gradient goes to the arg-max."""

    @staticmethod
    def forward(ctx, input, rois, pooled, spatial_scale):  # type: ignore[override]
        need_grad = ctx.needs_input_grad[0]
        values, argmax = _roi_pool_forward(input, rois, pooled, spatial_scale, need_grad)
        ctx.save_for_backward(argmax)
        ctx.input_shape = input.shape
        k, ph, pw = rois.shape[0], *pooled
        # A channels-last [K, C, ph, pw] tensor: same values as torchvision's, no transposing copy.
        return values.reshape(k, ph, pw, -1).permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        (argmax,) = ctx.saved_tensors
        return _route_gradient(grad, argmax, ctx.input_shape), None, None, None


def _route_gradient(grad: Tensor, argmax: Tensor, shape: torch.Size) -> Tensor:
    """Input gradient ``[N, C, H, W]``: each bin's ``grad [K, C, ph, pw]`` added at its arg-max.

    ``argmax`` (``[K * ph * pw, C]``) holds element indices into the channels-last rows
    (``row * C + channel``) plus one sentinel row for empty bins, dropped here. One flat
    ``index_add_`` per chunk of RoIs keeps the reference kernel's summation order (RoI, then bin);
    the chunks transpose ``grad`` to channels-last in a small reused buffer (a whole transposed
    copy is slower: fresh memory).
    """
    n, c, h, w = shape
    k, _, ph, pw = grad.shape
    grad_flat = grad.new_zeros((n * h * w + 1) * c)
    index = argmax.reshape(-1)
    per_roi = ph * pw * c
    step = max(1, _BACKWARD_CHUNK_ELEMENTS // per_roi)
    buffer = grad.new_empty((min(step, k), ph, pw, c))
    for s in range(0, k, step):
        e = min(s + step, k)
        chunk = buffer[: e - s].copy_(grad[s:e].permute(0, 2, 3, 1))
        grad_flat.index_add_(0, index[s * per_roi : e * per_roi], chunk.view(-1))
    return grad_flat[: n * h * w * c].view(n, h, w, c).permute(0, 3, 1, 2)


def _roi_pool_forward(
    input: Tensor,
    rois: Tensor,
    pooled: tuple[int, int],
    spatial_scale: float,
    need_argmax: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Bin maxima ``[K * ph * pw, C]`` and where they come from (same shape; None unless
    ``need_argmax``): the element ``row * C + channel`` of the channels-last rows,
    ``row = n * H * W + y * W + x``.

    Every input element gets a unique int64 key, ordered like the values and, among equal
    values, like the reference kernel's row-major scan (:func:`_window_keys`): the max key of a
    window is its first maximum. Maps of window-maximum keys are then built for a few window
    sizes and each bin's key is the max of 1 to 4 look-ups of overlapping windows that cover it
    (:func:`_lookup_keys`). Empty bins hold 0 and point at the extra row ``N * H * W``.
    """
    n, c, height, width = input.shape
    num_rows = n * height * width
    rows = input.new_empty((num_rows + 1, c))
    rows[:num_rows].view(n, height, width, c).copy_(input.permute(0, 2, 3, 1))
    rows[num_rows] = 0  # the empty bins' row: their value is 0
    # Keys store element indices when they fit in int32 (the arg-max dtype), else row indices.
    per_element = rows.numel() <= _INT32_INDEX_LIMIT
    keys = _window_keys(rows[:num_rows], per_element)
    top, bin_h, bin_w = _pool_bin_table(rois, pooled, spatial_scale, (height, width))
    winner = _lookup_keys(keys, top, bin_h, bin_w, width).bitwise_not_()
    channel = torch.arange(c, device=input.device)
    argmax = winner if per_element else winner.long() * c + channel
    empty = (bin_h == 0) | (bin_w == 0)
    argmax[empty] = (num_rows * c + channel).to(argmax.dtype)
    values = rows.view(-1).index_select(0, argmax.view(-1)).view(argmax.shape)
    return values, argmax if need_argmax else None


# Largest element count whose indices (and the sentinel row's) are int32.
_INT32_INDEX_LIMIT = 2**31 - 1
# Window sizes up to this get a map of their own (one look-up); larger ones use the largest power
# of two below them (two overlapping look-ups per axis).
_EXACT_WINDOW = 2
# Look-ups gather chunks of about 4 MB of keys: they stay in cache for the reduction.
_LOOKUP_ELEMENTS = 1 << 19
# Byte order of the two int32 words of an int64 key.
_LOW, _HIGH = (0, 1) if sys.byteorder == "little" else (1, 0)


def _ordinal(rows: Tensor) -> Tensor:
    """int32 codes ordered like the values of ``rows`` (equal values, equal codes); same shape."""
    if rows.dtype == torch.float64:
        _, rank = torch.unique(rows, sorted=True, return_inverse=True)
        return rank.to(torch.int32)
    # + 0.0 turns -0.0 into +0.0: equal values must tie. Flipping the magnitude bits of negative
    # floats makes their int32 bits increase with the value.
    bits = (rows.float() + 0.0).view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _window_keys(rows: Tensor, per_element: bool) -> Tensor:
    """int64 keys ``[R, C]`` of the channels-last ``rows``: the value's ordinal in the high word,
    ``~index`` in the low one (unsigned there, so it decreases with the index), with ``index`` the
    element ``r * C + c`` if ``per_element`` else the row ``r``."""
    r, c = rows.shape
    words = torch.empty((r, c, 2), dtype=torch.int32, device=rows.device)
    words[..., _HIGH] = _ordinal(rows)
    count = r * c if per_element else r
    low = torch.arange(-1, -count - 1, -1, dtype=torch.int32, device=rows.device)  # ~index
    words[..., _LOW] = low.view(r, c) if per_element else low[:, None]
    return words.view(torch.int64).view(r, c)


def _pool_bin_table(
    rois: Tensor, pooled: tuple[int, int], spatial_scale: float, size: tuple[int, int]
) -> tuple[Tensor, Tensor, Tensor]:
    """Each bin's window, flattened over ``[K, ph, pw]``: top-left row ``n * H * W + y * W + x``,
    height and width (``[K * ph * pw]`` int64 each; a size is 0 for an empty bin)."""
    height, width = size
    ph, pw = pooled
    x1, y1, x2, y2 = (_round_half_away(rois[:, i] * spatial_scale) for i in range(1, 5))
    h_lo, h_hi = _pool_bins(y1, y2, ph, height)  # [K, ph]
    w_lo, w_hi = _pool_bins(x1, x2, pw, width)  # [K, pw]
    base = rois[:, 0].long() * (height * width)
    top = base[:, None, None] + h_lo[:, :, None] * width + w_lo[:, None, :]
    bin_h = (h_hi - h_lo).clamp(min=0)[:, :, None].expand_as(top)
    bin_w = (w_hi - w_lo).clamp(min=0)[:, None, :].expand_as(top)
    return top.reshape(-1), bin_h.reshape(-1), bin_w.reshape(-1)


def _anchor(size: Tensor) -> Tensor:
    """Window size whose map serves bins of ``size`` (>= size / 2, so two windows cover it)."""
    power = torch.exp2(torch.floor(torch.log2(size.double()))).long()
    return torch.where(size <= _EXACT_WINDOW, size, power)


def _ladder(sizes: list[int]) -> list[int]:
    """Sorted window sizes from 1 through ``sizes``, each at most twice the previous one."""
    out = [1]
    for s in sorted(set(sizes)):
        while s > 2 * out[-1]:
            out.append(2 * out[-1])
        if s > out[-1]:
            out.append(s)
    return out


def _grow(src: Tensor, shift: int, spare: list[Tensor]) -> Tensor:
    """``out[r] = max(src[r], src[r + shift])``: windows extended by ``shift`` rows of ``src``.

    The two windows overlap; that is harmless since keys are unique. The last ``shift`` rows are
    left stale: no window that fits in the map starts there. ``spare`` holds the buffer that is
    not ``src`` (allocated on first use).
    """
    if not spare:
        spare.append(torch.empty_like(src))
    out = spare.pop()
    torch.maximum(src[:-shift], src[shift:], out=out[:-shift])
    return out


def _window_groups(bin_h: Tensor, bin_w: Tensor) -> list[tuple[int, int, bool, bool, Tensor]]:
    """Non-empty bins grouped by map ``(a, b)`` (window height and width) and by whether they
    need a second look-up down / right: ``(a, b, down, right, bin indices)``, sorted by ``b``."""
    ids = torch.nonzero((bin_h > 0) & (bin_w > 0)).squeeze(1)
    if ids.numel() == 0:
        return []
    h, w = bin_h[ids], bin_w[ids]
    a, b = _anchor(h), _anchor(w)
    key = ((b * (int(a.max()) + 1) + a) * 2 + (h > a)) * 2 + (w > b)
    key, order = torch.sort(key, stable=True)
    uniq, counts = torch.unique_consecutive(key, return_counts=True)
    groups, start = [], 0
    for k, count in zip(uniq.tolist(), counts.tolist(), strict=True):
        i = ids[order[start]]
        a_i, b_i = int(_anchor(bin_h[i])), int(_anchor(bin_w[i]))
        groups.append((a_i, b_i, bool(k & 2), bool(k & 1), ids[order[start : start + count]]))
        start += count
    return groups


def _lookup_keys(keys: Tensor, top: Tensor, bin_h: Tensor, bin_w: Tensor, width: int) -> Tensor:
    """Low words ``[M, C]`` (int32) of each bin's max key; rows of empty bins are undefined.

    Maps are built in order of window width ``b`` and, for each, of height ``a``, so that only
    two column maps (``keys`` are overwritten) and two row maps are alive.
    """
    c = keys.shape[1]
    low = torch.empty((top.numel(), c), dtype=torch.int32, device=keys.device)
    groups = _window_groups(bin_h, bin_w)
    heights: dict[int, list[int]] = {}
    for a, b, *_ in groups:
        heights.setdefault(b, []).append(a)
    col_spare: list[Tensor] = []
    row_spare: list[Tensor] = []
    col, col_b = keys, 1
    for b in _ladder(list(heights)):
        if b > col_b:
            col, prev = _grow(col, b - col_b, col_spare), col
            col_spare.append(prev)  # the keys too: they are ours and no longer needed
            col_b = b
        if b not in heights:
            continue
        row, row_a = col, 1
        for a in _ladder(heights[b]):
            if a > row_a:
                row, prev = _grow(row, (a - row_a) * width, row_spare), row
                if prev is not col:
                    row_spare.append(prev)
                row_a = a
            for ga, gb, down, right, ids in groups:
                if (ga, gb) == (a, b):
                    _gather_max(row, top, bin_h, bin_w, ids, (a, b, down, right), width, low)
    return low


def _gather_max(
    window_max: Tensor,
    top: Tensor,
    bin_h: Tensor,
    bin_w: Tensor,
    ids: Tensor,
    how: tuple[int, int, bool, bool],
    width: int,
    low: Tensor,
) -> None:
    """Write into ``low[ids]`` the low words of the max over the 1, 2 or 4 windows of size
    ``a x b`` of ``window_max`` that cover bins ``ids`` (top-left, bottom-left, top-right,
    bottom-right as needed)."""
    a, b, down, right = how
    c = window_max.shape[1]
    starts = top[ids][:, None]
    if down:
        starts = torch.cat((starts, starts + (bin_h[ids][:, None] - a) * width), 1)
    if right:
        starts = torch.cat((starts, starts + (bin_w[ids][:, None] - b)), 1)
    taps = starts.shape[1]
    step = max(1, _LOOKUP_ELEMENTS // (taps * c))
    buffer = window_max.new_empty((min(step, ids.numel()) * taps, c))
    for s in range(0, ids.numel(), step):
        e = min(s + step, ids.numel())
        got = buffer[: (e - s) * taps]
        torch.index_select(window_max, 0, starts[s:e].reshape(-1), out=got)
        got = got.view(e - s, taps, c)
        best = got[:, 0]
        for t in range(1, taps):
            best = torch.maximum(best, got[:, t], out=got[:, 0])
        low.index_copy_(0, ids[s:e], best.view(torch.int32).view(e - s, c, 2)[..., _LOW])


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


class RoIPool(nn.Module):
    """Module form of :func:`roi_pool`."""

    def __init__(self, output_size: int | Sequence[int], spatial_scale: float) -> None:
        super().__init__()
        self.output_size = _pair(output_size)
        self.spatial_scale = spatial_scale

    def forward(self, input: Tensor, rois: Tensor | Sequence[Tensor]) -> Tensor:
        return roi_pool(input, rois, self.output_size, self.spatial_scale)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, spatial_scale={self.spatial_scale}"


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
