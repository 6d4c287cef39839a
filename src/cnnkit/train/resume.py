"""Where a run stands, as ``last.ckpt`` holds it: epochs done, steps taken, and the epoch in
progress when the checkpoint was taken mid-epoch (``--save-every``).

Nothing random is saved: the engine re-seeds every generator from ``(seed, epoch, rank, step)``
at each step and the sample order is a function of ``(seed, epoch)``, so the step count alone
says what comes next. The epoch in progress keeps its running sums, so its history record is
the one an uninterrupted run would have written.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cnnkit.train.progress import EpochTotals

if TYPE_CHECKING:
    from pathlib import Path

    from cnnkit.train.engine import Engine

STATE_FORMAT = 2


def _partial(engine: Engine, epoch: int, totals: EpochTotals) -> dict[str, Any]:
    """The epoch in progress: every rank's running sums (each rank sums its own shard; they are
    reduced only at the epoch's end)."""
    from cnnkit.train.distributed import Reduce

    return {"epoch": epoch, "ranks": Reduce(engine.ctx).gather(totals.to_dict())}


class TrainState:
    """Epochs completed, optimizer steps taken, training seconds, and a partial epoch."""

    def __init__(self) -> None:
        self.epoch = 0
        self.global_step = 0
        self.train_seconds = 0.0
        self.partial: tuple[int, EpochTotals] | None = None

    def partial_steps(self, epoch: int) -> int:
        """Steps of ``epoch`` already taken before a resume (0 when it starts afresh)."""
        return self.partial[1].steps if self.partial and self.partial[0] == epoch else 0

    def take_partial(self, epoch: int) -> EpochTotals | None:
        """The resumed totals of ``epoch`` (once), or None to start it afresh."""
        partial, self.partial = self.partial, None
        return partial[1] if partial and partial[0] == epoch else None

    def to_dict(self, engine: Engine, partial: tuple[int, EpochTotals] | None) -> dict[str, Any]:
        """The resume state: plain data only (``torch.load(weights_only=True)`` reads it)."""
        return {
            "format": STATE_FORMAT,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "model": engine.model.state_dict(),
            "optimizer": engine.optimizer.state_dict(),
            "schedule": {"kind": engine.schedule.kind, "step": self.global_step},
            "partial": None if partial is None else _partial(engine, *partial),
            "train_seconds": self.train_seconds + (partial[1].seconds if partial else 0.0),
            "world_size": engine.ctx.world_size,
            "seed": engine.cfg.seed,
        }

    def load(self, state: dict[str, Any], engine: Engine, where: Path) -> None:
        """Restore the model, the optimizer and the counters from ``state``.

        Raises:
            ValueError: the state is of another format or does not fit the model (naming
                ``where``).
        """
        try:
            if state.get("format") != STATE_FORMAT:
                raise ValueError(f"format {state.get('format')!r}, expected {STATE_FORMAT}")
            engine.model.load_state_dict(state["model"])
            engine.optimizer.load_state_dict(state["optimizer"])
            self.epoch = int(state["epoch"])
            self.global_step = int(state["global_step"])
            self.train_seconds = float(state.get("train_seconds", 0.0))
            partial = state.get("partial")
            if partial is not None:
                ranks = partial["ranks"]
                # Each rank continues its own sums; another world size replays the epoch's
                # remaining steps on other shards, and the sums of the ranks that did not exist
                # restart at zero (the weights are what matter; the note below says so).
                rank = engine.ctx.rank
                totals = EpochTotals.from_dict(ranks[min(rank, len(ranks) - 1)], engine.device)
                if rank >= len(ranks):
                    totals.sums = {}
                self.train_seconds -= totals.seconds
                self.partial = (int(partial["epoch"]), totals)
        except (KeyError, RuntimeError, TypeError, ValueError) as err:
            raise ValueError(f"resume state {where} does not fit this run: {err}") from None
        if int(state.get("world_size", 1)) != engine.ctx.world_size:
            engine.log(
                f"note: resuming a run of {state.get('world_size')} process(es) with "
                f"{engine.ctx.world_size}; the batch order changes from here on"
            )
