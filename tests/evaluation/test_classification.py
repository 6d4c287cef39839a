"""Classification metrics against brute-force loops and scikit-learn as oracle."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from cnnkit.evaluation.classification import accuracy, confusion_matrix, per_class_accuracy, topk


@st.composite
def predictions(draw):
    k = draw(st.integers(1, 6))
    n = draw(st.integers(1, 40))
    preds = draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n))
    labels = draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n))
    return k, torch.tensor(preds), torch.tensor(labels)


@pytest.mark.filterwarnings("ignore:A single label was found")
@settings(max_examples=60, deadline=None)
@given(predictions())
def test_confusion_matrix_matches_sklearn_and_a_loop(case):
    k, preds, labels = case
    matrix = confusion_matrix(preds, labels, k)
    assert matrix.dtype == torch.int64 and matrix.shape == (k, k)
    oracle = sk_confusion_matrix(labels.numpy(), preds.numpy(), labels=list(range(k)))
    assert matrix.tolist() == oracle.tolist()  # sklearn: rows = true, columns = predicted
    loop = [[0] * k for _ in range(k)]
    for p, t in zip(preds.tolist(), labels.tolist(), strict=True):
        loop[t][p] += 1
    assert matrix.tolist() == loop


@settings(max_examples=60, deadline=None)
@given(predictions())
def test_accuracy_and_per_class_accuracy_by_counting(case):
    k, preds, labels = case
    n = len(labels)
    correct = sum(int(p == t) for p, t in zip(preds.tolist(), labels.tolist(), strict=True))
    assert accuracy(preds, labels) == pytest.approx(correct / n)
    per_class = per_class_accuracy(confusion_matrix(preds, labels, k))
    for c in range(k):
        members = [p for p, t in zip(preds.tolist(), labels.tolist(), strict=True) if t == c]
        if members:
            assert per_class[c].item() == pytest.approx(sum(p == c for p in members) / len(members))
        else:
            assert math.isnan(per_class[c].item())


def test_accuracy_from_logits_takes_the_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0], [0.0, 0.0, 5.0], [1.0, 0.9, 0.8]])
    labels = torch.tensor([1, 0, 1, 2])
    assert accuracy(logits, labels) == 0.5
    assert confusion_matrix(logits, labels, 3).tolist() == [[1, 0, 0], [0, 1, 1], [1, 0, 0]]


def test_topk_probabilities():
    logits = torch.tensor([[0.0, math.log(3.0), math.log(6.0)], [5.0, 5.0, -100.0]])
    probs, indices = topk(logits, 2)
    assert indices[0].tolist() == [2, 1]
    torch.testing.assert_close(probs[0], torch.tensor([0.6, 0.3]))  # 6/10, 3/10 by hand
    torch.testing.assert_close(probs[1], torch.tensor([0.5, 0.5]))
    probs1, idx1 = topk(logits[0], 3)
    assert probs1.shape == (3,) and idx1.tolist() == [2, 1, 0]
    assert probs1.sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda: accuracy(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long)),
            ValueError,
            "4 entries",
        ),
        (lambda: accuracy(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)), ValueError, "zero"),
        (lambda: accuracy(torch.zeros(3), torch.zeros(3, dtype=torch.long)), TypeError, "integer"),
        (
            lambda: accuracy(torch.zeros(2, 2, 2), torch.zeros(2, dtype=torch.long)),
            ValueError,
            r"\[N, K\]",
        ),
        (lambda: accuracy([1, 2], torch.zeros(2, dtype=torch.long)), TypeError, "Tensor"),
        (lambda: accuracy(torch.zeros(2, dtype=torch.long), torch.zeros(2)), ValueError, "labels"),
        (
            lambda: confusion_matrix(torch.tensor([0, 3]), torch.tensor([0, 1]), 3),
            ValueError,
            "preds holds class 3",
        ),
        (
            lambda: confusion_matrix(torch.tensor([0, 1]), torch.tensor([-1, 1]), 3),
            ValueError,
            "labels holds class -1",
        ),
        (
            lambda: confusion_matrix(torch.tensor([0]), torch.tensor([0]), 0),
            ValueError,
            "num_classes",
        ),
        (lambda: per_class_accuracy(torch.zeros(2, 3)), ValueError, r"\[K, K\]"),
        (lambda: topk(torch.zeros(2, 3), 4), ValueError, "1..3"),
        (lambda: topk(torch.zeros(2, 3), 0), ValueError, "k must"),
        (lambda: topk(torch.zeros(2, 3, 4), 1), ValueError, "logits"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()
