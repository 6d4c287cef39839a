"""make_norm against torch's functional normalizations and hand-computed statistics."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.layers.norm import NORMS, make_norm


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
        assert n_params == (0 if name == "none" else 2 * 64), name
    assert isinstance(make_norm("group", 64), nn.GroupNorm)
    assert make_norm("group", 64).num_groups == 32  # Wu & He's default G=32


def test_unknown_norm_is_refused():
    with pytest.raises(ValueError, match="norm='instance'"):
        make_norm("instance", 8)


@pytest.mark.parametrize("channels, groups", [(24, 32), (10, 4), (8, 0)])
def test_indivisible_group_norm_names_norm_groups(channels, groups):
    with pytest.raises(ValueError, match="norm_groups") as err:
        make_norm("group", channels, groups=groups)
    assert str(channels) in str(err.value)
