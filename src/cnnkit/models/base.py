"""The interface every classification network implements, and the head they share.

A network is a stem, a sequence of stages (each may halve the resolution and widen the
channels) and a head: global average pooling, optional dropout, one linear classifier
(no fully connected stacks). Detection backbones use :meth:`ConvNet.forward_stages`, which
exposes the per-stage feature maps with :attr:`stage_channels` and :attr:`stage_strides`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cnnkit.layers.norm import check_norm
from cnnkit.layers.regularize import STOCHASTIC_DEPTH_MODES, check_probability


def check_choice(value: str, choices: tuple[str, ...], name: str) -> str:
    """``value`` when it is one of ``choices``; a ValueError naming ``name`` otherwise."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}")
    return value


def check_common_args(
    *,
    num_classes: int,
    in_chans: int,
    norm: str,
    drop_path_mode: str,
    drop_path_rate: float,
    drop_block: float,
    dropout: float,
) -> None:
    """Validate the arguments every family shares, naming the offending one."""
    for name, value in (("num_classes", num_classes), ("in_chans", in_chans)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    check_norm(norm)
    check_choice(drop_path_mode, STOCHASTIC_DEPTH_MODES, "drop_path_mode")
    for name, value in (
        ("drop_path_rate", drop_path_rate),
        ("drop_block", drop_block),
        ("dropout", dropout),
    ):
        check_probability(value, name)


class ConvNet(nn.Module):
    """Base class: subclasses build their layers and implement :meth:`forward_stages`.

    Attributes set by subclasses:
        stage_channels: channels of each stage's output, e.g. ``[64, 128, 256, 512]``.
        stage_strides: total stride of each stage's output w.r.t. the input, e.g. ``[4, 8, 16, 32]``.
        num_features: channels entering the classifier.
    """

    stage_channels: list[int]
    stage_strides: list[int]
    num_features: int

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        """``[N, in_chans, H, W]`` -> one ``[N, C_s, H / stride_s, W / stride_s]`` map per stage."""
        raise NotImplementedError

    def forward_features(self, x: Tensor) -> Tensor:
        """``[N, in_chans, H, W]`` -> the last feature map ``[N, num_features, h, w]``.

        Pre-activation networks override this to apply their final norm + ReLU.
        """
        return self.forward_stages(x)[-1]

    def classifier_layer(self) -> nn.Linear:
        """The final linear layer (named ``fc`` or ``classifier`` as in torchvision)."""
        return self.fc if hasattr(self, "fc") else self.classifier

    def forward_head(self, features: Tensor) -> Tensor:
        """``[N, C, h, w]`` -> logits ``[N, num_classes]``: global average pool, dropout, linear."""
        pooled = torch.flatten(features.mean((2, 3)), 1)
        head_dropout = getattr(self, "head_dropout", None)
        if head_dropout is not None:
            pooled = head_dropout(pooled)
        return self.classifier_layer()(pooled)

    def forward(self, x: Tensor) -> Tensor:
        """``[N, in_chans, H, W]`` -> logits ``[N, num_classes]``."""
        return self.forward_head(self.forward_features(x))
