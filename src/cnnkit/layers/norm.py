"""One factory for every normalization a model may use: batch, frozen batch, group, layer or none.

Every family takes ``norm`` and ``norm_groups`` and builds its norms through :func:`make_norm`,
so switching BatchNorm for GroupNorm (Wu & He, 2018) or LayerNorm is one argument.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

NORMS = ("batch", "frozen_batch", "group", "layer", "none")


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine transform: ``y = x * scale + shift``.

    ``scale = weight / sqrt(running_var + eps)``, ``shift = bias - running_mean * scale``: exactly
    an eval-mode BatchNorm2d, but all four tensors are buffers, so neither the optimizer nor
    training mode changes them. Detectors fine-tune ImageNet backbones this way because their
    per-GPU batches (1-2 images) are too small for useful batch statistics (torchvision's
    detection backbones, Detectron). It loads a BatchNorm2d ``state_dict`` (same keys;
    ``num_batches_tracked`` is ignored).
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
    ) -> None:
        # A BatchNorm2d checkpoint carries a step counter that means nothing once frozen.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
        )

    def forward(self, x: Tensor) -> Tensor:
        """``[N, C, H, W]`` -> ``[N, C, H, W]``."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


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
    - ``"frozen_batch"``: :class:`FrozenBatchNorm2d`, fixed statistics and affine (buffers, no
      parameters): an eval-mode BatchNorm2d for fine-tuning detection backbones.
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
    if norm == "frozen_batch":
        return FrozenBatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(group_count(channels, groups), channels)
    if norm == "layer":
        return nn.GroupNorm(1, channels)
    return nn.Identity()
