"""When a run stops as diverged: a non-finite training loss, or a non-finite loss or primary
metric of an evaluated split. The CLI reports :class:`TrainingDiverged` as exit status 1."""

from __future__ import annotations

import math
from pathlib import Path


class TrainingDiverged(RuntimeError):
    """A training loss, or a dev/test loss or primary metric, became NaN or infinite; the last
    good checkpoint is left as it was."""


def non_finite(figures: dict[str, float], keys: tuple[str, ...]) -> tuple[str, float] | None:
    """The first of ``keys`` whose value in ``figures`` is NaN or infinite, with the value."""
    for key in keys:
        value = figures.get(key)
        if value is not None and not math.isfinite(value):
            return key, value
    return None


def diverged(what: str, checkpoint: Path, epoch: int) -> TrainingDiverged:
    """The error saying ``what`` went wrong, where the last good checkpoint is, what to try."""
    last = (
        f"the last good checkpoint is {checkpoint} (epoch {epoch}), left intact"
        if checkpoint.is_file()
        else "no checkpoint was written yet"
    )
    return TrainingDiverged(
        f"{what}; {last}. Try a lower --lr, a longer --warmup-epochs or --precision fp32"
    )
