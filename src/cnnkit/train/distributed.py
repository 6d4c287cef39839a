"""Data-parallel training across processes and machines with PyTorch's own engine.

``torchrun --nproc_per_node=N -m cnnkit train ...`` starts N processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address in their environment (several
machines: the same command on each with ``--nnodes``, ``--node_rank`` and
``--rdzv_endpoint``). :func:`init_from_env` joins the process group (NCCL on CUDA, Gloo on
CPU); DistributedDataParallel averages gradients over ranks in the backward pass, so every
replica takes the same optimizer step.

Each rank trains on a disjoint shard of a per-epoch permutation
(:func:`cnnkit.data.streaming.shard_order`, as ``torch.utils.data.DistributedSampler``), and
evaluates a contiguous share of a split (:func:`eval_shard`); :class:`Reduce` combines the
shares' results.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size``; ``local_rank`` on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only the main process (rank 0) prints progress and writes files."""
        return self.rank == 0


def env_world() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment (0, 1, 0 without it)."""
    try:
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as err:
        raise ValueError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers ({err})") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return rank, world, local


def init_from_env(use_cuda: bool) -> DistContext:
    """Join the process group described by torchrun's environment, if there is one."""
    rank, world, local = env_world()
    if world == 1:
        return DistContext()
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistContext(rank, world, local, backend)


def shutdown(ctx: DistContext, *, synchronize: bool = True) -> None:
    """Leave the process group.

    With ``synchronize`` every rank first waits at a barrier: a rank that tears down Gloo while
    a peer is still writing files aborts the process ("terminate called without an active
    exception"). After an error the barrier is skipped, since the failed rank's peers may never
    arrive and torchrun stops them anyway.
    """
    if not (ctx.enabled and dist.is_initialized()):
        return
    if synchronize:
        dist.barrier()
    dist.destroy_process_group()


def eval_shard(n: int, rank: int, world_size: int) -> slice:
    """A contiguous, disjoint share of ``range(n)`` for evaluation (no padding: exact sums)."""
    per = -(-n // world_size)
    return slice(min(rank * per, n), min((rank + 1) * per, n))


class Reduce:
    """Combines the ranks' partial evaluation results (:class:`cnnkit.train.task.Reducer`)."""

    def __init__(self, ctx: DistContext) -> None:
        self.ctx = ctx

    def sum(self, values: Tensor) -> Tensor:
        return all_reduce_sum(values, self.ctx)

    def gather(self, obj: Any) -> list[Any]:
        if not self.ctx.enabled:
            return [obj]
        out: list[Any] = [None] * self.ctx.world_size
        dist.all_gather_object(out, obj)
        return out


def all_reduce_sum(t: Tensor, ctx: DistContext) -> Tensor:
    """Sum ``t`` over ranks in place (a no-op in one process); returns ``t``."""
    if ctx.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def wrap_model(
    model: nn.Module, ctx: DistContext, device: torch.device, sync_bn: bool
) -> nn.Module:
    """DistributedDataParallel around ``model`` (SyncBatchNorm first when ``sync_bn``)."""
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def broadcast_buffers(model: nn.Module, ctx: DistContext) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts them before each forward, but each rank then updates its own with its last
    batch; evaluation and the saved model use rank 0's.
    """
    if ctx.enabled:
        for buf in model.buffers():
            dist.broadcast(buf, src=0)


def max_replica_difference(model: nn.Module, ctx: DistContext) -> float:
    """Largest ``|w_rank - w_rank0|`` over every parameter and rank (0.0 in one process)."""
    if not ctx.enabled:
        return 0.0
    worst = torch.zeros((), dtype=torch.float64, device=next(model.parameters()).device)
    for p in model.parameters():
        ref = p.detach().clone()
        dist.broadcast(ref, src=0)
        worst = torch.maximum(worst, (p.detach() - ref).abs().max().double())
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return float(worst)


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()
