"""Entry points: train a configuration, or resume a run directory, to the end."""

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


def make_task(cfg: TrainConfig, **kwargs: Any):
    """The task ``cfg`` trains (classification, for now)."""
    from cnnkit.train.classification import ClassificationTask

    return ClassificationTask(cfg, **kwargs)


def train(cfg: TrainConfig, *, data=None, **kwargs: Any) -> dict[str, Any]:
    """Train ``cfg`` to the end; returns metrics.json's dict (empty on ranks other than 0)."""
    return run_engine(cfg, make_task(cfg, data=data), **kwargs)


def resume(run_dir: str | os.PathLike, **kwargs: Any) -> dict[str, Any]:
    """Continue the run in ``run_dir`` with its saved training arguments."""
    from cnnkit.train.checkpoint import read_config
    from cnnkit.train.state import load_state

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"--resume {run_dir}: no such run directory")
    config = read_config(run_dir)
    if "train" not in config or not isinstance(config["train"], dict):
        raise ValueError(f"--resume {run_dir}: config.json has no 'train' section")
    values = {k: v for k, v in config["train"].items() if k != "resolved"}
    cfg = TrainConfig.from_dict(values, where=f"{run_dir / 'config.json'} 'train'")
    ckpt = run_dir / CHECKPOINT_NAME
    # Stopped before its first checkpoint: start over with the same arguments (same result).
    state = load_state(ckpt) if ckpt.is_file() else None
    return train(cfg, run_dir=run_dir, resume=state, **kwargs)
