"""Building blocks shared by the model families: norms and regularizers."""

from cnnkit.layers.norm import NORMS, make_norm
from cnnkit.layers.regularize import (
    DropBlock2d,
    StochasticDepth,
    check_probability,
    drop_block_stage_indices,
    set_drop_block,
    survival_probs,
)

__all__ = [
    "NORMS",
    "DropBlock2d",
    "StochasticDepth",
    "check_probability",
    "drop_block_stage_indices",
    "make_norm",
    "set_drop_block",
    "survival_probs",
]
