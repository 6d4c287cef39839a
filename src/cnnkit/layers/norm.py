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


def group_count(channels: int, groups: int = 32) -> int:
    """The GroupNorm groups of a ``channels``-channel layer: the largest divisor of ``channels``
    not above ``groups`` (``--norm-groups``, default 32 as in Wu & He).

    Channel counts of the CIFAR families are rarely multiples of 32 (16-channel ResNet stems,
    DenseNet's 24 + 12k, PyramidNet's ``floor(16 + k alpha / N)``), so one G cannot divide
    every layer; each layer takes the largest G that fits instead, e.g. 16 channels -> 16
    groups, 48 -> 24, 17 (a prime) -> 17 (instance norm), 64 -> 32.
    """
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(
            f"--norm-groups must be a positive integer (the most groups a GroupNorm layer "
            f"may use), got {groups!r}"
        )
    if groups >= channels:
        return channels
    return next(g for g in range(groups, 0, -1) if channels % g == 0)


def make_norm(norm: str, channels: int, groups: int = 32) -> nn.Module:
    """Return the normalization layer for a ``[N, channels, H, W]`` activation.

    - ``"batch"``: BatchNorm2d, statistics over (N, H, W) per channel.
    - ``"group"``: GroupNorm with at most ``groups`` groups (``--norm-groups``; G=32 as in
      Wu & He): the largest divisor of ``channels`` not above ``groups``
      (:func:`group_count`), so any channel count works; statistics over (C/G, H, W) per
      sample and group.
    - ``"layer"``: statistics over (C, H, W) per sample (GroupNorm with one group), with a
      per-channel affine transform as in the GroupNorm paper's LN baseline.
    - ``"none"``: identity.
    """
    check_norm(norm)
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(group_count(channels, groups), channels)
    if norm == "layer":
        return nn.GroupNorm(1, channels)
    return nn.Identity()
