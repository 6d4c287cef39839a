"""The engine with the classification task: LR rules, schedules, optimizer groups, hardware
choices, a tiny run, divergence."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cnnkit.data.classification import DataSplits, load_data
from cnnkit.train.classification import ClassificationTask, predict_logits
from cnnkit.train.config import TrainConfig, effective_lr, parse_dropblock
from cnnkit.train.device import resolve_channels_last, resolve_precision
from cnnkit.train.engine import Engine, TrainingDiverged
from cnnkit.train.optim import LRSchedule, param_groups
from cnnkit.train.state import load_state

TINY = {"depth": 8, "widths": [8, 16, 32]}


def Trainer(cfg: TrainConfig, *, data: DataSplits, run_dir) -> Engine:  # noqa: N802
    """The engine driving the classification task on ``data``."""
    return Engine(cfg, ClassificationTask(cfg, data=data), run_dir=run_dir)


def tiny_config(**overrides) -> TrainConfig:
    values = dict(
        model="resnet20",
        model_args=dict(TINY),
        image_size=16,
        crop_padding=2,  # 4 at 32x32
        train_subset=200,
        epochs=2,
        batch_size=50,
        compile="off",
        quiet=True,
        threads=1,
    )
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def digits16() -> DataSplits:
    return load_data("digits", image_size=16)


def test_linear_scaling_rule():
    # Goyal et al.: batch k*n -> rate k*eta.
    assert effective_lr(0.1, 128, 128) == pytest.approx(0.1)
    assert effective_lr(0.1, 256, 128) == pytest.approx(0.2)
    assert effective_lr(0.1, 1024, 256) == pytest.approx(0.4)
    assert effective_lr(0.4, 32, 128) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        effective_lr(0.1, 0, 128)


def test_trainer_applies_the_scaling_rule_to_the_global_batch(digits16, tmp_path):
    t = Trainer(tiny_config(lr=0.2, lr_batch=100, batch_size=25), data=digits16, run_dir=tmp_path)
    assert t.lr == pytest.approx(0.2 * 25 / 100)
    assert "effective lr 0.05 = 0.2 x 25 / 100" in t.describe()
    assert t.train_section()["resolved"]["lr"] == pytest.approx(0.05)


def test_step_schedule_with_warmup():
    s = LRSchedule("step", total_steps=100, warmup_steps=4)
    assert [s.factor(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s.factor(49) == 1.0 and s.factor(50) == pytest.approx(0.1)
    assert s.factor(74) == pytest.approx(0.1) and s.factor(75) == pytest.approx(0.01)
    assert s.factor(99) == pytest.approx(0.01)


def test_cosine_schedule():
    s = LRSchedule("cosine", total_steps=110, warmup_steps=10)
    assert s.factor(0) == pytest.approx(0.1)
    assert s.factor(10) == pytest.approx(1.0)
    assert s.factor(60) == pytest.approx(0.5)  # half way through the decay
    assert s.factor(35) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert s.factor(110) == pytest.approx(0.0, abs=1e-12)


def test_no_decay_on_norm_and_bias():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    groups = param_groups(model, 5e-4, no_decay_norm_bias=True)
    decayed = {id(p) for p in groups[0]["params"]}
    assert decayed == {id(model[0].weight), id(model[3].weight)}
    assert groups[1]["weight_decay"] == 0.0 and len(groups[1]["params"]) == 4
    assert len(param_groups(model, 5e-4, False)) == 1


def test_adamw_and_nesterov_options(digits16, tmp_path):
    t = Trainer(tiny_config(optimizer="adamw"), data=digits16, run_dir=tmp_path)
    assert isinstance(t.optimizer, torch.optim.AdamW)
    assert t.lr == pytest.approx(1e-3 * 50 / 128)  # AdamW's default rate, scaled
    assert t.optimizer.param_groups[0]["weight_decay"] == 0.05
    t = Trainer(
        tiny_config(nesterov=True, no_decay_norm_bias=True), data=digits16, run_dir=tmp_path
    )
    assert t.optimizer.param_groups[0]["nesterov"] is True
    assert [g["weight_decay"] for g in t.optimizer.param_groups] == [5e-4, 0.0]


def test_precision_and_layout_choices(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    monkeypatch.setattr("cnnkit.train.device.cpu_has_fast_bf16", lambda: True)
    assert resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr("cnnkit.train.device.cpu_has_fast_bf16", lambda: False)
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_channels_last("auto", cpu, "fp32") is True
    assert resolve_channels_last("auto", cpu, "bf16") is True
    assert resolve_channels_last("off", cpu, "bf16") is False


@pytest.mark.parametrize(
    ("overrides", "flag"),
    [
        ({"epochs": 0}, "--epochs"),
        ({"batch_size": -3}, "--batch-size"),
        ({"lr": -0.1}, "--lr"),
        ({"schedule": "linear"}, "--schedule"),
        ({"dropblock": "0.1:x"}, "--dropblock"),
        ({"warmup_epochs": 5, "epochs": 2}, "--warmup-epochs"),
    ],
)
def test_config_validation_names_the_option(overrides, flag):
    with pytest.raises(ValueError, match=flag):
        tiny_config(**overrides)


def test_parse_dropblock():
    assert parse_dropblock(None) == (0.0, None)
    assert parse_dropblock("0.1") == (0.1, None)
    assert parse_dropblock("0.2:5") == (0.2, 5)


def test_unsupported_flag_and_channel_mismatch(digits16, tmp_path):
    with pytest.raises(ValueError, match="--in-chans 3 does not match"):
        Trainer(tiny_config(in_chans=3), data=digits16, run_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown model"):
        Trainer(tiny_config(model="resnet7"), data=digits16, run_dir=tmp_path)


def test_tiny_run_learns_and_writes_the_run_directory(digits16, tmp_path):
    cfg = tiny_config(epochs=4, train_subset=None, batch_size=32, cutout=4, label_smoothing=0.1)
    trainer = Trainer(cfg, data=digits16, run_dir=tmp_path)
    metrics = trainer.fit()
    for name in (
        "config.json",
        "model.safetensors",
        "last.ckpt",
        "history.jsonl",
        "history.csv",
        "curves.png",
        "metrics.json",
        "report.md",
    ):
        assert (tmp_path / name).is_file(), name
    assert metrics["epochs"] == 4 and len(trainer.history.records) == 4
    assert metrics["test_accuracy"] > 0.6  # chance is 0.1
    first, last = trainer.history.records[0], trainer.history.records[-1]
    assert last["train_loss"] < first["train_loss"]
    assert last["lr"] < first["lr"]  # cosine decay
    # predict_logits of the saved model agrees with the trainer's test accuracy.
    import cnnkit

    model = cnnkit.load_model(tmp_path)
    logits = predict_logits(model, digits16.test.images, mean=digits16.mean, std=digits16.std)
    acc = (logits.argmax(1) == digits16.test.labels).float().mean().item()
    assert acc == pytest.approx(metrics["test_accuracy"], abs=1e-6)


def test_dropblock_is_ramped(digits16, tmp_path):
    from cnnkit.layers.regularize import DropBlock2d

    trainer = Trainer(tiny_config(dropblock="0.2:3", epochs=2), data=digits16, run_dir=tmp_path)
    blocks = [m for m in trainer.model.modules() if isinstance(m, DropBlock2d)]
    assert blocks
    trainer.set_lr(0)
    assert all(b.drop_prob == 0.0 for b in blocks)
    trainer.set_lr(trainer.total_steps // 2)
    assert all(b.drop_prob == pytest.approx(0.1, abs=0.02) for b in blocks)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(digits16, tmp_path):
    trainer = Trainer(tiny_config(epochs=3), data=digits16, run_dir=tmp_path)
    augment = trainer.task.augment
    poison_at = trainer.steps_per_epoch + 1  # the second step of epoch 2

    def poisoned(x, *, train, generator=None):
        out = augment(x, train=train, generator=generator)
        return out * float("nan") if train and trainer.state.global_step == poison_at else out

    trainer.task.augment = poisoned
    with pytest.raises(TrainingDiverged, match=r"epoch 2, step 2.*last.ckpt \(epoch 1\)"):
        trainer.fit()
    state = load_state(tmp_path / "last.ckpt")
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
