"""ResNet and ResNeXt: published sizes, torchvision's layout, shapes, norms and regularizers."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from cnnkit import count_parameters, create_model
from cnnkit.layers.regularize import DropBlock2d, StochasticDepth, set_drop_block
from cnnkit.models.resnet import BasicBlock, BlockSpec, ResNet, ZeroPadShortcut

# DESIGN.md reference figures: torchvision's counts (num_classes=1000) and the papers' CIFAR
# models (num_classes=10; He et al. 2016 Table 6 gives 0.27M ... 19.4M).
PUBLISHED_PARAMS = {
    "resnet20": 269_722,
    "resnet32": 464_154,
    "resnet44": 658_586,
    "resnet56": 853_018,
    "resnet110": 1_727_962,
    "resnet1202": 19_421_274,
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "resnext29_8x64d": 34_426_698,
    "resnext29_16x64d": 68_155_210,
    "resnext50_32x4d": 25_028_904,
    "resnext101_32x8d": 88_791_336,
}
CIFAR_RUN = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]
IMAGENET_RUN = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d"]
# torchvision's ResNet blocks per stage (torchvision.models.resnet builders).
TORCHVISION_LAYERS = {
    "resnet18": ("basic", [2, 2, 2, 2]),
    "resnet34": ("basic", [3, 4, 6, 3]),
    "resnet50": ("bottleneck", [3, 4, 6, 3]),
    "resnet101": ("bottleneck", [3, 4, 23, 3]),
    "resnet152": ("bottleneck", [3, 8, 36, 3]),
    "resnext50_32x4d": ("bottleneck", [3, 4, 6, 3]),
    "resnext101_32x8d": ("bottleneck", [3, 4, 23, 3]),
}


def meta_count(name: str, **overrides) -> int:
    with torch.device("meta"):
        return count_parameters(create_model(name, **overrides))


def forward_backward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.train()
    out = model(x)
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    return out


def torchvision_keys(block: str, layers: list[int]) -> list[str]:
    """The state_dict keys of torchvision's ResNet, written out from its module layout."""

    def bn(prefix: str) -> list[str]:
        stats = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
        return [f"{prefix}.{s}" for s in stats]

    keys = ["conv1.weight", *bn("bn1")]
    convs = 2 if block == "basic" else 3
    for stage, n in enumerate(layers, start=1):
        for i in range(n):
            p = f"layer{stage}.{i}"
            for c in range(1, convs + 1):
                keys += [f"{p}.conv{c}.weight", *bn(f"{p}.bn{c}")]
            # A projection where stride or channels change: every stage's first block, except
            # layer1 of basic-block nets (64 -> 64 channels at stride 1).
            if i == 0 and (stage > 1 or block == "bottleneck"):
                keys += [f"{p}.downsample.0.weight", *bn(f"{p}.downsample.1")]
    return [*keys, "fc.weight", "fc.bias"]


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_parameter_count_matches_published(name):
    assert meta_count(name) == PUBLISHED_PARAMS[name]


def test_resnet110_with_projection_shortcuts_matches_option_b():
    assert meta_count("resnet110", shortcut="projection") == 1_730_714


@pytest.mark.parametrize("name", CIFAR_RUN)
def test_cifar_resnet_forward_backward(name):
    out = forward_backward(create_model(name), torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)


@pytest.mark.parametrize("name", ["resnext29_8x64d", "resnext29_16x64d"])
def test_cifar_resnext_forward_backward(name):
    # 16x16 instead of 32x32 keeps these 5-11 GFLOP models fast; the network is size-agnostic.
    out = forward_backward(create_model(name), torch.randn(2, 3, 16, 16))
    assert out.shape == (2, 10)


@pytest.mark.parametrize("name", IMAGENET_RUN)
def test_imagenet_forward_backward(name):
    # 2 x 32 x 32 reaches a 1x1 map in layer4 (stride 32): still 2 values per channel for BN.
    out = forward_backward(create_model(name, num_classes=7), torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)


@pytest.mark.parametrize("name", sorted(TORCHVISION_LAYERS))
def test_state_dict_keys_follow_torchvision(name):
    with torch.device("meta"):
        model = create_model(name)
    expected = torchvision_keys(*TORCHVISION_LAYERS[name])
    assert list(model.state_dict()) == expected


def test_resnet50_key_count_equals_torchvision():
    # len(torchvision.models.resnet50().state_dict()) == 320 (torchvision 0.29.1, peers env).
    with torch.device("meta"):
        keys = list(create_model("resnet50").state_dict())
    assert len(keys) == 320
    for key in ["conv1.weight", "bn1.running_mean", "layer1.0.downsample.0.weight"]:
        assert key in keys
    assert "layer4.2.bn3.num_batches_tracked" in keys and keys[-1] == "fc.bias"


def test_resnext_grouped_conv_shapes():
    with torch.device("meta"):
        sd = create_model("resnext50_32x4d").state_dict()
    # C=32, d=4: the first stage's grouped 3x3 conv has 32*4 = 128 channels, 4 per group.
    assert sd["layer1.0.conv2.weight"].shape == (128, 4, 3, 3)
    assert sd["layer4.0.conv2.weight"].shape == (1024, 32, 3, 3)
    assert sd["fc.weight"].shape == (1000, 2048)


def test_cifar_resnext_widths_follow_xie_et_al():
    with torch.device("meta"):
        model = create_model("resnext29_8x64d")
    # C*d = 8*64 = 512 at stage 1, doubling; outputs 256/512/1024; 64-channel stem.
    assert model.conv1.weight.shape == (64, 3, 3, 3)
    assert [s[0].conv2.out_channels for s in (model.layer1, model.layer2, model.layer3)] == [
        512,
        1024,
        2048,
    ]
    assert all(s[0].conv2.groups == 8 for s in (model.layer1, model.layer2, model.layer3))
    assert model.stage_channels == [256, 512, 1024]
    assert [len(s) for s in (model.layer1, model.layer2, model.layer3)] == [3, 3, 3]


@pytest.mark.parametrize(
    ("name", "size", "channels", "strides"),
    [
        ("resnet20", 32, [16, 32, 64], [1, 2, 4]),
        ("resnext29_8x64d", 16, [256, 512, 1024], [1, 2, 4]),
        ("resnet18", 64, [64, 128, 256, 512], [4, 8, 16, 32]),
        ("resnet50", 64, [256, 512, 1024, 2048], [4, 8, 16, 32]),
    ],
)
def test_forward_stages_shapes_and_strides(name, size, channels, strides):
    model = create_model(name).eval()
    assert model.stage_channels == channels and model.stage_strides == strides
    assert model.num_features == channels[-1]
    with torch.no_grad():
        x = torch.randn(1, 3, size, size)
        maps = model.forward_stages(x)
        features = model.forward_features(x)
    assert [tuple(m.shape) for m in maps] == [
        (1, c, size // s, size // s) for c, s in zip(channels, strides, strict=True)
    ]
    torch.testing.assert_close(features, maps[-1])


def test_zero_pad_shortcut_subsamples_and_appends_zero_channels():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    y = ZeroPadShortcut(3, 5, stride=2)(x)
    assert y.shape == (2, 5, 2, 2)
    # Hand-computed: kept pixels (0,0), (0,2), (2,0), (2,2) of each channel.
    assert y[0, 0].tolist() == [[0.0, 2.0], [8.0, 10.0]]
    torch.testing.assert_close(y[:, :3], x[:, :, ::2, ::2])
    assert (y[:, 3:] == 0).all()


def test_option_a_has_no_shortcut_parameters():
    model = create_model("resnet20")
    assert isinstance(model.layer2[0].downsample, ZeroPadShortcut)
    assert not any("downsample" in k for k in model.state_dict())
    projection = create_model("resnet20", shortcut="projection")
    # Option B adds 1x1 conv + BN at the two transitions: 16*32 + 2*32 + 32*64 + 2*64.
    assert count_parameters(projection) - count_parameters(model) == 512 + 64 + 2048 + 128


@pytest.mark.parametrize("depth", [21, 19, 7, 0])
def test_cifar_depth_not_6n_plus_2_is_rejected(depth):
    with pytest.raises(ValueError, match="depth"):
        create_model("resnet20", depth=depth)


def test_depth_and_layers_are_exclusive():
    with pytest.raises(ValueError, match="depth"):
        create_model("resnet20", layers=[3, 3, 3])
    model = create_model("resnet20", depth=None, layers=[1, 2, 3])
    assert [len(s) for s in (model.layer1, model.layer2, model.layer3)] == [1, 2, 3]


@pytest.mark.parametrize(
    ("overrides", "argument"),
    [
        ({"block": "triple"}, "block"),
        ({"stem": "mnist"}, "stem"),
        ({"shortcut": "identity"}, "shortcut"),
        ({"norm": "instance"}, "norm"),
        ({"groups": 2}, "groups"),
        ({"depth": None, "layers": [3, 3]}, "layers"),
        ({"drop_path_mode": "linear"}, "drop_path_mode"),
        ({"drop_block_stages": [4]}, "drop_block_stages"),
    ],
)
def test_impossible_configurations_name_the_argument(overrides, argument):
    with pytest.raises(ValueError, match=argument):
        create_model("resnet20", **overrides)


@pytest.mark.parametrize("argument", ["drop_path_rate", "drop_block", "dropout"])
@pytest.mark.parametrize("value", [1.0, -0.1, 1.5])
def test_probabilities_outside_unit_interval_are_rejected(argument, value):
    with pytest.raises(ValueError, match=argument):
        create_model("resnet20", **{argument: value})


def test_group_norm_at_default_groups_fits_16_channels():
    # G=32 does not divide the 16/32/64 widths of resnet20: 16 channels take 16 groups.
    model = create_model("resnet20", norm="group")
    groups = {m.num_channels: m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)}
    assert groups == {16: 16, 32: 32, 64: 32}
    with pytest.raises(ValueError, match="--norm-groups"):
        create_model("resnet20", norm="group", norm_groups=0)


@pytest.mark.parametrize(
    ("norm", "groups", "expected"),
    [("group", 8, 8), ("layer", 32, 1)],
)
def test_group_and_layer_norm_replace_batch_norm_everywhere(norm, groups, expected):
    model = create_model("resnet20", norm=norm, norm_groups=groups)
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    # 1 stem norm + 9 blocks x 2 norms.
    assert len(norms) == 19 and {m.num_groups for m in norms} == {expected}
    forward_backward(model, torch.randn(2, 3, 32, 32))


def test_group_norm_keeps_torchvision_names():
    with torch.device("meta"):
        keys = set(create_model("resnet18", norm="group").state_dict())
    assert {"bn1.weight", "layer2.0.downsample.1.weight", "layer4.1.bn2.bias"} <= keys
    assert not any("running_mean" in k for k in keys)


def test_no_norm_uses_conv_biases():
    model = create_model("resnet20", norm="none")
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) for m in model.modules())
    assert all(m.bias is not None for m in model.modules() if isinstance(m, nn.Conv2d))
    forward_backward(model, torch.randn(2, 3, 32, 32))


def test_survival_probabilities_decay_linearly_over_all_blocks():
    model = create_model("resnet20", drop_path_rate=0.5)
    depth_modules = [m for m in model.modules() if isinstance(m, StochasticDepth)]
    # L = 9 blocks over 3 stages; Huang et al. eq. 4: p_l = 1 - l / L * (1 - p_L).
    assert [m.survival_prob for m in depth_modules] == pytest.approx(
        [1 - b / 9 * 0.5 for b in range(1, 10)]
    )
    assert depth_modules[-1].survival_prob == pytest.approx(0.5)


def test_stochastic_depth_is_random_in_training_and_deterministic_in_eval():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    model = create_model("resnet20", drop_path_rate=0.9, drop_path_mode="paper")
    model.train()
    with torch.no_grad():
        train_outputs = [model(x) for _ in range(3)]
    assert not torch.allclose(train_outputs[0], train_outputs[1])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x))
    # Control: without stochastic depth two training passes agree (BN uses batch statistics).
    plain = create_model("resnet20").train()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), plain(x))


def test_paper_mode_scales_the_branch_by_survival_probability_at_inference():
    spec = BlockSpec("batch", 32, "zero_pad", 1, 64, "paper", 0.0, 3)
    block = BasicBlock(8, 8, 1, spec, survival_prob=0.3).eval()
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        expected = torch.relu(0.3 * block.branch(x) + x)
        torch.testing.assert_close(block(x), expected)


def test_drop_block_sits_in_the_last_two_stages_and_is_schedulable():
    model = create_model("resnet50", drop_block=0.1)
    owners = {name.split(".")[0] for name, m in model.named_modules() if isinstance(m, DropBlock2d)}
    assert owners == {"layer3", "layer4"}
    assert set_drop_block(model, 0.05) == 6 + 3  # one per block of layer3 and layer4
    only_last = create_model("resnet50", drop_block=0.1, drop_block_stages=[4])
    assert set_drop_block(only_last, 0.1) == 3


def test_drop_block_changes_training_output_only():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    model = create_model("resnet20", drop_block=0.3)
    reference = create_model("resnet20")
    reference.load_state_dict(model.state_dict())
    model.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))
        model.train(), reference.train()
        assert not torch.allclose(model(x), reference(x))


def test_dropout_before_the_classifier():
    model = create_model("resnet20", dropout=0.5)
    assert isinstance(model.head_dropout, nn.Dropout) and model.head_dropout.p == 0.5
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x))


def test_zero_init_residual_starts_blocks_as_identity():
    model = create_model("resnet50", zero_init_residual=True)
    assert all((b.bn3.weight == 0).all() for s in (model.layer1, model.layer4) for b in s)
    assert (model.bn1.weight == 1).all()


def test_in_chans_and_num_classes():
    model = create_model("resnet20", in_chans=1, num_classes=100)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 100)


def test_config_survives_json_and_rebuilds_the_same_model():
    with torch.device("meta"):
        model = create_model("resnext29_8x64d", drop_path_rate=0.1)
    config = json.loads(json.dumps(model.cnnkit_config))
    with torch.device("meta"):
        rebuilt = ResNet(**config["kwargs"])
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes
