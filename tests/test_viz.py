"""Learning curves and confusion matrix pictures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cnnkit import viz
from cnnkit.viz import plot_confusion_matrix, plot_curves


def _png(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        pixels = np.asarray(image.convert("L"))
    # Not a blank canvas: axes, lines and labels make many distinct grey levels.
    assert len(np.unique(pixels)) > 10
    return pixels


def test_curves_two_panels_train_and_dev(tmp_path):
    records = [
        {
            "epoch": t,
            "train_loss": 1 / t,
            "train_accuracy": 1 - 0.5 / t,
            "dev_loss": 1.1 / t,
            "dev_accuracy": 1 - 0.6 / t,
        }
        for t in range(1, 11)
    ]
    plot_curves(records, tmp_path / "curves.png")
    pixels = _png(tmp_path / "curves.png")
    assert pixels.shape[1] > 1.8 * pixels.shape[0]  # two panels side by side
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]  # no temp file left


def test_curves_one_record_and_missing_values(tmp_path):
    plot_curves([{"epoch": 1, "train_loss": 2.0, "train_accuracy": 0.3}], tmp_path / "a.png")
    _png(tmp_path / "a.png")
    records = [
        {"epoch": 1, "train_loss": 2.0, "train_accuracy": 0.3, "dev_loss": float("nan")},
        {"epoch": 2, "train_loss": 1.0, "train_accuracy": 0.6, "dev_loss": 1.2},
    ]
    plot_curves(records, tmp_path / "sub" / "b.png")
    _png(tmp_path / "sub" / "b.png")
    with pytest.raises(ValueError, match="no records"):
        plot_curves([], tmp_path / "c.png")


def _figure_of(monkeypatch, draw):
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


def _drawn(monkeypatch, records, path, **kwargs):
    """Draw with plot_curves and return, per panel, (y label, {line label: y values})."""
    fig = _figure_of(monkeypatch, lambda: plot_curves(records, path, **kwargs))
    _png(path)
    return [
        (ax.get_ylabel(), {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()})
        for ax in fig.axes
    ]


def test_curves_of_a_detector_named_losses_and_dev_ap(tmp_path, monkeypatch):
    # A detector: named training losses, dev box AP, no training AP and no dev loss.
    records = [
        {
            "epoch": t,
            "train_loss": 3 / t,
            "train_loss_classifier": 1 / t,
            "train_loss_box_reg": 2 / t,
            "dev_box_ap": 0.05 * t,
        }
        for t in range(1, 6)
    ]
    (loss_label, losses), (ap_label, aps) = _drawn(
        monkeypatch, records, tmp_path / "det.png", metric="box_ap"
    )
    assert loss_label == "loss" and list(losses) == ["train", "classifier", "box_reg"]
    assert losses["box_reg"] == pytest.approx([2 / t for t in range(1, 6)])
    assert ap_label == "box ap (%)" and list(aps) == ["dev"]  # no empty train line
    assert aps["dev"] == pytest.approx([5.0 * t for t in range(1, 6)])


def test_curves_in_percent_only_for_fractions(tmp_path, monkeypatch):
    records = [
        {"epoch": t, "train_loss": 1 / t, "train_accuracy": 0.5, "dev_psnr": 20.0 + t}
        for t in range(1, 4)
    ]
    (_, _), (label, lines) = _drawn(monkeypatch, records, tmp_path / "a.png")
    assert label == "accuracy (%)" and lines["train"] == pytest.approx([50.0] * 3)
    (_, _), (label, lines) = _drawn(monkeypatch, records, tmp_path / "b.png", metric="psnr")
    assert label == "psnr" and lines["dev"] == pytest.approx([21.0, 22.0, 23.0])
    (_, _), (label, lines) = _drawn(monkeypatch, records, tmp_path / "c.png", percent=False)
    assert label == "accuracy" and lines["train"] == pytest.approx([0.5] * 3)


def test_confusion_matrix_picture(tmp_path):
    matrix = torch.tensor([[5, 1, 0], [0, 3, 2], [0, 0, 0]])
    plot_confusion_matrix(matrix, ["cat", "dog", "eel"], tmp_path / "cm.png")
    _png(tmp_path / "cm.png")
    plot_confusion_matrix(np.eye(40, dtype=int), [str(i) for i in range(40)], tmp_path / "big.png")
    _png(tmp_path / "big.png")
    with pytest.raises(ValueError, match="class names"):
        plot_confusion_matrix(matrix, ["a", "b"], tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"\[K, K\]"):
        plot_confusion_matrix(torch.zeros(2, 3), ["a", "b"], tmp_path / "x.png")


def test_voc_pr_curve_is_the_interpolated_envelope_as_steps(tmp_path, monkeypatch):
    # Ranked TP, FP, TP, FP with npos 3: the raw curve starts at (1/3, 1) and zig-zags; the
    # envelope is 1 on [0, 1/3], 2/3 on (1/3, 2/3] — what all-point AP integrates.
    recall = np.array([1, 1, 2, 2]) / 3
    precision = np.array([1, 1 / 2, 2 / 3, 1 / 2])
    fig = _figure_of(
        monkeypatch,
        lambda: viz.plot_pr_curves({"a": (recall, precision)}, tmp_path / "pr.png", envelope=True),
    )
    (line,) = fig.axes[0].get_lines()
    assert line.get_drawstyle() == "steps-pre"
    x, y = np.asarray(line.get_xdata()), np.asarray(line.get_ydata())
    assert x[0] == 0.0 and y[0] == 1.0  # from recall 0 at the best precision, not from (0, 0)
    assert np.all(np.diff(y) <= 0)
    np.testing.assert_allclose(y, [1, 1, 1, 2 / 3, 2 / 3])
    area = np.sum(np.diff(x) * y[1:])
    from cnnkit.evaluation.voc import ap_all_point

    assert area == pytest.approx(ap_all_point(recall, precision))
    _png(tmp_path / "pr.png")


def test_pr_curve_at_recall_one_and_a_single_point_are_visible(tmp_path, monkeypatch):
    curves = {"perfect": ([1.0], [1.0]), "half": ([0.5, 1.0], [1.0, 0.5])}
    fig = _figure_of(
        monkeypatch, lambda: viz.plot_pr_curves(curves, tmp_path / "pr.png", envelope=True)
    )
    ax = fig.axes[0]
    assert ax.get_xlim()[1] > 1.0 and ax.get_ylim()[1] > 1.0  # the edge does not hide them
    for line in ax.get_lines():
        assert line.get_marker() not in (None, "None", "")
        last = len(line.get_xdata()) - 1
        assert last in list(line.get_markevery())  # the curve's reach is marked
    perfect = ax.get_lines()[0]
    assert list(perfect.get_xdata()) == [0.0, 1.0] and list(perfect.get_ydata()) == [1.0, 1.0]


def test_equal_pr_curves_stay_distinguishable(tmp_path, monkeypatch):
    rec = np.linspace(0, 1, 101)
    prec = np.clip(1.2 - rec, 0, 1)
    curves = {"IoU=0.50": (rec, prec), "IoU=0.75": (rec, prec.copy())}
    fig = _figure_of(monkeypatch, lambda: viz.plot_pr_curves(curves, tmp_path / "pr.png"))
    first, second = fig.axes[0].get_lines()
    # The data are drawn as given (no offset) ...
    np.testing.assert_array_equal(first.get_ydata(), second.get_ydata())
    # ... in distinct styles, the one drawn first wider, so the later one does not cover it.
    assert first.get_linestyle() != second.get_linestyle()
    assert first.get_marker() != second.get_marker()
    assert first.get_linewidth() > second.get_linewidth() + 1
    assert first.get_zorder() < second.get_zorder()
    assert list(first.get_markevery()) != list(second.get_markevery())


def test_confusion_matrix_of_many_classes_names_its_ticks(tmp_path, monkeypatch):
    names = [f"class_{i}" for i in range(40)]
    fig = _figure_of(
        monkeypatch,
        lambda: plot_confusion_matrix(np.eye(40, dtype=int), names, tmp_path / "cm.png"),
    )
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == names
    assert [t.get_text() for t in ax.get_yticklabels()] == names


def test_confusion_matrix_too_many_names_for_ticks_writes_a_key(tmp_path, monkeypatch):
    k = 400
    names = [f"n{i:05d}" for i in range(k)]
    fig = _figure_of(
        monkeypatch,
        lambda: plot_confusion_matrix(np.eye(k, dtype=int), names, tmp_path / "cm.png"),
    )
    ax = fig.axes[0]
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks and all(t.isdigit() for t in ticks)  # indices ...
    key = "\n".join(t.get_text() for t in fig.texts if t.get_gid() == "class-key")
    rows = key.splitlines()
    assert len(rows) == k  # ... with a key for every class
    assert [r.split() for r in rows[:2]] == [["0", "n00000"], ["1", "n00001"]]
    assert rows[-1].split() == ["399", "n00399"]


def _loss_axis(monkeypatch, tmp_path, dev_losses):
    records = [
        {
            "epoch": t,
            "train_loss": 1.0 / t,
            "dev_loss": d,
            "train_accuracy": 0.5,
            "dev_accuracy": 0.5,
        }
        for t, d in enumerate(dev_losses, 1)
    ]
    fig = _figure_of(monkeypatch, lambda: plot_curves(records, tmp_path / "curves.png"))
    return fig.axes[0]


def test_an_early_loss_spike_gets_a_log_axis(tmp_path, monkeypatch):
    # A dev loss of 42 in epoch 1, then about 0.1: 2.6 decades; on a linear axis everything
    # after epoch 1 would sit in the bottom 1% of the panel.
    ax = _loss_axis(monkeypatch, tmp_path, [42.0, 0.5, 0.2, 0.12, 0.1, 0.1])
    assert ax.get_yscale() == "log"
    low, high = ax.get_ylim()
    assert low <= 0.1 and high >= 42.0  # nothing clipped
    assert "log" in ax.get_title()


def test_losses_within_a_decade_and_a_half_stay_linear(tmp_path, monkeypatch):
    ax = _loss_axis(monkeypatch, tmp_path, [2.0, 1.2, 0.9, 0.7, 0.6, 0.5])  # 1.0 .. 0.167
    assert ax.get_yscale() == "linear"


# --------------------------------------------------------------------------- detections on images


def _scene(h=128, w=128):
    rng = np.random.default_rng(0)
    return rng.integers(90, 160, size=(h, w, 3), dtype=np.uint8)


def test_detections_drawn_boxes_names_scores_and_class_colours(tmp_path, monkeypatch):
    boxes = np.array([[10.0, 20.0, 40.0, 60.0], [70.0, 0.0, 120.0, 30.0], [5, 80, 30, 120]])
    fig = _figure_of(
        monkeypatch,
        lambda: viz.draw_detections(
            _scene(), boxes, ["7", "3", "7"], np.array([0.91, 0.5, 0.25]), tmp_path / "d.png"
        ),
    )
    ax = fig.axes[0]
    rects = [p for p in ax.patches if not p.get_fill()]
    assert [(r.get_x(), r.get_y(), r.get_width(), r.get_height()) for r in rects] == [
        (10, 20, 30, 40),
        (70, 0, 50, 30),
        (5, 80, 25, 40),
    ]
    colours = [r.get_edgecolor() for r in rects]
    assert colours[0] == colours[2] != colours[1]  # one colour per class
    assert [t.get_text() for t in ax.texts] == ["7 0.91", "3 0.50", "7 0.25"]
    assert ax.texts[0].get_va() == "bottom" and ax.texts[1].get_va() == "top"  # at the top edge
    pixels = _png(tmp_path / "d.png")
    assert min(pixels.shape) >= 4 * 128  # enlarged: labels stay readable
    with Image.open(tmp_path / "d.png") as image:
        rgb = np.asarray(image.convert("RGB"), dtype=np.int16)
    for colour in {colours[0][:3], colours[1][:3]}:  # each box colour is on the picture
        target = np.round(np.asarray(colour) * 255).astype(np.int16)
        assert (np.abs(rgb - target).max(axis=2) <= 3).sum() > 200


def test_detections_ground_truth_without_scores_and_nothing_to_draw(tmp_path, monkeypatch):
    fig = _figure_of(
        monkeypatch,
        lambda: viz.draw_detections(
            _scene(64, 96), [[1, 2, 30, 40]], ["cat"], None, tmp_path / "gt.png"
        ),
    )
    assert [t.get_text() for t in fig.axes[0].texts] == ["cat"]
    with Image.open(tmp_path / "gt.png") as image:
        assert image.size[0] > 1.3 * image.size[1]  # the image's aspect is kept
    viz.draw_detections(_scene(), np.zeros((0, 4)), [], np.zeros(0), tmp_path / "none.png")
    _png(tmp_path / "none.png")


def test_detections_colours_follow_the_class_list(tmp_path, monkeypatch):
    classes = [str(d) for d in range(10)]

    def colour_of(label):
        fig = _figure_of(
            monkeypatch,
            lambda: viz.draw_detections(
                _scene(), [[0, 0, 9, 9]], [label], None, tmp_path / "c.png", classes=classes
            ),
        )
        return fig.axes[0].patches[0].get_edgecolor()

    assert colour_of("3") != colour_of("4")  # distinct classes, distinct colours
    with pytest.raises(ValueError, match="not in classes"):
        viz.draw_detections(
            _scene(), [[0, 0, 9, 9]], ["x"], None, tmp_path / "c.png", classes=classes
        )


def test_detections_bad_input_named(tmp_path):
    path = tmp_path / "x.png"
    with pytest.raises(ValueError, match="2 labels for 1 boxes"):
        viz.draw_detections(_scene(), [[0, 0, 5, 5]], ["a", "b"], None, path)
    with pytest.raises(ValueError, match="3 scores for 1 boxes"):
        viz.draw_detections(_scene(), [[0, 0, 5, 5]], ["a"], [0.1, 0.2, 0.3], path)
    with pytest.raises(ValueError, match=r"uint8 \[H, W, 3\]"):
        viz.draw_detections(_scene().astype(np.float32), [[0, 0, 5, 5]], ["a"], None, path)
    assert not path.exists()


def test_instances_with_masks_and_keypoints(tmp_path, monkeypatch):
    mask = np.zeros((2, 32, 32), dtype=np.uint8)
    mask[0, 4:12, 5:9] = 1
    mask[1, 20:30, 20:28] = 1
    keypoints = np.array(
        [
            [[7, 4, 2], [7, 12, 2], [5, 8, 2], [9, 8, 0]],
            [[24, 20, 2], [24, 30, 2], [20, 25, 2], [28, 25, 2]],
        ],
        dtype=np.float32,
    )
    fig = _figure_of(
        monkeypatch,
        lambda: viz.draw_instances(
            _scene(32, 32),
            [[5, 4, 9, 12], [20, 20, 28, 30]],
            ["1", "2"],
            tmp_path / "i.png",
            masks=mask,
            keypoints=keypoints,
            skeleton=[[1, 3], [3, 2], [2, 4], [4, 1]],
        ),
    )
    ax = fig.axes[0]
    overlay = ax.get_images()[1].get_array()
    assert overlay.shape == (32, 32, 4)
    assert (overlay[..., 3] > 0).sum() == mask.sum()  # exactly the mask pixels are tinted
    # Skeleton lines between visible points only: 2 for the first (point 4 hidden), 4 then.
    assert len(ax.get_lines()) == 6
    points = [c.get_offsets() for c in ax.collections]
    assert [len(p) for p in points] == [3, 4]
    with pytest.raises(ValueError, match="skeleton pair"):
        viz.draw_instances(
            _scene(32, 32),
            [[5, 4, 9, 12]],
            ["1"],
            tmp_path / "j.png",
            keypoints=keypoints[:1],
            skeleton=[[1, 5]],
        )
