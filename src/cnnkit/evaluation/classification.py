"""Classification metrics: accuracy, confusion matrix, per-class accuracy, top-k.

Pure tensor functions of predictions and labels (no models). Class indices are ``0..K-1``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _predictions(logits_or_preds: Tensor, name: str) -> Tensor:
    """``[N, K]`` scores -> argmax ``[N]``; ``[N]`` integer predictions pass through."""
    if not isinstance(logits_or_preds, Tensor):
        raise TypeError(f"{name} must be a Tensor, not {type(logits_or_preds).__name__}")
    if logits_or_preds.ndim == 2:
        if logits_or_preds.shape[1] == 0:
            raise ValueError(f"{name}: [N, K] scores with K = 0 classes")
        return logits_or_preds.argmax(dim=1)
    if logits_or_preds.ndim == 1:
        if logits_or_preds.is_floating_point():
            raise TypeError(f"{name}: 1-D predictions must be integer class indices")
        return logits_or_preds
    raise ValueError(
        f"{name} must be [N, K] scores or [N] class indices, got {_shape(logits_or_preds)}"
    )


def _labels(labels: Tensor, n: int) -> Tensor:
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a Tensor, not {type(labels).__name__}")
    if labels.ndim != 1 or labels.is_floating_point():
        raise ValueError(
            f"labels must be [N] integer class indices, got {_shape(labels)} {labels.dtype}"
        )
    if labels.shape[0] != n:
        raise ValueError(f"labels has {labels.shape[0]} entries for {n} predictions")
    return labels


def _shape(t: Tensor) -> str:
    return str(list(t.shape))


def accuracy(logits_or_preds: Tensor, labels: Tensor) -> float:
    """Fraction of correct predictions, in [0, 1].

    Args:
        logits_or_preds: ``[N, K]`` scores (logits or probabilities; argmax is the prediction)
            or ``[N]`` predicted class indices.
        labels: ``[N]`` true class indices.
    """
    preds = _predictions(logits_or_preds, "logits_or_preds")
    labels = _labels(labels, preds.shape[0])
    if preds.shape[0] == 0:
        raise ValueError("accuracy of zero samples is undefined")
    return (preds == labels.to(preds.device)).float().mean().item()


def confusion_matrix(preds: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Counts ``C[i, j]`` of samples of true class ``i`` predicted as class ``j``.

    Args:
        preds: ``[N]`` predicted class indices (or ``[N, K]`` scores, argmax taken).
        labels: ``[N]`` true class indices.
        num_classes: K.

    Returns:
        int64 ``[K, K]``, rows = true class, columns = predicted class; ``C.sum() == N``.
    """
    preds = _predictions(preds, "preds")
    labels = _labels(labels, preds.shape[0]).to(preds.device)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    for name, t in (("preds", preds), ("labels", labels)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
            raise ValueError(
                f"{name} holds class {int(t.min()) if int(t.min()) < 0 else int(t.max())}, "
                f"outside 0..{num_classes - 1}"
            )
    # One bincount over the flat index true * K + pred fills the whole matrix.
    flat = labels.long() * num_classes + preds.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def per_class_accuracy(matrix: Tensor) -> Tensor:
    """Recall of each true class: ``C[i, i] / sum_j C[i, j]``.

    Args:
        matrix: ``[K, K]`` confusion matrix, rows = true class.

    Returns:
        float ``[K]``; NaN for a class with no samples (its accuracy is undefined, not 0).
    """
    if not isinstance(matrix, Tensor) or matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        shape = _shape(matrix) if isinstance(matrix, Tensor) else type(matrix).__name__
        raise ValueError(f"matrix must be a [K, K] confusion matrix, got {shape}")
    totals = matrix.sum(dim=1).double()
    correct = matrix.diagonal().double()
    out = torch.full_like(totals, float("nan"))
    seen = totals > 0
    out[seen] = correct[seen] / totals[seen]
    return out.float()


def topk(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` most probable classes of each sample.

    Args:
        logits: ``[N, K]`` (or ``[K]`` for one sample) unnormalized scores.
        k: how many classes, ``1 <= k <= K``.

    Returns:
        ``(probs, indices)``, each ``[N, k]`` (``[k]`` for a 1-D input): softmax probabilities
        ``p_j = exp(z_j) / sum_i exp(z_i)`` in decreasing order, and their class indices.
    """
    if not isinstance(logits, Tensor) or logits.ndim not in (1, 2):
        shape = _shape(logits) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits must be [N, K] or [K], got {shape}")
    num_classes = logits.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_classes:
        raise ValueError(
            f"k must be an integer in 1..{num_classes} (the number of classes), got {k!r}"
        )
    probs = torch.softmax(logits.float(), dim=-1)
    return probs.topk(k, dim=-1)
