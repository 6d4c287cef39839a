"""Random streams: the global generators' state, and the per-epoch seeds that make a resumed
run repeat exactly what the killed one would have done.

The shuffling and augmentation generators and the global generators (dropout, stochastic
depth, DropBlock) are seeded from ``(seed, epoch, rank)`` at each epoch start
(:func:`stream_seed`); the global states are saved in the checkpoint as well
(:func:`rng_state`, :func:`set_rng_state`).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """Every global generator's state as plain data (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {"version": version, "internal": list(internal), "gauss": py_gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the global generators from :func:`rng_state`'s dict."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


def seed_everything(seed: int) -> None:
    """Seed torch's, NumPy's and Python's global generators with ``seed``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def stream_seed(seed: int, epoch: int, rank: int, stream: int) -> int:
    """A distinct, reproducible seed for each (run seed, epoch, rank, stream)."""
    return (seed * 1_000_003 + epoch * 10_007 + rank * 101 + stream) % 2**62
