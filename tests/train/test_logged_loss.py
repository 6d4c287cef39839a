"""The training loss the history records is the dev loss's quantity (plain cross-entropy),
whatever label smoothing the step optimizes; the smoothed objective is recorded beside it."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cnnkit.train.classification import ClassificationTask
from cnnkit.train.config import TrainConfig
from cnnkit.train.progress import EpochTotals

CLASSES = 5


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    # Two batches of different sizes: the epoch's mean weighs each sample once.
    return [
        (torch.randn(n, 3, 2, 2, generator=gen), torch.randint(0, CLASSES, (n,), generator=gen))
        for n in (7, 3)
    ]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, CLASSES))


def _by_hand(logits: torch.Tensor, y: torch.Tensor, eps: float) -> tuple[float, float]:
    """Mean cross-entropy and mean smoothed cross-entropy from log-probabilities, per sample:
    target distribution (1 - eps) one-hot + eps / K uniform."""
    plain, smoothed = [], []
    for row, label in zip(logits.double().tolist(), y.tolist(), strict=True):
        log_z = math.log(sum(math.exp(v) for v in row))
        log_p = [v - log_z for v in row]
        plain.append(-log_p[label])
        smoothed.append((1 - eps) * -log_p[label] + eps * -sum(log_p) / len(row))
    return sum(plain) / len(plain), sum(smoothed) / len(smoothed)


def _record(label_smoothing: float) -> tuple[dict, float, float]:
    cfg = TrainConfig(label_smoothing=label_smoothing, compile="off", quiet=True)
    task = ClassificationTask(cfg)
    model = _model()
    totals = EpochTotals()
    logits, labels = [], []
    for x, y in _batches():
        out = task.train_step(model, (x, y))
        sum(out.losses.values()).backward()  # what the engine does (no optimizer step here)
        totals.add(out)
        with torch.no_grad():
            logits.append(model(x))
        labels.append(y)
    plain, smoothed = _by_hand(torch.cat(logits), torch.cat(labels), label_smoothing)
    return totals.record(1, {}), plain, smoothed


def test_smoothed_step_records_plain_cross_entropy_and_the_objective():
    record, plain, smoothed = _record(0.1)
    assert record["train_loss"] == pytest.approx(plain, rel=1e-6)
    assert record["train_objective"] == pytest.approx(smoothed, rel=1e-6)
    assert abs(record["train_objective"] - record["train_loss"]) > 1e-3  # they really differ


def test_without_smoothing_loss_and_objective_coincide():
    record, plain, smoothed = _record(0.0)
    assert plain == pytest.approx(smoothed)
    assert record["train_loss"] == pytest.approx(plain, rel=1e-6)
    assert "train_objective" not in record  # nothing to tell apart


def test_backpropagated_loss_is_the_smoothed_one():
    cfg = TrainConfig(label_smoothing=0.1, compile="off", quiet=True)
    x, y = _batches()[0]
    out = ClassificationTask(cfg).train_step(_model(), (x, y))
    _, smoothed = _by_hand(_model()(x).detach(), y, 0.1)
    assert out.losses["loss"].requires_grad
    assert float(out.losses["loss"].detach()) == pytest.approx(smoothed, rel=1e-6)
