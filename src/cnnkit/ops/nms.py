"""Exact greedy non-maximum suppression, vectorized.

Greedy NMS (as in R-CNN and torchvision): visit boxes by decreasing score; keep a box unless an
already kept box overlaps it with IoU > threshold.

Few boxes (up to ``_DENSE_MAX_BOXES``): the suppression edges come from the full IoU matrix
and are resolved as in 3. Sparse inputs (the usual case): all suppression edges (pairs with
IoU > threshold, compared block pair by block pair, see 2.) are found at once and resolved as
in 3. Dense inputs (more than ``_DENSE_EDGES`` edges per box expected, e.g. tight clusters at
IoU 0.5; the estimate is made first from a strided sample of the blocks' own pairs, then from
all of them, so little search is wasted), where most edges join boxes that are suppressed
anyway: the sequential scan becomes a loop over *chunks* of boxes in score order, each chunk
handled with data-parallel steps:

1. **Candidates.** The next boxes by score that no kept box has suppressed yet. Suppressed
   boxes are dropped for good (compaction), so a dense cluster costs little once its first
   boxes are kept; torchvision's loop gets the same saving by skipping suppressed boxes.
2. **Suppression edges** from each candidate to the live boxes after it (IoU > threshold).
   Only spatially close boxes are compared: live boxes are kept in compact blocks (strips
   along x, runs along y), and a candidate is compared with the blocks next to its own. For
   0 < t < 1, IoU > t implies ``|cx_i - cx_j| < (1 - t) max(w_i, w_j)`` (the overlap along x
   must exceed ``t max(w_i, w_j)``), and likewise along y.
3. **Greedy resolution inside the chunk.** ``keep[j] = not any(keep[i] for edges i -> j)`` has
   a unique solution on this acyclic graph (edges point to lower-ranked boxes), and it is the
   greedy result. It is found in rounds that decide the boxes whose predecessors are all
   decided; the rounds are as many as the longest chain of decisions (a handful in practice).
4. **Forward suppression.** The edges of the kept candidates kill later boxes.

The chunk size adapts to the work per candidate (dense regions: small chunks, so that few
candidates are compared only to be suppressed inside their own chunk; sparse: large chunks, so
that the loop is short). The blocks are rebuilt from the live boxes once half are gone.

The IoU is computed with the same float operations as torchvision's kernel
(``inter / (area_i + area_j - inter)``, compared with ``> threshold``), so the keep lists match
it exactly. Ties in score keep the input order (stable sort).

Bulk float work (the IoU of many pairs) is done in torch; the comparison with the threshold, the
extraction of the hits and the many small index operations (block layout, adjacency, edge
bookkeeping, greedy resolution) in numpy, whose per-call overhead is a fraction of torch's.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import Tensor

from cnnkit.ops.boxes import check_boxes

__all__ = ["batched_nms", "nms"]

# Boxes per spatial block, by number of boxes: (most boxes, block size). Measured on CPU, one
# thread: 32 is best up to ~4,000 boxes, 64 above (fewer, larger blocks: the [B, B] block
# adjacency and the per-block-pair overhead grow as B^2).
_BLOCK_SIZES = ((4096, 32),)
_BLOCK = 64
# batched_nms shifts categories apart (one nms call) up to this many box coordinates.
_SHIFT_MAX_NUMEL, _SHIFT_MAX_NUMEL_CUDA = 4000, 100_000
# Box pairs compared per chunk (the chunk size adapts to it): long enough vectors to amortize
# the per-chunk overhead, short enough that few candidates die inside their own chunk.
_CHUNK_PAIRS = 1 << 18
# Box pairs compared per IoU call: bounds the memory of the work buffers.
_PAIR_BUDGET = 1 << 20
# Edges per box beyond which the chunked scan is used.
_DENSE_EDGES = 8
# Up to this many boxes, all pairs are compared (no blocks): measured on CPU, one thread.
_DENSE_MAX_BOXES = 320
# Edges expected in a pair of neighbouring blocks relative to those inside one block.
_OFF_DIAG_WEIGHT = 0.25
# Fewest candidates per chunk.
_MIN_CHUNK = 32
# Diagonal blocks compared first, spread over the layout: enough to tell a dense input.
_PROBE_BLOCKS = 16


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
    t = np.float32(iou_threshold)  # boxes are float32 otherwise (see _nms)
    if float(t) > iou_threshold:
        t = np.nextafter(t, np.float32(-np.inf))
    return float(t)


def _flat_over(values: Tensor, threshold: float) -> Tensor:
    """int64 ``[K]``: flat indices of the entries of ``values`` greater than ``threshold``.

    On CPU numpy's comparison and flatnonzero are several times faster than torch's (one
    thread); the comparison is the same (a Python float is compared in the array's dtype, and
    ``threshold`` is exact in it, see :func:`_threshold_for`). ``values`` is float32 or float64
    (:func:`_nms` converts the boxes).
    """
    if values.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(values.numpy() > threshold))
    return torch.nonzero(values.reshape(-1) > threshold).squeeze(1)


def _major_minor_key(major: np.ndarray, minor: np.ndarray) -> np.ndarray:
    """``[N]`` float64 sort key: by ``major`` (integers), then by ``minor`` (coordinates).

    One sort instead of two stable ones. The order by ``major`` is exact (``minor`` is squeezed
    into [0, 0.5], NaN and inf included), which the blocks need (one group, one strip each); the
    order by ``minor`` may round to ties, which only changes the layout, never the result.
    """
    m = minor.astype(np.float64)
    lo, hi = m.min(), m.max()
    frac = np.clip(np.nan_to_num((m - lo) / (2 * (hi - lo) + 1), nan=0.0), 0.0, 0.5)
    return major + frac


def _spatial_blocks(boxes: Tensor, block: int, groups: Tensor | None = None) -> Tensor:
    """Row indices of ``boxes`` grouped into spatially compact blocks: ``[num_blocks, block]``,
    -1 padded.

    Within each group (category; one group if ``groups`` is None): strips of equal count along
    x, each ordered along y and cut into runs of ``block`` boxes (a two-level k-d split that
    adapts to any density). A block never mixes groups or strips. In numpy: a few dozen
    operations on [N] arrays, where torch's per-call overhead would dominate.
    """
    b = boxes.cpu().numpy()
    n = b.shape[0]
    cx, cy = b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    if groups is None:
        group, sizes = np.zeros(n, dtype=np.int64), np.array([n])
    else:
        group = np.unique(groups.cpu().numpy(), return_inverse=True)[1].reshape(-1)
        sizes = np.bincount(group)
    group_first = np.cumsum(sizes) - sizes
    num_strips = np.maximum(np.round(np.sqrt(sizes / block)), 1).astype(np.int64)
    strip_size = block * np.ceil(np.ceil(sizes / num_strips) / block).astype(np.int64)
    strip_first = np.cumsum(num_strips) - num_strips
    # Rank along x within the group -> strip id (global over groups).
    by_gx = np.argsort(_major_minor_key(group, cx))
    g = group[by_gx]
    strip = np.empty(n, dtype=np.int64)
    strip[by_gx] = strip_first[g] + (np.arange(n) - group_first[g]) // strip_size[g]
    order = np.argsort(_major_minor_key(strip, cy))
    # Pad each strip to a whole number of blocks so that no block spans two strips.
    counts = np.bincount(strip, minlength=int(num_strips.sum()))
    padded_counts = (counts + block - 1) // block * block
    starts = np.cumsum(padded_counts) - padded_counts
    first = np.cumsum(counts) - counts
    in_strip = strip[order]
    slots = np.full(int(padded_counts.sum()), -1, dtype=np.int64)
    slots[np.arange(n) - first[in_strip] + starts[in_strip]] = order
    return torch.from_numpy(slots.reshape(-1, block)).to(boxes.device)


def _block_adjacency(
    boxes: Tensor, slots: Tensor, threshold: float, prune: bool, labels: Tensor | None
) -> Tensor:
    """``[B, B]`` bool, symmetric: the block pairs that may hold two boxes with IoU > threshold
    (and, with ``labels``, of one category; blocks then hold a single category).

    ``boxes``: ``[N, 4]``; ``slots``: ``[B, block]`` rows of ``boxes``, -1 padded. In numpy, as
    :func:`_spatial_blocks`.
    """
    s = slots.cpu().numpy()
    first = s[:, 0]  # a block's first slot always holds a box; padding comes after
    adj = np.ones((s.shape[0], s.shape[0]), dtype=bool)
    if prune:
        filled = np.where(s >= 0, s, first[:, None])  # padding repeats it: no masks below
        b64 = boxes.cpu().numpy().astype(np.float64)[filled]  # the test itself must not round
        c2 = np.stack((b64[..., 0] + b64[..., 2], b64[..., 1] + b64[..., 3]), -1)
        size = np.stack((b64[..., 2] - b64[..., 0], b64[..., 3] - b64[..., 1]), -1)
        lo, hi = c2.min(1), c2.max(1)  # [B, 2] (2x centre)
        big = size.max(1)
        gap = np.maximum(np.maximum(lo[:, None] - hi[None], lo[None] - hi[:, None]), 0.0)
        # IoU > t needs |2 cx_i - 2 cx_j| < 2 (1 - t) max(w_i, w_j) (same along y); the margins
        # absorb the float rounding of the IoU and of the centres.
        mag = np.maximum(np.abs(hi), np.abs(lo))
        scale = 1 + np.maximum(mag[:, None], mag[None])
        slack = 2 * (1.0 - threshold + 1e-4) * np.maximum(big[:, None], big[None]) + 1e-4 * scale
        adj = (gap <= slack).all(-1)
    if labels is not None:
        block_label = labels.cpu().numpy()[first]
        adj &= block_label[:, None] == block_label[None, :]
    return torch.from_numpy(adj).to(boxes.device)


def _block_coords(boxes: Tensor, slots: Tensor) -> tuple[Tensor, ...]:
    """``(x1, y1, x2, y2, area)``, each ``[B, block]`` contiguous, of the rows ``slots`` (-1
    padded) of ``boxes``. Padding is NaN: every comparison with it is false, so it never makes
    an edge."""
    padded = torch.cat((boxes, boxes.new_full((1, 4), math.nan)))
    coords = padded[torch.where(slots >= 0, slots, boxes.shape[0])]  # [B, block, 4]
    x1, y1, x2, y2 = (coords[..., i].contiguous() for i in range(4))
    return x1, y1, x2, y2, (x2 - x1) * (y2 - y1)


class _Blocks:
    """The live boxes in spatial blocks, and which blocks may suppress each other.

    ``slots``: ``[B, block]`` ranks, -1 padded; ``x1 .. area``: ``[B, block]`` coordinates
    (:func:`_block_coords`);
    ``block_of``: ``[N]`` block of each live rank; ``adj``: ``[B, B]`` bool.
    """

    def __init__(
        self,
        boxes: Tensor,
        live: Tensor,
        threshold: float,
        prune: bool,
        labels: Tensor | None,
        block: int,
        layout: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        sub = boxes[live]
        sub_labels = None if labels is None else labels[live]
        # layout: (slots, adj) already computed for all boxes (``live`` must then be all of them).
        local = _spatial_blocks(sub, block, sub_labels) if layout is None else layout[0]
        self.x1, self.y1, self.x2, self.y2, self.area = _block_coords(sub, local)
        self.slots = torch.where(local >= 0, live[local.clamp(min=0)], -1)
        self.block_of = torch.zeros(boxes.shape[0], dtype=torch.long, device=boxes.device)
        rows = torch.arange(local.shape[0], device=boxes.device)[:, None].expand_as(local)
        self.block_of[self.slots[local >= 0]] = rows[local >= 0]
        if layout is None:
            self.adj = _block_adjacency(sub, local, threshold, prune, sub_labels)
        else:
            self.adj = layout[1]
        self.size = live.numel()


class _Scratch:
    """Three work buffers reused across calls, grown on demand: on CPU, fresh multi-MB tensors
    cost more in page faults than the arithmetic itself."""

    def __init__(self, like: Tensor) -> None:
        self.like = like
        self.bufs = [like.new_empty(0)] * 3

    def views(self, shape: tuple[int, ...]) -> list[Tensor]:
        size = math.prod(shape)
        if self.bufs[0].numel() < size:
            self.bufs = [self.like.new_empty(size) for _ in range(3)]
        return [b[:size].view(shape) for b in self.bufs]


class _PairIoU:
    """``IoU > threshold`` for batches of block pairs, with torchvision's float operations; the
    ``[P, block, block]`` intermediates live in a :class:`_Scratch`."""

    def __init__(self, boxes: Tensor, slots: Tensor, threshold: float) -> None:
        self.x1, self.y1, self.x2, self.y2, self.area = _block_coords(boxes, slots)
        self.threshold = threshold
        self.scratch = _Scratch(boxes)

    def __call__(self, ia: Tensor, ib: Tensor) -> Tensor:
        """Flat indices into ``[P, block, block]`` of the pairs (box of block ``ia[p]``, box of
        block ``ib[p]``) with IoU > threshold."""
        p, block = ia.numel(), self.x1.shape[1]
        t1, t2, t3 = self.scratch.views((p, block, block))

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
        return _flat_over(inter.div_(union), self.threshold)


def _weighted_pairs(count: int, num_diag: int) -> float:
    """Expected share of the edges in the first ``count`` block pairs (diagonal ones first), up to
    a constant factor.

    A block is compact, so its own pairs hold more edges than a pair of neighbouring blocks;
    weighing those by ``_OFF_DIAG_WEIGHT`` lets the diagonal blocks alone predict dense inputs
    (at 5,000 clustered boxes, IoU 0.5, this avoids a useless first million pair comparisons).
    """
    return min(count, num_diag) + _OFF_DIAG_WEIGHT * max(0, count - num_diag)


def _all_edges(
    boxes: Tensor, threshold: float, labels: Tensor | None, slots: Tensor, adj: Tensor, limit: int
) -> tuple[Tensor, Tensor] | None:
    """Suppression edges ``(src, dst)`` (ranks, ``src < dst``): all pairs with IoU > threshold,
    each block pair compared once. None once more than ``limit`` edges are expected.

    ``slots``: ``[B, block]`` ranks, -1 padded (:func:`_spatial_blocks`); ``adj``: ``[B, B]``
    the block pairs to compare (:func:`_block_adjacency`).
    """
    device = boxes.device
    block = slots.shape[1]
    # Diagonal pairs first (they need the i < j mask), then the upper triangle. The diagonal
    # blocks go in strided order: the first _PROBE_BLOCKS of them sample the whole layout.
    num_diag = slots.shape[0]
    probe = min(num_diag, _PROBE_BLOCKS)
    diag = torch.argsort(torch.arange(num_diag, device=device) % -(-num_diag // probe), stable=True)
    ba, bb = torch.nonzero(torch.triu(adj, diagonal=1), as_tuple=True)
    ba, bb = torch.cat((diag, ba)), torch.cat((diag, bb))
    iou = _PairIoU(boxes, slots, threshold)
    step = max(1, _PAIR_BUDGET // (block * block))
    total = ba.numel()
    # With more than one chunk, the density estimate below is made from the probe, then from
    # the diagonal blocks alone, before any off-diagonal pair is compared.
    starts = [0, *range(probe, num_diag, step), *range(num_diag, total, step)]
    if total <= step:
        starts = [0]
    ends = [*starts[1:], total]
    # The hits are few: their bookkeeping is done in numpy (torch's per-call overhead dominates).
    np_slots, np_ba, np_bb = slots.cpu().numpy(), ba.cpu().numpy(), bb.cpu().numpy()
    np_labels = None if labels is None else labels.cpu().numpy()
    src, dst, found = [], [], 0
    for s, e in zip(starts, ends, strict=True):
        flat = iou(ba[s:e], bb[s:e]).cpu().numpy()
        p, i, j = flat // (block * block) + s, flat // block % block, flat % block
        ia, ib = np_ba[p], np_bb[p]
        # Within a block each pair is seen twice (and each box with itself): keep i < j.
        wanted = (ia != ib) | (i < j)
        r1, r2 = np_slots[ia[wanted], i[wanted]], np_slots[ib[wanted], j[wanted]]
        if np_labels is not None:
            same = np_labels[r1] == np_labels[r2]
            r1, r2 = r1[same], r2[same]
        src.append(np.minimum(r1, r2))
        dst.append(np.maximum(r1, r2))
        found += r1.size
        # Projected from the block pairs done so far: bail out early, before most of the work.
        if found * _weighted_pairs(total, num_diag) > limit * _weighted_pairs(e, num_diag):
            return None
    return tuple(
        torch.from_numpy(np.concatenate(x).astype(np.int64)).to(device) for x in (src, dst)
    )


class _RowIoU:
    """``IoU > threshold`` of single boxes against whole blocks, with torchvision's float
    operations; buffers as in :class:`_PairIoU`."""

    def __init__(self, boxes: Tensor, threshold: float) -> None:
        self.boxes = boxes
        self.area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        self.threshold = threshold
        self.scratch = _Scratch(boxes)

    def __call__(self, blocks: _Blocks, src: Tensor, tb: Tensor) -> Tensor:
        """Flat indices into ``[P, block]`` of the pairs (box ``src[p]`` (rank), box of block
        ``tb[p]``) with IoU > threshold."""
        t1, t2, t3 = self.scratch.views((src.numel(), blocks.x1.shape[1]))
        row = self.boxes[src]  # [P, 4]
        x1, y1, x2, y2 = (row[:, i : i + 1] for i in range(4))

        def cols(t: Tensor, out: Tensor) -> Tensor:
            return torch.index_select(t, 0, tb, out=out)

        torch.minimum(cols(blocks.x2, t1), x2, out=t1)
        torch.maximum(cols(blocks.x1, t2), x1, out=t2)
        t1.sub_(t2).clamp_(min=0)
        torch.minimum(cols(blocks.y2, t2), y2, out=t2)
        torch.maximum(cols(blocks.y1, t3), y1, out=t3)
        t2.sub_(t3).clamp_(min=0)
        inter = t1.mul_(t2)
        union = cols(blocks.area, t2).add_(self.area[src][:, None]).sub_(inter)
        return _flat_over(inter.div_(union), self.threshold)


def _edges_from(
    blocks: _Blocks, iou: _RowIoU, cand: Tensor, step: int
) -> tuple[Tensor, Tensor, int]:
    """Suppression edges ``(src, dst)`` from the candidates ``cand`` (ranks) to the live boxes
    ranked after them, and the number of box pairs compared."""
    ci, tb = torch.nonzero(blocks.adj[blocks.block_of[cand]], as_tuple=True)
    src_all = cand[ci]  # [P] one row per (candidate, neighbouring block)
    block = blocks.slots.shape[1]
    src, dst = [], []
    for s in range(0, src_all.numel(), step):
        rs, rb = src_all[s : s + step], tb[s : s + step]
        flat = iou(blocks, rs, rb)
        p = flat // block
        s_, d_ = rs[p], blocks.slots[rb[p], flat % block]
        # Only boxes ranked after the candidate: the earlier ones are decided already.
        after = d_ > s_
        src.append(s_[after])
        dst.append(d_[after])
    pairs = src_all.numel() * block
    if not src:
        empty = cand.new_empty(0)
        return empty, empty, pairs
    return torch.cat(src), torch.cat(dst), pairs


def _dense_edges(boxes: Tensor, threshold: float, labels: Tensor | None) -> tuple[Tensor, Tensor]:
    """Suppression edges ``(src, dst)`` (ranks, ``src < dst``) from the full ``[N, N]`` IoU
    matrix of ``boxes`` ``[N, 4]`` (torchvision's float operations).

    For few boxes: N^2 cheap pairs cost less than the ~100 small operations of the blocks.
    """
    x1, y1, x2, y2 = (boxes[:, i] for i in range(4))
    area = (x2 - x1) * (y2 - y1)
    w = (torch.minimum(x2[:, None], x2) - torch.maximum(x1[:, None], x1)).clamp_(min=0)
    h = (torch.minimum(y2[:, None], y2) - torch.maximum(y1[:, None], y1)).clamp_(min=0)
    inter = w.mul_(h)
    union = (area[:, None] + area).sub_(inter)
    flat = _flat_over(inter.div_(union), threshold)
    src, dst = flat // boxes.shape[0], flat % boxes.shape[0]
    upper = src < dst  # each pair once; a box never suppresses itself
    if labels is not None:
        upper &= labels[src] == labels[dst]
    return src[upper], dst[upper]


def _resolve_greedy(n: int, src: Tensor, dst: Tensor) -> Tensor:
    """``[N]`` bool, the boxes suppressed by the unique ``keep`` with
    ``keep[j] = not any(keep[i] for edges i -> j)`` (edges ``i < j``).

    Rounds of: suppress the successors of kept boxes; drop the edges that can no longer matter
    (from a suppressed box, or into a decided one); keep the boxes left with no incoming edge.
    The lowest undecided box is decided in every round, and the edge list shrinks fast (in a
    dense cluster the first kept box settles most of its neighbours at once). In numpy: many
    small index operations, where torch's per-call overhead would dominate.
    """
    device = src.device
    src, dst = src.cpu().numpy(), dst.cpu().numpy()
    kept = np.zeros(n, dtype=bool)
    suppressed = np.zeros(n, dtype=bool)
    while src.size:
        suppressed[dst[kept[src]]] = True
        live = ~(suppressed[src] | suppressed[dst] | kept[dst])
        src, dst = src[live], dst[live]
        has_pred = np.zeros(n, dtype=bool)
        has_pred[dst] = True
        kept |= ~(has_pred | suppressed)
    return torch.from_numpy(suppressed).to(device)


def _greedy_chunked(
    boxes: Tensor,
    threshold: float,
    prune: bool,
    labels: Tensor | None,
    group_blocks: bool,
    layout: tuple[Tensor, Tensor],
) -> Tensor:
    """Kept ranks, ascending, of the greedy scan over ``boxes`` ``[N, 4]`` sorted by score,
    chunk by chunk (module docstring, "dense inputs")."""
    n, device = boxes.shape[0], boxes.device
    block = layout[0].shape[1]
    block_labels = labels if group_blocks else None
    live = torch.arange(n, device=device)
    blocks = _Blocks(boxes, live, threshold, prune, block_labels, block, layout)
    iou = _RowIoU(boxes, threshold)
    step = max(1, _PAIR_BUDGET // block)
    dead = torch.zeros(n, dtype=torch.bool, device=device)
    kept = []
    # First guess of the pairs compared per candidate: the mean number of neighbouring slots.
    per_box = int(blocks.adj.sum()) * block / blocks.adj.shape[0]
    while live.numel():
        chunk = max(_MIN_CHUNK, int(_CHUNK_PAIRS / max(per_box, 1.0)))
        cand, rest = live[:chunk], live[chunk:]
        src, dst, pairs = _edges_from(blocks, iou, cand, step)
        per_box = pairs / cand.numel()
        if labels is not None and not group_blocks:  # blocks may mix categories
            same = labels[src] == labels[dst]
            src, dst = src[same], dst[same]
        inside = dst <= cand[-1]
        suppressed = _resolve_greedy(n, src[inside], dst[inside])
        kept.append(cand[~suppressed[cand]])
        # Edges of the kept candidates suppress later boxes for good.
        dead[dst[~inside & ~suppressed[src]]] = True
        live = rest[~dead[rest]]
        if 0 < 2 * live.numel() < blocks.size:
            blocks = _Blocks(boxes, live, threshold, prune, block_labels, block)
    return torch.cat(kept)


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
    b = boxes[order].detach()  # indices only: no gradient flows through nms
    if b.dtype not in (torch.float32, torch.float64):
        # Integers and half precision are compared in float32, as torchvision's CUDA kernel
        # does for half (its accumulation type); the block pruning's margins assume it.
        b = b.float()
    threshold = _threshold_for(b.dtype, float(iou_threshold))
    prune = 0.0 < iou_threshold < 1.0
    if prune:
        # The pruning rule assumes well-formed boxes (x1 <= x2, y1 <= y2): one check.
        prune = bool(((b[:, 2] >= b[:, 0]) & (b[:, 3] >= b[:, 1])).all())
    lab = None if labels is None else labels[order]
    if n <= _DENSE_MAX_BOXES:
        return order[~_resolve_greedy(n, *_dense_edges(b, threshold, lab))]
    # [B, block] ranks, -1 padded (with group_blocks, single-category blocks), and the block
    # pairs to compare: shared by both paths.
    block_labels = lab if group_blocks else None
    slots = _spatial_blocks(b, _block_size(n), block_labels)
    adj = _block_adjacency(b, slots, threshold, prune, block_labels)
    edges = _all_edges(b, threshold, lab, slots, adj, _DENSE_EDGES * n)
    if edges is None:  # dense: most boxes are suppressed, skip them
        return order[_greedy_chunked(b, threshold, prune, lab, group_blocks, (slots, adj))]
    return order[~_resolve_greedy(n, *edges)]


def _block_size(n: int) -> int:
    return next((size for most, size in _BLOCK_SIZES if n <= most), _BLOCK)


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
    if torch.jit.is_tracing():
        return _traceable_nms(boxes, scores, None, iou_threshold)
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
    if torch.jit.is_tracing():
        return _traceable_nms(boxes, scores, idxs, iou_threshold)
    many = boxes.numel() > (
        _SHIFT_MAX_NUMEL if boxes.device.type == "cpu" else _SHIFT_MAX_NUMEL_CUDA
    )
    if boxes.numel() and not many:
        # torchvision's choice for few boxes: shift each category by (max coordinate + 1) and
        # run one nms. The IoU is then computed on shifted coordinates, whose rounding we
        # reproduce to return the same boxes; the category mask below still applies, so boxes
        # with negative coordinates (where shifted categories can overlap) stay exact.
        boxes = boxes + (idxs.to(boxes) * (boxes.max() + 1))[:, None]
    # For many boxes, blocks never mix categories and only blocks of one category are compared
    # (the shifted boxes above are apart already); below it, edges across categories are masked.
    keep = _nms(boxes, scores, iou_threshold, idxs, group_blocks=many)
    if many:
        # Order among equal scores as torchvision, whose per-class path for this many boxes
        # re-sorts the kept indices (ascending) with an unstable sort; keep lists then agree
        # element for element. (Below the size, it runs one nms: stable, as ours.)
        keep = keep.sort().values
        keep = keep[scores[keep].sort(descending=True)[1]]
    return keep


# --------------------------------------------------------------------- traced (exported) models


def _greedy_scan(
    boxes: Tensor, scores: Tensor, labels: Tensor, threshold: float, shift_max_numel: int
) -> Tensor:
    """The textbook greedy loop, in the TorchScript subset: visit boxes by decreasing score
    (stable), keep one unless suppressed, suppress the later boxes of its label with
    ``IoU > threshold``. ``O(N * kept)``; the IoU uses the float operations of
    :func:`_dense_edges` (torchvision's), so the result is :func:`batched_nms`'s.

    A traced model cannot run :func:`_nms` (numpy, data-dependent Python loops): scripted,
    this loop stays a loop in the exported graph. ``boxes`` ``[N, 4]`` float, ``scores`` ``[N]``,
    ``labels`` ``[N]`` int64 -> kept indices ``[K]`` int64.
    """
    many = boxes.numel() > shift_max_numel
    if not many and boxes.size(0) > 0:
        # batched_nms's few-box path compares shifted boxes: the same rounding, the same result.
        boxes = boxes + (labels.to(boxes.dtype) * (boxes.max() + 1))[:, None]
    order = torch.sort(scores, descending=True, stable=True)[1]
    b = boxes[order]
    lab = labels[order]
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    area = (x2 - x1) * (y2 - y1)
    removed = torch.zeros(b.size(0), dtype=torch.bool, device=b.device)
    keep = torch.zeros(b.size(0), dtype=torch.bool, device=b.device)
    for i in range(b.size(0)):
        if not bool(removed[i]):
            keep[i] = True
            w = (torch.minimum(x2[i], x2) - torch.maximum(x1[i], x1)).clamp(min=0)
            h = (torch.minimum(y2[i], y2) - torch.maximum(y1[i], y1)).clamp(min=0)
            inter = w * h
            iou = inter / (area[i] + area - inter)
            removed = removed | ((iou > threshold) & (lab == lab[i]))
    kept = order[keep]
    if many:  # batched_nms's order of equal scores on its many-box path
        kept = kept.sort()[0]
        kept = kept[scores[kept].sort(descending=True)[1]]
    return kept


@functools.cache
def _scripted_scan():
    return torch.jit.script(_greedy_scan)  # compiled once, when a model is first traced


def _traceable_nms(
    boxes: Tensor, scores: Tensor, idxs: Tensor | None, iou_threshold: float
) -> Tensor:
    """:func:`nms` / :func:`batched_nms` while ``torch.jit.trace`` records a model: a call of
    the scripted :func:`_greedy_scan` (compiled once), which the trace keeps as a call."""
    if torch.onnx.is_in_onnx_export():
        return _OnnxNMS.apply(boxes, scores, idxs, float(iou_threshold))
    return _scripted_scan()(*_scan_arguments(boxes, scores, idxs, iou_threshold))


def _scan_arguments(
    boxes: Tensor, scores: Tensor, idxs: Tensor | None, iou_threshold: float
) -> tuple[Tensor, Tensor, Tensor, float, int]:
    """The arguments of :func:`_greedy_scan` that give :func:`nms` / :func:`batched_nms`."""
    b = boxes.detach()
    if b.dtype not in (torch.float32, torch.float64):
        b = b.float()
    labels = torch.zeros_like(scores, dtype=torch.long) if idxs is None else idxs.long()
    threshold = _threshold_for(b.dtype, float(iou_threshold))
    # batched_nms shifts the categories apart up to this many coordinates and re-sorts beyond;
    # nms does neither (one category: the shift adds 0).
    shift_max = _SHIFT_MAX_NUMEL if b.device.type == "cpu" else _SHIFT_MAX_NUMEL_CUDA
    if idxs is None:
        shift_max = 2**62
    return b, scores, labels, threshold, shift_max


class _OnnxNMS(torch.autograd.Function):
    """:func:`batched_nms` (``idxs`` None: :func:`nms`) as ONNX's ``NonMaxSuppression``: the
    categories shifted apart as in :func:`batched_nms`, one class, every box allowed."""

    @staticmethod
    def forward(ctx, boxes, scores, idxs, iou_threshold):  # type: ignore[override]
        return _greedy_scan(*_scan_arguments(boxes, scores, idxs, iou_threshold))

    @staticmethod
    def symbolic(g, boxes, scores, idxs, iou_threshold):  # type: ignore[override]
        def const(value, dtype):
            return g.op("Constant", value_t=torch.tensor(value, dtype=dtype))

        boxes = g.op("Cast", boxes, to_i=1)  # float32
        if not (idxs is None or idxs.node().mustBeNone()):
            span = g.op("Add", g.op("ReduceMax", boxes, keepdims_i=0), const(1.0, torch.float32))
            shift = g.op("Mul", g.op("Cast", idxs, to_i=1), span)
            boxes = g.op("Add", boxes, g.op("Unsqueeze", shift, const([1], torch.int64)))
        selected = g.op(
            "NonMaxSuppression",
            g.op("Unsqueeze", boxes, const([0], torch.int64)),  # [1, N, 4]
            g.op(
                "Unsqueeze",
                g.op("Unsqueeze", scores, const([0], torch.int64)),
                const([0], torch.int64),
            ),  # [1, 1, N]
            const([2**62], torch.int64),
            const([iou_threshold], torch.float32),
        )  # [K, 3]: (batch, class, box)
        column = g.op("Gather", selected, const([2], torch.int64), axis_i=1)
        return g.op("Squeeze", column, const([1], torch.int64))
