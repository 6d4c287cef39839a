"""Wide ResNets: published sizes, the paper's block types, in-block dropout, pre-activation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cnnkit import count_parameters, create_model
from cnnkit.layers.regularize import StochasticDepth
from cnnkit.models.wide_resnet import WideBasicBlock, WideResNet

# DESIGN.md (num_classes=10) and torchvision (num_classes=1000; wide_resnet101_2's count is
# sum(p.numel()) of torchvision 0.29.1's model, also its docs' 126.9M).
PUBLISHED_PARAMS = {
    "wrn16_8": 10_961_370,
    "wrn28_10": 36_479_194,
    "wrn40_4": 8_949_210,
    "wide_resnet50_2": 68_883_240,
    "wide_resnet101_2": 126_886_696,
}
# The paper's Table 1 block types with a depth 3 * m * N + 4 each admits.
BLOCK_TYPES = {
    "3,3": 10,
    "3,1,3": 13,
    "1,3,1": 13,
    "1,3": 10,
    "3,1": 10,
    "3,1,1": 13,
}


def wrn_params(depth: int, k: int, kernels: list[int], num_classes: int = 10) -> int:
    """Parameters of WRN-d-k written out from the paper's description (bias-free convs, BN
    before every conv, 1x1 shortcut convs where the width changes, final BN, linear)."""
    n = (depth - 4) // (3 * len(kernels))
    total = 3 * 16 * 9
    cin = 16
    for width in (16 * k, 32 * k, 64 * k):
        for _ in range(n):
            for i, kernel in enumerate(kernels):
                c = cin if i == 0 else width
                total += 2 * c + c * width * kernel * kernel
            if cin != width:
                total += cin * width
            cin = width
    return total + 2 * cin + cin * num_classes + num_classes


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_parameter_count_matches_published(name):
    with torch.device("meta"):
        assert count_parameters(create_model(name)) == PUBLISHED_PARAMS[name]


def test_formula_reproduces_the_published_counts():
    # The formula below is trusted for other block types only because it matches these.
    assert wrn_params(16, 8, [3, 3]) == PUBLISHED_PARAMS["wrn16_8"]
    assert wrn_params(28, 10, [3, 3]) == PUBLISHED_PARAMS["wrn28_10"]
    assert wrn_params(40, 4, [3, 3]) == PUBLISHED_PARAMS["wrn40_4"]


@pytest.mark.parametrize("block", sorted(BLOCK_TYPES))
def test_every_block_type_of_the_paper(block):
    depth = BLOCK_TYPES[block]
    kernels = [int(k) for k in block.split(",")]
    model = WideResNet(depth=depth, widen_factor=1, block=block)
    assert count_parameters(model) == wrn_params(depth, 1, kernels)
    first = model.layer2[0]
    assert [getattr(first, f"conv{i + 1}").kernel_size[0] for i in range(len(kernels))] == kernels
    assert first.conv1.stride == (2, 2)  # the first conv carries the stride
    out = model(torch.randn(2, 3, 8, 8))
    out.sum().backward()
    assert out.shape == (2, 10)


@pytest.mark.parametrize("spelling", ["B(1,3,1)", [1, 3, 1], (1, 3, 1), " 1, 3, 1 "])
def test_block_spellings(spelling):
    assert WideResNet(depth=13, widen_factor=1, block=spelling).layer1[0].num_convs == 3


@pytest.mark.parametrize(("name", "size"), [("wrn16_8", 32), ("wrn40_4", 16), ("wrn28_10", 16)])
def test_cifar_forward_backward(name, size):
    model = create_model(name).train()
    out = model(torch.randn(2, 3, size, size))
    out.square().mean().backward()
    assert out.shape == (2, 10)
    assert all(p.grad is not None for p in model.parameters())


def test_imagenet_wide_resnet_forward_backward_and_torchvision_shapes():
    model = create_model("wide_resnet50_2", num_classes=5)
    out = model(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    assert out.shape == (2, 5)
    sd = model.state_dict()
    # Twice resnet50's inner width (128 instead of 64 in layer1), same outputs (256).
    assert sd["layer1.0.conv2.weight"].shape == (128, 128, 3, 3)
    assert sd["layer1.0.conv3.weight"].shape == (256, 128, 1, 1)
    assert len(sd) == 320  # as torchvision's wide_resnet50_2 (and resnet50)


@pytest.mark.parametrize("depth", [27, 15, 21, 4])
def test_depth_must_fit_the_block(depth):
    with pytest.raises(ValueError, match="depth"):
        WideResNet(depth=depth, widen_factor=1, block="3,3")


def test_depth_check_counts_convs_per_block():
    WideResNet(depth=22, widen_factor=1, block="3,1,3")  # 18 = 9 * 2
    with pytest.raises(ValueError, match="depth"):
        WideResNet(depth=28, widen_factor=1, block="3,1,3")


@pytest.mark.parametrize("block", ["2,3", "", "a,b", [3, 0], [3, True]])
def test_bad_block_names_block(block):
    with pytest.raises(ValueError, match="block"):
        WideResNet(depth=10, widen_factor=1, block=block)


@pytest.mark.parametrize(
    ("overrides", "argument"),
    [
        ({"widen_factor": 0}, "widen_factor"),
        ({"block_dropout": 1.0}, "block_dropout"),
        ({"drop_path_rate": 1.0}, "drop_path_rate"),
        ({"drop_path_rate": -0.5}, "drop_path_rate"),
        ({"drop_block": 2.0}, "drop_block"),
        ({"dropout": 1.0}, "dropout"),
        ({"norm": "group", "norm_groups": 0}, "--norm-groups"),
    ],
)
def test_impossible_configurations_name_the_argument(overrides, argument):
    with pytest.raises(ValueError, match=argument):
        create_model("wrn16_8", **overrides)


def test_dropout_sits_between_the_convolutions():
    model = create_model("wrn16_8", block_dropout=0.3)
    block = model.layer2[0]
    assert isinstance(block.dropout, nn.Dropout) and block.dropout.p == 0.3
    order = []
    for name in ("conv1", "dropout", "conv2", "shortcut"):
        getattr(block, name).register_forward_hook(lambda *_, n=name: order.append(n))
    block.train()(torch.randn(2, 128, 8, 8))
    assert order == ["shortcut", "conv1", "dropout", "conv2"]


class _DropEverything(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


@pytest.mark.parametrize("stage", ["layer1", "layer2"])
def test_dropout_never_touches_the_shortcut(stage):
    # If the dropout zeroes everything, only the shortcut is left: identity (layer1, block 2)
    # or the 1x1 conv of the pre-activated input (layer2, block 1). The last conv has no bias.
    model = create_model("wrn16_8", block_dropout=0.3).eval()
    block = getattr(model, stage)[1 if stage == "layer1" else 0]
    block.dropout = _DropEverything()
    x = torch.randn(2, block.conv1.in_channels, 8, 8)
    with torch.no_grad():
        expected = x if block.shortcut is None else block.shortcut(torch.relu(block.bn1(x)))
        torch.testing.assert_close(block(x), expected)


def test_features_are_normalized_and_activated():
    model = create_model("wrn16_8").eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        maps = model.forward_stages(x)
        features = model.forward_features(x)
        expected = torch.relu(model.bn(maps[-1]))
    assert [tuple(m.shape) for m in maps] == [(2, 128, 16, 16), (2, 256, 8, 8), (2, 512, 4, 4)]
    assert model.stage_channels == [128, 256, 512] and model.stage_strides == [1, 2, 4]
    assert model.num_features == 512
    torch.testing.assert_close(features, expected)
    assert (features >= 0).all()


@pytest.mark.parametrize(("norm", "groups"), [("group", 16), ("layer", 32), ("none", 32)])
def test_norm_variants(norm, groups):
    model = WideResNet(depth=10, widen_factor=2, norm=norm, norm_groups=groups)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    x = torch.randn(2, 3, 16, 16)
    before = x.clone()
    model(x).sum().backward()
    torch.testing.assert_close(x, before)  # no in-place op reaches the caller's tensor
    if norm != "none":
        norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
        assert {m.num_groups for m in norms} == {groups if norm == "group" else 1}


def test_no_norm_identity_shortcut_keeps_negative_inputs():
    block = WideBasicBlock(4, 4, 1, [3, 3], "none", 32, 0.0, 1.0, "inverted", None).eval()
    x = -torch.ones(1, 4, 5, 5)
    with torch.no_grad():
        branch = block.conv2(torch.relu(block.conv1(torch.relu(x))))
        torch.testing.assert_close(block(x), x + branch)


def test_stochastic_depth_over_all_blocks():
    model = create_model("wrn16_8", drop_path_rate=0.2)
    probs = [m.survival_prob for m in model.modules() if isinstance(m, StochasticDepth)]
    assert probs == pytest.approx([1 - b / 6 * 0.2 for b in range(1, 7)])  # L = 3 stages x 2


def test_drop_block_in_the_last_two_stages():
    model = create_model("wrn16_8", drop_block=0.1)
    assert [
        b.drop_block is not None for s in (model.layer1, model.layer2, model.layer3) for b in s
    ] == [
        False,
        False,
        True,
        True,
        True,
        True,
    ]
