"""DenseNet: published parameter counts, torchvision's state_dict layout, regularizers, errors."""

import json

import pytest
import torch
from torch import nn

from cnnkit.layers.regularize import DropBlock2d, StochasticDepth, set_drop_block
from cnnkit.models import count_parameters, create_model, list_models
from cnnkit.models.densenet import DenseNet


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The test machines are small and shared: one intra-op thread avoids OpenMP contention.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# DESIGN.md reference figures: torchvision's counts (ImageNet, 1000 classes) and the
# DenseNet-BC counts of Huang et al. (CIFAR, 10 classes).
EXPECTED_PARAMS = {
    "densenet121": 7_978_856,
    "densenet161": 28_681_000,
    "densenet169": 14_149_480,
    "densenet201": 20_013_928,
    "densenet_bc_100_12": 769_162,
    "densenet_bc_250_24": 15_324_406,
    "densenet_bc_190_40": 25_624_430,
}


def test_every_variant_is_registered():
    assert set(list_models("densenet")) == set(EXPECTED_PARAMS)


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_parameter_count_is_exact(name):
    with torch.device("meta"):
        model = create_model(name)
    assert count_parameters(model) == EXPECTED_PARAMS[name]


def torchvision_densenet_layout(growth, blocks, init, bn_size=4, classes=1000):
    """torchvision's DenseNet state_dict (name -> shape), derived from its naming scheme."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

    def norm(prefix, c):
        return {f"{prefix}.{k}": (() if k == "num_batches_tracked" else (c,)) for k in bn}

    keys = {"features.conv0.weight": (init, 3, 7, 7), **norm("features.norm0", init)}
    c = init
    for b, n in enumerate(blocks, start=1):
        for i in range(1, n + 1):
            p = f"features.denseblock{b}.denselayer{i}"
            cin = c + (i - 1) * growth
            keys |= norm(f"{p}.norm1", cin)
            keys[f"{p}.conv1.weight"] = (bn_size * growth, cin, 1, 1)
            keys |= norm(f"{p}.norm2", bn_size * growth)
            keys[f"{p}.conv2.weight"] = (growth, bn_size * growth, 3, 3)
        c += n * growth
        if b < len(blocks):
            keys |= norm(f"features.transition{b}.norm", c)
            keys[f"features.transition{b}.conv.weight"] = (c // 2, c, 1, 1)
            c //= 2
    keys |= norm("features.norm5", c)
    keys |= {"classifier.weight": (classes, c), "classifier.bias": (classes,)}
    return keys


def test_densenet121_state_dict_matches_torchvision_layout():
    with torch.device("meta"):
        model = create_model("densenet121")
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = torchvision_densenet_layout(32, [6, 12, 24, 16], 64)
    # torchvision 0.29.1's densenet121().state_dict() has 727 entries (checked in the peers env).
    assert len(expected) == 727
    assert list(ours) == list(expected)
    assert ours == expected


@pytest.mark.parametrize(
    "name, growth, blocks, init",
    [("densenet161", 48, [6, 12, 36, 24], 96), ("densenet201", 32, [6, 12, 48, 32], 64)],
)
def test_other_imagenet_densenets_match_torchvision_layout(name, growth, blocks, init):
    with torch.device("meta"):
        model = create_model(name)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == torchvision_densenet_layout(growth, blocks, init)


@pytest.mark.parametrize(
    "name, shape",
    [
        ("densenet_bc_100_12", (2, 3, 32, 32)),
        # The two large CIFAR models on 16x16 inputs to keep CPU time small; same layers.
        ("densenet_bc_250_24", (2, 3, 16, 16)),
        ("densenet_bc_190_40", (2, 3, 16, 16)),
        ("densenet121", (1, 3, 64, 64)),
        ("densenet161", (1, 3, 64, 64)),
        ("densenet169", (1, 3, 64, 64)),
        ("densenet201", (1, 3, 64, 64)),
    ],
)
def test_forward_backward(name, shape):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7)
    x = torch.randn(shape)
    logits = model(x)
    assert logits.shape == (shape[0], 7)
    logits.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.features.conv0.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name, size", [("densenet_bc_100_12", 32), ("densenet121", 64)])
def test_stages_expose_channels_and_strides(name, size):
    model = create_model(name).eval()
    x = torch.randn(1, 3, size, size)
    stages = model.forward_stages(x)
    assert [s.shape[1] for s in stages] == model.stage_channels
    assert [size // s.shape[-1] for s in stages] == model.stage_strides
    assert model.stage_channels[-1] == model.num_features
    features = model.forward_features(x)
    torch.testing.assert_close(features, torch.relu(model.features[-1](stages[-1])))
    torch.testing.assert_close(model(x), model.classifier(features.mean((2, 3))))


def test_cifar_layout_follows_the_paper():
    # DenseNet-BC-100 (k=12): 3 blocks of (100 - 4) / 6 = 16 bottleneck layers; stem 2k = 24;
    # channels 24 + 16*12 = 216 -> 108 -> 108 + 192 = 300 -> 150 -> 150 + 192 = 342.
    model = create_model("densenet_bc_100_12")
    assert model.features.conv0.weight.shape == (24, 3, 3, 3)
    assert model.stage_channels == [216, 300, 342] and model.stage_strides == [1, 2, 4]
    assert len(model.features.denseblock1) == 16
    assert model.features.denseblock2.denselayer1.conv1.weight.shape == (48, 108, 1, 1)


def test_basic_densenet_without_bottleneck_or_compression():
    # DenseNet (L=40, k=12) of the paper: 3 blocks of 12 layers, 16-channel stem, 1.0M params.
    model = DenseNet(
        growth_rate=12, depth=40, num_init_features=16, bottleneck=False, compression=1.0,
        stem="cifar", num_classes=10,
    )  # fmt: skip
    assert model.stage_channels == [160, 304, 448]
    assert abs(count_parameters(model) - 1.0e6) < 0.05e6
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_drop_path_decays_linearly_over_all_dense_layers():
    model = create_model("densenet_bc_100_12", drop_path_rate=0.5)
    probs = [m.survival_prob for m in model.modules() if isinstance(m, StochasticDepth)]
    total = 48
    assert probs == pytest.approx([1 - k / total * 0.5 for k in range(1, total + 1)])


def test_drop_path_is_stochastic_in_training_and_deterministic_in_eval():
    torch.manual_seed(0)
    model = DenseNet(growth_rate=4, depth=16, stem="cifar", num_classes=3, drop_path_rate=0.5)
    x = torch.randn(4, 3, 16, 16)
    model.train()
    assert not torch.allclose(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_drop_block_goes_to_the_last_two_blocks_by_default():
    model = create_model("densenet_bc_100_12", drop_block=0.1)
    assert set_drop_block(model, 0.05) == 32  # 16 dense layers in each of blocks 2 and 3
    for name, m in model.named_modules():
        if isinstance(m, DropBlock2d):
            assert not name.startswith("features.denseblock1.") and m.block_size == 3
    assert set_drop_block(create_model("densenet121", drop_block_stages=[4]), 0.1) == 16
    assert create_model("densenet121", drop_block=0.1).features.denseblock4.denselayer1.drop_block
    assert set_drop_block(create_model("densenet121"), 0.1) == 24 + 16  # blocks 3, 4


@pytest.mark.parametrize("norm, groups", [("group", 4), ("layer", 32), ("none", 32)])
def test_other_norms_build_and_run(norm, groups):
    model = DenseNet(growth_rate=4, depth=16, stem="cifar", norm=norm, norm_groups=groups)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 1000)


def test_config_round_trips_through_json():
    model = create_model("densenet_bc_100_12", drop_path_rate=0.1)
    kwargs = json.loads(json.dumps(model.cnnkit_config["kwargs"]))
    rebuilt = DenseNet(**kwargs)
    assert rebuilt.stage_channels == model.stage_channels
    assert count_parameters(rebuilt) == count_parameters(model)


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"depth": 101}, "depth"),
        ({"depth": 7}, "depth"),
        ({"depth": 100, "block_config": [6, 6]}, "depth"),
        ({"block_config": []}, "block_config"),
        ({"block_config": [6, 0]}, "block_config"),
        ({"depth": 100, "compression": 0.0}, "compression"),
        ({"depth": 100, "stem": "tiny"}, "stem"),
        ({"depth": 100, "drop_path_rate": 1.0}, "drop_path_rate"),
        ({"depth": 100, "drop_block": -0.1}, "drop_block"),
        ({"depth": 100, "dropout": 1.5}, "dropout"),
        ({"depth": 100, "drop_rate": 1.0}, "drop_rate"),
        ({"depth": 100, "norm": "instance"}, "norm"),
        ({"depth": 100, "growth_rate": 0}, "growth_rate"),
        ({"depth": 100, "drop_block_stages": [5]}, "drop_block_stages"),
    ],
)
def test_invalid_configurations_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        DenseNet(**{"stem": "cifar", **kwargs})


def test_group_norm_fits_channel_counts_that_32_does_not_divide():
    # DenseNet-BC-100-12: a 24-channel stem, then 24 + 12k channels; each GroupNorm takes the
    # largest divisor of its channels not above G=32 (24 -> 24, 36 -> 18, 48 -> 24, 60 -> 30).
    model = create_model("densenet_bc_100_12", norm="group")
    groups = {m.num_channels: m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)}
    assert groups[24] == 24 and groups[36] == 18 and groups[48] == 24 and groups[60] == 30
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="--norm-groups"):
        create_model("densenet_bc_100_12", norm="group", norm_groups=0)
