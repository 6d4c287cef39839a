"""Cross-check cnnkit.ops against torchvision.ops on random inputs (equality, not speed).

Run in the peers environment::

    PYTHONPATH=src /tmp/cnnkit-peers/bin/python benchmarks/crosscheck_ops.py

Prints the max abs difference of roi_align / roi_pool (forward and input gradient, float32;
also relative to max(1, |torchvision's value|)) and whether nms / batched_nms keep lists are
identical, then exits 1 if any check fails (relative difference > 1e-5 or a different keep list).
"""

from __future__ import annotations

import argparse
import sys

import torch
import torchvision.ops as tv

import cnnkit.ops as ck

TOL = 1e-5


def random_rois(gen: torch.Generator, k: int, n: int, height: float, width: float) -> torch.Tensor:
    """RoIs ``[K, 5]`` in image coordinates, some partly or wholly outside the image."""
    xy = torch.rand(k, 2, generator=gen) * torch.tensor([width * 1.1, height * 1.1]) - 20
    wh = torch.rand(k, 2, generator=gen) * torch.tensor([width, height]) * 0.6
    wh[: k // 10] = 0  # degenerate RoIs
    batch = torch.randint(0, n, (k, 1), generator=gen).float()
    return torch.cat((batch, xy, xy + wh), dim=1)


def random_boxes(gen: torch.Generator, n: int, clustered: bool = False) -> torch.Tensor:
    if clustered:
        centres = torch.rand(8, 2, generator=gen) * 1000
        c = (
            centres[torch.randint(0, 8, (n,), generator=gen)]
            + torch.randn(n, 2, generator=gen) * 30
        )
    else:
        c = torch.rand(n, 2, generator=gen) * 1000
    s = torch.rand(n, 2, generator=gen) * 190 + 10
    return torch.cat((c - s / 2, c + s / 2), dim=1)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max |a - b|, max |a - b| / max(1, max |b|)): float32 sums of many terms (the input
    gradient of overlapping RoIs reaches ~20) differ by a few ulps between summation orders."""
    d = (a - b).abs().max().item() if a.numel() else 0.0
    return d, d / max(1.0, b.abs().max().item() if b.numel() else 0.0)


def check_roi(gen: torch.Generator, trials: int) -> dict[str, tuple[float, float]]:
    worst = {k: (0.0, 0.0) for k in ("align fwd", "align grad", "pool fwd", "pool grad")}

    def record(key: str, pair: tuple[float, float]) -> None:
        worst[key] = tuple(max(u, v) for u, v in zip(worst[key], pair, strict=True))

    for t in range(trials):
        n, c = 2, 8
        h, w = (
            int(torch.randint(5, 40, (1,), generator=gen)),
            int(torch.randint(5, 40, (1,), generator=gen)),
        )
        scale = [1.0, 0.5, 0.25, 1 / 16][t % 4]
        x = torch.randn(n, c, h, w, generator=gen)
        rois = random_rois(gen, 64, n, h / scale, w / scale)
        out = [(7, 7), (3, 5), (1, 1), (14, 14)][t % 4]
        grad = torch.randn(64, c, *out, generator=gen)
        for ratio in (-1, 0, 1, 2, 3):
            for aligned in (False, True):
                res = []
                for fn in (ck.roi_align, tv.roi_align):
                    xi = x.clone().requires_grad_()
                    y = fn(xi, rois, out, scale, ratio, aligned)
                    (y * grad).sum().backward()
                    res.append((y.detach(), xi.grad))
                record("align fwd", _max_diff(res[0][0], res[1][0]))
                record("align grad", _max_diff(res[0][1], res[1][1]))
        res = []
        for fn in (ck.roi_pool, tv.roi_pool):
            xi = x.clone().requires_grad_()
            y = fn(xi, rois, out, scale)
            (y * grad).sum().backward()
            res.append((y.detach(), xi.grad))
        record("pool fwd", _max_diff(res[0][0], res[1][0]))
        record("pool grad", _max_diff(res[0][1], res[1][1]))
    return worst


def check_roi_pool_ties(gen: torch.Generator) -> float:
    """Integer-valued features (many ties, like ReLU zeros): the arg-max must be the first max."""
    x = torch.randint(0, 3, (2, 4, 20, 24), generator=gen).float()
    rois = random_rois(gen, 50, 2, 20, 24)
    grads = []
    for fn in (ck.roi_pool, tv.roi_pool):
        xi = x.clone().requires_grad_()
        fn(xi, rois, (4, 3), 1.0).sum().backward()
        grads.append(xi.grad)
    return (grads[0] - grads[1]).abs().max().item()


def check_multiscale(gen: torch.Generator) -> float:
    names = ["p2", "p3", "p4", "p5"]
    feats = {
        name: torch.randn(2, 4, 200 // 2**i, 272 // 2**i, generator=gen)
        for i, name in enumerate(names, start=2)
    }
    image_shapes = [(800, 1088), (760, 1000)]
    boxes = []
    for _ in range(2):
        xy = torch.rand(40, 2, generator=gen) * 700
        wh = torch.exp(torch.rand(40, 2, generator=gen) * 6)  # 1 to 400 pixels
        boxes.append(torch.cat((xy, xy + wh), dim=1))
    ours = ck.MultiScaleRoIAlign(names, 7, 2)(feats, boxes, image_shapes)
    theirs = tv.MultiScaleRoIAlign(names, 7, 2)(feats, boxes, image_shapes)
    return (ours - theirs).abs().max().item()


def check_nms(gen: torch.Generator) -> list[str]:
    failures = []
    for n in (0, 1, 10, 500, 1000, 3000, 5000, 20000):
        for clustered in (False, True):
            boxes = random_boxes(gen, n, clustered)
            scores = torch.rand(n, generator=gen)
            for thr in (0.0, 0.3, 0.5, 0.7, 0.95, 1.0):
                if n == 20000 and thr not in (0.5, 0.7):
                    continue
                if not torch.equal(ck.nms(boxes, scores, thr), tv.nms(boxes, scores, thr)):
                    failures.append(f"nms n={n} clustered={clustered} thr={thr}")
                idxs = torch.randint(0, 5, (n,), generator=gen)
                if not torch.equal(
                    ck.batched_nms(boxes, scores, idxs, thr),
                    tv.batched_nms(boxes, scores, idxs, thr),
                ):
                    failures.append(f"batched_nms n={n} clustered={clustered} thr={thr}")
    # Tied scores and duplicate boxes: the order among equal scores must agree too.
    for n in (50, 2000):
        boxes = random_boxes(gen, n)
        boxes[n // 2 :] = boxes[: n - n // 2]  # duplicates
        scores = torch.randint(0, 5, (n,), generator=gen).float()
        for thr in (0.3, 0.5):
            if not torch.equal(ck.nms(boxes, scores, thr), tv.nms(boxes, scores, thr)):
                failures.append(f"nms with ties n={n} thr={thr}")
    # Integer (pixel) boxes: many exact IoU values, e.g. exactly 0.5.
    for n in (300, 3000):
        xy = torch.randint(0, 100, (n, 2), generator=gen)
        wh = torch.randint(1, 20, (n, 2), generator=gen)
        boxes = torch.cat((xy, xy + wh), 1).float()
        scores = torch.rand(n, generator=gen)
        for thr in (0.5, 0.25, 0.7):
            if not torch.equal(ck.nms(boxes, scores, thr), tv.nms(boxes, scores, thr)):
                failures.append(f"nms integer boxes n={n} thr={thr}")
    return failures


def check_boxes(gen: torch.Generator) -> float:
    a, b = random_boxes(gen, 50), random_boxes(gen, 70)
    d = (ck.box_iou(a, b) - tv.box_iou(a, b)).abs().max().item()
    for fin in ("xyxy", "xywh", "cxcywh"):
        for fout in ("xyxy", "xywh", "cxcywh"):
            d = max(
                d, (ck.box_convert(a, fin, fout) - tv.box_convert(a, fin, fout)).abs().max().item()
            )
    d = max(d, (ck.box_area(a) - tv.box_area(a)).abs().max().item())
    d = max(
        d,
        (ck.clip_boxes_to_image(a, (300, 500)) - tv.clip_boxes_to_image(a, (300, 500)))
        .abs()
        .max()
        .item(),
    )
    if not torch.equal(ck.remove_small_boxes(a, 50.0), tv.remove_small_boxes(a, 50.0)):
        d = float("inf")
    return d


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(args.seed)
    ok = True
    for name, (absolute, relative) in check_roi(gen, args.trials).items():
        good = relative <= TOL
        ok &= good
        print(
            f"roi_{name:40s} max|diff| {absolute:.3g}  relative {relative:.3g}  {'ok' if good else 'FAIL'}"
        )
    figures = {
        "roi_pool with ties, grad max |diff|": check_roi_pool_ties(gen),
        "MultiScaleRoIAlign max |diff|": check_multiscale(gen),
        "box ops max |diff|": check_boxes(gen),
    }
    for name, value in figures.items():
        good = value <= TOL
        ok &= good
        print(f"{name:44s} max|diff| {value:.3g}  {'ok' if good else 'FAIL'}")
    failures = check_nms(gen)
    print(f"{'nms / batched_nms keep lists':45s} {'identical' if not failures else 'DIFFERENT'}")
    for f in failures:
        print("  ", f)
    ok &= not failures
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
