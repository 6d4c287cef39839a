"""FasterRCNN end to end on tiny images: losses fall, outputs have the contract's format."""

from __future__ import annotations

import statistics

import pytest
import torch

from cnnkit.detection.rcnn import FasterRCNN
from cnnkit.models.registry import count_parameters, create_model, list_models, model_info

TINY = {
    "num_classes": 3,
    "backbone": "resnet18",
    "backbone_widths": [8, 16, 32, 64],
    "norm": "batch",
    "fpn_channels": 16,
    "representation_size": 32,
    "anchor_sizes": [8, 16, 32, 64, 128],
    "min_size": 64,
    "max_size": 64,
    "rpn_pre_nms_top_n_train": 200,
    "rpn_post_nms_top_n_train": 100,
    "rpn_pre_nms_top_n_test": 100,
    "rpn_post_nms_top_n_test": 50,
    "box_batch_size_per_image": 32,
}


def tiny(**overrides) -> FasterRCNN:
    torch.manual_seed(0)
    return FasterRCNN(**{**TINY, **overrides})


def batch(sizes=((64, 64), (64, 64))):
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, h, w, generator=g) for h, w in sizes]
    boxes = [[[8.0, 10.0, 30.0, 34.0], [36.0, 30.0, 60.0, 50.0]], [[20.0, 5.0, 44.0, 40.0]]]
    targets = [
        {"boxes": torch.tensor(b[: 2 - i]), "labels": torch.tensor([1, 3][: 2 - i])}
        for i, b in enumerate(boxes * (len(sizes) // 2))
    ]
    for image, t in zip(images, targets, strict=True):
        for x1, y1, x2, y2 in t["boxes"].long().tolist():  # bright objects on the noise
            image[:, y1:y2, x1:x2] = 1.0
    return images, targets


def train(model, images, targets, steps, proposals=None, lr=0.02):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    model.train()
    history = []
    for _ in range(steps):
        losses = model(images, targets, proposals) if proposals else model(images, targets)
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append((set(losses), total.item()))
    return history


def check_detections(out, sizes, num_classes, most=100):
    assert len(out) == len(sizes)
    for det, (h, w) in zip(out, sizes, strict=True):
        assert set(det) == {"boxes", "labels", "scores"}
        assert det["boxes"].dtype == torch.float32 and det["scores"].dtype == torch.float32
        assert det["labels"].dtype == torch.int64
        n = det["boxes"].shape[0]
        assert det["boxes"].shape == (n, 4) and det["scores"].shape == det["labels"].shape == (n,)
        assert n <= most
        if n:
            b = det["boxes"]
            assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all()
            assert (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
            assert (b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all()
            assert ((det["labels"] >= 1) & (det["labels"] <= num_classes)).all()
            assert (det["scores"][:-1] >= det["scores"][1:]).all()


def test_parameter_count_matches_torchvision_fasterrcnn_resnet50_fpn():
    # DESIGN.md: torchvision's fasterrcnn_resnet50_fpn (num_classes=91 incl. background).
    model = create_model("faster_rcnn_r50_fpn", num_classes=90, norm="batch")
    assert count_parameters(model) == 41_808_406


def test_sgd_steps_lower_the_loss_of_a_tiny_faster_rcnn():
    model = tiny()
    images, targets = batch()
    history = train(model, images, targets, steps=12)
    keys = {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    assert all(k == keys for k, _ in history)
    first, last = history[0][1], sum(v for _, v in history[-3:]) / 3
    assert last < 0.6 * first, [round(v, 3) for _, v in history]


def test_eval_output_format_in_original_coordinates():
    model = tiny(box_score_thresh=0.0, box_detections_per_img=7).eval()
    sizes = [(50, 70), (90, 40)]  # resized to 64 px: boxes must come back to these sizes
    images, _ = batch(sizes)
    with torch.no_grad():
        out = model(images)
    check_detections(out, sizes, 3, most=7)
    assert any(len(d["boxes"]) for d in out)
    # The same detections, computed step by step in the resized images, then scaled by hand.
    with torch.no_grad():
        images_batch, _ = model.transform(images)
        assert images_batch.image_sizes == [(45, 64), (64, 28)]
        features = model.features(images_batch.tensors)
        props, _ = model.rpn(images_batch.image_sizes, images_batch.padded_size, features)
        resized, _ = model.roi_heads(features, props, images_batch.image_sizes)
    for det, small, (h, w), (rh, rw) in zip(
        out, resized, sizes, images_batch.image_sizes, strict=True
    ):
        scale = torch.tensor([w / rw, h / rh, w / rw, h / rh])
        torch.testing.assert_close(det["boxes"], small["boxes"] * scale)
        assert torch.equal(det["labels"], small["labels"])
    proposals = model.propose(images)
    assert model.training is False and len(proposals) == 2
    for p, (h, w) in zip(proposals, sizes, strict=True):
        assert 0 < len(p) <= 50 and (p[:, 2] <= w + 1e-4).all() and (p[:, 3] <= h + 1e-4).all()


def test_fast_rcnn_trains_and_predicts_on_given_proposals():
    model = tiny(rpn=False)
    assert model.has_rpn is False and model.rpn is None
    images, targets = batch()
    g = torch.Generator().manual_seed(2)
    proposals = []
    for t in targets:  # jittered copies of the boxes plus random boxes
        near = t["boxes"].repeat(10, 1) + torch.randn(10 * len(t["boxes"]), 4, generator=g) * 3
        xy = torch.rand(20, 2, generator=g) * 48
        proposals.append(torch.cat((near, torch.cat((xy, xy + 16), 1))))
    history = train(model, images, targets, steps=10, proposals=proposals)
    assert all(k == {"loss_classifier", "loss_box_reg"} for k, _ in history)
    assert history[-1][1] < history[0][1]
    model.eval()
    with torch.no_grad():
        out = model(images, proposals=proposals)
    check_detections(out, [(64, 64)] * 2, 3)
    with pytest.raises(ValueError, match="proposals"):
        model(images)


@pytest.mark.parametrize(("head", "roi_op"), [("c4", "align"), ("c4", "pool"), ("fpn", "pool")])
def test_c4_head_and_roi_pool_run(head, roi_op):
    extra = {"roi_output_size": 6, "anchor_sizes": [16, 32, 64]} if head == "c4" else {}
    model = tiny(head=head, roi_op=roi_op, **extra)
    images, targets = batch()
    history = train(model, images, targets, steps=2)
    assert all(torch.isfinite(torch.tensor(v)) for _, v in history)
    model.eval()
    with torch.no_grad():
        check_detections(model(images), [(64, 64)] * 2, 3)
    if head == "c4":
        # The last stage is the box head; it is stored once, under the backbone.
        keys = list(model.state_dict())
        assert any(k.startswith("backbone.body.layer4.") for k in keys)
        assert not any(k.startswith("roi_heads.box_head") for k in keys)


def test_registry_lists_the_detectors_with_their_task():
    names = list_models("faster_rcnn") + list_models("fast_rcnn")
    for name in ("faster_rcnn_r50_fpn", "faster_rcnn_r18_fpn_lite", "fast_rcnn_r50_c4"):
        assert name in names and "detection" in model_info(name).tags
    lite = create_model("faster_rcnn_r18_fpn_lite", num_classes=10)
    assert lite.cnnkit_config["kwargs"]["backbone_widths"] == [32, 64, 128, 256]
    assert (lite.num_classes, lite.min_size, lite.max_size, lite.has_rpn) == (10, 128, 128, True)
    assert lite.roi_heads.box_predictor.cls_score.out_features == 11
    assert "detection" not in model_info("resnet50").tags


def test_bad_arguments():
    with pytest.raises(ValueError, match="head"):
        FasterRCNN(head="c5")
    with pytest.raises(ValueError, match="anchor_sizes"):
        tiny(anchor_sizes=[8, 16])
    model = tiny()
    with pytest.raises(ValueError, match="targets"):
        model.train()(batch()[0])


# ------------------------------------------------------------------ Mask R-CNN, keypoint R-CNN


def test_parameter_counts_match_torchvision_mask_and_keypoint_rcnn_resnet50_fpn():
    # DESIGN.md: maskrcnn_resnet50_fpn (91 classes incl. background) and
    # keypointrcnn_resnet50_fpn (2 classes incl. background, 17 keypoints), plain BatchNorm.
    mask = create_model("mask_rcnn_r50_fpn", num_classes=90, norm="batch")
    assert count_parameters(mask) == 44_454_513
    assert mask.has_masks and mask.keypoint_head is None
    keypoint = create_model("keypoint_rcnn_r50_fpn", num_classes=1, norm="batch")
    assert count_parameters(keypoint) == 59_190_378
    assert keypoint.num_keypoints == 17 and keypoint.mask_head is None


def instance_batch(sizes=((64, 64), (64, 64))):
    """``batch`` with an ellipse inscribed in each box (drawn in the image, and its mask) and
    two keypoints per object: the ellipse's left-most and right-most points."""
    images, targets = batch(sizes)
    for image, target, (h, w) in zip(images, targets, sizes, strict=True):
        image.mul_(0.3)
        ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
        masks, points = [], []
        for x1, y1, x2, y2 in target["boxes"].tolist():
            cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
            inside = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1
            image[:, inside] = 1.0
            masks.append(inside.to(torch.uint8))
            points.append([[x1 + 0.5, cy, 2.0], [x2 - 0.5, cy, 2.0]])
        target["masks"] = torch.stack(masks)
        target["keypoints"] = torch.tensor(points)
    return images, targets


def check_inside_boxes(det, points):
    """``points [D, K, 2]`` lie in their detection's box."""
    b = det["boxes"][:, None]
    assert ((points >= b[..., :2] - 1e-4) & (points <= b[..., 2:] + 1e-4)).all()


def test_tiny_mask_rcnn_trains_and_pastes_masks_in_original_coordinates():
    model = tiny(mask=True, mask_channels=16)
    assert model.has_masks and model.mask_head.logits.out_channels == 4
    images, targets = instance_batch()
    history = train(model, images, targets, steps=12)
    keys = {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"}
    assert all(k == keys for k, _ in history)
    totals = [v for _, v in history]
    assert statistics.median(totals[-5:]) < 0.7 * totals[0], [round(v, 3) for v in totals]

    model.eval()
    model.roi_heads.score_thresh = 0.0
    sizes = [(50, 70), (90, 40)]
    images, _ = instance_batch(sizes)
    with torch.no_grad():
        out = model(images)
        lean = model(images, paste_masks=False)
    for det, thin, (h, w) in zip(out, lean, sizes, strict=True):
        assert set(det) == {"boxes", "labels", "scores", "mask_probs", "masks"}
        assert set(thin) == set(det) - {"masks"}
        n = det["boxes"].shape[0]
        assert n > 0 and det["mask_probs"].shape == (n, 1, 28, 28)
        assert det["masks"].shape == (n, 1, h, w) and det["masks"].dtype == torch.float32
        assert ((det["mask_probs"] >= 0) & (det["mask_probs"] <= 1)).all()
        torch.testing.assert_close(det["mask_probs"], thin["mask_probs"])
        # The masks lie in their boxes, which are in the original image's coordinates.
        ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
        b = det["boxes"][:, :, None, None]
        inside = (xs >= b[:, 0]) & (xs < b[:, 2]) & (ys >= b[:, 1]) & (ys < b[:, 3])
        assert (det["masks"][:, 0][~inside] == 0).all() and det["masks"].amax() > 0


def test_tiny_keypoint_rcnn_trains_and_predicts_keypoints_in_original_coordinates():
    model = tiny(num_keypoints=2, keypoint_channels=16, keypoint_convs=2)
    assert model.keypoint_head is not None and not model.has_masks
    images, targets = instance_batch()
    history = train(model, images, targets, steps=12)
    keys = {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    assert all(k == keys | {"loss_keypoint"} for k, _ in history)
    # The keypoint loss of a few RoIs jumps when a new RoI comes in: the median is the trend.
    totals = [v for _, v in history]
    assert statistics.median(totals[-5:]) < 0.75 * totals[0], [round(v, 3) for v in totals]

    model.eval()
    model.roi_heads.score_thresh = 0.0
    sizes = [(50, 70), (90, 40)]
    with torch.no_grad():
        out = model(instance_batch(sizes)[0])
    for det, (h, w) in zip(out, sizes, strict=True):
        extra = {"keypoints", "keypoints_scores", "keypoint_heatmaps"}
        assert set(det) == {"boxes", "labels", "scores"} | extra
        n = det["boxes"].shape[0]
        assert n > 0 and det["keypoints"].shape == (n, 2, 3)
        assert det["keypoints_scores"].shape == (n, 2)
        assert det["keypoint_heatmaps"].shape == (n, 2, 56, 56)
        check_inside_boxes(det, det["keypoints"][..., :2])  # both mapped back alike
        assert det["keypoints"][..., 0].max() <= w and det["keypoints"][..., 1].max() <= h


def test_instance_heads_on_the_c4_map_with_roi_pool():
    model = tiny(
        head="c4",
        roi_op="pool",
        roi_output_size=6,
        anchor_sizes=[16, 32, 64],
        mask=True,
        mask_channels=8,
        num_keypoints=2,
        keypoint_channels=8,
        keypoint_convs=1,
    )
    assert model.mask_head.pooler.featmap_names == ["c4"] and model.mask_head.pooler.op == "pool"
    assert model.mask_head.convs[0][0].in_channels == 32  # C4 of the tiny ResNet-18
    images, targets = instance_batch()
    history = train(model, images, targets, steps=2)
    assert all({"loss_mask", "loss_keypoint"} <= k for k, _ in history)
    assert all(torch.isfinite(torch.tensor(v)) for _, v in history)
    model.eval()
    model.roi_heads.score_thresh = 0.0
    with torch.no_grad():
        det = model(images[:1])[0]
    n = det["boxes"].shape[0]
    assert det["masks"].shape == (n, 1, 64, 64) and det["keypoints"].shape == (n, 2, 3)


def test_mask_and_keypoint_targets_are_required_with_their_heads():
    images, targets = instance_batch()
    model = tiny(mask=True, mask_channels=8).train()
    with pytest.raises(ValueError, match=r"targets\[0\]\['masks'\]"):
        model(images, [{k: v for k, v in t.items() if k != "masks"} for t in targets])
    wrong = [{**t, "masks": t["masks"][:, :32]} for t in targets]
    with pytest.raises(ValueError, match=r"targets\[0\]\['masks'\].*\[2, 64, 64\]"):
        model(images, wrong)
    model = tiny(num_keypoints=3, keypoint_channels=8, keypoint_convs=1).train()
    with pytest.raises(ValueError, match=r"targets\[0\]\['keypoints'\].*\[2, 3, 3\]"):
        model(images, targets)


def test_registry_lists_mask_and_keypoint_rcnn():
    for name, family in [
        ("mask_rcnn_r18_fpn", "mask_rcnn"),
        ("mask_rcnn_r50_fpn", "mask_rcnn"),
        ("keypoint_rcnn_r18_fpn", "keypoint_rcnn"),
        ("keypoint_rcnn_r50_fpn", "keypoint_rcnn"),
    ]:
        assert name in list_models(family) and "detection" in model_info(name).tags
    lite = create_model("mask_rcnn_r18_fpn", num_classes=10)
    assert lite.has_masks and (lite.min_size, lite.mask_head.logits.out_channels) == (128, 11)
    kp = create_model("keypoint_rcnn_r18_fpn", num_classes=10)
    assert kp.num_keypoints == 4 and kp.keypoint_head.heatmap_size == 56
    gn = tiny(
        norm="group",
        norm_groups=4,
        mask=True,
        mask_channels=8,
        num_keypoints=2,
        keypoint_channels=8,
        keypoint_convs=1,
    )
    for head in (gn.mask_head, gn.keypoint_head):
        assert any(isinstance(m, torch.nn.GroupNorm) for m in head.modules())


def _positives_seen(model, images, targets, seed):
    """The (positive RoIs, matched ground truth) per image that the instance heads train on."""
    seen = []
    head = model.mask_head

    def spy(features, positives, matched, image_shapes):
        seen.append(([p.clone() for p in positives], [m["gt_index"].clone() for m in matched]))
        return {"loss_mask": sum(p.sum() for p in positives) * 0}

    head.loss = spy
    torch.manual_seed(seed)
    model.train()(images, targets)
    return seen[0]


def test_instance_rois_per_image_caps_the_positive_rois_with_a_random_subset():
    images, targets = instance_batch()
    # A low foreground IoU: many positive RoIs even from an untrained RPN.
    loose = {"mask": True, "mask_channels": 8, "box_fg_iou": 0.1, "box_bg_iou_lo": 0.0}
    subsets = set()
    for seed in range(4):
        # The same seed: the RoI sampler draws the same positives, the cap then subsamples them.
        every, every_gt = _positives_seen(tiny(**loose), images, targets, seed)
        assert min(len(p) for p in every) > 2  # enough positives for the cap to bite
        capped = tiny(**loose, instance_rois_per_image=2)
        boxes, gt = _positives_seen(capped, images, targets, seed)
        for kept, kept_gt, full, full_gt in zip(boxes, gt, every, every_gt, strict=True):
            assert len(kept) == 2
            # Each kept RoI is one of the image's positives, with that positive's ground truth.
            same = (kept[:, None] == full[None]).all(-1)
            assert same.any(1).all()
            torch.testing.assert_close(kept_gt, full_gt[same.float().argmax(1)])
        subsets.add(tuple(boxes[0].flatten().tolist()))
    assert len(subsets) > 1  # drawn at random, not the first two
    for bad in (0, -1, 2.5, True, "8"):
        with pytest.raises(ValueError, match="instance_rois_per_image"):
            tiny(mask=True, instance_rois_per_image=bad)
