"""FeaturePyramid: torchvision's parameter count, names/strides, and the top-down sum by hand."""

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.detection.fpn import FeaturePyramid


def test_parameter_count_equals_torchvision_resnet50_fpn():
    """torchvision's FPN for ResNet-50 C2..C5 -> 256: 3,344,384 parameters.

    Laterals (1x1 + bias): (256 + 512 + 1024 + 2048) * 256 + 4 * 256 = 983,040 + 1,024 = 984,064.
    Outputs (3x3 + bias): 4 * (256 * 256 * 9 + 256) = 4 * 590,080 = 2,360,320.
    Total 984,064 + 2,360,320 = 3,344,384 (P6 max-pool has none).
    """
    with torch.device("meta"):
        fpn = FeaturePyramid([256, 512, 1024, 2048], 256)
    assert sum(p.numel() for p in fpn.parameters()) == 3_344_384


def test_output_names_and_strides():
    fpn = FeaturePyramid([4, 8, 16, 32], 8)
    image = (64, 96)
    feats = [
        torch.randn(2, c, image[0] // s, image[1] // s)
        for c, s in zip([4, 8, 16, 32], [4, 8, 16, 32], strict=True)
    ]
    out = fpn(feats)
    assert list(out) == ["p2", "p3", "p4", "p5", "p6"]
    for level, (name, value) in enumerate(out.items(), start=2):
        stride = 2**level
        assert name == f"p{level}"
        # P6 subsamples P5 (2 x 3) with stride 2: ceil -> 1 x 2.
        assert tuple(value.shape) == (2, 8, -(-image[0] // stride), -(-image[1] // stride))
    assert list(FeaturePyramid([4, 8], 8, extra_pool=False)(feats[:2])) == ["p2", "p3"]


def test_top_down_sum_by_hand_with_odd_sizes():
    # Laterals = identity, outputs = identity (3x3 kernel with only the centre): then
    # P_l = C_l + nearest-upsample(M_{l+1}) with M the running sum, P6 = P5[::2, ::2].
    fpn = FeaturePyramid([1, 1, 1], 1)
    with torch.no_grad():
        for block in fpn.inner_blocks:
            block[0].weight.fill_(1.0)
        for block in fpn.layer_blocks:
            block[0].weight.zero_()
            block[0].weight[0, 0, 1, 1] = 1.0
    c2, c3, c4 = torch.randn(1, 1, 13, 11), torch.randn(1, 1, 7, 6), torch.randn(1, 1, 4, 3)

    def up(x, size):  # nearest: output pixel i reads floor(i * in / out)
        rows = (torch.arange(size[0]) * x.shape[2]) // size[0]
        cols = (torch.arange(size[1]) * x.shape[3]) // size[1]
        return x[:, :, rows][:, :, :, cols]

    m3 = c3 + up(c4, c3.shape[2:])
    m2 = c2 + up(m3, c2.shape[2:])
    out = fpn([c2, c3, c4])
    torch.testing.assert_close(out["p4"], c4)
    torch.testing.assert_close(out["p3"], m3)
    torch.testing.assert_close(out["p2"], m2)
    torch.testing.assert_close(out["p5"], c4[:, :, ::2, ::2])


def test_norm_variant_has_no_bias_and_a_norm_per_conv():
    fpn = FeaturePyramid([4, 8], 8, norm="group", norm_groups=4)
    convs = [m for m in fpn.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 4 and all(c.bias is None for c in convs)
    assert len([m for m in fpn.modules() if isinstance(m, nn.GroupNorm)]) == 4
    out = fpn([torch.randn(2, 4, 8, 8), torch.randn(2, 8, 4, 4)])
    assert out["p2"].shape == (2, 8, 8, 8) and out["p4"].shape == (2, 8, 2, 2)
    assert F.mse_loss(out["p2"], torch.zeros_like(out["p2"])) > 0
