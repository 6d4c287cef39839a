"""Exact greedy non-maximum suppression, vectorized.

Greedy NMS (as in R-CNN and torchvision): visit boxes by decreasing score; keep a box unless an
already kept box overlaps it with IoU > threshold. The sequential scan is replaced by two
data-parallel steps:

1. **Suppression edges.** Every pair (i, j) with IoU > threshold, oriented from the higher-ranked
   box to the lower-ranked one. Only pairs that can pass the threshold are evaluated: boxes are
   cut into spatially compact blocks (strips along x, then runs along y), and two blocks are
   compared only if some pair of their boxes could reach the threshold. For 0 < t < 1,
   IoU > t implies ``|cx_i - cx_j| < (1 - t) max(w_i, w_j)`` (the overlap along x must exceed
   ``t max(w_i, w_j)``), and likewise along y.
2. **Greedy resolution.** ``keep[j] = not any(keep[i] for edges i -> j)`` has a unique solution
   on this acyclic graph (edges point to lower-ranked boxes), and it is the greedy result. It is
   found in rounds that decide boxes whose predecessors are all decided, dropping the edges
   that no longer matter; the rounds are as many as the longest chain of decisions (a handful on
   detector outputs), each cheaper than the last.

The IoU is computed with the same float operations as torchvision's kernel
(``inter / (area_i + area_j - inter)``, compared with ``> threshold``), so the keep lists match
it exactly. Ties in score keep the input order (stable sort).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from cnnkit.ops.boxes import check_boxes

__all__ = ["batched_nms", "nms"]

# Boxes per spatial block (measured on CPU: 64 beats 32 and 128 from 1,000 to 20,000 boxes).
_BLOCK = 64
# IoU entries evaluated at once: bounds memory, keeps the work buffers in cache.
_PAIR_BUDGET = 1 << 20


def _check(boxes: Tensor, scores: Tensor, iou_threshold: float) -> None:
    check_boxes(boxes, "boxes")
    if not isinstance(scores, Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dim() != 1 or scores.shape[0] != boxes.shape[0]:
        raise ValueError(
            f"scores must have shape [{boxes.shape[0]}] to match boxes, got {list(scores.shape)}"
        )
    if not isinstance(iou_threshold, (int, float)) or math.isnan(iou_threshold):
        raise TypeError(f"iou_threshold must be a number, got {iou_threshold!r}")


def _threshold_for(dtype: torch.dtype, iou_threshold: float) -> float:
    """The largest value ``t`` of ``dtype`` with ``x > t`` iff ``x > iou_threshold`` for all x.

    torchvision compares the float IoU with a double threshold; a float32 tensor compared with
    a Python float would round the threshold to float32 first (0.7 -> 0.699999988...).
    """
    if dtype == torch.float64:
        return iou_threshold
    np_type = {torch.float32: np.float32, torch.float16: np.float16}.get(dtype, np.float32)
    t = np_type(iou_threshold)
    if float(t) > iou_threshold:
        t = np.nextafter(t, np_type(-np.inf))
    return float(t)


def _spatial_blocks(boxes: Tensor, block: int, groups: Tensor | None = None) -> Tensor:
    """Box ranks grouped into spatially compact blocks: ``[num_blocks, block]``, -1 padded.

    Within each group (category; one group if ``groups`` is None): strips of equal count along
    x, each ordered along y and cut into runs of ``block`` boxes (a two-level k-d split that
    adapts to any density). A block never mixes groups or strips.
    """
    n, device = boxes.shape[0], boxes.device
    cx = boxes[:, 0] + boxes[:, 2]
    cy = boxes[:, 1] + boxes[:, 3]
    if groups is None:
        group = torch.zeros(n, dtype=torch.long, device=device)
        sizes = torch.tensor([n], device=device)
    else:
        group = torch.unique(groups, return_inverse=True)[1]
        sizes = torch.bincount(group)
    group_first = torch.cumsum(sizes, 0) - sizes
    num_strips = torch.sqrt(sizes / block).round().clamp(min=1).long()
    strip_size = block * torch.ceil(torch.ceil(sizes / num_strips) / block).long()
    strip_first = torch.cumsum(num_strips, 0) - num_strips
    # Rank along x within the group -> strip id (global over groups).
    by_x = torch.argsort(cx, stable=True)
    by_gx = by_x if groups is None else by_x[torch.argsort(group[by_x], stable=True)]
    g = group[by_gx]
    rank = torch.arange(n, device=device) - group_first[g]
    strip = torch.empty_like(by_gx)
    strip[by_gx] = strip_first[g] + rank // strip_size[g]
    by_y = torch.argsort(cy, stable=True)
    order = by_y[torch.argsort(strip[by_y], stable=True)]
    # Pad each strip to a whole number of blocks so that no block spans two strips.
    counts = torch.bincount(strip, minlength=int(num_strips.sum()))
    padded_counts = (counts + block - 1) // block * block
    starts = torch.cumsum(padded_counts, 0) - padded_counts
    first = torch.cumsum(counts, 0) - counts
    pos = torch.arange(n, device=device) - first[strip[order]] + starts[strip[order]]
    slots = torch.full((int(padded_counts.sum()),), -1, dtype=torch.long, device=device)
    slots[pos] = order
    return slots.view(-1, block)


class _PairIoU:
    """``IoU > threshold`` for batches of block pairs, with torchvision's float operations.

    All ``[P, block, block]`` intermediates live in buffers allocated once: on CPU, fresh
    multi-MB tensors cost more in page faults than the arithmetic itself.
    """

    def __init__(self, blocks: Tensor, threshold: float, budget: int) -> None:
        self.x1, self.y1, self.x2, self.y2 = (blocks[..., i].contiguous() for i in range(4))
        self.area = (self.x2 - self.x1) * (self.y2 - self.y1)
        self.threshold = threshold
        self.t1 = blocks.new_empty(budget)
        self.t2 = blocks.new_empty(budget)
        self.t3 = blocks.new_empty(budget)
        self.mask = torch.empty(budget, dtype=torch.bool, device=blocks.device)

    def __call__(self, ia: Tensor, ib: Tensor) -> Tensor:
        """``[P, block, block]`` bool for the boxes of blocks ``ia`` against those of ``ib``."""
        p, block = ia.numel(), self.x1.shape[1]
        shape = (p, block, block)
        t1, t2, t3 = (t[: p * block * block].view(shape) for t in (self.t1, self.t2, self.t3))

        def rows(t: Tensor) -> Tensor:
            return t[ia][:, :, None]

        def cols(t: Tensor) -> Tensor:
            return t[ib][:, None, :]

        torch.minimum(rows(self.x2), cols(self.x2), out=t1)
        torch.maximum(rows(self.x1), cols(self.x1), out=t2)
        t1.sub_(t2).clamp_(min=0)
        torch.minimum(rows(self.y2), cols(self.y2), out=t2)
        torch.maximum(rows(self.y1), cols(self.y1), out=t3)
        t2.sub_(t3).clamp_(min=0)
        inter = t1.mul_(t2)
        union = torch.add(rows(self.area), cols(self.area), out=t2).sub_(inter)
        mask = self.mask[: p * block * block].view(shape)
        return torch.gt(inter.div_(union), self.threshold, out=mask)


def _block_pairs(
    boxes: Tensor, slots: Tensor, threshold: float, prune: bool, labels: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Block pairs ``(a, b)``, ``a <= b``, that may hold a pair of boxes with IoU > threshold
    (and, with ``labels``, of one category: blocks hold a single category)."""
    num = slots.shape[0]
    pairs = torch.ones((num, num), dtype=torch.bool, device=boxes.device)
    if prune:
        valid = slots >= 0
        b64 = boxes[slots.clamp(min=0)].double()  # float64: the test itself must not round
        c2 = torch.stack((b64[..., 0] + b64[..., 2], b64[..., 1] + b64[..., 3]), -1)
        size = torch.stack((b64[..., 2] - b64[..., 0], b64[..., 3] - b64[..., 1]), -1)
        lo = torch.where(valid[..., None], c2, math.inf).amin(1)  # [B, 2] (2x centre)
        hi = torch.where(valid[..., None], c2, -math.inf).amax(1)
        big = torch.where(valid[..., None], size, 0.0).amax(1)
        gap = torch.maximum(lo[:, None] - hi[None], lo[None] - hi[:, None]).clamp(min=0)
        # IoU > t needs |2 cx_i - 2 cx_j| < 2 (1 - t) max(w_i, w_j) (same along y); the margins
        # absorb the float rounding of the IoU and of the centres.
        scale = 1 + torch.maximum(hi.abs()[:, None], lo.abs()[None])
        slack = 2 * (1.0 - threshold + 1e-4) * torch.maximum(big[:, None], big[None]) + 1e-4 * scale
        pairs = (gap <= slack).all(-1)
    if labels is not None:
        block_label = labels[slots.amax(1)]  # every block holds at least one box
        pairs &= block_label[:, None] == block_label[None, :]
    # Diagonal pairs first (they need the i < j mask), then the upper triangle.
    diag = torch.arange(num, device=boxes.device)
    ba, bb = torch.nonzero(torch.triu(pairs, diagonal=1), as_tuple=True)
    return torch.cat((diag, ba)), torch.cat((diag, bb))


def _edges(
    boxes: Tensor,
    threshold: float,
    labels: Tensor | None,
    prune: bool,
    block: int,
    group_blocks: bool,
) -> tuple[Tensor, Tensor]:
    """Suppression edges ``(src, dst)`` (ranks, ``src < dst``): pairs with IoU > threshold."""
    device = boxes.device
    # [B, block] ranks, -1 padded; with group_blocks, blocks are single-category.
    slots = _spatial_blocks(boxes, block, labels if group_blocks else None)
    # Padding boxes are NaN: every comparison with them is false, so they never make an edge.
    padded = torch.cat((boxes, boxes.new_full((1, 4), math.nan)))
    blocks = padded[torch.where(slots >= 0, slots, boxes.shape[0])]  # [B, block, 4]
    ba, bb = _block_pairs(boxes, slots, threshold, prune, labels if group_blocks else None)
    num_diag = slots.shape[0]
    iou = _PairIoU(blocks, threshold, min(_PAIR_BUDGET, ba.numel() * block * block))
    upper = torch.triu(torch.ones(block, block, dtype=torch.bool, device=device), diagonal=1)
    step = max(1, _PAIR_BUDGET // (block * block))
    src, dst = [], []
    for s in range(0, ba.numel(), step):
        ia, ib = ba[s : s + step], bb[s : s + step]
        over = iou(ia, ib)
        if s < num_diag:
            # Within a block each pair is seen twice (and each box with itself): keep i < j.
            over[: num_diag - s] &= upper
        p, i, j = torch.nonzero(over, as_tuple=True)
        r1, r2 = slots[ia[p], i], slots[ib[p], j]
        if labels is not None:
            same = labels[r1] == labels[r2]
            r1, r2 = r1[same], r2[same]
        src.append(torch.minimum(r1, r2))
        dst.append(torch.maximum(r1, r2))
    if not src:
        empty = torch.empty(0, dtype=torch.long, device=device)
        return empty, empty
    return torch.cat(src), torch.cat(dst)


def _resolve_greedy(n: int, src: Tensor, dst: Tensor, device: torch.device) -> Tensor:
    """Unique ``keep`` with ``keep[j] = not any(keep[i] for edges i -> j)`` (edges ``i < j``).

    Rounds of: suppress the successors of kept boxes; drop the edges that can no longer matter
    (from a suppressed box, or into a decided one); keep the boxes left with no incoming edge.
    The lowest undecided box is decided in every round, and the edge list shrinks fast (in a
    dense cluster the first kept box settles most of its neighbours at once).
    """
    kept = torch.zeros(n, dtype=torch.bool, device=device)
    suppressed = torch.zeros(n, dtype=torch.bool, device=device)
    while src.numel():
        suppressed[dst[kept[src]]] = True
        live = ~(suppressed[src] | suppressed[dst] | kept[dst])
        src, dst = src[live], dst[live]
        has_pred = torch.zeros(n, dtype=torch.bool, device=device)
        has_pred[dst] = True
        kept |= ~(has_pred | suppressed)
    return ~suppressed


def _nms(
    boxes: Tensor,
    scores: Tensor,
    iou_threshold: float,
    labels: Tensor | None,
    group_blocks: bool = False,
) -> Tensor:
    n = boxes.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    order = torch.argsort(scores, descending=True, stable=True)
    b = boxes[order]
    if not b.is_floating_point():
        b = b.float()
    threshold = _threshold_for(b.dtype, float(iou_threshold))
    prune = 0.0 < iou_threshold < 1.0
    if prune:
        # The pruning rule assumes well-formed boxes (x1 <= x2, y1 <= y2): one check.
        prune = bool(((b[:, 2] >= b[:, 0]) & (b[:, 3] >= b[:, 1])).all())
    lab = None if labels is None else labels[order]
    src, dst = _edges(b, threshold, lab, prune, _block_size(n), group_blocks)
    keep = _resolve_greedy(n, src, dst, boxes.device)
    return order[keep]


def _block_size(n: int) -> int:
    return min(_BLOCK, max(16, 1 << max(n - 1, 0).bit_length()))


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression, exactly torchvision's result.

    Args:
        boxes: ``Tensor[N, 4]`` xyxy.
        scores: ``Tensor[N]``.
        iou_threshold: a box is discarded if it overlaps a kept, higher-scoring box with
            ``IoU > iou_threshold``.

    Returns:
        int64 ``Tensor[K]``: indices of the kept boxes by decreasing score (ties: input order).
    """
    _check(boxes, scores, iou_threshold)
    return _nms(boxes, scores, iou_threshold, None)


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS within each category: boxes with different ``idxs`` never suppress each other.

    Args:
        boxes: ``Tensor[N, 4]`` xyxy.
        scores: ``Tensor[N]``.
        idxs: ``Tensor[N]`` integer category of each box.
        iou_threshold: as in :func:`nms`.

    Returns:
        int64 ``Tensor[K]``: kept indices by decreasing score (ties: see the comment below).
    """
    _check(boxes, scores, iou_threshold)
    if not isinstance(idxs, Tensor):
        raise TypeError(f"idxs must be a torch.Tensor, got {type(idxs).__name__}")
    if idxs.shape != scores.shape:
        raise ValueError(f"idxs must have shape [{scores.shape[0]}], got {list(idxs.shape)}")
    many = boxes.numel() > (4000 if boxes.device.type == "cpu" else 100_000)
    if boxes.numel() and not many:
        # torchvision's choice for few boxes: shift each category by (max coordinate + 1) and
        # run one nms. The IoU is then computed on shifted coordinates, whose rounding we
        # reproduce to return the same boxes; the category mask below still applies, so boxes
        # with negative coordinates (where shifted categories can overlap) stay exact.
        boxes = boxes + (idxs.to(boxes) * (boxes.max() + 1))[:, None]
    # For many boxes, blocks never mix categories and only blocks of one category are compared
    # (the shifted boxes above are apart already). Edges across categories are masked anyway.
    keep = _nms(boxes, scores, iou_threshold, idxs, group_blocks=many)
    if many:
        # Order among equal scores as torchvision, whose per-class path for this many boxes
        # re-sorts the kept indices (ascending) with an unstable sort; keep lists then agree
        # element for element. (Below the size, it runs one nms: stable, as ours.)
        keep = keep.sort().values
        keep = keep[scores[keep].sort(descending=True)[1]]
    return keep
