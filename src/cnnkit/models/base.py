"""The interface every classification network implements, and the head they share.

A network is a stem, a sequence of stages (each may halve the resolution and widen the
channels) and a head: global average pooling, optional dropout, one linear classifier
(no fully connected stacks). Detection backbones use :meth:`ConvNet.forward_stages`, which
exposes the per-stage feature maps with :attr:`stage_channels` and :attr:`stage_strides`.
"""

from __future__ import annotations

from torch import Tensor, nn

from cnnkit.layers.norm import check_norm
from cnnkit.layers.regularize import STOCHASTIC_DEPTH_MODES, check_probability

# DropBlock's default block size per stem: Ghiasi et al. use 7 on ImageNet's 14x14 / 7x7 maps;
# CIFAR's 16x16 / 8x8 maps need less.
DEFAULT_DROP_BLOCK_SIZE = {"cifar": 3, "imagenet": 7}


def is_positive_int(value: object) -> bool:
    """True for an ``int`` >= 1 (``bool`` excluded)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_positive_int(value: int, name: str) -> int:
    """``value`` when it is a positive integer; a ValueError naming ``name`` otherwise."""
    if not is_positive_int(value):
        raise ValueError(f"{name}={value!r} must be a positive integer")
    return value


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
    check_positive_int(num_classes, "num_classes")
    check_positive_int(in_chans, "in_chans")
    check_norm(norm)
    check_choice(drop_path_mode, STOCHASTIC_DEPTH_MODES, "drop_path_mode")
    for name, value in (
        ("drop_path_rate", drop_path_rate),
        ("drop_block", drop_block),
        ("dropout", dropout),
    ):
        check_probability(value, name)


def head_dropout_layer(dropout: float) -> nn.Dropout | None:
    """The dropout before the classifier (``None`` when ``dropout == 0``)."""
    return nn.Dropout(dropout) if dropout > 0 else None


def init_conv_net(
    model: nn.Module, *, conv_mode: str = "fan_out", zero_linear_bias: bool = False
) -> None:
    """He initialization (He et al., 2015) of every conv; norms' affine to (1, 0).

    ``conv_mode`` is Kaiming's ``"fan_out"`` (torchvision's ResNet) or ``"fan_in"``; conv biases
    start at zero, and linear biases too when ``zero_linear_bias``.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode=conv_mode, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) and m.weight is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif zero_linear_bias and isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


class ConvNet(nn.Module):
    """Base class: a stem, stages in ``stage_names`` order, global average pooling, dropout and
    one linear classifier.

    Subclasses build their layers and implement :meth:`forward_stem` (or override
    :meth:`forward_stages` when their stages are not plain consecutive modules).

    Attributes set by subclasses:
        stage_names: attribute names of the stage modules, e.g. ``["layer1", ..., "layer4"]``.
        stage_channels: channels of each stage's output, e.g. ``[64, 128, 256, 512]``.
        stage_strides: total stride of each stage's output w.r.t. the input, e.g. ``[4, 8, 16, 32]``.
        num_features: channels entering the classifier.
        head_dropout: ``nn.Dropout`` before the classifier, or None.
        classifier_name: attribute name of the final linear layer (torchvision's: ``"fc"``, or
            ``"classifier"`` for DenseNet).
    """

    stage_names: list[str]
    stage_channels: list[int]
    stage_strides: list[int]
    num_features: int
    head_dropout: nn.Module | None
    classifier_name = "fc"

    def forward_stem(self, x: Tensor) -> Tensor:
        """``[N, in_chans, H, W]`` -> the input of the first stage."""
        raise NotImplementedError

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        """``[N, in_chans, H, W]`` -> one ``[N, C_s, H / stride_s, W / stride_s]`` map per stage."""
        x = self.forward_stem(x)
        outputs = []
        for name in self.stage_names:
            x = getattr(self, name)(x)
            outputs.append(x)
        return outputs

    def forward_features(self, x: Tensor) -> Tensor:
        """``[N, in_chans, H, W]`` -> the last feature map ``[N, num_features, h, w]``.

        Pre-activation networks override this to apply their final norm + ReLU.
        """
        return self.forward_stages(x)[-1]

    def classifier_layer(self) -> nn.Linear:
        """The final linear layer."""
        return getattr(self, self.classifier_name)

    def forward_head(self, features: Tensor) -> Tensor:
        """``[N, C, h, w]`` -> logits ``[N, num_classes]``: global average pool, dropout, linear."""
        pooled = features.mean((2, 3))
        if self.head_dropout is not None:
            pooled = self.head_dropout(pooled)
        return self.classifier_layer()(pooled)

    def forward(self, x: Tensor) -> Tensor:
        """``[N, in_chans, H, W]`` -> logits ``[N, num_classes]``."""
        return self.forward_head(self.forward_features(x))
