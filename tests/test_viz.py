"""Learning curves and confusion matrix pictures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

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
