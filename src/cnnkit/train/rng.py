"""Random streams: a distinct, reproducible seed for every (run seed, epoch, rank, step), so that
a run resumed after any step repeats exactly what the killed one would have done.

The engine re-seeds the global generators (dropout, stochastic depth, DropBlock) before every
step (:func:`seed_step`); a task derives its augmentation generators from the same tuple
(:func:`stream_seed`). No generator state needs saving.
"""

from __future__ import annotations

import numpy as np
import torch


def stream_seed(*keys: int) -> int:
    """A 63-bit seed for the tuple ``keys`` (e.g. ``(seed, epoch, rank, step)``).

    NumPy's SeedSequence hashes the whole tuple, so distinct tuples give unrelated seeds
    (a sum such as ``seed + epoch`` would give epoch 1 of seed 0 the stream of epoch 0 of seed 1).
    """
    words = [int(k) % 2**64 for k in keys]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> np.uint64(1))


def seed_step(seed: int, epoch: int, rank: int, step: int) -> None:
    """Seed torch's global generators (CPU and every CUDA device) for one training step.

    ``torch.manual_seed`` also visits every other accelerator backend (120 us a call here);
    seeding the CPU generator directly costs 1 us, and CUDA's only once it is in use.
    """
    value = stream_seed(seed, epoch, rank, step)
    torch.default_generator.manual_seed(value)
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(value)
