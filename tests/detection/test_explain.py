"""explain / write_explanation: the stages of a tiny Faster R-CNN on one image, checked against
brute-force IoUs, the model's own outputs (forward, propose) and the files written."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch

from cnnkit import viz
from cnnkit.detection.explain import INSTANCES, explain, write_explanation
from cnnkit.detection.rcnn import FasterRCNN
from cnnkit.detection.roi_heads import InstanceHead

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
    "rpn_pre_nms_top_n_test": 1000,
    "rpn_post_nms_top_n_test": 300,  # dense enough for foreground RoIs
    "box_batch_size_per_image": 32,
}
CLASSES = ["cat", "dog", "emu"]
# 48 x 80 resized to 38 x 64: x scaled by 0.8, y by 38/48 (the mapping back is tested).
HEIGHT, WIDTH = 48, 80
ALL = 100_000  # a `top` that keeps every box


def tiny(**overrides) -> FasterRCNN:
    torch.manual_seed(0)
    return FasterRCNN(**{**TINY, **overrides})


def image_and_target() -> tuple[torch.Tensor, dict]:
    """Noise with two bright boxes: one the shape of an anchor (several anchors reach IoU 0.7),
    one long and thin (no anchor does: only the low-quality rule matches it)."""
    g = torch.Generator().manual_seed(3)
    image = (torch.rand(3, HEIGHT, WIDTH, generator=g) * 255).to(torch.uint8)
    boxes = torch.tensor([[20.0, 10.0, 40.0, 30.25], [50.0, 4.0, 54.0, 44.0]])
    for x1, y1, x2, y2 in boxes.long().tolist():
        image[:, y1:y2, x1:x2] = 255
    target = {"boxes": boxes, "labels": torch.tensor([1, 3]), "iscrowd": torch.tensor([0, 0])}
    return image, target


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Brute-force IoU, ``[len(a), len(b)]``, box by box."""
    out = np.zeros((len(a), len(b)))
    for i, p in enumerate(a):
        for j, q in enumerate(b):
            w = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
            h = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
            inter = w * h
            union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
            out[i, j] = inter / union if union > 0 else 0.0
    return out


def all_anchors_in_original_coordinates(model: FasterRCNN) -> np.ndarray:
    """Every anchor of the image, from the model's generator, scaled back by hand."""
    resized = (38, 64)  # floor(48 * 0.8), 80 * 0.8
    padded = (64, 64)
    shapes = [(64 // s, 64 // s) for s in (4, 8, 16, 32, 64)]
    anchors = model.rpn.anchor_generator(padded, shapes).numpy().astype(np.float64)
    scale = np.array([WIDTH / resized[1], HEIGHT / resized[0]] * 2)
    return anchors * scale


def pngs(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix == ".png")


@pytest.fixture(scope="module")
def explained():
    model = tiny()
    image, target = image_and_target()
    return model, image, target, explain(model, image, target, top=ALL)


def test_outputs_agree_with_the_models_own_forward_and_propose(explained):
    model, image, _, expl = explained
    assert expl.image_size == (HEIGHT, WIDTH) and expl.resized_size == (38, 64)
    model.eval()
    with torch.no_grad():
        det = model([image.float() / 255])[0]
        proposals = model.propose([image.float() / 255])[0]
    np.testing.assert_allclose(expl.detections.boxes, det["boxes"].numpy(), rtol=0, atol=1e-4)
    np.testing.assert_array_equal(expl.detections.labels, det["labels"].numpy())
    np.testing.assert_allclose(expl.detections.scores, det["scores"].numpy(), atol=1e-6)
    np.testing.assert_allclose(expl.proposals_after_nms.boxes, proposals.numpy(), atol=1e-4)
    assert expl.proposals_after_nms.total == proposals.shape[0] <= 300
    # Every proposal is one of the candidates, with the candidate's score.
    before = expl.proposals_before_nms
    for box, score in zip(
        expl.proposals_after_nms.boxes, expl.proposals_after_nms.scores, strict=True
    ):
        same = np.flatnonzero((before.boxes == box).all(axis=1))
        assert same.size and np.isclose(before.scores[same], score).any()


def test_counts_are_consistent_and_scores_sorted(explained):
    _, _, _, e = explained
    assert e.proposals_after_nms.total <= e.proposals_before_nms.total <= e.anchors.total
    assert e.detections.total <= e.boxes_before_nms.total
    assert e.detections.total <= 100
    for stage in (e.proposals_before_nms, e.proposals_after_nms, e.boxes_before_nms, e.detections):
        assert stage.boxes.shape == (stage.total, 4) and stage.boxes.dtype == np.float32
        assert (np.diff(stage.scores) <= 0).all()
    assert (e.boxes_before_nms.scores > 0.05).all()
    assert set(e.boxes_before_nms.labels) <= {1, 2, 3}
    assert e.mask_probs is None and e.keypoint_heatmaps is None


def test_top_keeps_the_best_boxes_and_the_totals(explained):
    model, image, target, full = explained
    short = explain(model, image, target, top=5)
    for a, b in (
        (full.proposals_before_nms, short.proposals_before_nms),
        (full.boxes_before_nms, short.boxes_before_nms),
        (full.detections, short.detections),
    ):
        assert b.total == a.total and b.boxes.shape[0] == min(5, a.total)
        np.testing.assert_array_equal(b.boxes, a.boxes[:5])
        np.testing.assert_array_equal(b.scores, a.scores[:5])


def test_matched_anchors_follow_the_rpn_rules_by_brute_force(explained):
    model, _, target, e = explained
    anchors = all_anchors_in_original_coordinates(model)
    assert e.anchors.total == anchors.shape[0]
    gt = target["boxes"].numpy().astype(np.float64)
    iou = iou_matrix(gt, anchors)  # [2, A]
    best = iou.max(axis=1)
    np.testing.assert_allclose(e.best_anchor_iou, best, atol=1e-5)
    assert best[0] >= 0.7 > best[1]  # the square box fits anchors; the thin one does not
    for box, g, score in zip(e.anchors.boxes, e.anchors.labels, e.anchors.scores, strict=True):
        own = iou_matrix(gt[g : g + 1], box[None].astype(np.float64))[0, 0]
        assert abs(own - score) < 1e-4
        assert own >= 0.7 - 1e-6 or abs(own - best[g]) < 1e-5  # a positive, or the best anchor
    # Complete: every anchor with IoU >= 0.7, and every box's best anchors, are listed.
    expected = (iou.max(axis=0) >= 0.7) | (np.abs(iou - best[:, None]) < 1e-6).any(axis=0)
    assert e.anchors.boxes.shape[0] == int(expected.sum())
    thin = e.anchors.labels == 1
    assert thin.any() and (e.anchors.scores[thin] < 0.7).all()


def test_sampled_rois_obey_the_box_heads_rules(explained):
    model, image, target, e = explained
    r = e.sampled_rois
    gt = target["boxes"].numpy().astype(np.float64)
    iou = iou_matrix(r.boxes.astype(np.float64), gt)
    fg, bg = r.labels > 0, r.labels == 0
    assert fg.sum() > 2  # the ground-truth boxes themselves, and proposals
    assert bg.sum() > 2
    assert (iou[fg].max(axis=1) >= 0.5 - 1e-5).all()
    np.testing.assert_array_equal(r.labels[fg], target["labels"].numpy()[iou[fg].argmax(axis=1)])
    assert ((iou[bg].max(axis=1) >= 0.1 - 1e-5) & (iou[bg].max(axis=1) < 0.5 + 1e-5)).all()
    assert fg.sum() <= int(32 * 0.25) and r.boxes.shape[0] <= 32
    assert r.total == e.proposals_after_nms.total + 2
    again = explain(model, image, target, top=ALL).sampled_rois  # a fixed seed
    np.testing.assert_array_equal(again.boxes, r.boxes)


def test_mode_gradients_and_random_state_are_left_alone(explained):
    model, image, target, _ = explained
    model.train()
    state = torch.get_rng_state()
    expl = explain(model, image, target)
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.is_grad_enabled()
    assert all(p.grad is None for p in model.parameters())
    for value in vars(expl).values():
        assert not isinstance(value, torch.Tensor)
    model.eval()
    explain(model, image)
    assert not model.training


def test_write_explanation_with_a_target(explained, tmp_path):
    _, image, _, expl = explained
    written = write_explanation(expl, image.permute(1, 2, 0).numpy(), tmp_path, CLASSES)
    assert pngs(tmp_path) == [
        "01_anchors.png",
        "02_proposals_before_nms.png",
        "03_proposals_after_nms.png",
        "04_sampled_rois.png",
        "05_boxes_before_nms.png",
        "06_detections.png",
    ]
    assert [p.name for p in written][-1] == "index.md"
    assert all(p.stat().st_size > 1000 for p in written)
    index = (tmp_path / "index.md").read_text()
    for p in written[:-1]:
        assert f"[{p.name}]({p.name})" in index
    assert f"{expl.proposals_before_nms.total} candidates" in index
    assert f"{expl.proposals_after_nms.total} proposals" in index
    assert f"{expl.boxes_before_nms.total} boxes" in index
    assert f"{expl.detections.total} detections" in index
    assert "box 2 (emu): " in index and "no anchor reaches IoU 0.7 with box 2:" in index


class FakeInstanceHead(InstanceHead):
    """Adds the keys of a mask head and a keypoint head with known values: detection ``i``'s
    mask probabilities are ``i / 100`` and its keypoint ``k``'s heatmap peaks at cell
    ``(k, 2k)``; its keypoints sit at its box's corner."""

    def predict(self, features, detections, image_shapes) -> None:
        for det in detections:
            d = det["boxes"].shape[0]
            index = torch.arange(d, dtype=torch.float32)
            det["mask_probs"] = (index / 100).view(d, 1, 1, 1).expand(d, 1, 28, 28).clone()
            maps = torch.zeros(d, 2, 56, 56)
            maps[:, 0, 0, 0] = 9.0
            maps[:, 1, 1, 2] = 9.0
            det["keypoint_heatmaps"] = maps
            corner = det["boxes"][:, None, :2].expand(d, 2, 2)
            det["keypoints"] = torch.cat([corner, torch.ones(d, 2, 1)], dim=2)
            det["keypoints_scores"] = torch.full((d, 2), 9.0)


def test_without_a_target_with_mask_and_keypoint_outputs(tmp_path):
    model = tiny(box_score_thresh=0.0)
    model.roi_heads.instance_heads.append(FakeInstanceHead())
    image, _ = image_and_target()
    expl = explain(model, image, top=10)
    assert expl.gt is None and expl.anchors is None and expl.sampled_rois is None
    count = min(INSTANCES, expl.detections.total)
    assert count > 0
    assert expl.mask_probs.shape == (count, 28, 28)
    np.testing.assert_allclose(expl.mask_probs[:, 0, 0], np.arange(count) / 100, atol=1e-7)
    maps = expl.keypoint_heatmaps
    assert maps.shape == (count, 2, 56, 56)
    np.testing.assert_allclose(maps.sum(axis=(2, 3)), 1.0, atol=1e-5)  # a softmax per map
    peak = np.exp(9.0) / (np.exp(9.0) + 56 * 56 - 1)
    np.testing.assert_allclose(maps[:, 0, 0, 0], peak, rtol=1e-5)
    np.testing.assert_allclose(maps[:, 1, 1, 2], peak, rtol=1e-5)
    # The keypoints come back in original coordinates, as the boxes.
    corners = expl.detections.boxes[:count, :2]
    np.testing.assert_allclose(expl.keypoints[:, 0, :2], corners, atol=1e-4)
    written = write_explanation(expl, image.permute(1, 2, 0).numpy(), tmp_path, CLASSES)
    assert pngs(tmp_path) == [
        "02_proposals_before_nms.png",
        "03_proposals_after_nms.png",
        "05_boxes_before_nms.png",
        "06_detections.png",
        "07_masks.png",
        "08_keypoints.png",
    ]
    assert written[-1].name == "index.md" and all(p.stat().st_size > 1000 for p in written)
    index = (tmp_path / "index.md").read_text()
    assert "[07_masks.png]" in index and "[08_keypoints.png]" in index
    assert "no 01_anchors.png" in index


def test_the_models_mask_and_keypoint_heads_line_up_with_the_detections():
    model = tiny(
        mask=True,
        mask_channels=8,
        num_keypoints=2,
        keypoint_channels=8,
        keypoint_convs=1,
        box_score_thresh=0.0,
    )
    image, _ = image_and_target()
    expl = explain(model, image)
    count = min(INSTANCES, expl.detections.total)
    assert count > 0 and expl.mask_probs.shape == (count, 28, 28)
    assert ((expl.mask_probs >= 0) & (expl.mask_probs <= 1)).all()
    maps = expl.keypoint_heatmaps
    assert maps.shape == (count, 2, 56, 56)
    np.testing.assert_allclose(maps.sum(axis=(2, 3)), 1.0, atol=1e-5)
    # Each keypoint lies in its heatmap's most likely cell, on its own detection's box.
    box = expl.detections.boxes[:count, None, :].astype(np.float64)  # [S, 1, 4]
    cell = np.stack([box[..., 2] - box[..., 0], box[..., 3] - box[..., 1]], axis=-1) / 56
    peak = maps.reshape(count, 2, -1).argmax(axis=2)
    centre = box[..., :2] + (np.stack([peak % 56, peak // 56], axis=-1) + 0.5) * cell
    assert (np.abs(expl.keypoints[..., :2] - centre) <= cell / 2 + 1e-3).all()


def test_bad_inputs(explained, tmp_path):
    model, image, target, expl = explained
    with pytest.raises(ValueError, match="uint8"):
        explain(model, image.float())
    with pytest.raises(ValueError, match="top"):
        explain(model, image, top=0)
    with pytest.raises(ValueError, match="Fast R-CNN"):
        explain(tiny(rpn=False), image)
    with pytest.raises(ValueError, match="48 x 80"):
        write_explanation(expl, np.zeros((10, 10, 3), np.uint8), tmp_path, CLASSES)
    with pytest.raises(ValueError, match="label 3 is not in 1..2"):
        write_explanation(expl, image.permute(1, 2, 0).numpy(), tmp_path / "out", CLASSES[:2])
    assert not (tmp_path / "out").exists()  # checked before anything is written


def figure_of(monkeypatch, draw):
    """Run ``draw`` and return the one figure it saved (the PNG is written as well)."""
    figures = []
    save = viz.save_png

    def keep(fig, out):
        figures.append(fig)
        save(fig, out)

    monkeypatch.setattr(viz, "save_png", keep)
    draw()
    monkeypatch.undo()
    (fig,) = figures
    return fig


def test_box_layers_draw_each_box_where_it_is(tmp_path, monkeypatch):
    image = np.full((40, 60, 3), 120, np.uint8)
    scored = viz.BoxLayer(
        np.array([[1.0, 2.0, 11.0, 22.0], [30.0, 5.0, 50.0, 35.0]]),
        name="proposals",
        values=[0.0, 1.0],
        cmap="viridis",
    )
    named = viz.BoxLayer(np.array([[5.0, 6.0, 7.0, 8.0]]), name="gt", colour="red", texts=["a"])
    fig = figure_of(
        monkeypatch,
        lambda: viz.draw_box_layers(image, [scored, named], tmp_path / "b.png", title="t"),
    )
    ax = fig.axes[0]
    first, second = ax.collections
    np.testing.assert_allclose(
        first.get_segments()[1], [[30, 5], [50, 5], [50, 35], [30, 35], [30, 5]]
    )
    viridis = matplotlib.colormaps["viridis"]
    np.testing.assert_allclose(first.get_colors()[:, :3], [viridis(0.0)[:3], viridis(1.0)[:3]])
    np.testing.assert_allclose(second.get_colors()[0], [1, 0, 0, 1])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["proposals", "gt"]
    assert [t.get_text() for t in ax.texts] == ["a"] and ax.texts[0].get_position() == (5, 6)
    assert len(fig.axes) == 2  # the colour bar of the scored layer
    with pytest.raises(ValueError, match="layer 0 has 1 values, 2 boxes"):
        viz.draw_box_layers(image, [viz.BoxLayer(scored.boxes, values=[0.5])], tmp_path / "x.png")


def test_box_heatmaps_cover_their_boxes(tmp_path, monkeypatch):
    image = np.full((40, 60, 3), 120, np.uint8)
    boxes = np.array([[10.0, 10.0, 30.0, 20.0], [0.0, 0.0, 60.0, 40.0]])
    maps = np.random.default_rng(0).random((2, 3, 8, 8))
    points = np.zeros((2, 3, 2))
    fig = figure_of(
        monkeypatch,
        lambda: viz.draw_box_heatmaps(
            image, boxes, maps, tmp_path / "h.png", points=points, vmax=None, context=0.5
        ),
    )
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 6  # one row per box, one column per map
    heat = panels[5].images[1]  # box 1, map 2
    np.testing.assert_allclose(heat.get_array(), maps[1, 2])
    assert tuple(heat.get_extent()) == (0.0, 60.0, 40.0, 0.0)
    assert panels[0].get_xlim() == (0.0, 40.0) and panels[0].get_ylim() == (25.0, 5.0)
    with pytest.raises(ValueError, match="heatmaps must be"):
        viz.draw_box_heatmaps(image, boxes, maps[:1], tmp_path / "x.png")
