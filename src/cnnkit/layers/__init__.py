"""Building blocks shared by the model families: norms and regularizers."""

from cnnkit.layers.norm import NORMS, make_norm

__all__ = ["NORMS", "make_norm"]
