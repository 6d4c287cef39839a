"""RoI sampling, the Fast R-CNN loss on hand-computed cases, poolers and heads."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cnnkit.detection.roi_heads import (
    BoxPredictor,
    ResStageHead,
    RoIHeads,
    RoIPooler,
    TwoMLPHead,
    fast_rcnn_loss,
    sample_rois,
)
from cnnkit.ops import MultiScaleRoIAlign, box_iou, decode_boxes

WEIGHTS = (10.0, 10.0, 5.0, 5.0)


def jittered(box: list[float], n: int, spread: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.tensor(box)
    out = base + (torch.rand(n, 4, generator=g) * 2 - 1) * spread
    out[:, 2:] = torch.maximum(out[:, 2:], out[:, :2] + 1)
    return out


def target(boxes, labels, crowd=None):
    t = {
        "boxes": torch.tensor(boxes, dtype=torch.float32).view(-1, 4),
        "labels": torch.tensor(labels),
    }
    if crowd is not None:
        t["iscrowd"] = torch.tensor(crowd)
    return t


def test_sampling_fractions_thresholds_and_appended_ground_truth():
    torch.manual_seed(0)
    gt0 = [20.0, 20.0, 60.0, 60.0]
    # Image 0: many RoIs around its box (foreground, background and ignored ones).
    props0 = torch.cat((jittered(gt0, 300, 25, 1), torch.tensor([[100.0, 100, 120, 120]] * 5)))
    # Image 1: few RoIs near its own box, and RoIs on image 0's box, which must not match.
    gt1 = [70.0, 10.0, 90.0, 30.0]
    props1 = torch.cat((jittered(gt1, 3, 1, 2), torch.tensor([gt0] * 4)))
    targets = [target([gt0], [3]), target([gt1], [5])]
    sample = sample_rois([props0, props1], targets, batch_size_per_image=64, positive_fraction=0.25)
    boxes = sample.per_image(sample.boxes)
    labels = sample.per_image(sample.labels)
    for i, (props, t) in enumerate(zip([props0, props1], targets, strict=True)):
        iou = box_iou(boxes[i], t["boxes"])[:, 0]
        fg = labels[i] > 0
        assert (iou[fg] >= 0.5).all() and (labels[i][fg] == t["labels"][0]).all()
        assert ((iou[~fg] >= 0.1) & (iou[~fg] < 0.5)).all()
        # Candidates counted independently of the implementation.
        all_iou = box_iou(torch.cat((props, t["boxes"])), t["boxes"])[:, 0]
        num_fg = int((all_iou >= 0.5).sum())
        num_bg = int(((all_iou >= 0.1) & (all_iou < 0.5)).sum())
        assert int(fg.sum()) == min(num_fg, 16)
        assert int((~fg).sum()) == min(num_bg, 64 - min(num_fg, 16))
    assert sample.counts == [64, 4]  # image 1: its 3 RoIs + its appended box; image 0's box: IoU 0
    assert (labels[1] == 5).all()
    assert any(torch.equal(b, torch.tensor(gt1)) for b in boxes[1])  # the appended gt box
    # Regression targets decode back to the matched ground truth; gt_index points at it.
    fg_boxes = sample.boxes[sample.labels > 0]
    decoded = decode_boxes(fg_boxes, sample.regression_targets, WEIGHTS)
    expected = torch.where(
        sample.labels[sample.labels > 0, None] == 3, torch.tensor(gt0), torch.tensor(gt1)
    )
    torch.testing.assert_close(decoded, expected, atol=1e-4, rtol=0)
    assert (sample.gt_index[sample.labels > 0] == 0).all() and (
        sample.gt_index[sample.labels == 0] == -1
    ).all()


def test_sampling_is_uniform_over_candidates_and_never_takes_ignored_ones():
    gt = [20.0, 20.0, 60.0, 60.0]
    props = torch.cat((jittered(gt, 60, 3, 3), torch.tensor([[100.0, 100, 120, 120]] * 10)))
    seen = torch.zeros(len(props) + 1, dtype=torch.int64)
    for seed in range(60):
        torch.manual_seed(seed)
        sample = sample_rois([props], [target([gt], [1])], batch_size_per_image=64)
        match = (sample.boxes[:, None, :] == torch.cat((props, torch.tensor([gt])))[None]).all(2)
        seen += match.any(0).long()
        assert sample.counts == [16] and (sample.labels == 1).all()  # 25% of 64; no background
    # Each of the 61 foreground RoIs is drawn with probability 16 / 61: ~Binomial(60, 0.26),
    # mean 15.7, sd 3.4.
    assert (seen[:60] > 0).all() and (seen[:60] < 35).all() and seen[70] > 0
    assert (seen[60:70] == 0).all()  # IoU 0 < 0.1: ignored


def test_background_lower_bound_zero_images_without_ground_truth_and_crowd():
    gt = [20.0, 20.0, 60.0, 60.0]
    far = torch.tensor([[100.0, 100, 120, 120]] * 6)
    sample = sample_rois([far], [target([gt], [1])], bg_iou_lo=0.0)
    assert sample.counts == [7] and int((sample.labels == 0).sum()) == 6
    # No ground truth: every RoI is background (torchvision's rule).
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    sample = sample_rois([far[:3], far[:2]], [empty, target([gt], [1])])
    assert sample.counts == [3, 1] and sample.labels.tolist() == [0, 0, 0, 1]
    assert sample.regression_targets.shape == (1, 4)
    # A crowd box is neither appended nor matched.
    sample = sample_rois([torch.tensor([gt, [21.0, 20, 60, 60]])], [target([gt], [1], [True])])
    assert sample.counts == [0]
    sample = sample_rois(
        [torch.tensor([gt, [21.0, 20, 60, 60]])],
        [target([gt, [15.0, 15, 60, 60]], [1, 2], [True, False])],
    )
    assert sample.labels.tolist() == [2, 2, 2] and (sample.gt_index == 1).all()


def test_fast_rcnn_loss_hand_computed():
    logits = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
    deltas = torch.zeros(2, 12)
    deltas[0, 4:8] = torch.tensor([0.05, -0.5, 0.0, 0.0])  # class 1 of RoI 0
    deltas[1] = 7.0  # a background RoI's deltas never count
    labels = torch.tensor([1, 0])
    targets = torch.tensor([[0.0, 0.0, 0.0, 0.1]])
    losses = fast_rcnn_loss(logits, deltas, labels, targets)
    ce0 = math.log(math.e + math.e**2 + 1) - 2.0
    ce1 = math.log(2 + math.e**3)
    # smooth L1, beta 1/9: 0.5 x^2 / beta below beta, else |x| - beta / 2.
    box = 0.5 * 0.05**2 * 9 + (0.5 - 0.5 / 9) + 0.5 * 0.1**2 * 9
    assert losses["loss_classifier"].item() == pytest.approx((ce0 + ce1) / 2, rel=1e-6)
    assert losses["loss_box_reg"].item() == pytest.approx(box / 2, rel=1e-6)


def test_roi_heads_losses_on_a_hand_made_case():
    features = {"c4": torch.rand(1, 2, 32, 32)}
    pooler = RoIPooler(["c4"], 2, sampling_ratio=2)
    predictor = BoxPredictor(8, 3)
    for p in predictor.parameters():
        nn.init.zeros_(p)
    heads = RoIHeads(pooler, TwoMLPHead(2 * 2 * 2, 8), predictor).train()
    proposal = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    # IoU 90 / 110: foreground; with the appended gt box, 2 RoIs, both of class 2.
    _, losses = heads(features, [proposal], [(32, 32)], [target([[1.0, 0.0, 11.0, 10.0]], [2])])
    assert set(losses) == {"loss_classifier", "loss_box_reg"}
    assert losses["loss_classifier"].item() == pytest.approx(math.log(3), rel=1e-6)
    # t_x = 10 * (6 - 5) / 10 = 1 for the proposal, 0 for the gt box: (1 - 1/18) / 2.
    assert losses["loss_box_reg"].item() == pytest.approx((1 - 1 / 18) / 2, rel=1e-6)
    (losses["loss_classifier"] + losses["loss_box_reg"]).backward()
    assert predictor.bbox_pred.bias.grad[8:12].abs().sum() > 0  # class 2's deltas
    assert predictor.bbox_pred.bias.grad[:8].abs().sum() == 0


@pytest.mark.parametrize("op", ["align", "pool"])
def test_pooler_picks_the_fpn_level_of_each_roi(op):
    # Level maps filled with their level number: pooled values tell which level was used.
    features = {
        f"p{k}": torch.full((1, 1, 512 // 2**k, 512 // 2**k), float(k)) for k in (2, 3, 4, 5)
    }
    pooler = RoIPooler(list(features), 3, sampling_ratio=2, op=op)
    boxes = [torch.tensor([[0.0, 0, 20, 20], [0, 0, 112, 112], [0, 0, 224, 224], [0, 0, 500, 500]])]
    out = pooler(features, boxes, [(512, 512)])
    assert out.shape == (4, 1, 3, 3)
    assert out[:, 0, 0, 0].tolist() == [2.0, 3.0, 4.0, 5.0]


def test_align_pooler_equals_multiscale_roi_align():
    g = torch.Generator().manual_seed(4)
    features = {
        f"p{k}": torch.rand(2, 3, 256 // 2**k, 320 // 2**k, generator=g) for k in (2, 3, 4, 5)
    }
    xy = torch.rand(40, 2, generator=g) * 200
    boxes = torch.cat((xy, xy + torch.rand(40, 2, generator=g) * 300 + 1), 1)
    boxes = [boxes[:25], boxes[25:]]
    shapes = [(250, 310), (256, 300)]
    ours = RoIPooler(list(features), 5, sampling_ratio=2)(features, boxes, shapes)
    reference = MultiScaleRoIAlign(list(features), 5, 2)(features, boxes, shapes)
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)


def test_res_stage_head_shared_stage_is_not_registered_twice():
    stage = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU())
    owned = ResStageHead(stage, 6)
    shared = ResStageHead(stage, 6, shared=True)
    assert len(list(owned.parameters())) == 2 and len(list(shared.parameters())) == 0
    x = torch.rand(5, 4, 14, 14)
    torch.testing.assert_close(shared(x), stage(x).mean((2, 3)))
    assert shared(x).shape == (5, 6)


def test_roi_heads_rejects_bad_thresholds():
    pooler = RoIPooler(["c4"], 2)
    with pytest.raises(ValueError, match="box_bg_iou_lo"):
        RoIHeads(pooler, TwoMLPHead(4, 4), BoxPredictor(4, 2), fg_iou=0.5, bg_iou_lo=0.6)
