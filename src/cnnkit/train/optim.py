"""The optimizer and its learning-rate schedule.

* SGD with momentum (optionally Nesterov) or AdamW; weight decay, optionally not on norm
  parameters and biases (:func:`param_groups`, :func:`build_optimizer`).
* A step (divide by 10 at 50% and 75% of training; He et al., 2016) or cosine (Loshchilov &
  Hutter, 2017) schedule with linear warmup (Goyal et al., 2017), updated every step
  (:class:`LRSchedule`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cnnkit.train.config import SCHEDULES, TrainConfig

# Divide the rate by 10 at these fractions of training (He et al., 2016: 32k and 48k of 64k).
STEP_MILESTONES = (0.5, 0.75)


class LRSchedule:
    """The learning-rate multiplier of every step: linear warmup, then step or cosine decay.

    With ``W`` warmup steps and ``T`` steps in all, step ``s`` (0-based) gets:

    * warmup, ``s < W``: ``(s + 1) / W`` (Goyal et al., 2017, Sec. 2.2: ramp up linearly);
    * ``"step"``: ``0.1 ** #{m in milestones : s >= m * T}`` (He et al., 2016);
    * ``"cosine"``: ``(1 + cos(pi * (s - W) / (T - W))) / 2`` (Loshchilov & Hutter, 2017,
      without restarts).

    A pure function of the step: the state is the step count.
    """

    def __init__(self, kind: str, total_steps: int, warmup_steps: int = 0) -> None:
        if kind not in SCHEDULES:
            raise ValueError(f"schedule {kind!r} is not one of {', '.join(SCHEDULES)}")
        if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"bad schedule length: total={total_steps}, warmup={warmup_steps}")
        self.kind, self.total, self.warmup = kind, total_steps, warmup_steps

    def factor(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "step":
            return 0.1 ** sum(step >= round(m * self.total) for m in STEP_MILESTONES)
        span = max(1, self.total - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float, no_decay_norm_bias: bool) -> list[dict]:
    """Optimizer parameter groups; with ``no_decay_norm_bias``, 1-D tensors (biases, norm
    scales and shifts) get no weight decay: shrinking a norm's scale changes nothing the next
    layer cannot undo, it only perturbs the effective learning rate."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not no_decay_norm_bias:
        return [{"params": params, "weight_decay": weight_decay}]
    decay = [p for p in params if p.ndim > 1]
    rest = [p for p in params if p.ndim <= 1]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov) or AdamW, multi-tensor (``foreach``) kernels."""
    groups = param_groups(model, cfg.decay, cfg.no_decay_norm_bias)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, foreach=True
        )
    return torch.optim.AdamW(groups, lr=lr, foreach=True)
