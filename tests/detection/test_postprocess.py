"""postprocess_detections against a brute-force loop: per class, per image, greedy NMS, top-k."""

from __future__ import annotations

import torch

from cnnkit.detection.postprocess import postprocess_detections
from cnnkit.ops import box_iou, decode_boxes

WEIGHTS = (10.0, 10.0, 5.0, 5.0)


def brute_force(logits, deltas, proposals, shapes, score_thresh, nms_thresh, top_k, min_size):
    """One RoI, one class, one box at a time: the definition written out."""
    results, row = [], 0
    for props, (h, w) in zip(proposals, shapes, strict=True):
        candidates = []  # (score, label, box)
        for p in props:
            probs = torch.softmax(logits[row].double(), 0).float()
            boxes = decode_boxes(p[None], deltas[row][None], WEIGHTS).view(-1, 4)
            for c in range(1, logits.shape[1]):
                x1, y1, x2, y2 = boxes[c].tolist()
                box = torch.tensor(
                    [min(max(x1, 0), w), min(max(y1, 0), h), min(max(x2, 0), w), min(max(y2, 0), h)]
                )
                small = box[2] - box[0] < min_size or box[3] - box[1] < min_size
                if probs[c] > score_thresh and not small:
                    candidates.append((float(probs[c]), c, box))
            row += 1
        kept = []
        for c in range(1, logits.shape[1]):
            mine = sorted((x for x in candidates if x[1] == c), key=lambda x: -x[0])
            chosen = []
            for cand in mine:  # greedy: drop a box overlapping a kept one by IoU > threshold
                if all(box_iou(cand[2][None], k[2][None]).item() <= nms_thresh for k in chosen):
                    chosen.append(cand)
            kept += chosen
        kept = sorted(kept, key=lambda x: -x[0])[:top_k]
        results.append(kept)
    return results


def random_case(seed: int, counts: list[int], num_classes: int, size: tuple[int, int]):
    g = torch.Generator().manual_seed(seed)
    proposals = []
    for n in counts:
        xy = torch.rand(n, 2, generator=g) * torch.tensor([size[1], size[0]]) * 0.9
        wh = torch.rand(n, 2, generator=g) * 30 + 2
        proposals.append(torch.cat((xy - 5, xy + wh), 1))  # some start outside: clipping
    total = sum(counts)
    logits = torch.randn(total, num_classes + 1, generator=g) * 2
    deltas = torch.randn(total, 4 * (num_classes + 1), generator=g) * 0.5
    return logits, deltas, proposals


def check(seed, counts, num_classes, shapes, score_thresh, nms_thresh, top_k):
    logits, deltas, proposals = random_case(seed, counts, num_classes, shapes[0])
    got = postprocess_detections(
        logits,
        deltas,
        proposals,
        shapes,
        score_thresh=score_thresh,
        nms_thresh=nms_thresh,
        detections_per_img=top_k,
    )
    want = brute_force(logits, deltas, proposals, shapes, score_thresh, nms_thresh, top_k, 1e-2)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert set(g) == {"boxes", "scores", "labels"}
        assert g["boxes"].dtype == torch.float32 and g["scores"].dtype == torch.float32
        assert g["labels"].dtype == torch.int64
        assert len(g["scores"]) == len(w)
        torch.testing.assert_close(g["scores"], torch.tensor([x[0] for x in w]))
        assert g["labels"].tolist() == [x[1] for x in w]
        if w:
            torch.testing.assert_close(g["boxes"], torch.stack([x[2] for x in w]))
    return got


def test_matches_brute_force_per_class_nms():
    got = check(0, [40, 25], 3, [(60, 80), (50, 40)], 0.05, 0.3, 100)
    assert all(0 < len(g["scores"]) < 100 for g in got)
    # Per-class NMS: two kept boxes of the same class overlap by at most the threshold, while
    # boxes of different classes may overlap more.
    g = got[0]
    same = g["labels"][:, None] == g["labels"][None, :]
    iou = box_iou(g["boxes"], g["boxes"]).fill_diagonal_(0)
    assert (iou[same] <= 0.3).all() and (iou[~same] > 0.3).any()


def test_top_k_keeps_the_highest_scores():
    # 150 spread-out RoIs x 4 classes, scores mostly above 0.05: far more than 100 survive NMS.
    got = check(1, [150, 3], 4, [(400, 400), (400, 400)], 0.05, 0.5, 100)
    assert len(got[0]["scores"]) == 100
    assert len(got[1]["scores"]) <= 12


def test_no_rois_and_nothing_above_threshold():
    empty = postprocess_detections(
        torch.zeros(0, 3), torch.zeros(0, 12), [torch.zeros(0, 4)], [(10, 10)]
    )
    assert empty[0]["boxes"].shape == (0, 4) and empty[0]["labels"].dtype == torch.int64
    # Background certain: no detection.
    logits = torch.tensor([[20.0, 0.0, 0.0]])
    out = postprocess_detections(
        logits, torch.zeros(1, 12), [torch.tensor([[0.0, 0, 5, 5]])], [(10, 10)]
    )
    assert out[0]["scores"].numel() == 0
