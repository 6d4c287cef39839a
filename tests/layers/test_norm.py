"""make_norm against torch's functional normalizations and hand-computed statistics."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.layers.norm import NORMS, FrozenBatchNorm2d, make_norm


@pytest.fixture
def x() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(3, 8, 5, 7) * 3.0 + 1.5


def test_group_norm_with_one_group_is_layer_norm_over_chw(x):
    expected = F.layer_norm(x, x.shape[1:], eps=1e-5)  # no affine = identity affine
    for norm in (make_norm("group", 8, groups=1), make_norm("layer", 8)):
        torch.testing.assert_close(norm(x), expected, atol=1e-5, rtol=1e-5)


def test_group_norm_with_one_group_per_channel_is_instance_norm(x):
    expected = F.instance_norm(x, eps=1e-5)
    torch.testing.assert_close(make_norm("group", 8, groups=8)(x), expected, atol=1e-5, rtol=1e-5)


def test_group_norm_statistics_by_hand(x):
    # Brute force: each (sample, group of C/G channels) is normalized by its own mean and
    # biased variance over (C/G, H, W).
    groups = 4
    out = make_norm("group", 8, groups=groups)(x)
    expected = torch.empty_like(x)
    per = 8 // groups
    for n in range(x.shape[0]):
        for g in range(groups):
            chunk = x[n, g * per : (g + 1) * per]
            mean = chunk.mean()
            var = ((chunk - mean) ** 2).mean()
            expected[n, g * per : (g + 1) * per] = (chunk - mean) / torch.sqrt(var + 1e-5)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_layer_norm_is_per_sample_not_per_batch(x):
    # Scaling one sample must not change another's output (unlike BatchNorm in training).
    norm = make_norm("layer", 8)
    y = x.clone()
    y[0] *= 100.0
    torch.testing.assert_close(norm(y)[1:], norm(x)[1:])


def test_batch_norm_normalizes_each_channel_over_batch_and_space(x):
    norm = make_norm("batch", 8).train()
    out = norm(x)
    torch.testing.assert_close(out.mean((0, 2, 3)), torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var((0, 2, 3), unbiased=False), torch.ones(8), atol=1e-3, rtol=0)


def test_none_is_identity(x):
    norm = make_norm("none", 8)
    assert not list(norm.parameters())
    assert torch.equal(norm(x), x)


def test_every_norm_has_per_channel_affine_or_none():
    for name in NORMS:
        norm = make_norm(name, 64)
        n_params = sum(p.numel() for p in norm.parameters())
        # Frozen BatchNorm keeps its affine (and statistics) as buffers: nothing to learn.
        assert n_params == (0 if name in ("none", "frozen_batch") else 2 * 64), name
    assert isinstance(make_norm("group", 64), nn.GroupNorm)
    assert make_norm("group", 64).num_groups == 32  # Wu & He's default G=32


def test_unknown_norm_is_refused():
    with pytest.raises(ValueError, match="norm='instance'"):
        make_norm("instance", 8)


@pytest.mark.parametrize(
    "channels, groups, expected",
    [
        (48, 32, 24),  # divisors of 48 up to 32: ..., 16, 24 -> 24
        (16, 32, 16),  # fewer channels than groups: one channel per group
        (64, 32, 32),  # Wu & He's G=32 where it divides
        (24, 32, 24),  # DenseNet-BC-100-12's stem
        (17, 32, 17),  # a prime above nothing but 1 and itself: instance norm
        (34, 32, 17),  # 34 = 2 * 17: 17 is the largest divisor <= 32
        (10, 4, 2),  # divisors of 10 up to 4: 1, 2
        (8, 1, 1),  # --norm-groups 1 is layer norm everywhere
    ],
)
def test_group_count_is_the_largest_divisor_not_above_norm_groups(channels, groups, expected):
    norm = make_norm("group", channels, groups=groups)
    assert norm.num_groups == expected
    assert channels % norm.num_groups == 0
    assert norm(torch.randn(2, channels, 3, 3)).shape == (2, channels, 3, 3)


@pytest.mark.parametrize("groups", [0, -4])
def test_non_positive_groups_name_the_flag(groups):
    with pytest.raises(ValueError, match="--norm-groups") as err:
        make_norm("group", 16, groups=groups)
    assert str(groups) in str(err.value)


def test_every_registered_classifier_builds_with_group_norm_at_default_groups():
    from cnnkit.models.registry import create_model, list_models

    names = list_models()
    assert len(names) > 20
    with torch.device("meta"):  # shapes only: the big ImageNet models cost no memory
        for name in names:
            model = create_model(name, norm="group")
            groups = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
            assert groups, name
            for m in groups:
                assert m.num_channels % m.num_groups == 0, name
                assert m.num_groups <= 32, name


def _trained_batch_norm(channels: int) -> nn.BatchNorm2d:
    torch.manual_seed(1)
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
    bn.train()
    for _ in range(3):  # non-trivial running statistics
        bn(torch.randn(4, channels, 6, 6) * 2.0 + 0.7)
    return bn.eval()


def test_frozen_batch_norm_equals_eval_mode_batch_norm(x):
    bn = _trained_batch_norm(8)
    assert int(bn.num_batches_tracked) == 3
    frozen = make_norm("frozen_batch", 8)
    assert isinstance(frozen, FrozenBatchNorm2d)
    frozen.load_state_dict(bn.state_dict())  # same keys; num_batches_tracked ignored
    assert not list(frozen.parameters())
    assert sorted(frozen.state_dict()) == ["bias", "running_mean", "running_var", "weight"]
    frozen.train()  # training mode changes nothing: statistics are frozen
    torch.testing.assert_close(frozen(x), bn(x), atol=1e-5, rtol=1e-5)
    # By hand: (x - mean) / sqrt(var + 1e-5) * weight + bias per channel.
    c = 5
    expected = (x[:, c] - bn.running_mean[c]) / torch.sqrt(bn.running_var[c] + 1e-5)
    expected = expected * bn.weight[c] + bn.bias[c]
    torch.testing.assert_close(frozen(x)[:, c], expected.detach(), atol=1e-5, rtol=1e-5)
    before = frozen.running_mean.clone()
    frozen(x * 10)
    assert torch.equal(frozen.running_mean, before)


def test_resnet_builds_and_runs_with_frozen_batch_norm():
    from cnnkit.models.registry import create_model

    model = create_model("resnet18", norm="frozen_batch", widths=[8, 8, 16, 16], num_classes=3)
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
