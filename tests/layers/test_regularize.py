"""Stochastic depth and DropBlock, measured against their papers' definitions."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from cnnkit.layers import regularize
from cnnkit.layers.regularize import (
    DropBlock2d,
    StochasticDepth,
    check_probability,
    drop_block_stage_indices,
    set_drop_block,
    survival_probs,
)

# --- check_probability and survival_probs -----------------------------------------------------


@pytest.mark.parametrize("value", [0, 0.0, 0.5, 0.999])
def test_check_probability_accepts_the_half_open_unit_interval(value):
    assert check_probability(value, "p") == float(value)


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5, float("nan")])
def test_check_probability_names_the_argument(value):
    with pytest.raises(ValueError, match="drop_path_rate"):
        check_probability(value, "drop_path_rate")


def test_check_probability_refuses_non_numbers():
    with pytest.raises(TypeError, match="dropout"):
        check_probability("0.1", "dropout")


def test_survival_probs_by_hand():
    # Huang et al. eq. 4 with p_L = 0.5, L = 4: p_l = 1 - l/4 * 0.5.
    assert survival_probs(0.5, 4) == pytest.approx([0.875, 0.75, 0.625, 0.5])
    # ResNet-110 (54 blocks) with p_L = 0.5: the paper's setting; first and last block.
    probs = survival_probs(0.5, 54)
    assert probs[0] == pytest.approx(1 - 0.5 / 54) and probs[-1] == pytest.approx(0.5)
    assert survival_probs(0.0, 3) == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="drop_path_rate"):
        survival_probs(1.0, 3)


# --- StochasticDepth -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["paper", "inverted"])
def test_measured_survival_rate_per_block_matches_p_l(mode):
    torch.manual_seed(1)
    n = 20000
    for p in survival_probs(0.5, 4):
        sd = StochasticDepth(p, mode).train()
        out = sd(torch.ones(n, 2, 3, 3))
        kept = out.flatten(1).ne(0)
        # A sample's branch is kept or dropped as a whole.
        assert torch.equal(kept.all(1), kept.any(1))
        rate = kept.all(1).double().mean().item()
        sigma = math.sqrt(p * (1 - p) / n)
        assert abs(rate - p) < 5 * sigma, (p, rate)
        expected_value = 1.0 / p if mode == "inverted" else 1.0
        assert torch.allclose(out[kept.all(1)], torch.tensor(expected_value))


def test_both_modes_have_the_same_expectation():
    # For each mode, the training-time mean of the branch equals its inference-time output, and
    # the paper's branch is the inverted one scaled by p: the two train the same function.
    torch.manual_seed(2)
    p, draws = 0.7, 40000
    f = torch.randn(1, 5)
    batch = f.expand(draws, 5)
    means = {}
    for mode in ("paper", "inverted"):
        sd = StochasticDepth(p, mode)
        train_mean = sd.train()(batch).mean(0)
        eval_out = sd.eval()(f)[0]
        scale = (1.0 / p if mode == "inverted" else 1.0) * f.abs()[0]
        tol = 5 * math.sqrt(p * (1 - p) / draws) * scale
        assert torch.all((train_mean - eval_out).abs() < tol), mode
        means[mode] = train_mean
    sigma = 5 * math.sqrt(p * (1 - p) / draws) * f.abs()[0]
    assert torch.all((means["inverted"] * p - means["paper"]).abs() < 2 * sigma)


def test_stochastic_depth_eval_is_deterministic():
    x = torch.randn(8, 3, 4, 4)
    paper = StochasticDepth(0.6, "paper").eval()
    inverted = StochasticDepth(0.6, "inverted").eval()
    assert torch.equal(paper(x), paper(x))
    torch.testing.assert_close(paper(x), 0.6 * x)
    assert torch.equal(inverted(x), x)


def test_stochastic_depth_keeps_everything_when_p_is_one():
    x = torch.randn(16, 4)
    assert torch.equal(StochasticDepth(1.0).train()(x), x)


def test_stochastic_depth_gradient_flows_only_through_kept_samples():
    torch.manual_seed(3)
    x = torch.ones(64, 3, requires_grad=True)
    out = StochasticDepth(0.5, "inverted").train()(x)
    out.sum().backward()
    kept = out[:, 0] != 0
    torch.testing.assert_close(x.grad[kept], torch.full_like(x.grad[kept], 2.0))
    assert torch.all(x.grad[~kept] == 0)


def test_stochastic_depth_bad_arguments():
    with pytest.raises(ValueError, match="survival_prob"):
        StochasticDepth(0.0)
    with pytest.raises(ValueError, match="survival_prob"):
        StochasticDepth(1.2)
    with pytest.raises(ValueError, match="mode='scaled'"):
        StochasticDepth(0.5, mode="scaled")


# --- DropBlock -----------------------------------------------------------------------------------


def dropped_is_union_of_full_squares(zero: np.ndarray, bh: int, bw: int) -> bool:
    """Brute force: every zero pixel lies in some all-zero bh x bw window inside the map."""
    h, w = zero.shape
    covered = np.zeros_like(zero)
    for i in range(h - bh + 1):
        for j in range(w - bw + 1):
            if zero[i : i + bh, j : j + bw].all():
                covered[i : i + bh, j : j + bw] = True
    return bool((covered == zero).all())


@pytest.mark.parametrize(
    "shape, block_size, drop_prob",
    [((4, 3, 256, 256), 7, 0.1), ((4, 3, 256, 256), 5, 0.05), ((4, 3, 128, 256), 7, 0.1)],
)
def test_dropblock_measured_drop_fraction_matches_drop_prob(shape, block_size, drop_prob):
    torch.manual_seed(4)
    db = DropBlock2d(block_size, drop_prob).train()
    fractions = [(db(torch.ones(shape)) == 0).float().mean().item() for _ in range(3)]
    assert abs(np.mean(fractions) - drop_prob) < 0.02, fractions


def test_dropblock_gamma_and_valid_seed_region_reconstructed_from_seeds():
    # Replay the uniform draws and rebuild the mask by hand from eq. 1 of Ghiasi et al.:
    # seeds where u < gamma in the (H - bs + 1) x (W - bs + 1) valid region, each seed the
    # top-left corner of a dropped bs x bs square.
    n, h, w, bs, drop_prob = 2, 40, 30, 5, 0.15
    gamma = drop_prob / bs**2 * (h * w) / ((h - bs + 1) * (w - bs + 1))
    db = DropBlock2d(bs, drop_prob).train()
    torch.manual_seed(5)
    out = db(torch.ones(n, 3, h, w))
    torch.manual_seed(5)
    seeds = (torch.rand(n, 1, h - bs + 1, w - bs + 1) < gamma).numpy()
    expected = np.ones((n, h, w), dtype=bool)
    for s, _, i, j in zip(*np.nonzero(seeds), strict=True):
        expected[s, i : i + bs, j : j + bs] = False
    assert seeds.sum() > 3  # the test exercises several (possibly overlapping) blocks
    for c in range(3):
        assert np.array_equal(out[:, c].numpy() != 0, expected)


@pytest.mark.parametrize("seed_at", ["top_left", "bottom_right", "middle"])
def test_dropblock_single_seed_drops_one_exact_square_inside_the_map(monkeypatch, seed_at):
    n, h, w, bs = 1, 12, 10, 4
    region = (h - bs + 1, w - bs + 1)
    i, j = {"top_left": (0, 0), "bottom_right": (region[0] - 1, region[1] - 1), "middle": (4, 3)}[
        seed_at
    ]

    def one_seed(*size, **kwargs):
        u = torch.ones(*size, **kwargs)
        assert tuple(size[-2:]) == region  # seeds only where a whole block fits
        u[..., i, j] = 0.0
        return u

    monkeypatch.setattr(regularize.torch, "rand", one_seed)
    out = DropBlock2d(bs, 0.1).train()(torch.ones(n, 2, h, w))
    zero = (out[0, 0] == 0).numpy()
    rows, cols = np.nonzero(zero)
    assert zero.sum() == bs * bs
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (i, i + bs - 1, j, j + bs - 1)


def test_dropblock_regions_are_full_squares_shared_across_channels():
    torch.manual_seed(6)
    bs = 3
    out = DropBlock2d(bs, 0.2).train()(torch.ones(3, 4, 24, 20))
    zero = (out == 0).numpy()
    assert zero.any()
    for n in range(3):
        for c in range(1, 4):
            assert np.array_equal(zero[n, c], zero[n, 0])  # one mask for all channels
        assert dropped_is_union_of_full_squares(zero[n, 0], bs, bs)


def test_dropblock_renormalizes_by_count_over_count_ones():
    torch.manual_seed(7)
    x = torch.rand(4, 3, 128, 128) + 0.5
    out = DropBlock2d(7, 0.1).train()(x)
    kept = out != 0
    scale = kept.numel() / kept.sum().item()
    torch.testing.assert_close(out[kept], x[kept] * scale)
    assert abs(out.mean().item() - x.mean().item()) < 0.01 * x.mean().item()


def test_dropblock_is_identity_in_eval_and_at_zero_probability():
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(DropBlock2d(3, 0.3).eval()(x), x)
    assert torch.equal(DropBlock2d(3, 0.0).train()(x), x)


def test_dropblock_larger_than_map_is_clamped_to_the_map():
    # A 7x7 block on a 4x4 map becomes a 4x4 block: each sample is kept or dropped whole.
    torch.manual_seed(8)
    out = DropBlock2d(7, 0.5).train()(torch.ones(64, 2, 4, 4))
    zero = (out == 0).flatten(1)
    assert torch.equal(zero.all(1), zero.any(1))
    assert 0 < zero.all(1).sum() < 64


def test_drop_prob_is_settable_and_validated():
    model = nn.Sequential(
        nn.Conv2d(3, 3, 1), DropBlock2d(3), nn.Sequential(nn.ReLU(), DropBlock2d(5, 0.1))
    )
    assert set_drop_block(model, 0.05) == 2
    assert [m.drop_prob for m in model.modules() if isinstance(m, DropBlock2d)] == [0.05, 0.05]
    with pytest.raises(ValueError, match="drop_prob"):
        set_drop_block(model, 1.0)
    with pytest.raises(ValueError, match="drop_prob"):
        DropBlock2d(3, -0.1)
    with pytest.raises(ValueError, match="block_size"):
        DropBlock2d(0, 0.1)
    assert set_drop_block(nn.Linear(2, 2), 0.1) == 0


def test_drop_block_stage_indices():
    assert drop_block_stage_indices(None, 4) == [3, 4]
    assert drop_block_stage_indices(None, 3) == [2, 3]
    assert drop_block_stage_indices([1, 1, 3], 3) == [1, 3]
    with pytest.raises(ValueError, match="drop_block_stages"):
        drop_block_stage_indices([4], 3)
