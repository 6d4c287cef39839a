"""Structured regularizers for residual networks: stochastic depth and DropBlock.

- :class:`StochasticDepth` (Huang et al., 2016, "Deep Networks with Stochastic Depth") drops a
  residual branch for whole samples; :func:`survival_probs` gives the paper's linear decay rule.
- :class:`DropBlock2d` (Ghiasi et al., 2018, "DropBlock: A regularization method for
  convolutional networks") drops contiguous ``block_size x block_size`` squares of a feature map;
  :func:`set_drop_block` lets a trainer ramp its ``drop_prob`` linearly during training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

STOCHASTIC_DEPTH_MODES = ("inverted", "paper")


def check_probability(value: float, name: str) -> float:
    """Return ``value`` as a float when ``0 <= value < 1``; a ValueError naming ``name`` otherwise.

    Drop probabilities of 1 are refused: they would remove a layer's signal entirely (and make
    the inverted scaling ``1 / (1 - p)`` infinite).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number in [0, 1), got {value!r}")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name}={value!r} is outside [0, 1)")
    return float(value)


def survival_probs(drop_path_rate: float, num_blocks: int) -> list[float]:
    """Survival probability of each of ``num_blocks`` residual blocks (Huang et al., eq. 4).

    ``p_l = 1 - l / L * (1 - p_L)`` for ``l = 1..L``, with ``p_L = 1 - drop_path_rate``: the first
    block almost always survives, the last survives with probability ``p_L``.
    """
    rate = check_probability(drop_path_rate, "drop_path_rate")
    if num_blocks < 0:
        raise ValueError(f"num_blocks={num_blocks} must be >= 0")
    return [1.0 - block / num_blocks * rate for block in range(1, num_blocks + 1)]


class StochasticDepth(nn.Module):
    """Drop a residual branch per sample with probability ``1 - survival_prob``.

    Applied to the branch output ``f(x)`` of shape ``[N, ...]`` before the addition
    ``y = x + StochasticDepth(f(x))``. Each sample draws ``b ~ Bernoulli(p)``:

    - ``mode="paper"`` (Huang et al.): training ``b * f(x)``; inference ``p * f(x)``.
    - ``mode="inverted"``: training ``b * f(x) / p``; inference ``f(x)`` (identity).

    Both have the expectation ``p * f(x)`` relative to inference, so they train the same model;
    the inverted form makes inference free.
    """

    def __init__(self, survival_prob: float, mode: str = "inverted") -> None:
        super().__init__()
        check_probability(1.0 - survival_prob, "drop probability 1 - survival_prob")
        if mode not in STOCHASTIC_DEPTH_MODES:
            raise ValueError(f"mode={mode!r} is not one of {', '.join(STOCHASTIC_DEPTH_MODES)}")
        self.survival_prob = float(survival_prob)
        self.mode = mode

    def forward(self, x: Tensor) -> Tensor:
        """``[N, ...]`` -> ``[N, ...]``, each sample's branch kept or zeroed as a whole."""
        p = self.survival_prob
        if p == 1.0:
            return x
        if not self.training:
            return x * p if self.mode == "paper" else x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(p)
        if self.mode == "inverted":
            keep.div_(p)
        return x * keep

    def extra_repr(self) -> str:
        return f"survival_prob={self.survival_prob:.4g}, mode={self.mode!r}"


class DropBlock2d(nn.Module):
    """DropBlock (Ghiasi et al., 2018, Algorithm 1) on a ``[N, C, H, W]`` map.

    In training, block seeds are drawn with probability (eq. 1, per spatial dimension)::

        gamma = drop_prob / (bh * bw) * (H * W) / ((H - bh + 1) * (W - bw + 1))

    only at positions where a whole ``bh x bw`` block fits inside the map (the valid seed region);
    each seed is expanded to its block by max-pooling, the blocks are zeroed, and the output is
    renormalized by ``count(M) / count_ones(M)`` so its expectation is unchanged. One mask is
    shared by all channels of a sample, as in the paper. ``block_size`` larger than the map is
    clamped to the map size (``bh = min(block_size, H)``, ``bw = min(block_size, W)``).

    Since blocks may overlap, the dropped fraction is ``1 - (1 - gamma)^(bh*bw)`` in the interior,
    which is ``drop_prob`` to first order (0.0995 for drop_prob 0.1 and block size 7).

    Identity in eval mode or when ``drop_prob == 0``. ``drop_prob`` may be reassigned at any time
    (see :func:`set_drop_block`); the paper ramps it linearly from 0 during training.
    """

    def __init__(self, block_size: int = 7, drop_prob: float = 0.0) -> None:
        super().__init__()
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size={block_size!r} must be a positive integer")
        self.block_size = block_size
        self.drop_prob = drop_prob

    @property
    def drop_prob(self) -> float:
        return self._drop_prob

    @drop_prob.setter
    def drop_prob(self, value: float) -> None:
        self._drop_prob = check_probability(value, "drop_prob")

    def block_mask(self, x: Tensor) -> Tensor:
        """The keep mask ``[N, 1, H, W]`` (1 = kept, 0 = inside a dropped block) for ``x``."""
        n, _, h, w = x.shape
        bh, bw = min(self.block_size, h), min(self.block_size, w)
        gamma = self.drop_prob / (bh * bw) * (h * w) / ((h - bh + 1) * (w - bw + 1))
        # A seed at (i, j) of the valid region is the top-left corner of its block.
        seeds = torch.rand(n, 1, h - bh + 1, w - bw + 1, device=x.device) < gamma
        seeds = F.pad(seeds.to(x.dtype), (bw - 1, bw - 1, bh - 1, bh - 1))
        dropped = F.max_pool2d(seeds, (bh, bw), stride=1)
        return 1.0 - dropped

    def forward(self, x: Tensor) -> Tensor:
        """``[N, C, H, W]`` -> ``[N, C, H, W]``."""
        if not self.training or self.drop_prob == 0.0:
            return x
        if x.dim() != 4:
            raise ValueError(
                f"DropBlock2d expects a [N, C, H, W] input, got shape {tuple(x.shape)}"
            )
        mask = self.block_mask(x)
        scale = mask.numel() / mask.sum().clamp(min=1.0)
        # Scale the [N, 1, H, W] mask, not the C times larger product (same values: mask is 0/1).
        return x * (mask * scale)

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}, drop_prob={self.drop_prob:.4g}"


def set_drop_block(model: nn.Module, drop_prob: float) -> int:
    """Set ``drop_prob`` on every :class:`DropBlock2d` inside ``model``; return how many."""
    drop_prob = check_probability(drop_prob, "drop_prob")
    count = 0
    for module in model.modules():
        if isinstance(module, DropBlock2d):
            module.drop_prob = drop_prob
            count += 1
    return count


def drop_block_stage_indices(stages: list[int] | None, num_stages: int) -> list[int]:
    """The 1-based stage indices that get DropBlock: ``stages`` validated, or the last two.

    Ghiasi et al. found DropBlock most useful on the last two stages (groups 3 and 4 of a
    ResNet-50), hence the default.
    """
    if stages is None:
        return list(range(max(1, num_stages - 1), num_stages + 1))
    chosen = [int(s) for s in stages]
    bad = [s for s in chosen if not 1 <= s <= num_stages]
    if bad:
        raise ValueError(
            f"drop_block_stages={list(stages)} names stages outside 1..{num_stages}: {bad}"
        )
    return sorted(set(chosen))
