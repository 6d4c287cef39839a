"""RPN head size, losses on hand-made anchors, and proposals against brute force."""

import math

import pytest
import torch
from torch import nn

from cnnkit.detection.anchors import AnchorGenerator
from cnnkit.detection.rpn import RegionProposalNetwork, RPNHead


def test_head_parameter_count_equals_torchvision():
    """torchvision's RPNHead(256, 3): 593,935 parameters.

    3x3 conv 256 -> 256 with bias: 256 * 256 * 9 + 256 = 590,080; objectness 1x1 256 -> 3:
    768 + 3 = 771; deltas 1x1 256 -> 12: 3,072 + 12 = 3,084. 590,080 + 771 + 3,084 = 593,935.
    """
    with torch.device("meta"):
        assert sum(p.numel() for p in RPNHead(256, 3).parameters()) == 593_935
        assert sum(p.numel() for p in RPNHead(256, 3, conv_depth=2).parameters()) == (
            593_935 + 590_080
        )


def test_head_shapes_and_init():
    torch.manual_seed(0)
    head = RPNHead(8, 3)
    logits, deltas = head([torch.randn(2, 8, 5, 7), torch.randn(2, 8, 3, 4)])
    assert [tuple(t.shape) for t in logits] == [(2, 3, 5, 7), (2, 3, 3, 4)]
    assert [tuple(t.shape) for t in deltas] == [(2, 12, 5, 7), (2, 12, 3, 4)]
    assert float(head.cls_logits.weight.detach().std()) < 0.05 and not head.bbox_pred.bias.any()


# A 32 x 32 image, one 2 x 2 map (stride 16), one 16 x 16 anchor per position:
# anchors [-8, -8, 8, 8], [8, -8, 24, 8], [-8, 8, 8, 24], [8, 8, 24, 24].
ANCHOR_3 = [8.0, 8.0, 24.0, 24.0]


def _rpn(objectness_bias: float, delta_bias: list[float], **kwargs) -> RegionProposalNetwork:
    head = RPNHead(2, 1)
    with torch.no_grad():
        for m in head.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.zero_()
        head.cls_logits.bias.fill_(objectness_bias)
        head.bbox_pred.bias.copy_(torch.tensor(delta_bias))
    return RegionProposalNetwork(AnchorGenerator([[16]], [[1.0]]), head, **kwargs)


def _softplus(z: float) -> float:
    return math.log1p(math.exp(z))


def _losses(rpn, targets):
    rpn.train()
    feats = {"p4": torch.randn(len(targets), 2, 2, 2)}
    _, losses = rpn([(32, 32)] * len(targets), (32, 32), feats, targets)
    return losses


def test_losses_when_one_gt_box_equals_one_anchor():
    # Anchor 3 is the gt (IoU 1): objectness target 1, regression target 0; the other three
    # have IoU 0: negatives. All 4 are sampled (256 per image), every logit is b = 0.5.
    b = 0.5
    target = {"boxes": torch.tensor([ANCHOR_3])}
    losses = _losses(_rpn(b, [0.0] * 4), [target])
    expected = (
        _softplus(-b) + 3 * _softplus(b)
    ) / 4  # BCE(z, 1) = softplus(-z), BCE(z, 0) = softplus(z)
    assert losses["loss_objectness"].item() == pytest.approx(expected, rel=1e-6)
    assert losses["loss_rpn_box_reg"].item() == 0.0

    # Predicted t_x = 0.1 < beta = 1/9: 0.5 * 0.1^2 / (1/9) = 0.045, divided by 4 sampled.
    rpn = _rpn(b, [0.1, 0.0, 0.0, 0.0])
    losses = _losses(rpn, [target])
    assert losses["loss_rpn_box_reg"].item() == pytest.approx(0.045 / 4, rel=1e-5)
    losses["loss_rpn_box_reg"].backward()
    # d/dt_x = (t_x / beta) / 4 = 0.9 / 4, from the one positive anchor only.
    grad = rpn.head.bbox_pred.bias.grad
    torch.testing.assert_close(grad, torch.tensor([0.225, 0.0, 0.0, 0.0]))


def test_regression_target_of_a_shifted_box():
    # gt [10, 8, 26, 24] vs anchor 3: IoU 224 / 288 = 0.78 >= 0.7, t_x = 2 / 16 = 0.125
    # (> beta: loss 0.125 - 0.5 / 9), t_y = t_w = t_h = 0.
    losses = _losses(_rpn(0.0, [0.0] * 4), [{"boxes": torch.tensor([[10.0, 8.0, 26.0, 24.0]])}])
    assert losses["loss_rpn_box_reg"].item() == pytest.approx((0.125 - 0.5 / 9) / 4, rel=1e-5)


def test_losses_over_two_images_one_without_boxes():
    # 8 sampled anchors: one positive, seven negatives; the box term is divided by 8.
    b = -0.3
    targets = [{"boxes": torch.tensor([ANCHOR_3])}, {"boxes": torch.zeros(0, 4)}]
    losses = _losses(_rpn(b, [0.1, 0.0, 0.0, 0.0]), targets)
    expected = (_softplus(-b) + 7 * _softplus(b)) / 8
    assert losses["loss_objectness"].item() == pytest.approx(expected, rel=1e-6)
    assert losses["loss_rpn_box_reg"].item() == pytest.approx(0.045 / 8, rel=1e-5)


def test_crowd_box_is_never_positive_and_its_anchor_is_ignored():
    b = 0.5
    target = {"boxes": torch.tensor([ANCHOR_3]), "iscrowd": torch.tensor([True])}
    losses = _losses(_rpn(b, [0.1, 0.0, 0.0, 0.0]), [target])
    assert losses["loss_objectness"].item() == pytest.approx(_softplus(b), rel=1e-6)  # 3 negatives
    assert losses["loss_rpn_box_reg"].item() == 0.0


def test_sampling_limits_the_anchors_in_the_loss():
    # batch_size_per_image=2, positive_fraction=0.5: one positive, one negative of three.
    b = 0.5
    rpn = _rpn(b, [0.0] * 4, batch_size_per_image=2, positive_fraction=0.5)
    losses = _losses(rpn, [{"boxes": torch.tensor([ANCHOR_3])}])
    expected = (_softplus(-b) + _softplus(b)) / 2
    assert losses["loss_objectness"].item() == pytest.approx(expected, rel=1e-6)


class StubHead(nn.Module):
    """Returns fixed per-level logits / deltas, to test the proposal filtering alone."""

    def __init__(self, logits: list[torch.Tensor], num_anchors: int) -> None:
        super().__init__()
        self.logits = logits
        self.num_anchors = num_anchors

    def forward(self, features):
        deltas = [torch.zeros(lg.shape[0], 4 * lg.shape[1], *lg.shape[2:]) for lg in self.logits]
        return self.logits, deltas


def _brute_force(anchors, logits, size, pre_n, post_n):
    # One level, non-overlapping anchors: NMS keeps everything; the order is by score.
    order = sorted(range(len(logits)), key=lambda i: -logits[i])[:pre_n]
    kept = []
    for i in order:
        x0, y0, x1, y1 = anchors[i]
        box = [min(max(x0, 0), size[1]), min(max(y0, 0), size[0])]
        box += [min(max(x1, 0), size[1]), min(max(y1, 0), size[0])]
        if box[2] - box[0] >= 1e-3 and box[3] - box[1] >= 1e-3:
            kept.append(box)
    return torch.tensor(kept[:post_n]).reshape(-1, 4)


def test_proposals_against_brute_force():
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 4, 4)
    gen = AnchorGenerator([[16]], [[1.0]])
    rpn = RegionProposalNetwork(
        gen,
        StubHead([logits], 1),
        pre_nms_top_n={"training": 3, "testing": 10},
        post_nms_top_n={"training": 5, "testing": 6},
    ).eval()
    sizes = [(64, 64), (40, 30)]
    feats = {"p4": torch.zeros(2, 1, 4, 4)}
    proposals, losses = rpn(sizes, (64, 64), feats)
    assert losses == {}
    anchors = gen((64, 64), [(4, 4)]).tolist()
    for i, size in enumerate(sizes):
        expected = _brute_force(anchors, logits[i].reshape(-1).tolist(), size, 10, 6)
        torch.testing.assert_close(proposals[i], expected)
    assert len(proposals[0]) == 6 and len(proposals[1]) < 6  # image 2 drops outside anchors
    rpn.train()
    proposals, _ = rpn(sizes, (64, 64), feats, [{"boxes": torch.zeros(0, 4)}] * 2)
    for i, size in enumerate(sizes):  # the training limits: top 3 per level, then 5
        expected = _brute_force(anchors, logits[i].reshape(-1).tolist(), size, 3, 5)
        torch.testing.assert_close(proposals[i], expected)
    assert len(proposals[0]) == 3


def test_nms_within_level_not_across_levels_and_top_n_per_level():
    # Two levels of 1 x 1 maps, two identical cell anchors each: every box is [0, 0, 8, 8]
    # after clipping. NMS keeps the best of each level; a per-level top 1 keeps the same.
    gen = AnchorGenerator([[16, 16], [16, 16]], [[1.0], [1.0]])
    logits = [torch.tensor([2.0, 1.0]).view(1, 2, 1, 1), torch.tensor([-1.0, 0.0]).view(1, 2, 1, 1)]
    feats = {"p4": torch.zeros(1, 1, 1, 1), "p5": torch.zeros(1, 1, 1, 1)}
    for pre_n in (1, 2):
        rpn = RegionProposalNetwork(
            gen, StubHead(logits, 2), pre_nms_top_n={"training": 1, "testing": pre_n}
        ).eval()
        (proposals,), _ = rpn([(16, 16)], (16, 16), feats)
        torch.testing.assert_close(proposals, torch.tensor([[0.0, 0, 8, 8]] * 2))


def test_score_threshold_can_remove_everything():
    logits = torch.full((1, 1, 4, 4), -10.0)
    rpn = RegionProposalNetwork(
        AnchorGenerator([[16]], [[1.0]]), StubHead([logits], 1), score_thresh=0.5
    ).eval()
    (proposals,), _ = rpn([(64, 64)], (64, 64), {"p4": torch.zeros(1, 1, 4, 4)})
    assert proposals.shape == (0, 4)


def test_real_head_proposals_are_detached_and_losses_backprop():
    torch.manual_seed(0)
    gen = AnchorGenerator([[16], [32]], [[0.5, 1.0, 2.0]] * 2)
    rpn = RegionProposalNetwork(gen, RPNHead(4, 3), post_nms_top_n={"training": 20, "testing": 7})
    feats = {"p3": torch.randn(2, 4, 8, 8), "p4": torch.randn(2, 4, 4, 4)}
    targets = [{"boxes": torch.tensor([[5.0, 6.0, 30.0, 40.0]])}, {"boxes": torch.zeros(0, 4)}]
    proposals, losses = rpn([(64, 64), (50, 60)], (64, 64), feats, targets)
    assert all(not p.requires_grad and p.shape[1] == 4 and len(p) <= 20 for p in proposals)
    assert (proposals[1][:, 2] <= 60).all() and (proposals[1][:, 3] <= 50).all()
    sum(losses.values()).backward()
    assert rpn.head.cls_logits.weight.grad.abs().sum() > 0
    assert rpn.head.bbox_pred.weight.grad.abs().sum() > 0
    rpn.eval()
    proposals, _ = rpn([(64, 64), (50, 60)], (64, 64), feats)
    assert all(len(p) <= 7 for p in proposals)


def test_errors():
    with pytest.raises(ValueError, match="3 anchors per location"):
        RegionProposalNetwork(AnchorGenerator([[16]], [[1.0]]), RPNHead(4, 3))
    rpn = RegionProposalNetwork(AnchorGenerator([[16]], [[1.0]]), RPNHead(4, 1)).train()
    with pytest.raises(ValueError, match="targets"):
        rpn([(32, 32)], (32, 32), {"p4": torch.randn(1, 4, 2, 2)})
    with pytest.raises(ValueError, match="pre_nms_top_n"):
        RegionProposalNetwork(
            AnchorGenerator([[16]], [[1.0]]), RPNHead(4, 1), pre_nms_top_n={"train": 1}
        )
