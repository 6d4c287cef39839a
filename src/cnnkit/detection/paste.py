"""Paste Mask R-CNN's box-local masks into the image, densely or straight to COCO RLE.

Mask R-CNN (sec. 3, "Implementation details") predicts an ``M x M`` mask per detection inside
its box; at inference "the m x m floating-number mask output is then resized to the RoI size,
and binarized at a threshold of 0.5". Pasting here means, for every image pixel ``(y, x)``
(centre ``(x + 0.5, y + 0.5)``) and a box ``(x1, y1, x2, y2)``::

    inside  <=>  x1 <= x + 0.5 < x2  and  y1 <= y + 0.5 < y2
    u = (x + 0.5 - x1) * M / (x2 - x1) - 0.5,   v = (y + 0.5 - y1) * M / (y2 - y1) - 0.5
    value = bilinear(mask, v, u)  if inside else 0

with the mask's cell centres at integer ``(v, u)`` and ``u, v`` clamped into ``[0, M - 1]``
(the border cells extend to the box's edges). For an integer box this is exactly
``F.interpolate(mask, size=(y2 - y1, x2 - x1), mode="bilinear", align_corners=False)`` placed
at the box: torchvision's ``paste_masks_in_image(..., padding=0)`` on the inclusive box
``(x1, y1, x2 - 1, y2 - 1)`` (checked to 2e-6), without its default one-cell zero padding
and integer rounding of the box. These are also the coordinates of the training targets
(RoIAlign with ``aligned=True``, :func:`cnnkit.detection.mask_head.mask_targets`). Binary masks
are ``value > threshold`` (0.5; torchvision's evaluation), so pixels outside every box stay 0
for any threshold >= 0.

Only the pixels inside each box are computed (two gathers and two linear interpolations per
mask, ``O(box area)``), and on the CPU the dense output is calloc'ed memory that the kernel
maps lazily to its zero page, so :func:`paste_masks` writes only the boxes' pixels.
:func:`masks_to_rles` never builds a dense mask at all: each box-local binary region is
run-length encoded directly in COCO's column-major order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch import Tensor

__all__ = ["masks_to_rles", "paste_masks", "paste_masks_dense"]


def _check(mask_probs: Tensor, boxes: Tensor, image_size: Sequence[int]) -> tuple[int, int]:
    if not isinstance(mask_probs, Tensor) or mask_probs.dim() != 4 or mask_probs.shape[1] != 1:
        shape = list(mask_probs.shape) if isinstance(mask_probs, Tensor) else mask_probs
        raise ValueError(f"mask_probs must be a Tensor[N, 1, M, M], got {shape}")
    if not isinstance(boxes, Tensor) or boxes.shape != (mask_probs.shape[0], 4):
        shape = list(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
        raise ValueError(f"boxes must be a Tensor[{mask_probs.shape[0]}, 4] (xyxy), got {shape}")
    if len(image_size) != 2 or min(int(s) for s in image_size) <= 0:
        raise ValueError(f"image_size must be (height, width) > 0, got {tuple(image_size)}")
    return int(image_size[0]), int(image_size[1])


@dataclass
class _AxisTaps:
    """Bilinear taps along one axis (x or y) of every mask's pixels inside its box.

    Mask ``i`` covers the pixels ``start[i] .. start[i] + length[i] - 1`` of the axis (those whose
    centres lie in the box, clipped to the image); ``low[i]``, ``high[i]`` (int64) and ``frac[i]``
    (float32), each ``[length[i]]``, interpolate its cells: ``(1 - frac) m[low] + frac m[high]``.
    """

    start: list[int]
    length: list[int]
    low: list[Tensor]
    high: list[Tensor]
    frac: list[Tensor]


def _axis_taps(lo: Tensor, hi: Tensor, cells: int, limit: int) -> _AxisTaps:
    """Taps of all masks at once (no per-mask tensor work) for box sides ``lo, hi: [N]`` along an
    axis of ``limit`` pixels covered by ``cells`` mask cells (``align_corners=False``)."""
    lo, hi = lo.double(), hi.double()
    # Pixels whose centres p + 0.5 lie in [lo, hi).
    first = torch.ceil(lo - 0.5).clamp(0, limit)
    end = torch.maximum(torch.ceil(hi - 0.5).clamp(max=limit), first)
    first, length = first.long(), (end - first).long()
    owner = torch.repeat_interleave(torch.arange(len(lo), device=lo.device), length)
    offset = torch.cumsum(length, 0) - length
    pixel = torch.arange(owner.numel(), device=lo.device) - offset[owner] + first[owner]
    scale = cells / (hi - lo).clamp(min=1e-6)
    u = ((pixel + 0.5 - lo[owner]) * scale[owner] - 0.5).clamp(0, cells - 1)
    low = u.floor().long()
    high = (low + 1).clamp(max=cells - 1)
    sizes = length.tolist()
    return _AxisTaps(
        first.tolist(),
        sizes,
        list(low.split(sizes)),
        list(high.split(sizes)),
        list((u - low).float().split(sizes)),
    )


def _regions(
    mask_probs: Tensor, boxes: Tensor, size: tuple[int, int]
) -> Iterator[tuple[int, Tensor, int, int]]:
    """Yield ``(i, region [h, w] float32, y0, x0)``: mask ``i`` pasted over the pixels inside its
    box, whose top-left pixel is ``(y0, x0)``; empty regions are skipped. The same computation
    serves the dense paste and the RLEs, so they agree bit for bit."""
    masks = mask_probs[:, 0].float()
    boxes = boxes.to(masks.device)
    ys = _axis_taps(boxes[:, 1], boxes[:, 3], masks.shape[1], size[0])
    xs = _axis_taps(boxes[:, 0], boxes[:, 2], masks.shape[2], size[1])
    for i in range(masks.shape[0]):
        if ys.length[i] == 0 or xs.length[i] == 0:
            continue
        # Separable bilinear interpolation: along y (rows of cells), then along x.
        m = masks[i]
        rows = torch.lerp(m[ys.low[i]], m[ys.high[i]], ys.frac[i][:, None])  # [h, M_w]
        region = torch.lerp(rows[:, xs.low[i]], rows[:, xs.high[i]], xs.frac[i])  # [h, w]
        yield i, region, ys.start[i], xs.start[i]


def _zeros(shape: tuple[int, ...], device: torch.device) -> Tensor:
    if device.type != "cpu":
        return torch.zeros(shape, device=device)
    # calloc'ed memory (numpy's zeros): the kernel maps large blocks to its zero page lazily, so
    # only the pages under a box are ever written here. Faulting in all of a 426 MB output
    # (100 masks, 800 x 1333) costs more than the pasting itself on these machines.
    return torch.from_numpy(np.zeros(shape, dtype=np.float32))


def _dense_axis(lo: Tensor, hi: Tensor, cells: int, limit: int) -> tuple[Tensor, ...]:
    """:func:`_axis_taps` for every pixel ``0..limit-1`` of every mask (``lo, hi: [N]``):
    ``(inside bool, low, high int64, frac float32)``, each ``[N, limit]``, the same float
    operations, so the two pastes agree bit for bit inside the boxes."""
    lo, hi = lo.double()[:, None], hi.double()[:, None]
    first = torch.ceil(lo - 0.5).clamp(0, limit)
    end = torch.maximum(torch.ceil(hi - 0.5).clamp(max=limit), first)
    pixel = torch.arange(limit, device=lo.device, dtype=torch.float64)[None]
    inside = (pixel >= first) & (pixel < end)
    u = ((pixel + 0.5 - lo) * (cells / (hi - lo).clamp(min=1e-6)) - 0.5).clamp(0, cells - 1)
    low = u.floor().long()
    return inside, low, (low + 1).clamp(max=cells - 1), (u - low).float()


def paste_masks_dense(mask_probs: Tensor, boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """:func:`paste_masks` computed on every pixel of every mask (``O(N H W)``) with tensor
    operations only: what a traced (exported) model runs, since the box sizes are data.

    ``mask_probs [N, 1, M_h, M_w]``, ``boxes [N, 4]``, ``image_size (H, W)`` ->
    float32 ``[N, 1, H, W]``.
    """
    masks = mask_probs[:, 0].float()  # [N, M_h, M_w]
    boxes = boxes.to(masks.device)
    n, cells_h, cells_w = masks.shape
    height, width = image_size
    y_in, y_lo, y_hi, y_frac = _dense_axis(boxes[:, 1], boxes[:, 3], cells_h, height)
    x_in, x_lo, x_hi, x_frac = _dense_axis(boxes[:, 0], boxes[:, 2], cells_w, width)
    # Separable bilinear interpolation, along y then x, as _regions.
    rows_lo = masks.gather(1, y_lo[:, :, None].expand(n, height, cells_w))
    rows_hi = masks.gather(1, y_hi[:, :, None].expand(n, height, cells_w))
    rows = torch.lerp(rows_lo, rows_hi, y_frac[:, :, None])  # [N, H, M_w]
    cols_lo = rows.gather(2, x_lo[:, None, :].expand(n, height, width))
    cols_hi = rows.gather(2, x_hi[:, None, :].expand(n, height, width))
    values = torch.lerp(cols_lo, cols_hi, x_frac[:, None, :])  # [N, H, W]
    inside = y_in[:, :, None] & x_in[:, None, :]
    return torch.where(inside, values, torch.zeros_like(values))[:, None]


def paste_masks(mask_probs: Tensor, boxes: Tensor, image_size: Sequence[int]) -> Tensor:
    """Paste box-local masks into an image of ``image_size = (H, W)``.

    Args:
        mask_probs: ``Tensor[N, 1, M_h, M_w]`` box-local probabilities (e.g. 28 x 28).
        boxes: ``Tensor[N, 4]`` xyxy boxes in the image's pixel coordinates.
        image_size: ``(H, W)``.

    Returns:
        float32 ``Tensor[N, 1, H, W]`` on the masks' device: the bilinear resize of each mask to
        its box, zero outside (module docstring). The work per mask is proportional to its box's
        area.
    """
    height, width = _check(mask_probs, boxes, image_size)
    if torch.jit.is_tracing():
        return paste_masks_dense(mask_probs, boxes, (height, width))
    out = _zeros((mask_probs.shape[0], 1, height, width), mask_probs.device)
    for i, region, y0, x0 in _regions(mask_probs, boxes, (height, width)):
        out[i, 0, y0 : y0 + region.shape[0], x0 : x0 + region.shape[1]] = region
    return out


def _region_rle_counts(binary: np.ndarray, y0: int, x0: int, size: tuple[int, int]) -> list[int]:
    """Uncompressed COCO RLE counts (column-major, alternating runs of 0s and 1s starting with
    0s) of an ``H x W`` image that is 0 except for ``binary [h, w]`` at ``(y0, x0)``."""
    height, width = size
    # Runs per column of the region: +1 / -1 steps of each zero-padded column.
    columns = np.pad(binary.T.astype(np.int8), ((0, 0), (1, 1)))  # [w, h + 2]
    steps = np.diff(columns, axis=1)  # [w, h + 1]
    col_s, row_s = np.nonzero(steps == 1)
    col_e, row_e = np.nonzero(steps == -1)
    # Flat column-major positions (x * H + y); np.nonzero is row-major, so both are sorted.
    starts = (x0 + col_s) * height + y0 + row_s
    ends = (x0 + col_e) * height + y0 + row_e
    if starts.size == 0:
        return [height * width]
    # A run reaching a column's bottom continues at the next column's top (full-height regions).
    keep = ends[:-1] != starts[1:]
    starts = starts[np.concatenate(([True], keep))]
    ends = ends[np.concatenate((keep, [True]))]
    bounds = np.empty(2 * starts.size + 2, dtype=np.int64)
    bounds[0], bounds[-1] = 0, height * width
    bounds[1:-1:2], bounds[2:-1:2] = starts, ends
    counts = np.diff(bounds).tolist()
    # As pycocotools: a leading run of 0 zeros is kept (counts start with zeros), a trailing one
    # (the last pixel is 1) is not.
    return counts[:-1] if counts[-1] == 0 else counts


def masks_to_rles(
    mask_probs: Tensor, boxes: Tensor, image_size: Sequence[int], threshold: float = 0.5
) -> list[dict]:
    """COCO RLEs of the pasted masks binarized at ``value > threshold``, without dense masks.

    Args:
        mask_probs: ``Tensor[N, 1, M_h, M_w]`` box-local probabilities.
        boxes: ``Tensor[N, 4]`` xyxy boxes in the image's pixel coordinates.
        image_size: ``(H, W)``.
        threshold: binarization threshold (Mask R-CNN: 0.5).

    Returns:
        ``N`` dicts ``{"size": [H, W], "counts": str}`` (compressed RLE, as the COCO results
        JSON holds them), equal to ``pycocotools.mask.encode`` of
        ``paste_masks(...) > threshold``. Only each box's pixels are ever computed.
    """
    height, width = _check(mask_probs, boxes, image_size)
    counts = [[height * width] for _ in range(mask_probs.shape[0])]  # empty regions: all 0
    for i, region, y0, x0 in _regions(mask_probs, boxes, (height, width)):
        binary = (region > threshold).cpu().numpy()
        counts[i] = _region_rle_counts(binary, y0, x0, (height, width))
    rles = []
    for c in counts:
        rle = mask_utils.frPyObjects({"size": [height, width], "counts": c}, height, width)
        rles.append({"size": [height, width], "counts": rle["counts"].decode("ascii")})
    return rles
