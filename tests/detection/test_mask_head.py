"""Mask R-CNN's mask branch: targets on hand-made masks, the per-class loss, the head's
bookkeeping of FPN-sorted RoIs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cnnkit.detection.mask_head import MaskHead, mask_loss, mask_targets, resample_masks
from cnnkit.detection.roi_heads import RoIPooler
from cnnkit.ops import roi_align


def test_a_box_exactly_over_a_region_of_mask_size_gives_its_pixels():
    g = torch.Generator().manual_seed(0)
    pattern = (torch.rand(28, 28, generator=g) > 0.5).to(torch.uint8)
    masks = torch.zeros(2, 40, 50, dtype=torch.uint8)
    masks[1, 7:35, 12:40] = pattern  # mask 1, rows 7..34, columns 12..39
    box = torch.tensor([[12.0, 7.0, 40.0, 35.0]])
    out = mask_targets([masks], [torch.tensor([1])], [box], 28)
    assert out.shape == (1, 28, 28) and out.dtype == torch.float32
    torch.testing.assert_close(out[0], pattern.float(), atol=1e-6, rtol=0)


def test_a_box_twice_the_mask_size_averages_two_by_two_blocks():
    g = torch.Generator().manual_seed(1)
    values = torch.randint(0, 2, (2, 16, 16), generator=g).to(torch.uint8)
    # Two images of different sizes (the targets pad them into one batch); image 1 has an extra,
    # unused instance before the one its RoI points at.
    masks0 = torch.zeros(1, 20, 24, dtype=torch.uint8)
    masks0[0, 2:18, 4:20] = values[0]
    masks1 = torch.zeros(2, 30, 17, dtype=torch.uint8)
    masks1[0] = 1
    masks1[1, 10:26, 0:16] = values[1]
    rois = [torch.tensor([[4.0, 2.0, 20.0, 18.0]]), torch.tensor([[0.0, 10.0, 16.0, 26.0]])]
    out = mask_targets([masks0, masks1], [torch.tensor([0]), torch.tensor([1])], rois, 8)
    # Each of the 8 x 8 cells covers a 2 x 2 block of pixels: their mean (hand-computed by pooling).
    want = F.avg_pool2d(values.float()[:, None], 2)[:, 0]
    torch.testing.assert_close(out, want, atol=1e-6, rtol=0)


def test_a_box_with_the_object_in_its_left_half():
    masks = torch.zeros(1, 10, 20, dtype=torch.uint8)
    masks[0, :, :6] = 1  # columns 0..5 set
    box = torch.tensor([[2.0, 1.0, 10.0, 9.0]])  # 8 x 8: columns 2..5 set = its left half
    out = mask_targets([masks], [torch.tensor([0])], [box], 4)
    want = torch.tensor([[1.0, 1.0, 0.0, 0.0]]).expand(4, 4)
    torch.testing.assert_close(out[0], want, atol=1e-6, rtol=0)


def test_separable_resampling_equals_roi_align_on_awkward_boxes():
    # The fast path (two matrix products per RoI) against the general RoIAlign (aligned, adaptive
    # sampling): sub-pixel, huge (many samples per bin), off-image, degenerate and thin boxes.
    g = torch.Generator().manual_seed(4)
    masks = (torch.rand(3, 37, 45, generator=g) > 0.4).to(torch.uint8)
    xy = torch.rand(40, 2, generator=g) * torch.tensor([50.0, 40.0]) - 5
    wh = torch.rand(40, 2, generator=g) ** 3 * 60
    boxes = torch.cat((xy, xy + wh), 1)
    boxes = torch.cat(
        (
            boxes,
            torch.tensor(
                [
                    [-30.0, -20.0, -5.0, -2.0],  # outside the image
                    [10.0, 10.0, 10.0, 30.0],  # zero width
                    [20.0, 5.0, 12.0, 9.0],  # negative width
                    [0.0, 0.0, 45.0, 37.0],  # the whole mask
                    [-3.0, -1.5, 200.0, 300.0],  # far beyond it
                    [3.2, 3.3, 3.4, 3.5],  # sub-pixel
                ]
            ),
        )
    )
    index = torch.randint(0, 3, (len(boxes),), generator=g)
    got = resample_masks(masks, index, boxes, 7)
    rois = torch.cat((index[:, None].float(), boxes), 1)
    want = roi_align(masks[:, None].float(), rois, 7, 1.0, sampling_ratio=-1, aligned=True)[:, 0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert resample_masks(masks, index[:0], boxes[:0], 7).shape == (0, 7, 7)


def test_mask_loss_is_the_mean_bce_of_the_ground_truth_class_only():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 5, 4, 4, generator=g, requires_grad=True)
    labels = torch.tensor([2, 4, 2])
    targets = torch.rand(3, 4, 4, generator=g)
    loss = mask_loss(logits, labels, targets)
    # By hand: -(t log s + (1 - t) log(1 - s)) of the labelled channel, averaged over 3 x 16.
    s = torch.sigmoid(logits.detach()[torch.arange(3), labels])
    want = -(targets * s.log() + (1 - targets) * (1 - s).log()).mean()
    torch.testing.assert_close(loss, want)
    loss.backward()
    grad = logits.grad
    for p, k in enumerate(labels.tolist()):
        others = [c for c in range(5) if c != k]
        assert grad[p, others].abs().max() == 0  # no competition between classes
        torch.testing.assert_close(grad[p, k], (s[p] - targets[p]) / 48)
    empty = torch.zeros(0, 5, 4, 4, requires_grad=True)
    zero = mask_loss(empty, torch.zeros(0, dtype=torch.int64), torch.zeros(0, 4, 4))
    assert zero.item() == 0 and zero.requires_grad


def fpn_features(channels=8):
    g = torch.Generator().manual_seed(3)
    return {
        "p2": torch.randn(2, channels, 32, 32, generator=g),  # a 128 x 128 image, stride 4
        "p3": torch.randn(2, channels, 16, 16, generator=g),
    }


def head(norm="none", channels=8):
    torch.manual_seed(0)
    pooler = RoIPooler(["p2", "p3"], 14, 2)
    return MaskHead(pooler, channels, num_classes=3, channels=16, norm=norm, norm_groups=4)


def test_head_layout_and_group_norm_variant():
    h = head()
    out = h(torch.randn(5, 8, 14, 14))
    assert out.shape == (5, 4, 28, 28)
    convs = [m for m in h.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 5 and all(c.bias is not None for c in convs)
    gn = head(norm="group")
    norms = [m for m in gn.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == 4 and all(m.num_groups == 4 for m in norms)
    assert all(c.bias is None for c in list(gn.convs.modules()) if isinstance(c, torch.nn.Conv2d))
    with pytest.raises(ValueError, match="norm"):
        head(norm="weight")


def test_loss_and_predict_keep_rois_labels_and_targets_together():
    # RoIs of two FPN levels interleaved: the pooler groups them by level, the head must permute
    # labels and targets the same way (a mean over mismatched rows would differ).
    h = head()
    features = fpn_features()
    sizes = [(128, 128), (128, 128)]
    big, small = [0.0, 0.0, 120.0, 110.0], [4.0, 4.0, 20.0, 24.0]  # FPN eq. 1: p3 and p2
    assert h.pooler.pool_sorted(features, [torch.tensor([big, small])], sizes)[1].tolist() == [1, 0]
    rois = [torch.tensor([big, small, big]), torch.tensor([small, big])]
    masks = [
        torch.zeros(2, 128, 128, dtype=torch.uint8),
        torch.zeros(1, 96, 128, dtype=torch.uint8),
    ]
    masks[0][0, :, :32] = 1
    masks[0][1, 10:, :] = 1
    masks[1][0, 5:40, 8:50] = 1
    gt_index = [torch.tensor([0, 1, 1]), torch.tensor([0, 0])]
    labels = [torch.tensor([1, 3, 2]), torch.tensor([2, 1])]
    matched = [
        {"labels": lab, "gt_index": idx, "target": {"masks": m}}
        for lab, idx, m in zip(labels, gt_index, masks, strict=True)
    ]
    loss = h.loss(features, rois, matched, sizes)["loss_mask"]
    # Reference: pooled in the RoIs' order (the pooler's forward un-sorts), no bookkeeping.
    logits = h(h.pooler(features, rois, sizes))
    targets = mask_targets(masks, gt_index, rois, 28)
    torch.testing.assert_close(loss, mask_loss(logits, torch.cat(labels), targets))

    detections = [{"boxes": r, "labels": lab} for r, lab in zip(rois, labels, strict=True)]
    detections.append({"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)})
    features = {k: torch.cat((v, v[:1])) for k, v in features.items()}
    with torch.no_grad():
        h.predict(features, detections, sizes + [(128, 128)])
    want = torch.sigmoid(logits.detach()[torch.arange(5), torch.cat(labels)])[:, None]
    got = torch.cat([d["mask_probs"] for d in detections])
    assert got.dtype == torch.float32 and detections[2]["mask_probs"].shape == (0, 1, 28, 28)
    torch.testing.assert_close(got, want)


def test_no_positive_rois_and_no_detections():
    h = head()
    features = fpn_features()
    empty = [torch.zeros(0, 4), torch.zeros(0, 4)]
    matched = [
        {
            "labels": torch.zeros(0, dtype=torch.int64),
            "gt_index": torch.zeros(0, dtype=torch.int64),
            "target": {"masks": torch.zeros(0, 64, 64, dtype=torch.uint8)},
        }
    ] * 2
    loss = h.loss(features, empty, matched, [(128, 128)] * 2)["loss_mask"]
    assert loss.item() == 0
    loss.backward()  # reaches the parameters (zero gradients), as DDP needs
    assert h.logits.weight.grad is not None
    detections = [{"boxes": b, "labels": torch.zeros(0, dtype=torch.int64)} for b in empty]
    h.predict(features, detections, [(128, 128)] * 2)
    assert all(d["mask_probs"].shape == (0, 1, 28, 28) for d in detections)
    with pytest.raises(ValueError, match="masks"):
        h.loss(features, empty, [{**matched[0], "target": {}}] * 2, [(128, 128)] * 2)
