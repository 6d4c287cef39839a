"""DenseNet (Huang et al., 2017, "Densely Connected Convolutional Networks").

Layer ``l`` of a dense block receives the concatenation of all earlier feature maps,
``x_l = H_l([x_0, x_1, ..., x_{l-1}])`` (eq. 2), and adds ``k`` (the growth rate) new channels.
``H_l`` is pre-activation: BN-ReLU-Conv(3x3), or with the bottleneck (DenseNet-B)
BN-ReLU-Conv(1x1, ``bn_size * k``)-BN-ReLU-Conv(3x3, ``k``). Transitions between blocks are
BN-ReLU-Conv(1x1)-AvgPool(2x2) and keep ``floor(theta * m)`` of the ``m`` channels (DenseNet-C,
``compression`` = theta). A final BN-ReLU precedes global pooling and the classifier.

The ImageNet variants (densenet121/161/169/201) use torchvision's parameter names and shapes
(``features.conv0``, ``features.denseblock1.denselayer1.norm1``, ``features.transition1.conv``,
``features.norm5``, ``classifier``) so its checkpoints load with ``strict=True``. The CIFAR
variants (DenseNet-BC-L-k) have a 3x3 stem convolution with ``2k`` channels and three dense
blocks of ``(L - 4) / 6`` bottleneck layers.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnnkit.layers.norm import make_norm
from cnnkit.layers.regularize import (
    DropBlock2d,
    StochasticDepth,
    check_probability,
    drop_block_stage_indices,
    survival_probs,
)
from cnnkit.models.base import (
    DEFAULT_DROP_BLOCK_SIZE,
    ConvNet,
    check_choice,
    check_common_args,
    check_positive_int,
    head_dropout_layer,
    init_conv_net,
    is_positive_int,
)
from cnnkit.models.registry import register_model

STEMS = ("cifar", "imagenet")


class DenseLayer(nn.Module):
    """``H_l``: ``[N, C_in, H, W]`` (the concatenated inputs) -> ``[N, k, H, W]`` new features.

    Without the bottleneck, ``norm1``/``conv1`` are absent and ``conv2`` is the only 3x3 conv.
    Dropout (``drop_rate``) follows each convolution as in the paper; stochastic depth drops the
    new features of a whole sample; DropBlock (when given) follows each norm.
    """

    def __init__(
        self,
        in_channels: int,
        growth_rate: int,
        bn_size: int,
        bottleneck: bool,
        drop_rate: float,
        norm: str,
        norm_groups: int,
        survival_prob: float,
        drop_path_mode: str,
        drop_block: DropBlock2d | None,
    ) -> None:
        super().__init__()
        mid = in_channels
        # A plain flag: hasattr() on a missing submodule raises inside nn.Module every forward.
        self.bottleneck = bottleneck
        if bottleneck:
            mid = bn_size * growth_rate
            self.norm1 = make_norm(norm, in_channels, norm_groups)
            self.relu1 = nn.ReLU(inplace=True)
            self.conv1 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.norm2 = make_norm(norm, mid, norm_groups)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(mid, growth_rate, 3, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.drop_block = drop_block if drop_block is not None else nn.Identity()
        self.drop_path = StochasticDepth(survival_prob, drop_path_mode)

    def forward(self, x: Tensor) -> Tensor:
        if self.bottleneck:
            x = self.conv1(self.relu1(self.drop_block(self.norm1(x))))
            x = F.dropout(x, self.drop_rate, self.training)
        x = self.conv2(self.relu2(self.drop_block(self.norm2(x))))
        x = F.dropout(x, self.drop_rate, self.training)
        return self.drop_path(x)


class DenseBlock(nn.ModuleDict):
    """``[N, C, H, W]`` -> ``[N, C + num_layers * k, H, W]``: each layer sees all before it."""

    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


class Transition(nn.Module):
    """BN-ReLU-Conv(1x1)-AvgPool(2x2): ``[N, C, H, W]`` -> ``[N, C_out, H/2, W/2]``."""

    def __init__(
        self, in_channels: int, out_channels: int, norm: str, norm_groups: int, drop_rate: float
    ) -> None:
        super().__init__()
        self.norm = make_norm(norm, in_channels, norm_groups)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.pool = nn.AvgPool2d(2, stride=2)
        self.drop_rate = drop_rate

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(self.relu(self.norm(x)))
        return self.pool(F.dropout(x, self.drop_rate, self.training))


def cifar_block_config(depth: int, bottleneck: bool) -> list[int]:
    """Layers per block of the paper's three-block CIFAR DenseNet of total depth ``depth``.

    Depth counts the stem conv, the two transition convs and the classifier (4 layers), plus 1
    (basic) or 2 (bottleneck) convolutions per dense layer: ``depth = 3 * n * convs + 4``.
    """
    convs = 2 if bottleneck else 1
    if not is_positive_int(depth) or depth < 3 * convs + 4:
        raise ValueError(f"depth={depth!r} is too small for a DenseNet (minimum {3 * convs + 4})")
    if (depth - 4) % (3 * convs):
        form = "6n+4 with bottleneck" if bottleneck else "3n+4 without bottleneck"
        raise ValueError(f"depth={depth} is not of the form {form} (DenseNet on CIFAR)")
    return [(depth - 4) // (3 * convs)] * 3


def resolve_block_config(
    depth: int | None, block_config: list[int] | None, bottleneck: bool
) -> list[int]:
    """Layers of each dense block, from ``block_config`` or the CIFAR ``depth`` (exactly one)."""
    if (depth is None) == (block_config is None):
        raise ValueError("give exactly one of depth (CIFAR DenseNet) and block_config")
    if depth is not None:
        return cifar_block_config(depth, bottleneck)
    if not isinstance(block_config, (list, tuple)) or not block_config:
        raise ValueError(f"block_config={block_config!r} must be a non-empty list of layer counts")
    for n in block_config:
        check_positive_int(n, "block_config entry")
    return list(block_config)


class DenseNet(ConvNet):
    """DenseNet for CIFAR or ImageNet.

    Args:
        growth_rate: ``k``, channels each dense layer adds.
        block_config: layers per dense block (e.g. ``[6, 12, 24, 16]`` for DenseNet-121); or
            give ``depth`` instead for the paper's three-block CIFAR network.
        num_init_features: stem output channels (default ``2 * growth_rate``).
        depth: total depth L of a CIFAR DenseNet (6n+4 with bottleneck, 3n+4 without).
        bn_size: bottleneck width factor (``bn_size * k`` channels of the 1x1 conv).
        compression: theta in (0, 1], share of channels a transition keeps.
        bottleneck: use the 1x1 bottleneck (DenseNet-B).
        stem: ``"cifar"`` (3x3 conv) or ``"imagenet"`` (7x7/2 conv, norm, ReLU, 3x3/2 max-pool).
        drop_rate: dropout after every convolution but the first (the paper's 0.2 without
            augmentation).
        num_classes, in_chans: classifier outputs and input channels.
        norm, norm_groups: normalization (see :func:`cnnkit.layers.norm.make_norm`).
        drop_path_rate: stochastic depth on each dense layer's new features, survival decaying
            linearly over all dense layers to ``1 - drop_path_rate``.
        drop_path_mode: ``"inverted"`` or ``"paper"`` (see :class:`StochasticDepth`).
        drop_block, drop_block_size, drop_block_stages: DropBlock probability, block size
            (default 7 for the ImageNet stem, 3 for CIFAR) and the 1-based dense blocks that get
            it (default the last two); it follows each norm of their dense layers.
        dropout: dropout before the classifier.
    """

    classifier_name = "classifier"  # torchvision's name

    def __init__(
        self,
        growth_rate: int = 32,
        block_config: list[int] | None = None,
        num_init_features: int | None = None,
        depth: int | None = None,
        bn_size: int = 4,
        compression: float = 0.5,
        bottleneck: bool = True,
        stem: str = "imagenet",
        drop_rate: float = 0.0,
        num_classes: int = 1000,
        in_chans: int = 3,
        norm: str = "batch",
        norm_groups: int = 32,
        drop_path_rate: float = 0.0,
        drop_path_mode: str = "inverted",
        drop_block: float = 0.0,
        drop_block_size: int | None = None,
        drop_block_stages: list[int] | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_choice(stem, STEMS, "stem")
        check_common_args(
            num_classes=num_classes,
            in_chans=in_chans,
            norm=norm,
            drop_path_mode=drop_path_mode,
            drop_path_rate=drop_path_rate,
            drop_block=drop_block,
            dropout=dropout,
        )
        check_probability(drop_rate, "drop_rate")
        if not 0.0 < compression <= 1.0:
            raise ValueError(f"compression={compression!r} must be in (0, 1]")
        check_positive_int(bn_size, "bn_size")
        blocks = resolve_block_config(depth, block_config, bottleneck)
        check_positive_int(growth_rate, "growth_rate")
        init = 2 * growth_rate if num_init_features is None else num_init_features
        check_positive_int(init, "num_init_features")
        survival = iter(survival_probs(drop_path_rate, sum(blocks)))
        dropblock_on = drop_block_stage_indices(drop_block_stages, len(blocks))
        if drop_block_size is None:
            drop_block_size = DEFAULT_DROP_BLOCK_SIZE[stem]

        features: OrderedDict[str, nn.Module] = OrderedDict()
        if stem == "imagenet":
            features["conv0"] = nn.Conv2d(in_chans, init, 7, stride=2, padding=3, bias=False)
            features["norm0"] = make_norm(norm, init, norm_groups)
            features["relu0"] = nn.ReLU(inplace=True)
            features["pool0"] = nn.MaxPool2d(3, stride=2, padding=1)
            stride = 4
        else:
            features["conv0"] = nn.Conv2d(in_chans, init, 3, padding=1, bias=False)
            stride = 1

        channels, self.stage_channels, self.stage_strides = init, [], []
        for i, num_layers in enumerate(blocks, start=1):
            if i > 1:
                out = int(math.floor(compression * channels))
                features[f"transition{i - 1}"] = Transition(
                    channels, out, norm, norm_groups, drop_rate
                )
                channels, stride = out, stride * 2
            block = DenseBlock()
            for j in range(1, num_layers + 1):
                block[f"denselayer{j}"] = DenseLayer(
                    channels + (j - 1) * growth_rate,
                    growth_rate,
                    bn_size,
                    bottleneck,
                    drop_rate,
                    norm,
                    norm_groups,
                    next(survival),
                    drop_path_mode,
                    DropBlock2d(drop_block_size, drop_block) if i in dropblock_on else None,
                )
            features[f"denseblock{i}"] = block
            channels += num_layers * growth_rate
            self.stage_channels.append(channels)
            self.stage_strides.append(stride)
        features[f"norm{len(blocks) + 1}"] = make_norm(norm, channels, norm_groups)
        self.features = nn.Sequential(features)
        self.num_features = channels
        self.head_dropout = head_dropout_layer(dropout)
        self.classifier = nn.Linear(channels, num_classes)
        # He initialization for convolutions (fan-in, as torchvision's DenseNet).
        init_conv_net(self, conv_mode="fan_in", zero_linear_bias=True)

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        """``[N, in_chans, H, W]`` -> the output of each dense block (before the final norm).

        DenseNet is pre-activation: these are the raw concatenated features; each transition
        (and the final ``norm5``) normalizes them.
        """
        stages = []
        for name, module in self.features.named_children():
            if name.startswith("norm") and name != "norm0":
                break  # the final norm belongs to forward_features
            x = module(x)
            if name.startswith("denseblock"):
                stages.append(x)
        return stages

    def forward_features(self, x: Tensor) -> Tensor:
        """``[N, in_chans, H, W]`` -> ``[N, num_features, h, w]`` after the final norm + ReLU."""
        final_norm = self.features[-1]
        return F.relu(final_norm(self.forward_stages(x)[-1]))


def _register() -> None:
    imagenet = {"stem": "imagenet", "num_classes": 1000}
    for name, k, config, init, params in (
        (
            "densenet121",
            32,
            [6, 12, 24, 16],
            64,
            "8.0M params, 25.57% IN top-1 err (torchvision)",
        ),
        (
            "densenet161",
            48,
            [6, 12, 36, 24],
            96,
            "28.7M params, 22.86% IN top-1 err (torchvision)",
        ),
        (
            "densenet169",
            32,
            [6, 12, 32, 32],
            64,
            "14.1M params, 24.40% IN top-1 err (torchvision)",
        ),
        (
            "densenet201",
            32,
            [6, 12, 48, 32],
            64,
            "20.0M params, 23.10% IN top-1 err (torchvision)",
        ),
    ):
        register_model(
            name,
            DenseNet,
            family="densenet",
            input_size=(3, 224, 224),
            paper=params,
            growth_rate=k,
            block_config=config,
            num_init_features=init,
            **imagenet,
        )
    for depth, k, paper in (
        (100, 12, "0.8M params, 4.51% C10+ err (Huang et al. 2017)"),
        (250, 24, "15.3M params, 3.62% C10+ err (Huang et al. 2017)"),
        (190, 40, "25.6M params, 3.46% C10+ err (Huang et al. 2017)"),
    ):
        register_model(
            f"densenet_bc_{depth}_{k}",
            DenseNet,
            family="densenet",
            input_size=(3, 32, 32),
            paper=paper,
            growth_rate=k,
            depth=depth,
            num_init_features=2 * k,
            stem="cifar",
            num_classes=10,
        )


_register()
