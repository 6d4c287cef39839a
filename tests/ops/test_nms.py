"""NMS against greedy references written here (Python loops over boxes)."""

from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cnnkit.ops import batched_nms, nms

# The module (cnnkit.ops.nms is the function), to patch its tuning constants.
nms_module = importlib.import_module("cnnkit.ops.nms")


def iou_py(a: list[float], b: list[float]) -> float:
    # The formula of the reference kernels: inter / (area_a + area_b - inter).
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    # Two empty boxes: 0 / 0 is NaN in the kernels, and NaN > thr is false (no suppression).
    return inter / union if union != 0 else float("nan")


def greedy_py(boxes: list[list[float]], scores: list[float], thr: float, labels=None) -> list[int]:
    """Greedy NMS, box by box: visit by decreasing score (ties: input order), keep a box unless
    a kept box of its category overlaps it with IoU > thr."""
    order = sorted(range(len(boxes)), key=lambda i: -scores[i])
    kept: list[int] = []
    for i in order:
        if all(
            (labels is not None and labels[i] != labels[k]) or not iou_py(boxes[i], boxes[k]) > thr
            for k in kept
        ):
            kept.append(i)
    return kept


def greedy_torch(boxes: torch.Tensor, scores: torch.Tensor, thr: float) -> list[int]:
    """The same greedy scan, one kept box at a time against all boxes (for larger inputs)."""
    order = torch.argsort(scores, descending=True, stable=True)
    b = boxes[order]
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    alive = torch.ones(len(b), dtype=torch.bool)
    kept = []
    for i in range(len(b)):
        if not alive[i]:
            continue
        kept.append(int(order[i]))
        w = (torch.minimum(b[i, 2], b[:, 2]) - torch.maximum(b[i, 0], b[:, 0])).clamp(min=0)
        h = (torch.minimum(b[i, 3], b[:, 3]) - torch.maximum(b[i, 1], b[:, 1])).clamp(min=0)
        inter = w * h
        over = inter / (area[i] + area - inter) > thr
        over[: i + 1] = False
        alive &= ~over
    return kept


def per_class_greedy(boxes, scores, labels, thr: float, classes: int) -> list[int]:
    """:func:`greedy_torch` within each class, merged by decreasing score."""
    expected = []
    for c in range(classes):
        idx = torch.where(labels == c)[0]
        expected += idx[greedy_torch(boxes[idx], scores[idx], thr)].tolist()
    expected.sort(key=lambda i: -scores[i].item())
    return expected


def random_boxes(n: int, seed: int, extent: float = 300.0, dtype=torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    c = torch.rand(n, 2, generator=gen, dtype=dtype) * extent
    s = torch.rand(n, 2, generator=gen, dtype=dtype) * 60 + 2
    return torch.cat((c - s / 2, c + s / 2), 1)


int_box = st.tuples(
    st.integers(0, 12), st.integers(0, 12), st.integers(0, 6), st.integers(0, 6)
).map(lambda t: [float(t[0]), float(t[1]), float(t[0] + t[2]), float(t[1] + t[3])])


# _DENSE_MAX_BOXES: 0 forces the spatial blocks, 10**9 the full IoU matrix (small inputs).
BOTH_PATHS = pytest.mark.parametrize("dense_max", [0, 10**9], ids=["blocks", "dense"])


@BOTH_PATHS
@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.tuples(int_box, st.integers(0, 6)), min_size=0, max_size=30),
    st.sampled_from([0.0, 0.25, 0.5, 0.7, 1.0]),
)
def test_nms_is_exact_greedy(dense_max, items, thr):
    # Small integer boxes and scores: IoU exactly at the threshold, tied scores, duplicates.
    boxes = [b for b, _ in items]
    scores = [float(s) for _, s in items]
    tb = torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nms_module, "_DENSE_MAX_BOXES", dense_max)
        keep = nms(tb, torch.tensor(scores, dtype=torch.float64), thr)
    assert keep.dtype == torch.int64
    assert keep.tolist() == greedy_py(boxes, scores, thr)


@BOTH_PATHS
@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(int_box, st.integers(0, 6), st.integers(0, 2)), max_size=30))
def test_batched_nms_is_per_class_greedy(dense_max, items):
    boxes = [b for b, _, _ in items]
    scores = [float(s) + 0.01 * i for i, (_, s, _) in enumerate(items)]  # distinct scores
    labels = [c for _, _, c in items]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nms_module, "_DENSE_MAX_BOXES", dense_max)
        keep = batched_nms(
            torch.tensor(boxes).reshape(-1, 4),
            torch.tensor(scores),
            torch.tensor(labels, dtype=torch.int64),
            0.5,
        )
    assert keep.tolist() == greedy_py(boxes, scores, 0.5, labels)


@pytest.mark.parametrize(
    ("n", "thr", "extent"),
    [(300, 0.5, 200.0), (700, 0.5, 300.0), (2500, 0.7, 600.0), (2500, 0.3, 600.0)],
)
def test_nms_large_inputs_match_greedy(n, thr, extent):
    # Large enough for many spatial blocks (the pruned path).
    boxes = random_boxes(n, seed=n, extent=extent)
    scores = torch.rand(n, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    assert nms(boxes, scores, thr).tolist() == greedy_torch(boxes, scores, thr)


def test_long_suppression_chain():
    # Boxes 9 wide, shifted by 1, scores falling along the row: IoU with the next two boxes is
    # 72/90 and 63/99 (> 0.5), with the third exactly 54/108 = 0.5 (not > 0.5). Greedy keeps every
    # third box; each decision depends on the previous ones, a chain as long as the row.
    n = 300
    x = torch.arange(n, dtype=torch.float64)
    boxes = torch.stack((x, torch.zeros(n), x + 9, torch.full((n,), 9.0)), 1)
    scores = torch.linspace(1, 0, n, dtype=torch.float64)
    keep = nms(boxes, scores, 0.5)
    assert keep.tolist() == greedy_torch(boxes, scores, 0.5)
    assert keep.tolist() == list(range(0, n, 3))


@BOTH_PATHS
def test_float32_threshold_is_not_rounded(monkeypatch, dense_max):
    # IoU exactly 0.7 in float32 rounding: torchvision compares with the double 0.7 (both the
    # full matrix and the blocks compare in numpy, with the threshold of _threshold_for).
    monkeypatch.setattr(nms_module, "_DENSE_MAX_BOXES", dense_max)
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 7.0]])
    iou32 = torch.tensor(70.0) / torch.tensor(100.0)
    keep = nms(a, torch.tensor([1.0, 0.5]), 0.7)
    assert keep.tolist() == ([0] if iou32.double().item() > 0.7 else [0, 1])


def test_thresholds_outside_zero_one():
    boxes = random_boxes(50, seed=3)
    scores = torch.rand(50, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    order = torch.argsort(scores, descending=True).tolist()
    assert nms(boxes, scores, 1.0).tolist() == order
    assert nms(boxes, scores, -0.1).tolist() == order[:1]  # IoU >= 0 > -0.1: all suppressed


def test_identical_boxes_in_different_classes_survive():
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 3)
    keep = batched_nms(box, torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0, 1, 0]), 0.5)
    assert keep.tolist() == [0, 1]


def test_batched_nms_many_boxes_matches_per_class_greedy():
    n = 1500  # above torchvision's threshold for the per-class path
    boxes = random_boxes(n, seed=11, extent=400.0)
    scores = torch.rand(n, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    labels = torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(13))
    keep = batched_nms(boxes, scores, labels, 0.5)
    assert keep.tolist() == per_class_greedy(boxes, scores, labels, 0.5, 3)


def test_empty_and_integer_inputs():
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).tolist() == []
    assert (
        batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.5).dtype
        == torch.int64
    )
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]])
    assert nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist() == [0, 2]


@pytest.mark.parametrize(
    ("call", "exc", "name"),
    [
        (lambda: nms(torch.zeros(3, 5), torch.zeros(3), 0.5), ValueError, "boxes"),
        (lambda: nms(torch.zeros(3, 4), torch.zeros(2), 0.5), ValueError, "scores"),
        (lambda: nms(torch.zeros(3, 4), [0.1, 0.2, 0.3], 0.5), TypeError, "scores"),
        (lambda: nms(torch.zeros(3, 4), torch.zeros(3), "0.5"), TypeError, "iou_threshold"),
        (
            lambda: batched_nms(torch.zeros(3, 4), torch.zeros(3), torch.zeros(2), 0.5),
            ValueError,
            "idxs",
        ),
    ],
)
def test_bad_input_errors_name_the_argument(call, exc, name):
    with pytest.raises(exc, match=name):
        call()


def clustered_boxes(n: int, seed: int, spread: float, dtype=torch.float64) -> torch.Tensor:
    """Boxes around 3 centres, all overlapping heavily: many more suppression edges than boxes."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[100.0, 100.0], [400.0, 150.0], [250.0, 400.0]], dtype=dtype)
    c = centres[torch.randint(0, 3, (n,), generator=gen)]
    c = c + torch.randn(n, 2, generator=gen, dtype=dtype) * spread
    s = torch.rand(n, 2, generator=gen, dtype=dtype) * 60 + 40
    return torch.cat((c - s / 2, c + s / 2), 1)


@pytest.mark.parametrize(("n", "thr", "spread"), [(1500, 0.5, 10.0), (1200, 0.3, 25.0)])
def test_dense_clusters_match_greedy(n, thr, spread):
    # Far more than 8 edges per box: the chunked scan (with compaction and block rebuilds).
    boxes = clustered_boxes(n, seed=n, spread=spread)
    scores = torch.rand(n, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert nms(boxes, scores, thr).tolist() == greedy_torch(boxes, scores, thr)


def test_dense_clusters_batched_match_per_class_greedy():
    n = 1200  # above torchvision's threshold for the per-class path; dense within each class
    boxes = clustered_boxes(n, seed=21, spread=10.0)
    scores = torch.rand(n, generator=torch.Generator().manual_seed(22), dtype=torch.float64)
    labels = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(23))
    keep = batched_nms(boxes, scores, labels, 0.5)
    assert keep.tolist() == per_class_greedy(boxes, scores, labels, 0.5, 2)


def test_all_identical_boxes_keep_the_first_best():
    # Every pair has IoU 1: only the top box survives; tied scores keep the input order.
    n = 600
    boxes = torch.tensor([[5.0, 5.0, 25.0, 45.0]]).repeat(n, 1)
    scores = torch.ones(n)
    scores[300] = 2.0
    assert nms(boxes, scores, 0.5).tolist() == [300]
    assert nms(boxes, torch.ones(n), 0.99).tolist() == [0]


def test_dense_chain_across_chunks():
    # Stacked copies of the shifted-box chain: >8 edges per box (chunked scan), decisions that
    # depend on each other across many chunks. Greedy keeps every third position, once.
    n, copies = 400, 6
    x = torch.arange(n, dtype=torch.float64).repeat(copies)
    boxes = torch.stack((x, torch.zeros_like(x), x + 9, torch.full_like(x, 9.0)), 1)
    # Score falls along the row; the copies of one position have adjacent ranks.
    scores = torch.linspace(1, 0, n * copies, dtype=torch.float64).view(n, copies).t().reshape(-1)
    keep = nms(boxes, scores, 0.5)
    assert keep.tolist() == greedy_torch(boxes, scores, 0.5)


@pytest.mark.parametrize("sizes", [(), ((10**9, 16),), ((10**9, 32),), ((10**9, 64),)])
def test_every_block_size_matches_greedy(monkeypatch, sizes):
    # The block size depends on the number of boxes (32 / 64); force each, and 16, on small inputs.
    monkeypatch.setattr(nms_module, "_BLOCK_SIZES", sizes)
    monkeypatch.setattr(nms_module, "_DENSE_MAX_BOXES", 0)
    for n, thr in ((900, 0.5), (200, 0.7)):
        boxes = random_boxes(n, seed=n, extent=400.0)
        scores = torch.rand(n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        assert nms(boxes, scores, thr).tolist() == greedy_torch(boxes, scores, thr)


def test_density_estimate_from_diagonal_blocks(monkeypatch):
    # With a small pair budget the block pairs take several chunks. Dense input: the estimate from
    # the diagonal chunks alone switches to the chunked scan, before any off-diagonal pair is
    # compared. Sparse input: all chunks are compared. Both exact.
    monkeypatch.setattr(nms_module, "_PAIR_BUDGET", 16 * 16 * 4)
    calls = []
    real_call = nms_module._PairIoU.__call__

    def spy(self, ia, ib):
        calls.append(bool((ia == ib).all()))
        return real_call(self, ia, ib)

    monkeypatch.setattr(nms_module._PairIoU, "__call__", spy)
    dense = clustered_boxes(800, seed=4, spread=10.0)
    scores = torch.rand(800, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    assert nms(dense, scores, 0.5).tolist() == greedy_torch(dense, scores, 0.5)
    assert calls and all(calls)  # diagonal block pairs only
    calls.clear()
    sparse = random_boxes(800, seed=8, extent=600.0)
    assert nms(sparse, scores, 0.5).tolist() == greedy_torch(sparse, scores, 0.5)
    assert not all(calls)  # off-diagonal pairs compared too


@pytest.mark.parametrize("n", [200, 1500])  # full matrix and blocks
def test_half_precision_and_grad_boxes(n):
    # Half-precision boxes are compared in float32 (torchvision's CUDA accumulation type);
    # boxes that require grad give indices (nms is not differentiable).
    boxes = random_boxes(n, seed=n, dtype=torch.float32)
    scores = torch.rand(n, generator=torch.Generator().manual_seed(n))
    for dtype in (torch.float16, torch.bfloat16):
        low = boxes.to(dtype)
        assert nms(low, scores, 0.5).tolist() == greedy_torch(low.float(), scores, 0.5)
    leaf = boxes.clone().requires_grad_(True)
    assert nms(leaf, scores, 0.5).tolist() == greedy_torch(boxes, scores, 0.5)
    labels = torch.arange(n) % 3
    assert torch.equal(
        batched_nms(leaf, scores, labels, 0.5), batched_nms(boxes, scores, labels, 0.5)
    )


# --------------------------------------------------------------------- traced (exported) models


def _traced(fn, *example):
    with torch.no_grad():
        return torch.jit.trace(fn, example, check_trace=False)


def test_traced_nms_is_greedy_on_inputs_unlike_its_example():
    """A model exported by tracing keeps NMS as a scripted loop: on inputs of other sizes,
    categories and densities than the one it was traced on, it returns the eager result."""
    batched = _traced(lambda b, s, c: batched_nms(b, s, c, 0.5), *_inputs(40, seed=0, classes=3))
    plain = _traced(lambda b, s: nms(b, s, 0.7), *_inputs(40, seed=0, classes=1)[:2])
    # Empty; few (shifted categories); many (> 1,000 boxes: the re-sorted path); ties.
    for n, seed, classes in [(0, 1, 2), (7, 2, 1), (300, 3, 5), (1500, 4, 4)]:
        boxes, scores, labels = _inputs(n, seed, classes)
        assert torch.equal(batched(boxes, scores, labels), batched_nms(boxes, scores, labels, 0.5))
        expected = per_class_greedy(boxes, scores, labels, 0.5, classes)
        assert sorted(batched(boxes, scores, labels).tolist()) == sorted(expected)
        assert torch.equal(plain(boxes, scores), nms(boxes, scores, 0.7))
        assert plain(boxes, scores).tolist() == greedy_torch(boxes, scores, 0.7)


def _inputs(n: int, seed: int, classes: int):
    gen = torch.Generator().manual_seed(seed)
    boxes = random_boxes(n, seed, extent=120.0, dtype=torch.float32)
    scores = torch.randint(0, 64, (n,), generator=gen).float() / 64  # many equal scores
    return boxes, scores, torch.randint(0, classes, (n,), generator=gen)
