"""Assigning ground truth to anchors or proposals, and sampling a balanced minibatch of them.

:class:`Matcher` labels each prediction by its best IoU with the ground truth (Ren et al., 2015,
Sec. 3.1.2; Girshick, 2015, Sec. 2.3): matched (``IoU >= high``), negative (``IoU < low``) or
ignored (in between). :class:`BalancedSampler` then draws a fixed number of them per image with
at most a given fraction of positives, since negatives vastly outnumber positives.
"""

from __future__ import annotations

import torch
from torch import Tensor

BELOW_LOW = -1
BETWEEN = -2


class Matcher:
    """Match each prediction (column) to the ground truth (row) it overlaps most.

    Args:
        high: predictions with ``max IoU >= high`` are matched to their best ground truth.
        low: predictions with ``max IoU < low`` get :data:`BELOW_LOW` (-1, negatives); those
            with ``low <= max IoU < high`` get :data:`BETWEEN` (-2, ignored).
        allow_low_quality_matches: also match, for each ground truth, the predictions with the
            highest IoU with it, even below ``high`` (Faster R-CNN's first positive rule: "the
            anchor/anchors with the highest IoU overlap with a ground-truth box"), ties
            included. As torchvision, such a prediction gets the ground truth it overlaps
            most (its own argmax). A ground truth overlapping nothing (best IoU 0) claims no
            prediction: otherwise every prediction would tie at 0 and become positive.
    """

    def __init__(self, high: float, low: float, allow_low_quality_matches: bool) -> None:
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"Matcher needs 0 <= low <= high <= 1, got low={low}, high={high}")
        self.high = high
        self.low = low
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, iou: Tensor) -> Tensor:
        """``iou: Tensor[G, N]`` (ground truth x predictions) -> int64 ``Tensor[N]``.

        Entry ``n`` is the index in ``0..G-1`` of the ground truth prediction ``n`` is matched
        to, or ``BELOW_LOW`` / ``BETWEEN``. With ``G == 0`` every prediction is ``BELOW_LOW``.
        """
        if iou.dim() != 2:
            raise ValueError(f"iou must have shape [G, N], got {list(iou.shape)}")
        if iou.shape[0] == 0:
            return torch.full((iou.shape[1],), BELOW_LOW, dtype=torch.int64, device=iou.device)
        best, matches = iou.max(dim=0)
        argmax = matches.clone()
        matches[best < self.low] = BELOW_LOW
        matches[(best >= self.low) & (best < self.high)] = BETWEEN
        if self.allow_low_quality_matches and iou.shape[1] > 0:
            best_per_gt = iou.max(dim=1, keepdim=True).values
            claims = (iou == best_per_gt) & (best_per_gt > 0)
            preds = claims.any(dim=0)
            matches[preds] = argmax[preds]
        return matches


class BalancedSampler:
    """Per image, sample at most ``batch_size_per_image`` labelled predictions.

    At most ``int(batch_size_per_image * positive_fraction)`` positives (``label >= 1``); the
    negatives (``label == 0``) fill the rest; ``label == -1`` is never sampled. Both are drawn
    uniformly without replacement (``torch.randperm`` on the global generator, so a seeded run
    repeats). Faster R-CNN's RPN: 256 anchors, up to half positive (Ren et al., Sec. 3.1.3);
    Fast R-CNN: 64 RoIs per image, 25% foreground (Girshick, 2015, Sec. 2.3).
    """

    def __init__(self, batch_size_per_image: int, positive_fraction: float) -> None:
        if isinstance(batch_size_per_image, bool) or not isinstance(batch_size_per_image, int):
            raise ValueError(f"batch_size_per_image={batch_size_per_image!r} must be an integer")
        if batch_size_per_image < 1:
            raise ValueError(f"batch_size_per_image={batch_size_per_image} must be >= 1")
        if not 0.0 <= positive_fraction <= 1.0:
            raise ValueError(f"positive_fraction={positive_fraction} must be in [0, 1]")
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction

    def _pick(self, candidates: Tensor, count: int, size: int) -> Tensor:
        mask = torch.zeros(size, dtype=torch.bool, device=candidates.device)
        chosen = torch.randperm(candidates.numel(), device=candidates.device)[:count]
        mask[candidates[chosen]] = True
        return mask

    def __call__(self, labels: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """``labels``: one int64 ``Tensor[N_i]`` per image -> (positive masks, negative masks),
        each a bool ``Tensor[N_i]`` per image."""
        positives, negatives = [], []
        for image_labels in labels:
            pos = torch.where(image_labels >= 1)[0]
            neg = torch.where(image_labels == 0)[0]
            num_pos = min(pos.numel(), int(self.batch_size_per_image * self.positive_fraction))
            num_neg = min(neg.numel(), self.batch_size_per_image - num_pos)
            size = image_labels.numel()
            positives.append(self._pick(pos, num_pos, size))
            negatives.append(self._pick(neg, num_neg, size))
        return positives, negatives
