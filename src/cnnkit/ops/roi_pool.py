"""RoI max pooling (Girshick, Fast R-CNN, sec. 2.1) with torchvision's signature and
quantization, in pure PyTorch, vectorized over all RoIs.

Every input element gets a unique int64 key ordered like its value and, among equal values,
like the reference kernel's row-major scan, so the largest key of a window names both its max
and the arg-max torchvision picks. Each bin is then a range-max query answered from maps of
window-maximum keys built for a few window sizes (a sparse table over powers of two: any bin is
covered by at most four overlapping windows of one size), instead of gathering every cell of
every bin. The gradient is routed to the arg-max with ``index_add_``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from cnnkit.ops.roi import _pair, _prepare

__all__ = ["RoIPool", "roi_pool"]

# The backward transposes the output gradient in chunks of ~1 MB (cache-sized).
_BACKWARD_CHUNK_ELEMENTS = 1 << 18


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
        contiguous ``Tensor[K, C, ph, pw]`` of ``input.dtype``. The RoI corners are scaled and
        rounded in float32 (float64 for float64 input) whatever the feature dtype, so bfloat16 /
        float16 features give exactly the float32 result on ``input.float()`` rounded to their
        dtype (a max is exact). torchvision has no bfloat16 roi_pool on CPU.
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
        # Contiguous [K, C, ph, pw] as torchvision's (code written for it calls .view). A 3-D
        # transpose copies 2.7x faster than the same permutation written in 4-D (6 vs 17 ms
        # for 512 x 256 x 7 x 7 at 1 thread).
        bins = values.view(k, ph * pw, -1)
        return bins.transpose(1, 2).contiguous().view(k, -1, ph, pw)

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
        chunk = buffer[: e - s].view(e - s, ph * pw, c)
        chunk.copy_(grad[s:e].reshape(e - s, c, ph * pw).transpose(1, 2))
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
    span = int(a.max()) + 1
    key = ((b * span + a) * 2 + (h > a)) * 2 + (w > b)
    key, order = torch.sort(key, stable=True)
    uniq, counts = torch.unique_consecutive(key, return_counts=True)
    groups, start = [], 0
    for k, count in zip(uniq.tolist(), counts.tolist(), strict=True):
        a_k, b_k = (k >> 2) % span, (k >> 2) // span  # the key's own (a, b)
        groups.append((a_k, b_k, bool(k & 2), bool(k & 1), ids[order[start : start + count]]))
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
