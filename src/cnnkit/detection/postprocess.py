"""From box-head outputs to detections: decode, clip, score, threshold, per-class NMS, top-k.

Fast R-CNN (sec. 2.3): "for each class independently, we perform non-maximum suppression";
each RoI yields one box per foreground class (its class-specific regression applied to the
proposal) scored by the softmax probability of that class. Decoding, clipping and thresholding
run on the whole batch at once; NMS runs per image (one call per image, classes kept apart).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from cnnkit.ops import batched_nms, decode_boxes

__all__ = [
    "BOX_CODER_WEIGHTS",
    "clip_boxes_per_image",
    "postprocess_detections",
    "split_per_image",
]

#: Fast R-CNN box coder weights ``(w_x, w_y, w_w, w_h)`` (Detectron's and torchvision's): the
#: targets of a well-trained head then have roughly unit variance.
BOX_CODER_WEIGHTS = (10.0, 10.0, 5.0, 5.0)


def clip_boxes_per_image(boxes: Tensor, heights: Tensor, widths: Tensor) -> Tensor:
    """Clamp ``boxes: Tensor[N, ..., 4]`` (xyxy) into per-row images ``heights, widths: [N]``."""
    shape = (-1,) + (1,) * (boxes.dim() - 1)
    w = widths.to(boxes.dtype).view(shape)
    h = heights.to(boxes.dtype).view(shape)
    zero = torch.zeros((), dtype=boxes.dtype, device=boxes.device)
    x = torch.minimum(torch.maximum(boxes[..., 0::2], zero), w)
    y = torch.minimum(torch.maximum(boxes[..., 1::2], zero), h)
    return torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)


def split_per_image(tensor: Tensor, counts: Sequence[int]) -> list[Tensor]:
    """``tensor``'s rows as one piece per image, ``counts[i]`` rows for image ``i``. A single
    image's piece is ``tensor`` itself: a traced (exported) model, which runs one image, then
    keeps its number of rows dynamic instead of the count of the traced example."""
    return [tensor] if len(counts) == 1 else list(tensor.split(list(counts)))


def postprocess_detections(
    class_logits: Tensor,
    box_regression: Tensor,
    proposals: Sequence[Tensor],
    image_shapes: Sequence[tuple[int, int]],
    *,
    weights: Sequence[float] = BOX_CODER_WEIGHTS,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.3,
    detections_per_img: int = 100,
    min_size: float = 1e-2,
    nms_trace: list[tuple[Tensor, ...]] | None = None,
) -> list[dict[str, Tensor]]:
    """Detections of a batch from its box head's outputs.

    Args:
        class_logits: ``Tensor[R, K + 1]`` (column 0 is background), ``R = sum P_i``.
        box_regression: ``Tensor[R, 4 (K + 1)]`` class-specific deltas.
        proposals: one ``Tensor[P_i, 4]`` per image, the RoIs in the order of the rows above.
        image_shapes: ``(h, w)`` of each image, to clip to.
        weights: the box coder weights of :func:`cnnkit.ops.decode_boxes`.
        score_thresh: keep class scores ``> score_thresh``.
        nms_thresh: per-class NMS IoU threshold.
        detections_per_img: keep at most this many, the highest-scoring.
        min_size: drop boxes narrower or lower than this (pixels).
        nms_trace: ``None``, or a list to which each image appends ``(boxes [N, 4], scores
            [N], labels [N], kept [M])``: the class-specific boxes before per-class NMS and the
            indices it kept.

    Returns:
        one dict per image: ``boxes`` float32 ``[D, 4]``, ``scores`` float32 ``[D]``, ``labels``
        int64 ``[D]`` in ``1..K``, sorted by decreasing score.
    """
    counts = [int(p.shape[0]) for p in proposals]
    if sum(counts) != class_logits.shape[0] or class_logits.shape[0] != box_regression.shape[0]:
        raise ValueError(
            f"{class_logits.shape[0]} class rows and {box_regression.shape[0]} box rows for "
            f"{sum(counts)} proposals"
        )
    num_classes = class_logits.shape[1]  # K + 1
    device = class_logits.device
    rois = torch.cat(list(proposals)).float() if proposals else class_logits.new_zeros((0, 4))
    # Built from the proposals' own sizes, so a traced (exported) model keeps them dynamic.
    image = (
        torch.cat([torch.full_like(p[:, 0], i, dtype=torch.int64) for i, p in enumerate(proposals)])
        if proposals
        else rois.new_zeros((0,), dtype=torch.int64)
    )
    sizes = torch.tensor(image_shapes, device=device, dtype=torch.float32).view(-1, 2)
    # [R, K + 1, 4]: one box per class, clipped to its own image.
    boxes = decode_boxes(rois, box_regression.float(), weights).view(-1, num_classes, 4)
    boxes = clip_boxes_per_image(boxes, sizes[image, 0], sizes[image, 1])
    scores = F.softmax(class_logits.float(), dim=-1)
    # Drop the background column; flatten RoI x class.
    boxes = boxes[:, 1:].reshape(-1, 4)
    scores = scores[:, 1:].reshape(-1)
    labels = torch.arange(1, num_classes, device=device).expand(rois.shape[0], -1).reshape(-1)
    image = image.repeat_interleave(num_classes - 1)
    wh = boxes[:, 2:] - boxes[:, :2]
    keep = (scores > score_thresh) & (wh >= min_size).all(dim=1)
    idx = torch.where(keep)[0]
    boxes, scores, labels, image = boxes[idx], scores[idx], labels[idx], image[idx]
    n = torch.bincount(image, minlength=len(counts)).tolist()
    results = []
    for b, s, lab in zip(
        split_per_image(boxes, n),
        split_per_image(scores, n),
        split_per_image(labels, n),
        strict=True,
    ):
        kept = batched_nms(b, s, lab, nms_thresh)
        if nms_trace is not None:
            nms_trace.append((b, s, lab, kept))
        kept = kept[:detections_per_img]
        results.append({"boxes": b[kept], "scores": s[kept], "labels": lab[kept]})
    return results
