"""An epoch's running figures (:class:`EpochTotals`) and how they are shown (:class:`Progress`).

Every named loss and every summed figure of a task's steps is accumulated on the device, as
``float64`` sums weighted by the batch size, so reading them waits for the device only when
they are shown. The history record of an epoch holds ``train_loss`` (the sum of the named
losses the step logs: :attr:`StepOutput.logged` where given, else its ``losses``),
``train_objective`` (the sum of the backpropagated ``losses``) when the two differ,
``train_<loss name>`` when there are several, ``train_<figure>`` for each summed
figure (e.g. ``train_accuracy``), ``dev_<metric>`` for each of the task's dev metrics, the rate,
the throughput and the epoch's wall time.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from cnnkit.train import distributed as D
from cnnkit.train.task import StepOutput


class EpochTotals:
    """Sums over an epoch's steps: ``loss`` (total), each named loss, each summed figure,
    ``count`` (samples); plus steps taken, wall and compute seconds and the last rate."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.sums: dict[str, Tensor] = {}
        self.steps = 0
        self.seconds = 0.0
        self.compute = 0.0
        self.lr = 0.0

    def _add(self, key: str, value: Tensor | float) -> None:
        if key not in self.sums:
            self.sums[key] = torch.zeros((), dtype=torch.float64, device=self.device)
        self.sums[key] += value

    def add(self, out: StepOutput) -> None:
        """Add one step: each logged loss (a batch mean) weighted by ``out.count``; the
        objective too (as ``objective``) when the step logs other figures than it optimizes."""
        n = out.count
        logged = out.losses if out.logged is None else out.logged
        with torch.no_grad():
            total = sum(v.detach().double() for v in logged.values())
            self._add("loss", total * n)
            if out.logged is not None:
                objective = sum(v.detach().double() for v in out.losses.values())
                self._add("objective", objective * n)
            if len(logged) > 1:
                for name, value in logged.items():
                    self._add(f"loss_{name}", value.detach().double() * n)
            for name, value in out.sums.items():
                self._add(name, value.detach().double())
        self._add("count", float(n))
        self.steps += 1

    @property
    def count(self) -> int:
        return int(self.sums["count"]) if "count" in self.sums else 0

    @property
    def loss(self) -> float:
        return self.means()["loss"]

    def means(self) -> dict[str, float]:
        """Every sum divided by the sample count (one read from the device)."""
        if not self.sums:
            return {"loss": 0.0}
        keys = list(self.sums)
        values = torch.stack([self.sums[k] for k in keys]).tolist()
        count = max(values[keys.index("count")], 1.0)
        return {k: v / count for k, v in zip(keys, values, strict=True) if k != "count"}

    def reduce(self, ctx: D.DistContext) -> None:
        """Sum every figure over ranks (one all-reduce)."""
        if not ctx.enabled or not self.sums:
            return
        keys = list(self.sums)
        stacked = D.all_reduce_sum(torch.stack([self.sums[k] for k in keys]), ctx)
        self.sums = dict(zip(keys, stacked.unbind(), strict=True))

    def record(self, epoch: int, dev: dict[str, float]) -> dict[str, Any]:
        """The epoch's history record."""
        means = self.means()
        record: dict[str, Any] = {"epoch": epoch}
        for key, value in means.items():
            record[f"train_{key}"] = value
        for key, value in dev.items():
            record[f"dev_{key}"] = value
        record["lr"] = self.lr
        record["images_per_second"] = self.count / max(self.seconds, 1e-9)
        record["epoch_seconds"] = self.seconds
        return record

    # -- resume: plain data only (torch.load(weights_only=True) reads it back)

    def to_dict(self) -> dict[str, Any]:
        return {
            "sums": {k: float(v) for k, v in self.sums.items()},
            "steps": self.steps,
            "seconds": self.seconds,
            "compute": self.compute,
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any], device: torch.device) -> EpochTotals:
        totals = cls(device)
        totals.sums = {
            str(k): torch.tensor(float(v), dtype=torch.float64, device=device)
            for k, v in values["sums"].items()
        }
        totals.steps = int(values["steps"])
        totals.seconds = float(values["seconds"])
        totals.compute = float(values["compute"])
        return totals


def _short(key: str) -> str:
    return {"accuracy": "acc"}.get(key, key)


def _fmt(key: str, value: float) -> str:
    return f"{value:.2%}" if "accuracy" in key else f"{value:.4f}"


class Progress:
    """A tqdm bar over an epoch's steps (rank 0, unless ``--quiet``)."""

    def __init__(self, bar) -> None:
        self.bar = bar

    @classmethod
    def open(cls, engine, epoch: int) -> Progress | None:
        if not engine.ctx.is_main or engine.cfg.quiet:
            return None
        from tqdm import tqdm

        bar = tqdm(
            total=engine.steps_per_epoch,
            desc=f"epoch {epoch}/{engine.cfg.epochs}",
            unit="step",
            dynamic_ncols=True,
            leave=True,
            initial=engine.state.partial_steps(epoch),
        )
        return cls(bar)

    def running(self, step: int, figures: dict[str, float], lr: float, rate: float) -> None:
        self.bar.update(step - self.bar.n)
        shown = {_short(k): _fmt(k, v) for k, v in figures.items() if not k.startswith("loss_")}
        self.bar.set_postfix(**shown, lr=f"{lr:.4g}", img_s=f"{rate:.0f}", refresh=False)

    def done(self, totals: EpochTotals, dev: dict[str, float]) -> None:
        figures = {_short(k): _fmt(k, v) for k, v in totals.means().items() if "_" not in k}
        figures.update({f"dev_{_short(k)}": _fmt(k, v) for k, v in dev.items() if k != "loss"})
        self.bar.set_postfix(
            **figures,
            lr=f"{totals.lr:.4g}",
            img_s=f"{totals.count / max(totals.seconds, 1e-9):.0f}",
        )

    def close(self) -> None:
        self.bar.close()

    @staticmethod
    def line(epoch: int, epochs: int, record: dict[str, Any]) -> str:
        """The ``--quiet`` line of an epoch: train and dev figures, rate, speed, time."""

        def figures(split: str) -> str:
            keys = [k for k in record if k.startswith(f"{split}_") and "loss_" not in k]
            return " ".join(f"{_short(k[len(split) + 1 :])} {_fmt(k, record[k])}" for k in keys)

        return (
            f"epoch {epoch}/{epochs}: train {figures('train')}, dev {figures('dev')}, lr "
            f"{record['lr']:.4g}, {record['images_per_second']:.0f} img/s, "
            f"{record['epoch_seconds']:.1f} s"
        )
