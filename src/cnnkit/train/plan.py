"""How many steps a run takes, and in which batches: the sampler of this rank's shards."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cnnkit.data.streaming import ShardBatchSampler
from cnnkit.train.config import TrainConfig
from cnnkit.train.device import resolve_compile
from cnnkit.train.distributed import DistContext


@dataclass
class StepPlan:
    """Steps per epoch over this rank's shard of ``n`` samples, steps in all, whether the model
    is compiled, and the batch sampler (:class:`cnnkit.data.streaming.ShardBatchSampler`)."""

    steps_per_epoch: int
    total_steps: int
    use_compile: bool
    sampler: ShardBatchSampler

    @classmethod
    def make(cls, cfg: TrainConfig, n: int, ctx: DistContext, device: torch.device) -> StepPlan:
        if n < 1:
            raise ValueError("the training split is empty")
        shard = -(-n // ctx.world_size)
        full, rest = divmod(shard, cfg.batch_size)
        all_steps = max(1, full + (rest > 0))
        use_compile = resolve_compile(cfg, device, all_steps * cfg.epochs)
        # Compiled graphs are specialized to the batch shape: a ragged last batch would
        # compile a second graph. A last batch of one sample cannot train BatchNorm.
        drop_last = full > 0 and (rest == 1 or (use_compile and rest > 0))
        steps = full if drop_last else all_steps
        sampler = ShardBatchSampler(
            n,
            cfg.batch_size,
            seed=cfg.seed,
            rank=ctx.rank,
            world_size=ctx.world_size,
            drop_last=drop_last,
        )
        return cls(steps, steps * cfg.epochs, use_compile, sampler)
