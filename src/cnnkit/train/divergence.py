"""When a run stops as diverged: a non-finite training loss, or a non-finite loss or primary
metric of an evaluated split. The CLI reports :class:`TrainingDiverged` as exit status 1."""

from __future__ import annotations

import json
import math
from pathlib import Path

# Written into the run directory when a run stops as diverged (its history ends at the last
# good epoch, so the history alone looks like a healthy, short run): `cnnkit diagnose` reads it.
DIVERGED_NAME = "diverged.json"


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


def record_divergence(run_dir: Path, error: TrainingDiverged, epoch: int, step: int) -> None:
    """Write ``run_dir/diverged.json`` (why, after which epoch and step), when the run has a
    directory; a resumed run that trains further removes it."""
    from cnnkit.atomic import atomic_write_text

    if run_dir.is_dir():
        record = {"reason": str(error), "epochs_done": epoch, "global_step": step}
        atomic_write_text(run_dir / DIVERGED_NAME, json.dumps(record, indent=2) + "\n")


def read_divergence(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds the record of a diverged run."""
    return (run_dir / DIVERGED_NAME).is_file()
