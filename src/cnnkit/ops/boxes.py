"""Box geometry, the Fast R-CNN box parametrization and the smooth L1 loss.

Boxes are ``Tensor[N, 4]`` in absolute ``(x1, y1, x2, y2)`` pixel coordinates unless a
function says otherwise. Coordinates are continuous: a box's width is ``x2 - x1`` (no ``+ 1``),
as in torchvision.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "BBOX_XFORM_CLIP",
    "box_area",
    "box_convert",
    "box_iou",
    "clip_boxes_to_image",
    "decode_boxes",
    "elementwise_box_iou",
    "encode_boxes",
    "remove_small_boxes",
    "smooth_l1_loss",
]

#: Largest log-scale size delta before the exponential in :func:`decode_boxes` (Detectron's
#: ``log(1000 / 16)``): keeps an untrained regressor from producing overflowing boxes.
BBOX_XFORM_CLIP = math.log(1000.0 / 16)

_FORMATS = ("xyxy", "xywh", "cxcywh")


def check_boxes(boxes: Tensor, name: str, ndim: int | None = 2) -> None:
    """Raise TypeError/ValueError naming ``name`` unless ``boxes`` is a ``[..., 4]`` tensor.

    ``ndim=2`` demands exactly ``[N, 4]``; ``ndim=None`` accepts any leading shape.
    """
    if not isinstance(boxes, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(boxes).__name__}")
    if boxes.dim() == 0 or boxes.shape[-1] != 4 or (ndim is not None and boxes.dim() != ndim):
        want = "[N, 4]" if ndim == 2 else "[..., 4]"
        raise ValueError(f"{name} must have shape {want}, got {list(boxes.shape)}")


def _check_same_count(a: Tensor, name_a: str, b: Tensor, name_b: str) -> None:
    """Raise ValueError naming both arguments unless ``a`` and ``b`` have as many rows."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{name_a} and {name_b} must hold the same number of rows, got {a.shape[0]} "
            f"and {b.shape[0]}"
        )


def _float(boxes: Tensor) -> Tensor:
    # Integer boxes would make IoU an integer division; half precision loses too much in the
    # products. Compute in float32 then (float64 stays float64).
    if boxes.is_floating_point() and boxes.dtype not in (torch.float16, torch.bfloat16):
        return boxes
    return boxes.float()


def box_area(boxes: Tensor) -> Tensor:
    """Area ``(x2 - x1) * (y2 - y1)`` of ``boxes: Tensor[..., 4]`` (xyxy) -> ``Tensor[...]``."""
    check_boxes(boxes, "boxes", ndim=None)
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _inter_union(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Intersection and union areas of broadcastable ``[..., 4]`` box tensors."""
    b1, b2 = _float(boxes1), _float(boxes2)
    area1 = (b1[..., 2] - b1[..., 0]) * (b1[..., 3] - b1[..., 1])
    area2 = (b2[..., 2] - b2[..., 0]) * (b2[..., 3] - b2[..., 1])
    lt = torch.maximum(b1[..., :2], b2[..., :2])
    rb = torch.minimum(b1[..., 2:], b2[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter, area1 + area2 - inter


def _safe_ratio(inter: Tensor, union: Tensor) -> Tensor:
    # Two zero-area boxes have union 0: their IoU is defined as 0, never 0/0 = NaN.
    return torch.where(union > 0, inter / union.where(union > 0, torch.ones_like(union)), 0.0)


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise intersection over union (Jaccard index).

    Args:
        boxes1: ``Tensor[N, 4]`` xyxy.
        boxes2: ``Tensor[M, 4]`` xyxy.

    Returns:
        ``Tensor[N, M]``: ``|a ∩ b| / |a ∪ b|``, in [0, 1]; 0 where both boxes are degenerate.
    """
    check_boxes(boxes1, "boxes1")
    check_boxes(boxes2, "boxes2")
    inter, union = _inter_union(boxes1[:, None, :], boxes2[None, :, :])
    return _safe_ratio(inter, union)


def elementwise_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of paired boxes: ``boxes1[i]`` with ``boxes2[i]``, both ``Tensor[N, 4]`` -> ``Tensor[N]``."""
    check_boxes(boxes1, "boxes1")
    check_boxes(boxes2, "boxes2")
    _check_same_count(boxes1, "boxes1", boxes2, "boxes2")
    inter, union = _inter_union(boxes1, boxes2)
    return _safe_ratio(inter, union)


def box_convert(boxes: Tensor, in_fmt: str, out_fmt: str) -> Tensor:
    """Convert ``boxes: Tensor[..., 4]`` between ``"xyxy"``, ``"xywh"`` and ``"cxcywh"``.

    ``xywh`` is (left, top, width, height) as in COCO; ``cxcywh`` is (centre x, centre y,
    width, height).
    """
    check_boxes(boxes, "boxes", ndim=None)
    for name, fmt in (("in_fmt", in_fmt), ("out_fmt", out_fmt)):
        if fmt not in _FORMATS:
            raise ValueError(f"{name} must be one of {_FORMATS}, got {fmt!r}")
    if in_fmt == out_fmt:
        return boxes.clone()
    a, b, c, d = boxes.unbind(-1)
    if in_fmt == "xywh":
        a, b, c, d = a, b, a + c, b + d
    elif in_fmt == "cxcywh":
        a, b, c, d = a - 0.5 * c, b - 0.5 * d, a + 0.5 * c, b + 0.5 * d
    # (a, b, c, d) is now xyxy.
    if out_fmt == "xywh":
        return torch.stack((a, b, c - a, d - b), dim=-1)
    if out_fmt == "cxcywh":
        return torch.stack(((a + c) / 2, (b + d) / 2, c - a, d - b), dim=-1)
    return torch.stack((a, b, c, d), dim=-1)


def clip_boxes_to_image(boxes: Tensor, size: Sequence[int]) -> Tensor:
    """Clamp ``boxes: Tensor[..., 4]`` (xyxy) into an image of ``size = (height, width)``."""
    check_boxes(boxes, "boxes", ndim=None)
    if len(size) != 2:
        raise ValueError(f"size must be (height, width), got {size!r}")
    height, width = size
    x = boxes[..., 0::2].clamp(min=0, max=width)
    y = boxes[..., 1::2].clamp(min=0, max=height)
    return torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)


def remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """Indices (int64, ascending) of the boxes whose width and height are both ``>= min_size``."""
    check_boxes(boxes, "boxes", ndim=None)
    ws = boxes[..., 2] - boxes[..., 0]
    hs = boxes[..., 3] - boxes[..., 1]
    return torch.where((ws >= min_size) & (hs >= min_size))[0]


def _centre_size(boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    return boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h, w, h


def _check_weights(weights: Sequence[float]) -> tuple[float, float, float, float]:
    if len(weights) != 4:
        raise ValueError(f"weights must hold 4 numbers (wx, wy, ww, wh), got {weights!r}")
    return tuple(float(w) for w in weights)  # type: ignore[return-value]


def encode_boxes(
    reference_boxes: Tensor,
    boxes: Tensor,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
) -> Tensor:
    """Regression targets of ``boxes`` relative to ``reference_boxes`` (Fast R-CNN, eq. 6-9).

    With centres ``x, y`` and sizes ``w, h`` (``_r`` for the reference, e.g. an anchor or a
    proposal)::

        t_x = w_x (x - x_r) / w_r      t_w = w_w log(w / w_r)
        t_y = w_y (y - y_r) / h_r      t_h = w_h log(h / h_r)

    Args:
        reference_boxes: ``Tensor[N, 4]`` xyxy, positive sizes.
        boxes: ``Tensor[N, 4]`` xyxy, the boxes to encode.
        weights: ``(w_x, w_y, w_w, w_h)``.

    Returns:
        ``Tensor[N, 4]`` ``(t_x, t_y, t_w, t_h)``.
    """
    check_boxes(reference_boxes, "reference_boxes")
    check_boxes(boxes, "boxes")
    _check_same_count(reference_boxes, "reference_boxes", boxes, "boxes")
    wx, wy, ww, wh = _check_weights(weights)
    rx, ry, rw, rh = _centre_size(reference_boxes)
    x, y, w, h = _centre_size(boxes)
    return torch.stack(
        (wx * (x - rx) / rw, wy * (y - ry) / rh, ww * torch.log(w / rw), wh * torch.log(h / rh)),
        dim=1,
    )


def decode_boxes(
    reference_boxes: Tensor,
    deltas: Tensor,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
) -> Tensor:
    """Inverse of :func:`encode_boxes`: apply ``deltas`` to ``reference_boxes``.

    ``x = x_r + w_r t_x / w_x``, ``w = w_r exp(min(t_w / w_w, log(1000/16)))`` (likewise for
    y, h); the clamp keeps early, untrained predictions from overflowing.

    Args:
        reference_boxes: ``Tensor[N, 4]`` xyxy.
        deltas: ``Tensor[N, 4 * k]``: ``k`` sets of ``(t_x, t_y, t_w, t_h)`` (e.g. one per class).
        weights: ``(w_x, w_y, w_w, w_h)``, as given to :func:`encode_boxes`.

    Returns:
        ``Tensor[N, 4 * k]`` decoded xyxy boxes.
    """
    check_boxes(reference_boxes, "reference_boxes")
    if not isinstance(deltas, Tensor):
        raise TypeError(f"deltas must be a torch.Tensor, got {type(deltas).__name__}")
    if deltas.dim() != 2 or deltas.shape[1] % 4 != 0 or deltas.shape[1] == 0:
        raise ValueError(f"deltas must have shape [N, 4 * k], got {list(deltas.shape)}")
    _check_same_count(deltas, "deltas", reference_boxes, "reference_boxes")
    wx, wy, ww, wh = _check_weights(weights)
    reference_boxes = reference_boxes.to(deltas.dtype)
    rx, ry, rw, rh = (t[:, None] for t in _centre_size(reference_boxes))
    dx = deltas[:, 0::4] / wx
    dy = deltas[:, 1::4] / wy
    dw = (deltas[:, 2::4] / ww).clamp(max=BBOX_XFORM_CLIP)
    dh = (deltas[:, 3::4] / wh).clamp(max=BBOX_XFORM_CLIP)
    cx = dx * rw + rx
    cy = dy * rh + ry
    half_w = 0.5 * torch.exp(dw) * rw
    half_h = 0.5 * torch.exp(dh) * rh
    out = torch.stack((cx - half_w, cy - half_h, cx + half_w, cy + half_h), dim=2)
    return out.reshape(deltas.shape)


def smooth_l1_loss(
    input: Tensor, target: Tensor, beta: float = 1.0, reduction: str = "sum"
) -> Tensor:
    """Smooth L1 (Huber-like) loss of Fast R-CNN, eq. 3.

    ``l(x) = 0.5 x^2 / beta`` if ``|x| < beta`` else ``|x| - 0.5 beta``, with ``x = input - target``;
    ``beta = 0`` is the plain L1 loss.

    Args:
        input, target: tensors of the same shape.
        beta: the quadratic region's half-width, ``>= 0``.
        reduction: ``"none"`` (elementwise), ``"sum"`` or ``"mean"``.
    """
    if not isinstance(input, Tensor) or not isinstance(target, Tensor):
        raise TypeError("input and target must be torch.Tensor")
    if input.shape != target.shape:
        raise ValueError(
            f"input and target must have the same shape, got {list(input.shape)} and "
            f"{list(target.shape)}"
        )
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")
    x = torch.abs(input - target)
    loss = x if beta == 0 else torch.where(x < beta, 0.5 * x * x / beta, x - 0.5 * beta)
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    return loss
