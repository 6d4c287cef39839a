"""The contract between the training engine and what it trains.

A task (classification, detection) knows its data, its model and its losses; the engine
(:mod:`cnnkit.train.engine`) knows everything else and nothing of those: the optimizer and its
schedule, precision and memory layout, DistributedDataParallel, checkpoints and resume, the
history, curves, diagnosis and report. As in torchvision's detection models, a training step is
a dict of named losses; the engine sums them and backpropagates the sum.

The engine calls, in this order::

    task.setup(runtime)                    # read the data (in memory or streamed)
    model = task.build_model()             # seeded by the engine
    n = task.train_size()                  # plans the steps and the shards
    for each epoch:
        for batch in task.train_batches(sampler):   # this rank's shard, from the resume step
            out = task.train_step(net, batch)       # under autocast
        task.evaluate(model, "dev", reducer)        # no grad, eval mode
    task.evaluate(model, "test", reducer); task.finish(run_dir, metrics)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from cnnkit.data.streaming import ShardBatchSampler
from cnnkit.train.distributed import DistContext


@dataclass(frozen=True)
class Metric:
    """The task's primary metric: its name (history keys ``dev_<name>``) and direction."""

    name: str
    higher_is_better: bool = True


@dataclass(frozen=True)
class Runtime:
    """What the engine resolved before the task reads its data."""

    device: torch.device
    dist: DistContext
    precision: str
    channels_last: bool


@dataclass
class StepOutput:
    """One training step's figures.

    ``losses``: named scalar losses, each a mean over the batch (their sum is backpropagated).
    ``count``: samples in the batch, the weight of this step in the epoch's means.
    ``sums``: extra figures summed over the batch (e.g. ``{"accuracy": correct}``); the history
    records ``train_<name> = sum / count``.
    ``logged``: the named per-batch-mean losses the history records as ``train_loss`` (their
    sum) when they differ from the objective ``losses`` (e.g. the plain cross-entropy of a
    label-smoothed step, comparable with the dev loss); the objective's sum is then recorded
    too, as ``train_objective``. None: the history records ``losses`` themselves.
    """

    losses: dict[str, Tensor]
    count: int
    sums: dict[str, Tensor] = field(default_factory=dict)
    logged: dict[str, Tensor] | None = None


class Reducer(Protocol):
    """Combines a rank's partial results of an evaluation (the identity in one process)."""

    def sum(self, values: Tensor) -> Tensor:
        """``values`` summed over ranks (in place; every rank gets the total)."""
        ...

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` in rank order (picklable objects; the engine's own processes)."""
        ...


class Task(Protocol):
    """A training task: see the module docstring for the order of calls."""

    metric: Metric

    def setup(self, runtime: Runtime) -> None:
        """Read the data; ``runtime`` says where the batches go and how."""
        ...

    def build_model(self) -> nn.Module:
        """The model to train, on the CPU (the engine moves it)."""
        ...

    def train_size(self) -> int:
        """Samples in the training split (the engine shards them)."""
        ...

    def train_batches(self, sampler: ShardBatchSampler) -> Iterator[Any]:
        """The prepared batches (on the device) of ``sampler``'s index batches, in order."""
        ...

    def train_step(self, net: nn.Module, batch: Any) -> StepOutput:
        """Forward ``batch`` through ``net`` (the engine wraps the call in autocast)."""
        ...

    def evaluate(self, model: nn.Module, split: str, reduce: Reducer) -> dict[str, float]:
        """Named metrics of ``model`` on ``split`` (``"dev"`` or ``"test"``), this rank's share
        reduced over ranks; one of them is :attr:`metric`, ``"loss"`` where there is one."""
        ...

    def describe(self) -> str:
        """The data in one line, for the run's log."""
        ...

    def facts(self) -> dict[str, Any]:
        """The ``data`` section of config.json (what reloading and evaluating the model needs)."""
        ...

    def settings(self) -> dict[str, Any]:
        """The task's resolved settings (config.json's ``train.resolved``)."""
        ...

    def summary(self, test: dict[str, float]) -> str:
        """The final line of the log, from the test metrics."""
        ...

    def finish(self, run_dir: Path, metrics: dict[str, Any]) -> None:
        """Write the task's own end-of-run files (rank 0 only)."""
        ...
