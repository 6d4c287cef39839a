"""Matcher thresholds and low-quality matches by hand; BalancedSampler counts and randomness."""

import pytest
import torch

from cnnkit.detection.matching import BELOW_LOW, BETWEEN, BalancedSampler, Matcher


def test_thresholds_are_inclusive_at_high_and_low():
    iou = torch.tensor(
        [
            [0.70, 0.30, 0.29, 0.69, 0.10],
            [0.10, 0.20, 0.00, 0.00, 0.95],
        ]
    )
    matches = Matcher(0.7, 0.3, allow_low_quality_matches=False)(iou)
    assert matches.tolist() == [0, BETWEEN, BELOW_LOW, BETWEEN, 1]
    assert matches.dtype == torch.int64


def test_low_quality_matches_take_every_tie():
    # gt 1's best IoU is 0.4, reached by predictions 1 and 3 (a tie): both become matches.
    iou = torch.tensor(
        [
            [0.90, 0.00, 0.10, 0.00],
            [0.00, 0.40, 0.20, 0.40],
        ]
    )
    without = Matcher(0.7, 0.3, allow_low_quality_matches=False)(iou)
    assert without.tolist() == [0, BETWEEN, BELOW_LOW, BETWEEN]
    with_low = Matcher(0.7, 0.3, allow_low_quality_matches=True)(iou)
    assert with_low.tolist() == [0, 1, BELOW_LOW, 1]


def test_low_quality_match_keeps_the_predictions_own_best_gt():
    # Prediction 0 is gt 1's best (0.5) but overlaps gt 0 more (0.6): as torchvision, it is
    # matched to gt 0, its own argmax.
    iou = torch.tensor([[0.6, 0.9], [0.5, 0.1]])
    assert Matcher(0.7, 0.3, True)(iou).tolist() == [0, 0]


def test_ground_truth_overlapping_nothing_claims_nothing():
    iou = torch.tensor([[0.0, 0.0, 0.0], [0.8, 0.1, 0.0]])
    assert Matcher(0.7, 0.3, True)(iou).tolist() == [1, BELOW_LOW, BELOW_LOW]


def test_no_ground_truth_means_all_below_low():
    matches = Matcher(0.7, 0.3, True)(torch.zeros(0, 5))
    assert matches.tolist() == [BELOW_LOW] * 5
    assert Matcher(0.7, 0.3, True)(torch.zeros(2, 0)).shape == (0,)


def test_matcher_rejects_bad_thresholds():
    with pytest.raises(ValueError, match="low=0.8"):
        Matcher(0.5, 0.8, True)


def _labels(pos: int, neg: int, ignored: int) -> torch.Tensor:
    labels = torch.tensor([1] * pos + [0] * neg + [-1] * ignored)
    return labels[torch.randperm(labels.numel())]


@pytest.mark.parametrize(
    "pos, neg, expected_pos, expected_neg",
    [
        (10, 100, 4, 12),  # plenty of both: fraction 0.25 of 16 positives
        (2, 100, 2, 14),  # few positives: negatives fill the batch
        (10, 3, 4, 3),  # few negatives: the batch is not filled
        (0, 0, 0, 0),
    ],
)
def test_sampler_counts(pos, neg, expected_pos, expected_neg):
    torch.manual_seed(0)
    labels = _labels(pos, neg, 7)
    labels[labels == 1] = 3  # any label >= 1 is a positive
    (p,), (n,) = BalancedSampler(16, 0.25)([labels])
    assert p.dtype == torch.bool and p.shape == labels.shape
    assert int(p.sum()) == expected_pos and int(n.sum()) == expected_neg
    assert (labels[p] >= 1).all() and (labels[n] == 0).all()


def test_sampler_per_image_and_seeded():
    labels = [_labels(30, 30, 0), _labels(1, 5, 2)]
    sampler = BalancedSampler(8, 0.5)
    torch.manual_seed(1)
    first = sampler(labels)
    torch.manual_seed(1)
    again = sampler(labels)
    for a, b in zip(first[0] + first[1], again[0] + again[1], strict=True):
        assert torch.equal(a, b)
    assert [int(m.sum()) for m in first[0]] == [4, 1]
    assert [int(m.sum()) for m in first[1]] == [4, 5]


def test_sampler_draws_uniformly():
    # 10 positives, 5 drawn per call: each is picked with probability 1/2.
    labels = torch.tensor([1] * 10)
    sampler = BalancedSampler(10, 0.5)
    torch.manual_seed(0)
    counts = sum(sampler([labels])[0][0].long() for _ in range(400))
    assert int(counts.sum()) == 2000
    assert counts.min() > 150 and counts.max() < 250
