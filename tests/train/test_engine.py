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
        # Non-finite, out-of-range or mistyped numbers (from the CLI or a resumed config.json).
        ({"weight_decay": math.inf}, "--weight-decay must be a finite number"),
        ({"weight_decay": math.nan}, "--weight-decay must be a finite number"),
        ({"lr": math.nan}, "--lr must be a finite number"),
        ({"momentum": math.nan}, "--momentum must be a finite number"),
        ({"warmup_epochs": math.inf}, "--warmup-epochs must be a finite number"),
        ({"label_smoothing": math.nan}, "--label-smoothing must be a finite number"),
        ({"dropout": "0.1"}, "--dropout must be a number"),
        ({"seed": 10**20}, r"--seed must be an integer in 0\.\.2\*\*63-1"),
        ({"seed": -1}, "--seed must be an integer in"),
        ({"seed": 1e20}, "--seed must be an integer, got 1e\\+20"),
        ({"cutout": 2.5}, "--cutout must be an integer"),
        ({"image_size": 20000}, "--image-size must be at most 8192"),
        ({"threads": 100000}, "--threads must be at most 1024"),
        ({"workers": 100000}, "--workers must be at most 256"),
    ],
)
def test_config_validation_names_the_option(overrides, flag):
    with pytest.raises(ValueError, match=flag):
        tiny_config(**overrides)


def test_largest_seed_is_accepted():
    assert tiny_config(seed=2**63 - 1).seed == 2**63 - 1


def test_parse_dropblock():
    assert parse_dropblock(None) == (0.0, None)
    assert parse_dropblock("0.1") == (0.1, None)
    assert parse_dropblock("0.2:5") == (0.2, 5)


def test_unsupported_flag_and_channel_mismatch(digits16, tmp_path):
    with pytest.raises(ValueError, match="--in-chans 3 does not match"):
        Trainer(tiny_config(in_chans=3), data=digits16, run_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown model"):
        Trainer(tiny_config(model="resnet7"), data=digits16, run_dir=tmp_path)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"crop_padding": 16}, r"--crop-padding 16 must be smaller than the image side \(16\)"),
        ({"cutout": 17}, r"--cutout 17 is larger than the image side \(16\)"),
        (
            {"batch_size": 201},
            r"--batch-size 201 is larger than the training split "
            r"\(--train-subset 200\): 200 images",
        ),
        ({"train_subset": None, "batch_size": 1198}, r"--batch-size 1198 .*: 1197 images"),
        (
            {"model_args": {**TINY, "num_classes": 3}},
            r"--model-arg num_classes=3 conflicts with --data digits, which has 10 classes",
        ),
        (
            {"model_args": {**TINY, "in_chans": 3}},
            r"--model-arg in_chans=3 conflicts with --data digits, whose images have 1 channel",
        ),
        (
            {"model_args": {**TINY, "drop_path_rate": 0.2}, "drop_path": 0.1},
            r"--model-arg drop_path_rate=0.2 conflicts with --drop-path 0.1",
        ),
    ],
)
def test_flags_that_do_not_fit_the_data_fail_before_the_run_directory(
    digits16, tmp_path, overrides, message
):
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        Trainer(tiny_config(**overrides), data=digits16, run_dir=run_dir)
    assert not run_dir.exists()


def test_model_args_that_agree_with_the_data_are_accepted(digits16, tmp_path):
    cfg = tiny_config(model_args={**TINY, "num_classes": 10, "in_chans": 1}, drop_path=0.1)
    cfg.model_args["drop_path_rate"] = 0.1
    Trainer(cfg, data=digits16, run_dir=tmp_path / "run")


def test_batch_size_is_checked_against_this_process_shard(digits16):
    from cnnkit.train.distributed import DistContext
    from cnnkit.train.task import Runtime

    cfg = tiny_config(batch_size=101)  # 200 images over 2 processes: 100 each
    task = ClassificationTask(cfg, data=digits16)
    runtime = Runtime(torch.device("cpu"), DistContext(rank=0, world_size=2), "fp32", False)
    with pytest.raises(ValueError, match=r"--batch-size 101 .*200 images, 100 per process of 2"):
        task.setup(runtime)
    ClassificationTask(tiny_config(batch_size=100), data=digits16).setup(runtime)


def test_too_small_a_training_split_warns_but_trains(digits16, tmp_path):
    cfg = tiny_config(train_subset=8, batch_size=8, epochs=1)
    with pytest.warns(UserWarning, match=r"--train-subset 8\) holds 8 images, 0 of class"):
        trainer = Trainer(cfg, data=digits16, run_dir=tmp_path / "run")
    trainer.fit()
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_image_size_the_model_cannot_take_names_it(tmp_path):
    from cnnkit.train.model_args import check_input_size

    tiny4 = load_data("digits", image_size=4)
    cfg = TrainConfig(model="densenet121", image_size=4, crop_padding=1, batch_size=64,
                      train_subset=64, quiet=True, threads=1)  # fmt: skip
    with pytest.raises(ValueError, match=r"--image-size 4: model 'densenet121' cannot take 1x4x4"):
        Trainer(cfg, data=tiny4, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()
    # The probe runs on the meta device and leaves the random state as it was.
    state = torch.get_rng_state()
    check_input_size("resnet20", {"num_classes": 10, "in_chans": 1}, (1, 4, 4))
    assert torch.equal(torch.get_rng_state(), state)


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


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(digits16, tmp_path, capsys):
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
    # The history ends at the good epoch 1; the record of the divergence makes `cnnkit
    # diagnose` say so instead of "too short, train longer".
    from cnnkit.cli.main import main

    assert (tmp_path / "diverged.json").is_file()
    assert main(["diagnose", str(tmp_path)]) == 0
    assert "Diagnosis: diverged" in capsys.readouterr().out


def test_batch_larger_than_the_memory_is_refused(digits16, tmp_path, monkeypatch):
    from cnnkit.train.distributed import DistContext
    from cnnkit.train.task import Runtime

    # 50 x 1 x 16 x 16 float32 = 51,200 bytes: more than 50,000 bytes, less than 60,000.
    monkeypatch.setattr("cnnkit.data.streaming.available_memory", lambda: 50_000)
    with pytest.raises(ValueError, match=r"--batch-size 50 at --image-size 16: .*more than"):
        Trainer(tiny_config(), data=digits16, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()
    monkeypatch.setattr("cnnkit.data.streaming.available_memory", lambda: 60_000)
    runtime = Runtime(torch.device("cpu"), DistContext(), "fp32", False)
    ClassificationTask(tiny_config(), data=digits16).setup(runtime)
