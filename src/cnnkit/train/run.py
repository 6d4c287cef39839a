"""Entry points: train a configuration, or resume a run directory, to the end.

A resumed run keeps its saved training arguments, except those in :data:`RESUME_OVERRIDES`,
which may be given again with new values:

* ``epochs``: train to a new total (not fewer than the epochs done). The schedule is re-planned
  for the new total from the current step: the learning rate is the one a run of that many
  epochs has at this step (a finished cosine run restarts at a higher rate), which differs
  from a run started with that many epochs only in the steps already taken;
* ``quiet``, ``threads``, ``workers``, ``save_every``, ``tensorboard``, ``skip_invalid``:
  how the run is shown, paced and saved, not what it computes;
* ``device``: where it continues (the weights and optimizer state move there; the precision
  ``auto`` resolves for the new device).

Any other argument given with a value other than the saved one is a ValueError naming it:
changing it would train a different run under the same name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cnnkit.train.config import TrainConfig
from cnnkit.train.engine import CHECKPOINT_NAME, Engine
from cnnkit.train.task import Task


def run_engine(cfg: TrainConfig, task: Task, **kwargs: Any) -> dict[str, Any]:
    """Build an :class:`Engine`, run it, release the process group."""
    engine = Engine(cfg, task, **kwargs)
    try:
        metrics = engine.fit()
    except BaseException:
        engine.close(failed=True)
        raise
    engine.close()
    return metrics


def make_task(cfg: TrainConfig, **kwargs: Any) -> Task:
    """The task ``cfg`` trains (``cfg.task``: classification or detection)."""
    if cfg.task == "detection":
        from cnnkit.train.detection import DetectionTask

        return DetectionTask(cfg, **kwargs)
    from cnnkit.train.classification import ClassificationTask

    return ClassificationTask(cfg, **kwargs)


def train(cfg: TrainConfig, *, data=None, **kwargs: Any) -> dict[str, Any]:
    """Train ``cfg`` to the end; returns metrics.json's dict (empty on ranks other than 0)."""
    return run_engine(cfg, make_task(cfg, data=data), **kwargs)


# The training arguments that may change on resume (see the module's docstring).
RESUME_OVERRIDES = (
    "epochs",
    "quiet",
    "threads",
    "workers",
    "save_every",
    "tensorboard",
    "device",
    "skip_invalid",
)
# Arguments whose flag is not named after them.
_FLAGS = {"storage": "--stream/--in-memory", "model_args": "--model-arg"}


def _flag(name: str) -> str:
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def _apply_overrides(
    run_dir: Path, values: dict[str, Any], overrides: dict[str, Any]
) -> dict[str, Any]:
    """The saved ``values`` with ``overrides`` applied; ValueError naming every override that
    would change an argument outside :data:`RESUME_OVERRIDES`."""
    overrides = dict(overrides)
    out = overrides.pop("out", None)
    conflicts = [
        f"{_flag(k)} (saved: {values.get(k)!r}, given: {v!r})"
        for k, v in overrides.items()
        if k not in RESUME_OVERRIDES and v != values.get(k)
    ]
    if out is not None and Path(out).resolve() != run_dir.resolve():
        conflicts.insert(0, f"--out {out} (the run directory is {run_dir})")
    if conflicts:
        allowed = ", ".join(_flag(k) for k in RESUME_OVERRIDES)
        raise ValueError(
            f"--resume {run_dir}: cannot change {'; '.join(conflicts)}; a resumed run keeps "
            f"its saved arguments except {allowed}"
        )
    return {**values, **overrides}


def _keep_compile_plan(values: dict[str, Any], saved: dict[str, Any], resolved: dict) -> None:
    """With a new ``--epochs``, pin ``--compile auto`` to the saved run's decision: ``auto``
    depends on the total steps, and with it whether a ragged last batch is dropped (the steps
    per epoch, which the checkpoint's position counts in)."""
    steps = resolved.get("steps_per_epoch")
    if values["epochs"] == saved.get("epochs") or values.get("compile") != "auto":
        return
    if isinstance(steps, int):
        from cnnkit.train.device import resolve_compile

        old = TrainConfig.from_dict(saved)
        values["compile"] = "on" if resolve_compile(old, None, steps * old.epochs) else "off"


def resume(
    run_dir: str | os.PathLike, overrides: dict[str, Any] | None = None, **kwargs: Any
) -> dict[str, Any]:
    """Continue the run in ``run_dir`` with its saved training arguments, changed by
    ``overrides`` (TrainConfig field -> value; only :data:`RESUME_OVERRIDES` may differ from
    the saved values)."""
    from cnnkit.train.checkpoint import read_config
    from cnnkit.train.state import load_state

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"--resume {run_dir}: no such run directory")
    config = read_config(run_dir)
    if "train" not in config or not isinstance(config["train"], dict):
        raise ValueError(f"--resume {run_dir}: config.json has no 'train' section")
    saved = {k: v for k, v in config["train"].items() if k != "resolved"}
    values = _apply_overrides(run_dir, saved, overrides or {})
    _keep_compile_plan(values, saved, config["train"].get("resolved") or {})
    cfg = TrainConfig.from_dict(values, where=f"{run_dir / 'config.json'} 'train'")
    ckpt = run_dir / CHECKPOINT_NAME
    # Stopped before its first checkpoint: start over with the same arguments (same result).
    state = load_state(ckpt) if ckpt.is_file() else None
    # Epochs done, counting one in progress (a mid-epoch checkpoint): never fewer.
    partial = (state or {}).get("partial") or {}
    done = max(int((state or {}).get("epoch", 0)), int(partial.get("epoch", 0)))
    if cfg.epochs < done:
        raise ValueError(
            f"--resume {run_dir} --epochs {cfg.epochs}: the run has already trained (into) "
            f"epoch {done}; give --epochs {done} or more"
        )
    return train(cfg, run_dir=run_dir, resume=state, resuming=True, **kwargs)
