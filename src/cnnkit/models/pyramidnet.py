"""PyramidNet (Han et al., 2017, "Deep Pyramidal Residual Networks") for CIFAR.

Instead of doubling the width at each downsampling, every one of the ``N`` residual blocks widens
the network a little (Sec. 3):

- additive (eq. 2): ``D_k = floor(D_{k-1} + alpha / N)``, from ``D_1 = 16`` to ``16 + alpha``;
- multiplicative (eq. 3): ``D_k = floor(D_{k-1} * alpha^(1/N))``, from 16 to ``16 * alpha``
  (``alpha`` is then the overall growth factor, e.g. 4 for the width range of additive
  alpha=48).

Channel rounding convention (implementations differ): the unrounded width is accumulated and
floored per block, in closed form, so block ``j = 1..N`` has
``floor(16 + j * alpha / N)`` (additive) or ``floor(16 * alpha^(j / N))`` (multiplicative)
channels (times 4 at the output of a bottleneck block). The official Torch code rounds to
nearest instead, which adds parameters (pyramidnet110_a48: 1.77M vs 1.74M here).

Blocks (Fig. 6(d), 7): basic BN-conv3x3-BN-ReLU-conv3x3-BN; bottleneck
BN-conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1(4x)-BN; no ReLU after the addition. Shortcuts are
identities whose missing channels are zeros (the branch's extra channels are added to zeros),
with 2x2 average pooling where the block downsamples: no projection parameters at all. Depth is
``2 + 6n`` (basic) or ``2 + 9n`` (bottleneck) for ``n`` blocks per stage, three stages.
"""

from __future__ import annotations

import math

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

WIDENINGS = ("additive", "multiplicative")
# Guards floor() against a width like 63.999999 from floating point.
_EPS = 1e-9


def block_widths(base: int, alpha: float, num_blocks: int, widening: str = "additive") -> list[int]:
    """Width ``D_k`` of each of the ``num_blocks`` residual blocks (Han et al., eq. 2 and 3)."""
    check_choice(widening, WIDENINGS, "widening")
    if widening == "additive":
        return [math.floor(base + k * alpha / num_blocks + _EPS) for k in range(1, num_blocks + 1)]
    return [math.floor(base * alpha ** (k / num_blocks) + _EPS) for k in range(1, num_blocks + 1)]


def blocks_per_stage(depth: int, bottleneck: bool) -> int:
    """``n`` from ``depth = 2 + 3 * layers * n`` (2 layers per basic block, 3 per bottleneck)."""
    layers = 3 if bottleneck else 2
    form = "9n+2 for bottleneck blocks" if bottleneck else "6n+2 for basic blocks"
    if not is_positive_int(depth) or depth < 3 * layers + 2:
        raise ValueError(f"depth={depth!r} must be an integer of the form {form}")
    if (depth - 2) % (3 * layers):
        raise ValueError(f"depth={depth} is not of the form {form}")
    return (depth - 2) // (3 * layers)


class PyramidBlock(nn.Module):
    """One pyramidal residual unit: ``[N, C_in, H, W]`` -> ``[N, C_out, H/s, W/s]``, C_out >= C_in.

    ``y = F(x) + pad(pool(x))`` where ``pad`` appends ``C_out - C_in`` zero channels and
    ``pool`` is 2x2 average pooling when ``stride == 2``. Stochastic depth drops ``F(x)`` per
    sample; DropBlock (when given) follows each norm of the branch.
    """

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int,
        bottleneck: bool,
        norm: str,
        norm_groups: int,
        survival_prob: float = 1.0,
        drop_path_mode: str = "inverted",
        drop_block: DropBlock2d | None = None,
    ) -> None:
        super().__init__()
        self.stride = stride
        self.bottleneck = bottleneck
        self.out_channels = planes * 4 if bottleneck else planes
        self.norm1 = make_norm(norm, in_channels, norm_groups)
        if bottleneck:
            self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
            self.norm2 = make_norm(norm, planes, norm_groups)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
            self.norm3 = make_norm(norm, planes, norm_groups)
            self.conv3 = nn.Conv2d(planes, self.out_channels, 1, bias=False)
            self.norm4 = make_norm(norm, self.out_channels, norm_groups)
        else:
            self.conv1 = nn.Conv2d(in_channels, planes, 3, stride, 1, bias=False)
            self.norm2 = make_norm(norm, planes, norm_groups)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.norm3 = make_norm(norm, planes, norm_groups)
        self.drop_block = drop_block if drop_block is not None else nn.Identity()
        self.drop_path = StochasticDepth(survival_prob, drop_path_mode)

    def branch(self, x: Tensor) -> Tensor:
        """The residual function ``F``: ``[N, C_in, H, W]`` -> ``[N, C_out, H/s, W/s]``."""
        db = self.drop_block
        out = self.conv1(db(self.norm1(x)))
        out = self.conv2(F.relu(db(self.norm2(out))))
        out = db(self.norm3(out))
        if self.bottleneck:
            out = db(self.norm4(self.conv3(F.relu(out))))
        return out

    def forward(self, x: Tensor) -> Tensor:
        out = self.drop_path(self.branch(x))
        shortcut = F.avg_pool2d(x, 2, 2, ceil_mode=True) if self.stride > 1 else x
        extra = out.shape[1] - shortcut.shape[1]
        if extra:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, extra))
        return out + shortcut


class PyramidNet(ConvNet):
    """PyramidNet for 32x32 inputs: stem conv 3x3 (16) + BN, three stages of pyramidal blocks
    (strides 1, 2, 4), final BN-ReLU, global pooling, linear classifier.

    Args:
        depth: ``6n + 2`` (basic) or ``9n + 2`` (bottleneck).
        alpha: widening parameter (total added channels for additive widening, growth factor
            for multiplicative).
        bottleneck: bottleneck blocks (4x expansion) instead of basic ones.
        widening: ``"additive"`` or ``"multiplicative"``.
        base_channels: width of the stem (16 in the paper).
        num_classes, in_chans: classifier outputs and input channels.
        norm, norm_groups: normalization (see :func:`cnnkit.layers.norm.make_norm`); with
            ``"group"``, each layer takes the largest divisor of its width not above
            ``norm_groups``.
        drop_path_rate: stochastic depth ``1 - p_L``, survival decaying linearly over all blocks.
        drop_path_mode: ``"inverted"`` or ``"paper"`` (see :class:`StochasticDepth`).
        drop_block, drop_block_size, drop_block_stages: DropBlock probability, block size
            (default 3) and the 1-based stages that get it (default the last two).
        dropout: dropout before the classifier.
    """

    def __init__(
        self,
        depth: int = 110,
        alpha: float = 48,
        bottleneck: bool = False,
        widening: str = "additive",
        base_channels: int = 16,
        num_classes: int = 10,
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
        check_common_args(
            num_classes=num_classes,
            in_chans=in_chans,
            norm=norm,
            drop_path_mode=drop_path_mode,
            drop_path_rate=drop_path_rate,
            drop_block=drop_block,
            dropout=dropout,
        )
        check_positive_int(base_channels, "base_channels")
        lowest = 1.0 if widening == "multiplicative" else 0.0
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha < lowest:
            raise ValueError(
                f"alpha={alpha!r} must be a number >= {lowest:g} for {widening} widening"
            )
        n = blocks_per_stage(depth, bottleneck)
        widths = block_widths(base_channels, alpha, 3 * n, widening)
        survival = survival_probs(drop_path_rate, 3 * n)
        dropblock_on = drop_block_stage_indices(drop_block_stages, 3)
        block_size = (
            DEFAULT_DROP_BLOCK_SIZE["cifar"] if drop_block_size is None else drop_block_size
        )

        self.conv1 = nn.Conv2d(in_chans, base_channels, 3, padding=1, bias=False)
        self.norm1 = make_norm(norm, base_channels, norm_groups)
        channels = base_channels
        self.stage_names, self.stage_channels, self.stage_strides = [], [], []
        for stage in range(3):
            blocks = []
            for i in range(n):
                k = stage * n + i
                blocks.append(
                    PyramidBlock(
                        channels,
                        widths[k],
                        2 if stage > 0 and i == 0 else 1,
                        bottleneck,
                        norm,
                        norm_groups,
                        survival[k],
                        drop_path_mode,
                        DropBlock2d(block_size, drop_block) if stage + 1 in dropblock_on else None,
                    )
                )
                channels = blocks[-1].out_channels
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
            self.stage_names.append(f"layer{stage + 1}")
            self.stage_channels.append(channels)
            self.stage_strides.append(2**stage)
        self.final_norm = make_norm(norm, channels, norm_groups)
        self.num_features = channels
        self.head_dropout = head_dropout_layer(dropout)
        self.fc = nn.Linear(channels, num_classes)
        # He initialization with fan-out, as the paper's Torch code (std = sqrt(2 / (k*k*C_out))).
        init_conv_net(self, zero_linear_bias=True)

    def forward_stem(self, x: Tensor) -> Tensor:
        """``[N, in_chans, H, W]`` -> ``[N, 16, H, W]``: 3x3 convolution and its norm."""
        return self.norm1(self.conv1(x))

    def forward_features(self, x: Tensor) -> Tensor:
        """``[N, in_chans, H, W]`` -> ``[N, num_features, H/4, W/4]`` after the final BN-ReLU."""
        return F.relu(self.final_norm(self.forward_stages(x)[-1]))


def _register() -> None:
    for depth, alpha, bottleneck, paper in (
        (110, 48, False, "1.7M params, 4.62% C10+ err (Han et al. 2017)"),
        (110, 270, False, "28.3M params, 3.73% C10+ err (Han et al. 2017)"),
        (200, 240, True, "26.6M params, 3.44% C10+ err (Han et al. 2017)"),
        (272, 200, True, "26.0M params, 3.31% C10+ err (Han et al. 2017)"),
    ):
        register_model(
            f"pyramidnet{depth}_a{alpha}",
            PyramidNet,
            family="pyramidnet",
            input_size=(3, 32, 32),
            paper=paper,
            depth=depth,
            alpha=alpha,
            bottleneck=bottleneck,
        )


_register()
