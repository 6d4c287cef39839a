"""One factory for every normalization a model may use: batch, group, layer or none.

Every family takes ``norm`` and ``norm_groups`` and builds its norms through :func:`make_norm`,
so switching BatchNorm for GroupNorm (Wu & He, 2018) or LayerNorm is one argument.
"""

from __future__ import annotations

from torch import nn

NORMS = ("batch", "group", "layer", "none")


def check_norm(norm: str) -> str:
    """Validate a norm name early, so a model fails before building half its layers."""
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r} is not one of {', '.join(NORMS)}")
    return norm


def make_norm(norm: str, channels: int, groups: int = 32) -> nn.Module:
    """Return the normalization layer for a ``[N, channels, H, W]`` activation.

    - ``"batch"``: BatchNorm2d, statistics over (N, H, W) per channel.
    - ``"group"``: GroupNorm with ``groups`` groups (G=32 as in Wu & He), statistics over
      (C/G, H, W) per sample and group; ``channels`` must be divisible by ``groups``.
    - ``"layer"``: statistics over (C, H, W) per sample (GroupNorm with one group), with a
      per-channel affine transform as in the GroupNorm paper's LN baseline.
    - ``"none"``: identity.
    """
    check_norm(norm)
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        if groups <= 0 or channels % groups:
            divisors = [g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0]
            raise ValueError(
                f"norm_groups={groups} does not divide a layer's {channels} channels "
                f"(group norm needs channels % norm_groups == 0; try norm_groups={divisors[0]})"
            )
        return nn.GroupNorm(groups, channels)
    if norm == "layer":
        return nn.GroupNorm(1, channels)
    return nn.Identity()
