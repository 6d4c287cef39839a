"""ResNet (He et al., 2016) and ResNeXt (Xie et al., 2017) as one parametrized family.

A residual block computes ``y = relu(F(x) + shortcut(x))`` (He et al., eq. 1-2):

- ``block="basic"``: ``F`` = 3x3 conv - norm - relu - 3x3 conv - norm (two layers).
- ``block="bottleneck"``: ``F`` = 1x1 conv (reduce) - 3x3 conv - 1x1 conv (expand x4), each followed
  by a norm. The 3x3 conv carries the stride ("ResNet v1.5", as torchvision) and may be grouped:
  ResNeXt's aggregated transform with cardinality ``C = groups`` and bottleneck width
  ``d = width_per_group`` is exactly a grouped 3x3 conv of ``C * d * planes / 64`` channels
  (Xie et al., Fig. 3c).

Shortcuts where the shape changes: ``"zero_pad"`` is option A of the paper (subsample by the
stride, append zero channels: no parameters), ``"projection"`` is option B (1x1 conv + norm).

Two stems: ``"imagenet"`` (7x7/2 conv, norm, relu, 3x3/2 max-pool; stage strides 4, 8, 16, 32) and
``"cifar"`` (3x3 conv, norm, relu; strides 1, 2, 4). Module names follow torchvision
(``conv1``, ``bn1``, ``layer1.0.downsample.0``, ``fc``; the norm keeps the name ``bn*`` whatever
``norm`` is), so torchvision checkpoints load with ``strict=True``.

Regularizers: stochastic depth on every block's branch with the survival probability decaying
linearly over all blocks of the network (Huang et al., 2016), DropBlock after the norms of the
chosen stages (Ghiasi et al., 2018, Sec. 4.1: last two stages), dropout before the classifier.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from cnnkit.layers.norm import make_norm
from cnnkit.layers.regularize import (
    DropBlock2d,
    StochasticDepth,
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

BLOCKS = ("basic", "bottleneck")
STEMS = ("cifar", "imagenet")
SHORTCUTS = ("zero_pad", "projection")
EXPANSION = {"basic": 1, "bottleneck": 4}
# Layers per residual block, for the depth rule depth = 2 + layers_per_block * blocks.
LAYERS_PER_BLOCK = {"basic": 2, "bottleneck": 3}
DEFAULT_WIDTHS = {"cifar": (16, 32, 64), "imagenet": (64, 128, 256, 512)}


def conv(
    cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, bias: bool = False
) -> nn.Conv2d:
    """``kernel x kernel`` convolution with 'same' padding (``[N, cin, H, W] -> [N, cout, H/s, W/s]``)."""
    return nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=bias)


class ZeroPadShortcut(nn.Module):
    """Option A shortcut: ``[N, C, H, W] -> [N, C', ceil(H/s), ceil(W/s)]``, parameter-free.

    ``y = concat(x[:, :, ::s, ::s], zeros)``: subsample by the stride and append ``C' - C`` zero
    channels (He et al., 2016, Sec. 4.2, CIFAR experiments).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(
                f"shortcut='zero_pad' cannot shrink {in_channels} channels to {out_channels}; "
                "use shortcut='projection'"
            )
        self.extra = out_channels - in_channels
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra)) if self.extra else x

    def extra_repr(self) -> str:
        return f"extra_channels={self.extra}, stride={self.stride}"


@dataclass(frozen=True)
class BlockSpec:
    """What every block of a network shares (norm, shortcut and regularizer settings)."""

    norm: str
    norm_groups: int
    shortcut: str
    groups: int
    width_per_group: int
    drop_path_mode: str
    drop_block: float
    drop_block_size: int

    @property
    def bias(self) -> bool:
        # A conv followed by a norm needs no bias; without norm the bias is the only offset.
        return self.norm == "none"

    def norm_layer(self, channels: int) -> nn.Module:
        return make_norm(self.norm, channels, self.norm_groups)

    def downsample(self, cin: int, cout: int, stride: int) -> nn.Module | None:
        """The shortcut where the shape changes (``None`` = identity)."""
        if cin == cout and stride == 1:
            return None
        if self.shortcut == "zero_pad":
            return ZeroPadShortcut(cin, cout, stride)
        return nn.Sequential(conv(cin, cout, 1, stride, bias=self.bias), self.norm_layer(cout))


class ResidualBlock(nn.Module):
    """Shared part of both block types: the shortcut, stochastic depth and the addition."""

    downsample: nn.Module | None
    drop_block: DropBlock2d | None
    drop_path: StochasticDepth | None

    def _init_regularizers(self, spec: BlockSpec, survival_prob: float, use_drop_block: bool):
        self.relu = nn.ReLU(inplace=True)
        # One DropBlock2d per block, applied after each norm: every call draws its own mask.
        self.drop_block = (
            DropBlock2d(spec.drop_block_size, spec.drop_block) if use_drop_block else None
        )
        self.drop_path = (
            StochasticDepth(survival_prob, spec.drop_path_mode) if survival_prob < 1.0 else None
        )
        self._drop_shortcut = use_drop_block and spec.shortcut == "projection"

    def _regularize(self, x: Tensor) -> Tensor:
        return x if self.drop_block is None else self.drop_block(x)

    def branch(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """``[N, C_in, H, W] -> [N, C_out, H / stride, W / stride]``."""
        shortcut = x
        if self.downsample is not None:
            shortcut = self.downsample(x)
            if self._drop_shortcut:
                shortcut = self._regularize(shortcut)
        out = self.branch(x)
        if self.drop_path is not None:
            out = self.drop_path(out)
        # In place: the branch output is a fresh tensor whose producer's backward does not need
        # it, and on CPU a new activation-sized buffer per block costs page faults.
        out += shortcut
        return self.relu(out)


class BasicBlock(ResidualBlock):
    """Two 3x3 convolutions (He et al., Fig. 5 left); the first carries the stride."""

    def __init__(
        self,
        cin: int,
        planes: int,
        stride: int,
        spec: BlockSpec,
        survival_prob: float = 1.0,
        use_drop_block: bool = False,
    ) -> None:
        super().__init__()
        self.conv1 = conv(cin, planes, 3, stride, bias=spec.bias)
        self.bn1 = spec.norm_layer(planes)
        self.conv2 = conv(planes, planes, 3, bias=spec.bias)
        self.bn2 = spec.norm_layer(planes)
        self.downsample = spec.downsample(cin, planes, stride)
        self._init_regularizers(spec, survival_prob, use_drop_block)

    def last_norm(self) -> nn.Module:
        return self.bn2

    def branch(self, x: Tensor) -> Tensor:
        out = self.relu(self._regularize(self.bn1(self.conv1(x))))
        return self._regularize(self.bn2(self.conv2(out)))


class Bottleneck(ResidualBlock):
    """1x1 reduce, 3x3 (grouped for ResNeXt, strided), 1x1 expand to ``4 * planes`` (Fig. 5 right).

    Inner width ``= int(planes * width_per_group / 64) * groups``: ``planes`` for ResNet,
    ``C * d`` at the first stage of a ResNeXt, doubling with ``planes``.
    """

    def __init__(
        self,
        cin: int,
        planes: int,
        stride: int,
        spec: BlockSpec,
        survival_prob: float = 1.0,
        use_drop_block: bool = False,
    ) -> None:
        super().__init__()
        width = int(planes * spec.width_per_group / 64) * spec.groups
        cout = planes * EXPANSION["bottleneck"]
        self.conv1 = conv(cin, width, 1, bias=spec.bias)
        self.bn1 = spec.norm_layer(width)
        self.conv2 = conv(width, width, 3, stride, groups=spec.groups, bias=spec.bias)
        self.bn2 = spec.norm_layer(width)
        self.conv3 = conv(width, cout, 1, bias=spec.bias)
        self.bn3 = spec.norm_layer(cout)
        self.downsample = spec.downsample(cin, cout, stride)
        self._init_regularizers(spec, survival_prob, use_drop_block)

    def last_norm(self) -> nn.Module:
        return self.bn3

    def branch(self, x: Tensor) -> Tensor:
        out = self.relu(self._regularize(self.bn1(self.conv1(x))))
        out = self.relu(self._regularize(self.bn2(self.conv2(out))))
        return self._regularize(self.bn3(self.conv3(out)))


BLOCK_CLASSES: dict[str, type[ResidualBlock]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


def blocks_per_stage(
    depth: int | None, layers: list[int] | None, block: str, num_stages: int
) -> list[int]:
    """Blocks in each stage, from ``layers`` or from ``depth`` (uniform stages).

    With ``depth``: ``depth = 2 + LAYERS_PER_BLOCK[block] * num_stages * n`` (the 6n+2 rule of the
    CIFAR ResNets for 3 stages of basic blocks; 9n+2 for bottlenecks, e.g. ResNeXt-29).
    """
    if (depth is None) == (layers is None):
        raise ValueError(f"give exactly one of depth={depth!r} and layers={layers!r}")
    if layers is not None:
        layers = list(layers)
        if len(layers) != num_stages or not all(is_positive_int(n) for n in layers):
            raise ValueError(
                f"layers={layers!r} must be {num_stages} positive integers (one per stage of widths)"
            )
        return layers
    per_stage = LAYERS_PER_BLOCK[block] * num_stages
    if not is_positive_int(depth) or depth < 2 + per_stage:
        raise ValueError(f"depth={depth!r} must be an integer of the form {per_stage}n+2, n >= 1")
    if (depth - 2) % per_stage:
        raise ValueError(
            f"depth={depth} is not of the form {per_stage}n+2 "
            f"({num_stages} stages of {block} blocks with {LAYERS_PER_BLOCK[block]} layers each)"
        )
    return [(depth - 2) // per_stage] * num_stages


class ResNet(ConvNet):
    """ResNet / ResNeXt classifier: stem, ``len(widths)`` stages of residual blocks, head.

    Args:
        block: ``"basic"`` or ``"bottleneck"``.
        layers: blocks per stage, e.g. ``[3, 4, 6, 3]``; or give ``depth`` instead.
        depth: total weighted layers for uniform stages (``6n+2`` for CIFAR basic ResNets).
        stem: ``"imagenet"`` (7x7/2 + max-pool) or ``"cifar"`` (one 3x3 conv).
        widths: ``planes`` of each stage (stage output = planes x expansion); the stem has
            ``widths[0]`` channels. ``None``: 16/32/64 (cifar) or 64/128/256/512 (imagenet).
        groups, width_per_group: ResNeXt cardinality ``C`` and bottleneck width ``d``.
        shortcut: ``"zero_pad"`` (option A) or ``"projection"`` (option B) where shapes change.
        num_classes, in_chans: classifier outputs and input channels.
        norm, norm_groups: ``"batch" | "group" | "layer" | "none"`` and the GroupNorm groups.
        drop_path_rate: stochastic depth ``1 - p_L``, decayed linearly over all blocks.
        drop_path_mode: ``"inverted"`` or ``"paper"`` (see :class:`StochasticDepth`).
        drop_block, drop_block_size, drop_block_stages: DropBlock probability, block size
            (``None``: 7 for the imagenet stem, 3 for cifar's small maps) and the 1-based stages
            that get it (``None``: the last two).
        dropout: dropout probability before the classifier.
        zero_init_residual: start each block's last norm at zero scale (Goyal et al., 2017), so
            every block begins as the identity.
    """

    def __init__(
        self,
        block: str = "basic",
        layers: list[int] | None = None,
        depth: int | None = None,
        stem: str = "imagenet",
        widths: list[int] | None = None,
        groups: int = 1,
        width_per_group: int = 64,
        shortcut: str = "projection",
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
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        check_choice(block, BLOCKS, "block")
        check_choice(stem, STEMS, "stem")
        check_choice(shortcut, SHORTCUTS, "shortcut")
        check_common_args(
            num_classes=num_classes,
            in_chans=in_chans,
            norm=norm,
            drop_path_mode=drop_path_mode,
            drop_path_rate=drop_path_rate,
            drop_block=drop_block,
            dropout=dropout,
        )
        widths = list(DEFAULT_WIDTHS[stem] if widths is None else widths)
        if not widths or not all(is_positive_int(w) for w in widths):
            raise ValueError(f"widths={widths!r} must be a non-empty list of positive integers")
        layers = blocks_per_stage(depth, layers, block, len(widths))
        check_positive_int(groups, "groups")
        check_positive_int(width_per_group, "width_per_group")
        if block == "basic" and (groups != 1 or width_per_group != 64):
            raise ValueError(
                f"block='basic' supports only groups=1 and width_per_group=64 (got groups={groups}, "
                f"width_per_group={width_per_group}); ResNeXt needs block='bottleneck'"
            )
        if drop_block_size is None:
            drop_block_size = DEFAULT_DROP_BLOCK_SIZE[stem]
        spec = BlockSpec(
            norm=norm,
            norm_groups=norm_groups,
            shortcut=shortcut,
            groups=groups,
            width_per_group=width_per_group,
            drop_path_mode=drop_path_mode,
            drop_block=drop_block,
            drop_block_size=drop_block_size,
        )

        self._build_stem(stem, in_chans, widths[0], spec)
        self._build_stages(block, layers, widths, spec, drop_path_rate, drop_block_stages)
        self.stage_strides = [self._stem_stride * 2**i for i in range(len(widths))]
        self.num_features = self.stage_channels[-1]
        self.head_dropout = head_dropout_layer(dropout)
        self.fc = nn.Linear(self.num_features, num_classes)
        init_conv_net(self)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, ResidualBlock):
                    last = m.last_norm()
                    if getattr(last, "weight", None) is not None:
                        nn.init.zeros_(last.weight)

    def _build_stem(self, stem: str, in_chans: int, channels: int, spec: BlockSpec) -> None:
        kernel, stride = (7, 2) if stem == "imagenet" else (3, 1)
        self.conv1 = conv(in_chans, channels, kernel, stride, bias=spec.bias)
        self.bn1 = spec.norm_layer(channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if stem == "imagenet" else nn.Identity()
        self._stem_stride = 4 if stem == "imagenet" else 1
        self._stem_channels = channels

    def _build_stages(
        self,
        block: str,
        layers: list[int],
        widths: list[int],
        spec: BlockSpec,
        drop_path_rate: float,
        stages_with_drop_block: list[int] | None,
    ) -> None:
        block_cls = BLOCK_CLASSES[block]
        # Stochastic depth counts blocks over the whole network: p_l for l = 1..L.
        probs = iter(survival_probs(drop_path_rate, sum(layers)))
        drop_stages = set(drop_block_stage_indices(stages_with_drop_block, len(widths)))
        cin = self._stem_channels
        self.stage_channels = []
        self.stage_names = []
        for index, (num_blocks, planes) in enumerate(zip(layers, widths, strict=True), start=1):
            blocks = []
            for i in range(num_blocks):
                stride = 2 if index > 1 and i == 0 else 1
                blocks.append(
                    block_cls(cin, planes, stride, spec, next(probs), index in drop_stages)
                )
                cin = planes * EXPANSION[block]
            name = f"layer{index}"
            setattr(self, name, nn.Sequential(*blocks))
            self.stage_names.append(name)
            self.stage_channels.append(cin)

    def forward_stem(self, x: Tensor) -> Tensor:
        """``[N, in_chans, H, W]`` -> ``[N, stem channels, H / s, W / s]`` (s = 4 ImageNet, 1 CIFAR)."""
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))


# --- Registered variants -----------------------------------------------------------------------
# ImageNet top-1 errors: torchvision's IMAGENET1K_V1 weights (its docs' reference accuracies).

_CIFAR_RESNETS = {
    20: "0.27M params, 8.75% C10 err (He et al. 2016, Table 6)",
    32: "0.46M params, 7.51% C10 err (He et al. 2016, Table 6)",
    44: "0.66M params, 7.17% C10 err (He et al. 2016, Table 6)",
    56: "0.85M params, 6.97% C10 err (He et al. 2016, Table 6)",
    110: "1.7M params, 6.43% C10 err (He et al. 2016, Table 6)",
    1202: "19.4M params, 7.93% C10 err (He et al. 2016, Table 6)",
}
for _depth, _paper in _CIFAR_RESNETS.items():
    register_model(
        f"resnet{_depth}",
        ResNet,
        family="resnet",
        input_size=(3, 32, 32),
        paper=_paper,
        block="basic",
        depth=_depth,
        stem="cifar",
        widths=[16, 32, 64],
        shortcut="zero_pad",
        num_classes=10,
    )

_IMAGENET_RESNETS = {
    "resnet18": ("basic", [2, 2, 2, 2], "11.7M params, 30.24% IN top-1 err (torchvision)"),
    "resnet34": ("basic", [3, 4, 6, 3], "21.8M params, 26.69% IN top-1 err (torchvision)"),
    "resnet50": ("bottleneck", [3, 4, 6, 3], "25.6M params, 23.87% IN top-1 err (torchvision)"),
    "resnet101": ("bottleneck", [3, 4, 23, 3], "44.5M params, 22.63% IN top-1 err (torchvision)"),
    "resnet152": ("bottleneck", [3, 8, 36, 3], "60.2M params, 21.69% IN top-1 err (torchvision)"),
}
for _name, (_block, _layers, _paper) in _IMAGENET_RESNETS.items():
    register_model(
        _name,
        ResNet,
        family="resnet",
        input_size=(3, 224, 224),
        paper=_paper,
        block=_block,
        layers=_layers,
        stem="imagenet",
        widths=[64, 128, 256, 512],
        shortcut="projection",
        num_classes=1000,
    )

# ResNeXt-29 for CIFAR (Xie et al. 2017, Sec. 5.3): 3 stages x 3 bottleneck blocks, a 64-channel
# 3x3 stem, stage outputs 256/512/1024, grouped width C*d doubling per stage, projections.
for _cardinality, _paper in (
    (8, "34.4M params, 3.65% C10 err"),
    (16, "68.1M params, 3.58% C10 err"),
):
    register_model(
        f"resnext29_{_cardinality}x64d",
        ResNet,
        family="resnext",
        input_size=(3, 32, 32),
        paper=f"{_paper} (Xie et al. 2017, Table 7)",
        block="bottleneck",
        depth=29,
        stem="cifar",
        widths=[64, 128, 256],
        groups=_cardinality,
        width_per_group=64,
        shortcut="projection",
        num_classes=10,
    )

for _name, _layers, _groups, _d, _paper in (
    ("resnext50_32x4d", [3, 4, 6, 3], 32, 4, "25.0M params, 22.38% IN top-1 err (torchvision)"),
    ("resnext101_32x8d", [3, 4, 23, 3], 32, 8, "88.8M params, 20.69% IN top-1 err (torchvision)"),
):
    register_model(
        _name,
        ResNet,
        family="resnext",
        input_size=(3, 224, 224),
        paper=_paper,
        block="bottleneck",
        layers=_layers,
        stem="imagenet",
        widths=[64, 128, 256, 512],
        groups=_groups,
        width_per_group=_d,
        shortcut="projection",
        num_classes=1000,
    )
