"""Wide Residual Networks (Zagoruyko & Komodakis, 2016).

WRN-d-k for CIFAR is a pre-activation ResNet (He et al., 2016b) whose stages are ``k`` times
wider: a 3x3 conv with 16 channels, three stages of ``N`` blocks with ``16k, 32k, 64k`` channels
(strides 1, 2, 2), a final norm + ReLU, global average pooling and a linear classifier.

A block ``B(k_1, ..., k_m)`` is ``m`` pre-activated convolutions with kernel sizes ``k_i``, all with
the stage's width (the paper's Table 1 compares B(3,3), B(3,1,3), B(1,3,1), B(1,3), B(3,1),
B(3,1,1)); the first carries the stride::

    x_pre = relu(norm_1(x))
    branch = conv_m(dropout(relu(norm_m(... conv_1(x_pre) ...))))   # dropout between convs
    y = shortcut + branch,  shortcut = x  or  conv1x1(x_pre) where the shape changes

Dropout sits between the convolutions of the residual branch, never on the shortcut
(the paper's Sec. 2.3). With ``m`` convs per block, ``d = 3 * m * N + 4``.

ImageNet's wide_resnet50_2 / wide_resnet101_2 (torchvision's) are bottleneck ResNets with a
doubled inner width (``width_per_group=128``); they are registered here as configurations of
:class:`cnnkit.models.resnet.ResNet`.
"""

from __future__ import annotations

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
    ConvNet,
    check_common_args,
    check_positive_int,
    head_dropout_layer,
    init_conv_net,
    is_positive_int,
)
from cnnkit.models.registry import register_model
from cnnkit.models.resnet import ResNet, conv

BASE_WIDTHS = (16, 32, 64)


def parse_block(block: str | list[int]) -> list[int]:
    """Kernel sizes of a block: ``"3,3"``, ``"B(3,1,3)"``, ``[1, 3, 1]`` -> ``[...]``.

    Each kernel must be a positive odd integer (so 'same' padding keeps the map size).
    """
    if isinstance(block, str):
        text = block.strip().removeprefix("B").strip("()[] ")
        try:
            kernels = [int(k) for k in text.split(",")]
        except ValueError:
            raise ValueError(f"block={block!r} is not a list of kernel sizes like '3,3'") from None
    elif isinstance(block, (list, tuple)):
        kernels = list(block)
    else:
        raise TypeError(f"block must be a string like '3,3' or a list of ints, got {block!r}")
    if not kernels or any(not is_positive_int(k) or k % 2 == 0 for k in kernels):
        raise ValueError(f"block={block!r} must list positive odd kernel sizes, e.g. [3, 3]")
    return kernels


class WideBasicBlock(nn.Module):
    """Pre-activation block ``B(kernels)``: ``[N, C_in, H, W] -> [N, C_out, H/s, W/s]``."""

    def __init__(
        self,
        cin: int,
        cout: int,
        stride: int,
        kernels: list[int],
        norm: str,
        norm_groups: int,
        block_dropout: float,
        survival_prob: float,
        drop_path_mode: str,
        drop_block: DropBlock2d | None,
    ) -> None:
        super().__init__()
        bias = norm == "none"  # every conv feeds a norm (its successor's or the next block's)
        self.num_convs = len(kernels)
        for i, kernel in enumerate(kernels, start=1):
            cin_i = cin if i == 1 else cout
            self.add_module(f"bn{i}", make_norm(norm, cin_i, norm_groups))
            self.add_module(
                f"conv{i}", conv(cin_i, cout, kernel, stride if i == 1 else 1, bias=bias)
            )
        # Without a norm, the first ReLU would act on the block input itself, which the
        # identity shortcut still needs: in-place only when a norm produced a fresh tensor.
        self.relu = nn.ReLU(inplace=norm != "none")
        self.dropout = nn.Dropout(block_dropout) if block_dropout > 0 else None
        self.shortcut = conv(cin, cout, 1, stride) if cin != cout or stride != 1 else None
        self.drop_block = drop_block
        self.drop_path = (
            StochasticDepth(survival_prob, drop_path_mode) if survival_prob < 1 else None
        )

    def _pre_activate(self, i: int, x: Tensor) -> Tensor:
        x = getattr(self, f"bn{i}")(x)
        if self.drop_block is not None:
            x = self.drop_block(x)
        return self.relu(x)

    def forward(self, x: Tensor) -> Tensor:
        pre = self._pre_activate(1, x)
        # The projection shortcut sees the pre-activated input (as the paper's code); an identity
        # shortcut carries the raw input, so the signal path stays clean (He et al., 2016b).
        shortcut = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        for i in range(2, self.num_convs + 1):
            out = self._pre_activate(i, out)
            if self.dropout is not None:
                out = self.dropout(out)
            out = getattr(self, f"conv{i}")(out)
        if self.drop_path is not None:
            out = self.drop_path(out)
        out += shortcut  # fresh tensor, not needed by its producer's backward
        return out


class WideResNet(ConvNet):
    """Pre-activation WRN-d-k for CIFAR-sized inputs.

    Args:
        depth: ``d = 3 * len(block) * N + 4`` (28 for WRN-28-10 with B(3,3)).
        widen_factor: ``k``; stage widths ``16k, 32k, 64k``.
        block: kernel sizes of a block's convs, ``"3,3"`` / ``[3, 1, 3]`` / ``"B(1,3,1)"``.
        block_dropout: dropout between the convolutions of each block (the paper's 0.3).
        num_classes, in_chans, norm, norm_groups: as every cnnkit model.
        drop_path_rate, drop_path_mode: stochastic depth, linear decay over all blocks.
        drop_block, drop_block_size, drop_block_stages: DropBlock after the norms of the given
            1-based stages (``None``: the last two).
        dropout: dropout before the classifier.
    """

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 10,
        block: str | list[int] = "3,3",
        block_dropout: float = 0.0,
        num_classes: int = 10,
        in_chans: int = 3,
        norm: str = "batch",
        norm_groups: int = 32,
        drop_path_rate: float = 0.0,
        drop_path_mode: str = "inverted",
        drop_block: float = 0.0,
        drop_block_size: int = 3,
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
        check_probability(block_dropout, "block_dropout")
        kernels = parse_block(block)
        per_block = 3 * len(kernels)
        if not is_positive_int(depth) or depth < per_block + 4:
            raise ValueError(f"depth={depth!r} must be an integer {per_block}N+4 with N >= 1")
        if (depth - 4) % per_block:
            raise ValueError(
                f"depth={depth}: depth - 4 must be divisible by {per_block} "
                f"(3 stages x {len(kernels)} convs per block B{tuple(kernels)})"
            )
        check_positive_int(widen_factor, "widen_factor")
        num_blocks = (depth - 4) // per_block
        widths = [w * widen_factor for w in BASE_WIDTHS]
        probs = iter(survival_probs(drop_path_rate, 3 * num_blocks))
        drop_stages = set(drop_block_stage_indices(drop_block_stages, len(widths)))

        self.conv1 = conv(in_chans, BASE_WIDTHS[0], 3, bias=norm == "none")
        cin = BASE_WIDTHS[0]
        self.stage_names = []
        for index, cout in enumerate(widths, start=1):
            blocks = []
            for i in range(num_blocks):
                drop = DropBlock2d(drop_block_size, drop_block) if index in drop_stages else None
                stride = 2 if index > 1 and i == 0 else 1
                blocks.append(
                    WideBasicBlock(
                        cin, cout, stride, kernels, norm, norm_groups, block_dropout,
                        next(probs), drop_path_mode, drop,
                    )
                )  # fmt: skip
                cin = cout
            self.add_module(f"layer{index}", nn.Sequential(*blocks))
            self.stage_names.append(f"layer{index}")
        self.stage_channels = widths
        self.stage_strides = [1, 2, 4]
        self.num_features = widths[-1]
        # Pre-activation leaves the last block's output un-normalized: norm + ReLU before pooling.
        self.bn = make_norm(norm, widths[-1], norm_groups)
        self.relu = nn.ReLU(inplace=True)
        self.head_dropout = head_dropout_layer(dropout)
        self.fc = nn.Linear(widths[-1], num_classes)
        init_conv_net(self)

    def forward_stem(self, x: Tensor) -> Tensor:
        """``[N, in_chans, H, W]`` -> ``[N, 16, H, W]`` (one 3x3 convolution, pre-activation)."""
        return self.conv1(x)

    def forward_features(self, x: Tensor) -> Tensor:
        """``[N, in_chans, H, W]`` -> ``relu(norm(last stage))``, ``[N, 64k, H/4, W/4]``."""
        return self.relu(self.bn(self.forward_stages(x)[-1]))


# --- Registered variants (Zagoruyko & Komodakis 2016, Table 4/5; CIFAR-10 test error) ------------

for _depth, _k, _paper in (
    (16, 8, "11.0M params, 4.81% C10 err"),
    (28, 10, "36.5M params, 4.00% C10 err (3.89% with dropout 0.3)"),
    (40, 4, "8.9M params, 4.53% C10 err"),
):
    register_model(
        f"wrn{_depth}_{_k}",
        WideResNet,
        family="wide_resnet",
        input_size=(3, 32, 32),
        paper=f"{_paper} (Zagoruyko & Komodakis 2016)",
        depth=_depth,
        widen_factor=_k,
        block=[3, 3],
        num_classes=10,
    )

for _name, _layers, _paper in (
    ("wide_resnet50_2", [3, 4, 6, 3], "68.9M params, 21.53% IN top-1 err (torchvision)"),
    ("wide_resnet101_2", [3, 4, 23, 3], "126.9M params, 21.15% IN top-1 err (torchvision)"),
):
    register_model(
        _name,
        ResNet,
        family="wide_resnet",
        input_size=(3, 224, 224),
        paper=_paper,
        block="bottleneck",
        layers=_layers,
        stem="imagenet",
        widths=[64, 128, 256, 512],
        width_per_group=128,
        shortcut="projection",
        num_classes=1000,
    )
