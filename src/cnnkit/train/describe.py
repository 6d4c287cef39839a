"""What a run is, in words and in config.json: the log's opening lines and the ``train``
section (the arguments, and what ``auto`` and the defaults resolved to)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from cnnkit.train.engine import Engine


def train_section(engine: Engine) -> dict[str, Any]:
    """config.json's ``train`` section: the arguments, and what they resolved to."""
    cfg = engine.cfg
    values = cfg.to_dict()
    values["out"] = str(engine.run_dir)
    values["threads"] = torch.get_num_threads() if cfg.deterministic else values["threads"]
    values["resolved"] = {
        "device": str(engine.device),
        "precision": engine.precision,
        "channels_last": engine.channels_last,
        "compile": engine.use_compile,
        "lr": engine.lr,
        "global_batch": engine.world_batch,
        "world_size": engine.ctx.world_size,
        "weight_decay": cfg.decay,
        "steps_per_epoch": engine.steps_per_epoch,
        "metric": engine.task.metric.name,
        "higher_is_better": engine.task.metric.higher_is_better,
        **engine.task.settings(),
    }
    return values


def describe(engine: Engine) -> str:
    """Three lines: the model and data; the hardware and numerics; the optimization."""
    from cnnkit.models.registry import count_parameters

    cfg, ctx = engine.cfg, engine.ctx
    processes = f", {ctx.world_size} processes ({ctx.backend})" if ctx.enabled else ""
    lines = [
        f"model {cfg.model} ({count_parameters(engine.model):,} parameters) on "
        f"{engine.task.describe()}",
        f"device {engine.device}, precision {engine.precision}, "
        f"{'channels_last' if engine.channels_last else 'NCHW'}, "
        f"{'compiled' if engine.use_compile else 'eager'}{processes}, "
        f"{torch.get_num_threads()} thread(s)",
        f"{cfg.optimizer} {cfg.schedule} schedule, {cfg.epochs} epochs x "
        f"{engine.steps_per_epoch} steps, batch {engine.world_batch}; effective lr "
        f"{engine.lr:.4g} = {cfg.base_lr:g} x {engine.world_batch} / {cfg.lr_batch} "
        f"(linear scaling rule), warmup {cfg.warmup_epochs:g} epoch(s)",
    ]
    return "\n".join(lines)
