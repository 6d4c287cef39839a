"""The engine drives any task: a tiny regression task with two named losses and a metric to
minimize, written here, trains, resumes and reports without anything of classification."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from cnnkit.data.streaming import ShardBatchSampler
from cnnkit.train.config import TrainConfig
from cnnkit.train.engine import Engine
from cnnkit.train.history import History
from cnnkit.train.state import load_state
from cnnkit.train.task import Metric, Reducer, Runtime, StepOutput


class LineFit:
    """Fit ``y = 3 x - 1`` with a 1-in, 1-out linear model; the metric is the dev MSE."""

    metric = Metric("mse", higher_is_better=False)

    def __init__(self, n: int = 96) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = {s: torch.randn(n, 1, generator=g) for s in ("train", "dev", "test")}
        self.y = {s: 3 * x - 1 for s, x in self.x.items()}
        self.seen: list[list[int]] = []
        self.finished = None

    def setup(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def build_model(self) -> nn.Module:
        model = nn.Linear(1, 1)
        model.cnnkit_config = {"name": "line_fit", "kwargs": {}}
        return model

    def train_size(self) -> int:
        return self.x["train"].shape[0]

    def train_batches(self, sampler: ShardBatchSampler):
        for keys in sampler:
            index = [i for _, i in keys]
            self.seen.append(index)
            yield self.x["train"][index], self.y["train"][index]

    def train_step(self, net: nn.Module, batch) -> StepOutput:
        x, y = batch
        pred = net(x).float()
        mse = (pred - y).square().mean()
        l1 = (pred - y).abs().mean()
        return StepOutput(
            {"mse": mse, "l1": 0.1 * l1}, x.shape[0], {"within": ((pred - y).abs() < 0.5).sum()}
        )

    def evaluate(self, model: nn.Module, split: str, reduce: Reducer) -> dict[str, float]:
        err = model(self.x[split]).float() - self.y[split]
        sums = reduce.sum(
            torch.stack([err.square().sum(), torch.tensor(float(err.shape[0]))]).double()
        )
        mse = float(sums[0] / sums[1])
        return {"loss": mse, "mse": mse}

    def describe(self) -> str:
        return "a line"

    def facts(self) -> dict:
        return {"spec": "line"}

    def settings(self) -> dict:
        return {}

    def summary(self, test: dict[str, float]) -> str:
        return f"test mse {test['mse']:.4f}"

    def finish(self, run_dir, metrics) -> None:
        self.finished = dict(metrics)


def _cfg(**overrides) -> TrainConfig:
    values = dict(
        epochs=6, batch_size=16, lr=0.2, lr_batch=16, warmup_epochs=0, weight_decay=0.0,
        precision="fp32", compile="off", quiet=True, threads=1, channels_last="off",
    )  # fmt: skip
    values.update(overrides)
    return TrainConfig(**values)


def test_engine_trains_a_task_it_knows_nothing_about(tmp_path):
    task = LineFit()
    metrics = Engine(_cfg(), task, run_dir=tmp_path, log=lambda s: None).fit()
    records = History.load(tmp_path).records
    # Every named loss and summed figure is recorded; train_loss is their sum.
    first = records[0]
    assert math.isclose(first["train_loss"], first["train_loss_mse"] + first["train_loss_l1"])
    assert 0 <= first["train_within"] <= 1 and "dev_mse" in first
    # The primary metric is minimized: the best dev value is the smallest. y has variance 9:
    # a test MSE under 0.1 is a fitted line.
    assert metrics["best_dev_mse"] == min(r["dev_mse"] for r in records)
    assert metrics["test_mse"] < 0.1 and records[-1]["train_loss"] < records[0]["train_loss"]
    assert json.loads((tmp_path / "metrics.json").read_text())["test_mse"] == metrics["test_mse"]
    assert task.finished is not None and (tmp_path / "report.md").is_file()
    # Each epoch visits the whole training set once, in a different order.
    steps = len(task.seen) // 6
    epoch1 = sum(task.seen[:steps], [])
    epoch2 = sum(task.seen[steps : 2 * steps], [])
    assert sorted(epoch1) == sorted(epoch2) == list(range(96)) and epoch1 != epoch2


def test_mid_epoch_checkpoint_resumes_to_identical_weights(tmp_path):
    whole = LineFit()
    Engine(_cfg(epochs=2), whole, run_dir=tmp_path / "whole", log=lambda s: None).fit()

    # Save every 4 steps; stop the run after step 4 of epoch 1 (of 6), as a kill would.
    class Stop(Exception):
        pass

    first = LineFit()
    engine = Engine(
        _cfg(epochs=2, save_every=4), first, run_dir=tmp_path / "cut", log=lambda s: None
    )
    real = engine.train_step

    def step_then_stop(batch):
        if engine.state.global_step == 5:
            raise Stop
        return real(batch)

    engine.train_step = step_then_stop
    with pytest.raises(Stop):
        engine.fit()
    state = load_state(tmp_path / "cut" / "last.ckpt")
    assert (
        state["epoch"] == 0
        and state["global_step"] == 4
        and state["partial"]["ranks"][0]["steps"] == 4
    )

    second = LineFit()
    Engine(
        _cfg(epochs=2, save_every=4),
        second,
        run_dir=tmp_path / "cut",
        resume=state,
        log=lambda s: None,
    ).fit()
    # The resumed run trained on exactly the batches the uninterrupted one did after step 4.
    assert second.seen == whole.seen[4:]
    a = load_state(tmp_path / "whole" / "last.ckpt")["model"]
    b = load_state(tmp_path / "cut" / "last.ckpt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    ref = History.load(tmp_path / "whole").records
    got = History.load(tmp_path / "cut").records
    assert [r["train_loss"] for r in got] == [r["train_loss"] for r in ref]
