"""Feature Pyramid Network (Lin et al., 2017): one ``out_channels`` map per backbone stage.

For stage outputs ``C_l`` (fine to coarse), with a 1x1 lateral conv ``L_l`` and a 3x3 output
conv ``O_l`` per level (Lin et al., Sec. 3, Fig. 3)::

    M_top = L_top(C_top)
    M_l   = L_l(C_l) + upsample_nearest(M_{l+1}, size of L_l(C_l))
    P_l   = O_l(M_l)

plus ``P6 = maxpool(P5, kernel 1, stride 2)`` (the extra RPN level of Sec. 4.1, as torchvision's
``LastLevelMaxPool``). Without a norm the convs carry biases, exactly torchvision's
``FeaturePyramidNetwork`` layout and parameter count; with ``norm="group"`` or ``"batch"`` each
conv is followed by that norm and has no bias (Wu & He, 2018, Sec. 6).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from cnnkit.layers.norm import check_norm, make_norm


def _conv(cin: int, cout: int, kernel: int, norm: str, norm_groups: int) -> nn.Sequential:
    # Module names ("inner_blocks.0.0.weight") follow torchvision, so its checkpoints load.
    conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=norm == "none")
    nn.init.kaiming_uniform_(conv.weight, a=1)  # torchvision's FPN initialization
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    if norm == "none":
        return nn.Sequential(conv)
    return nn.Sequential(conv, make_norm(norm, cout, norm_groups))


class FeaturePyramid(nn.Module):
    """Top-down pyramid over the backbone stages.

    Args:
        in_channels: channels of each input map, fine to coarse, e.g. ``[256, 512, 1024, 2048]``.
        out_channels: channels of every output map (256 in the paper).
        norm, norm_groups: ``"none"`` (biases, torchvision) or a norm after every conv.
        extra_pool: add P6 by stride-2 subsampling of the coarsest output.
        first_level: ``log2`` of the finest input's stride (2 for ResNet's C2, stride 4): the
            outputs are named ``p{first_level}``, ``p{first_level + 1}``, ...
    """

    def __init__(
        self,
        in_channels: list[int],
        out_channels: int,
        norm: str = "none",
        norm_groups: int = 32,
        extra_pool: bool = True,
        first_level: int = 2,
    ) -> None:
        super().__init__()
        check_norm(norm)
        if not in_channels or any(c <= 0 for c in in_channels) or out_channels <= 0:
            raise ValueError(
                f"FeaturePyramid needs positive channels, got in_channels={in_channels!r}, "
                f"out_channels={out_channels!r}"
            )
        self.in_channels = list(in_channels)
        self.out_channels = out_channels
        self.extra_pool = extra_pool
        self.inner_blocks = nn.ModuleList(
            _conv(c, out_channels, 1, norm, norm_groups) for c in in_channels
        )
        self.layer_blocks = nn.ModuleList(
            _conv(out_channels, out_channels, 3, norm, norm_groups) for _ in in_channels
        )
        levels = len(in_channels) + int(extra_pool)
        self.names = [f"p{first_level + i}" for i in range(levels)]

    def forward(self, features: list[Tensor]) -> dict[str, Tensor]:
        """``[C_l: Tensor[N, in_channels[l], H_l, W_l]]`` -> ``{"p2": [N, out, H_2, W_2], ...}``.

        The dict is ordered fine to coarse; with ``extra_pool`` the last entry is half the size
        (rounded up) of the coarsest input.
        """
        if len(features) != len(self.in_channels):
            raise ValueError(
                f"FeaturePyramid expects {len(self.in_channels)} feature maps, got {len(features)}"
            )
        last = self.inner_blocks[-1](features[-1])
        outputs = [self.layer_blocks[-1](last)]
        for idx in range(len(features) - 2, -1, -1):
            lateral = self.inner_blocks[idx](features[idx])
            # Upsample to the lateral's size, not x2: odd sizes (e.g. 25 -> 13) then still add.
            last = lateral + F.interpolate(last, size=lateral.shape[-2:], mode="nearest")
            outputs.insert(0, self.layer_blocks[idx](last))
        if self.extra_pool:
            outputs.append(F.max_pool2d(outputs[-1], kernel_size=1, stride=2, padding=0))
        return dict(zip(self.names, outputs, strict=True))
