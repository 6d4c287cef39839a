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


def _drawn(monkeypatch, records, path, **kwargs):
    """Draw with plot_curves and return, per panel, (y label, {line label: y values})."""
    figures = []
    save = viz._save_png

    def keep(fig, out):
        figures.append(fig)
        save(fig, out)

    monkeypatch.setattr(viz, "_save_png", keep)
    plot_curves(records, path, **kwargs)
    monkeypatch.undo()
    _png(path)
    (fig,) = figures
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
