"""Keypoint R-CNN's head: heatmap targets and decoding by hand, the loss by hand, shapes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cnnkit.detection.keypoint_head import (
    KeypointHead,
    heatmaps_to_keypoints,
    keypoints_to_heatmap_targets,
    loss_keypoint,
)
from cnnkit.detection.roi_heads import RoIPooler


def test_heatmap_targets_hand_computed_cells_and_validity():
    # RoI 0: 56 x 28 px, S = 56 -> cells 1 px wide, 0.5 px tall.
    # RoI 1: 8 x 4 px, S = 4 -> cells 2 px wide, 1 px tall (checked with size=4 below).
    rois = torch.tensor([[10.0, 20.0, 66.0, 48.0]])
    kps = torch.tensor(
        [
            [
                [10.0, 20.0, 2],  # top-left corner: cell (0, 0)
                [37.5, 30.2, 2],  # x: 27.5 -> 27, y: 10.2 * 2 = 20.4 -> 20
                [66.0, 48.0, 1],  # bottom-right corner (inclusive): cell (55, 55)
                [65.99, 47.99, 2],  # just inside: 55.99 -> 55, 27.99 * 2 = 55.98 -> 55
                [9.99, 30.0, 2],  # left of the box
                [40.0, 48.01, 2],  # below the box
                [40.0, 30.0, 0],  # unlabelled
                [float("nan"), 30.0, 2],  # missing coordinate
            ]
        ]
    )
    index, valid = keypoints_to_heatmap_targets(kps, rois, 56)
    assert index.dtype == torch.int64 and valid.dtype == torch.bool
    assert valid.tolist() == [[True, True, True, True, False, False, False, False]]
    assert index[valid].tolist() == [0, 20 * 56 + 27, 55 * 56 + 55, 55 * 56 + 55]
    assert (index[~valid] == 0).all()

    rois = torch.tensor([[0.0, 0.0, 8.0, 4.0], [2.0, 2.0, 2.0, 6.0]])  # second: zero width
    kps = torch.tensor([[[3.0, 2.5, 2], [7.9, 0.1, 2]], [[2.0, 3.0, 2], [2.0, 2.0, 2]]])
    index, valid = keypoints_to_heatmap_targets(kps, rois, 4)
    # (3, 2.5) -> column 1 (3 / 2), row 2; (7.9, 0.1) -> column 3, row 0.
    assert valid.tolist() == [[True, True], [False, False]]
    assert index[0].tolist() == [2 * 4 + 1, 3]


def test_decode_of_encode_is_within_half_a_cell_and_unbiased():
    g = torch.Generator().manual_seed(0)
    num, k, size = 400, 5, 56
    xy0 = torch.rand(num, 2, generator=g) * 200
    wh = 5 + torch.rand(num, 2, generator=g) * 300
    rois = torch.cat((xy0, xy0 + wh), dim=1)
    u = torch.rand(num, k, 2, generator=g)
    kps = torch.cat((rois[:, None, :2] + u * wh[:, None], torch.full((num, k, 1), 2.0)), dim=2)
    index, valid = keypoints_to_heatmap_targets(kps, rois, size)
    assert valid.all()
    heatmaps = torch.zeros(num, k, size * size)
    heatmaps.scatter_(2, index[..., None], 10.0)  # one-hot logits at the target cell
    xy, scores = heatmaps_to_keypoints(heatmaps.view(num, k, size, size), rois)
    assert (scores == 10.0).all()
    cell = wh[:, None, :] / size
    err = (xy - kps[..., :2]) / cell  # in cells
    # Stated bound: half a cell per axis (w / 2S); flat one-hot neighbours give no offset.
    assert err.abs().max() <= 0.5 + 1e-3
    # Cell centres: signed errors average out (a decoder returning the cell's corner would be
    # off by 0.5 here).
    assert err.mean(dim=(0, 1)).abs().max() < 0.05


def test_decoding_recovers_the_peak_of_a_gaussian_heatmap_to_a_fraction_of_a_cell():
    g = torch.Generator().manual_seed(1)
    num, k, size, sigma = 50, 3, 56, 1.5
    rois = torch.tensor([[4.0, 8.0, 116.0, 64.0]]).repeat(num, 1)  # cells 2 px x 1 px
    peak = 1.5 + torch.rand(num, k, 2, generator=g) * (size - 3)  # (u, v) in cells
    centres = torch.arange(size) + 0.5
    du = centres.view(1, 1, 1, size) - peak[..., 0, None, None]
    dv = centres.view(1, 1, size, 1) - peak[..., 1, None, None]
    logits = -(du**2 + dv**2) / (2 * sigma**2)  # log of a Gaussian softmax, peak off-grid
    xy, _ = heatmaps_to_keypoints(logits, rois)
    truth = torch.stack((4.0 + peak[..., 0] * 2.0, 8.0 + peak[..., 1] * 1.0), dim=2)
    err_cells = (xy - truth) / torch.tensor([2.0, 1.0])
    assert err_cells.abs().max() < 1e-3


def test_decoding_refines_interior_maxima_by_hand_and_not_border_ones():
    rois = torch.tensor([[0.0, 0.0, 8.0, 4.0]])  # S = 4: cells 2 px wide, 1 px tall
    heatmaps = torch.zeros(1, 1, 4, 4)
    heatmaps[0, 0, 0, 3] = 5.0  # top-right cell: no right / upper neighbour
    heatmaps[0, 0, 0, 2] = 4.0
    xy, scores = heatmaps_to_keypoints(heatmaps, rois)
    assert xy.tolist() == [[[7.0, 0.5]]] and scores.tolist() == [[5.0]]  # cell centre
    heatmaps = torch.zeros(1, 1, 4, 4)
    heatmaps[0, 0, 2, 0:3] = torch.tensor([3.0, 5.0, 4.0])  # max at row 2, column 1
    heatmaps[0, 0, 1, 1] = heatmaps[0, 0, 3, 1] = 1.0
    xy, _ = heatmaps_to_keypoints(heatmaps, rois)
    # Parabola through (-1, 3), (0, 5), (1, 4): vertex at (3 - 4) / (2 (3 - 10 + 4)) = 1/6.
    assert xy[0, 0].tolist() == pytest.approx([(1 + 0.5 + 1 / 6) * 2, 2.5])


def test_loss_equals_hand_computed_cross_entropy_and_ignores_invalid_keypoints():
    ln = math.log
    heatmaps = torch.zeros(2, 2, 2, 2)
    heatmaps[0, 0] = torch.tensor([[0.0, ln(3)], [0.0, 0.0]])  # p = 1/6, 3/6, 1/6, 1/6
    heatmaps[0, 1] = torch.tensor([[0.0, ln(3)], [0.0, 0.0]])
    heatmaps[1, 0] = torch.tensor([[100.0, -50.0], [7.0, 3.0]])  # invalid: anything
    heatmaps[1, 1] = torch.tensor([[ln(2), 0.0], [0.0, 0.0]])  # p = 2/5, 1/5, 1/5, 1/5
    heatmaps.requires_grad_(True)
    index = torch.tensor([[1, 0], [3, 3]])
    valid = torch.tensor([[True, True], [False, True]])
    loss = loss_keypoint(heatmaps, index, valid)
    expected = (ln(2) + ln(6) + ln(5)) / 3  # -log(3/6), -log(1/6), -log(1/5)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    assert (heatmaps.grad[1, 0] == 0).all()
    # d/dz of the mean CE: (softmax - onehot) / 3 for the valid maps.
    assert heatmaps.grad[0, 0].flatten().tolist() == pytest.approx(
        [1 / 18, (3 / 6 - 1) / 3, 1 / 18, 1 / 18]
    )


def test_loss_without_valid_keypoints_is_a_connected_zero():
    heatmaps = torch.randn(3, 2, 4, 4, requires_grad=True)
    loss = loss_keypoint(heatmaps, torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2).bool())
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert (heatmaps.grad == 0).all()


# ------------------------------------------------------------------------------ the module


def tiny_head(norm: str = "none") -> KeypointHead:
    torch.manual_seed(0)
    pooler = RoIPooler(["p2", "p3"], output_size=14, sampling_ratio=2)
    return KeypointHead(pooler, 8, num_keypoints=3, channels=8, num_convs=2, norm=norm)


def tiny_features() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return {
        "p2": torch.randn(2, 8, 32, 32, generator=g),
        "p3": torch.randn(2, 8, 16, 16, generator=g),
    }


SHAPES = [(128, 128), (128, 128)]
# Levels 3, 2, 3 (FPN eq. 1): the pooler's level order differs from the boxes' order.
BOXES = torch.tensor([[0.0, 0.0, 120.0, 120.0], [10.0, 10.0, 30.0, 30.0], [5.0, 5.0, 125, 120]])


def test_layout_and_parameter_count_match_torchvisions_keypoint_head():
    # torchvision's keypointrcnn_resnet50_fpn head: 8 convs 3x3 of 512 (with bias) on 256
    # channels, ConvTranspose2d(512, 17, 4): hand count in the module's report.
    head = KeypointHead(RoIPooler(["p2"], 14), 256, num_keypoints=17)
    first = 256 * 512 * 9 + 512
    rest = 7 * (512 * 512 * 9 + 512)
    deconv = 512 * 17 * 4 * 4 + 17
    assert sum(p.numel() for p in head.parameters()) == first + rest + deconv == 17_838_097
    # Kaiming normal, fan_out, ReLU gain (torch's fan_out of a ConvTranspose2d weight
    # [512, 17, 4, 4] is 512 * 16, as torchvision initializes it); biases 0.
    assert head.convs[2].weight.std().item() == pytest.approx(math.sqrt(2 / (512 * 9)), rel=0.02)
    assert head.kps_score_lowres.weight.std().item() == pytest.approx(
        math.sqrt(2 / (512 * 16)), rel=0.02
    )
    assert not head.convs[0].bias.any() and not head.kps_score_lowres.bias.any()
    head = tiny_head("group")
    assert isinstance(head.convs[1], nn.GroupNorm) and head.convs[0].bias is None
    assert sum(isinstance(m, nn.Conv2d) for m in head.convs) == 2
    assert head(torch.randn(4, 8, 14, 14)).shape == (4, 3, 56, 56)


def test_predict_shapes_with_several_and_zero_detections():
    head = tiny_head().eval()
    features = tiny_features()
    detections = [{"boxes": BOXES.clone()}, {"boxes": torch.zeros(0, 4)}]
    with torch.no_grad():
        head.predict(features, detections, SHAPES)
        expected = head(head.pooler(features, [BOXES, torch.zeros(0, 4)], SHAPES))
    d0, d1 = detections
    assert d0["keypoints"].shape == (3, 3, 3) and d0["keypoints"].dtype == torch.float32
    assert d0["keypoints_scores"].shape == (3, 3)
    assert d0["keypoint_heatmaps"].shape == (3, 3, 56, 56)
    assert (d0["keypoints"][..., 2] == 1).all()
    # Heatmaps in the boxes' order (the pooler sorts RoIs by level), keypoints inside each box.
    assert torch.allclose(d0["keypoint_heatmaps"], expected, atol=1e-6)
    xy = d0["keypoints"][..., :2]
    assert (xy >= BOXES[:, None, :2]).all() and (xy <= BOXES[:, None, 2:]).all()
    assert d1["keypoints"].shape == (0, 3, 3) and d1["keypoints_scores"].shape == (0, 3)
    assert d1["keypoint_heatmaps"].shape == (0, 3, 56, 56)
    empty = [{"boxes": torch.zeros(0, 4)}, {"boxes": torch.zeros(0, 4)}]
    head.predict(features, empty, SHAPES)
    assert [d["keypoints"].shape for d in empty] == [(0, 3, 3), (0, 3, 3)]


def test_head_loss_uses_matched_keypoints_in_roi_order_and_zero_without_positives():
    head = tiny_head("group")
    features = tiny_features()
    kp = torch.tensor(
        [
            [[60.0, 60.0, 2], [20.0, 20.0, 2], [200.0, 5.0, 2]],  # third keypoint off the image
            [[15.0, 25.0, 1], [20.0, 20.0, 0], [100.0, 110.0, 2]],
        ]
    )
    target = {"boxes": BOXES[:2], "labels": torch.tensor([1, 1]), "keypoints": kp}
    gt_index = torch.tensor([0, 1, 0])
    no_boxes = {"gt_index": gt_index[:0], "target": {"keypoints": torch.zeros(0, 3, 3)}}
    matched = [{"gt_index": gt_index, "target": target}, no_boxes]
    losses = head.loss(features, [BOXES, torch.zeros(0, 4)], matched, SHAPES)
    heatmaps = head(head.pooler(features, [BOXES, torch.zeros(0, 4)], SHAPES))
    index, valid = keypoints_to_heatmap_targets(kp[gt_index], BOXES, 56)
    # RoIs 0 and 2 (gt 0): (60, 60) and (20, 20); RoI 1 (gt 1): (15, 25) only.
    assert valid.tolist() == [[True, True, False], [True, False, False], [True, True, False]]
    expected = loss_keypoint(heatmaps, index, valid)
    assert losses["loss_keypoint"].item() == pytest.approx(expected.item(), rel=1e-5)

    none = head.loss(features, [torch.zeros(0, 4)] * 2, [no_boxes] * 2, SHAPES)
    assert none["loss_keypoint"].item() == 0.0
    none["loss_keypoint"].backward()
    assert all(p.grad is not None and (p.grad == 0).all() for p in head.parameters())

    with pytest.raises(ValueError, match="no 'keypoints'"):
        head.loss(features, [BOXES, BOXES[:0]], [matched[0] | {"target": {}}] * 2, SHAPES)
    with pytest.raises(ValueError, match="frozen_batch"):
        tiny_head("frozen_batch")
