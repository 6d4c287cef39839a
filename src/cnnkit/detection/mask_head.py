"""Mask R-CNN's mask branch (He et al., 2017): a small FCN on each positive RoI.

Architecture (paper, fig. 4 right, the FPN head): RoIAlign ``14 x 14`` from the FPN level of
the RoI (or the C4 map), four ``3 x 3`` convolutions + ReLU, a ``2 x 2`` stride-2 transposed
convolution + ReLU, and a ``1 x 1`` convolution giving one ``28 x 28`` mask logit map per class
(``K + 1`` channels, index 0 the unused background, torchvision's layout, so that
``maskrcnn_resnet50_fpn``'s parameter count is reproduced). With ``norm="group"`` each
``3 x 3`` convolution is followed by GroupNorm and has no bias (Wu & He, 2018, sec. 6.1).

Loss (paper, sec. 3): ``L_mask`` is "the average binary cross-entropy loss" of the per-pixel
sigmoid, "defined only on the k-th mask" for a RoI of ground-truth class ``k``; the other
classes' masks get no gradient, so classes do not compete (the mask is decoupled from the
class prediction). The target of a RoI is its matched ground-truth mask resampled into the RoI
at ``28 x 28`` by RoIAlign (``aligned=True``: cell ``(i, j)`` averages the mask over the bin
``[x1 + j w / 28, x1 + (j + 1) w / 28) x ...`` with adaptive sampling), so targets are soft at
object edges, as torchvision's and Detectron2's before their thresholding.

Inference: the mask of the detected class, ``sigmoid`` -> ``mask_probs [D, 1, 28, 28]``
(box-local; :mod:`cnnkit.detection.paste` puts them into the image).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnnkit.detection.postprocess import split_per_image
from cnnkit.detection.roi_heads import InstanceHead, RoIPooler, conv_norm_relu
from cnnkit.layers.norm import check_norm

__all__ = ["MaskHead", "mask_loss", "mask_targets", "resample_masks"]


def mask_targets(
    masks: Sequence[Tensor],
    gt_index: Sequence[Tensor],
    rois: Sequence[Tensor],
    resolution: int = 28,
) -> Tensor:
    """Ground-truth masks resampled into the RoIs: ``[sum P_i, resolution, resolution]`` float32.

    Args:
        masks: per image the instance masks ``[G_i, H_i, W_i]`` (uint8 / bool / float; sizes
            may differ between images).
        gt_index: per image int64 ``[P_i]``: the mask of each RoI (index into ``masks[i]``).
        rois: per image ``[P_i, 4]`` xyxy RoIs in the masks' pixel coordinates.
        resolution: the output side ``M``.

    Cell ``(i, j)`` is the average of the mask over the ``(i, j)``-th of ``M x M`` equal bins of
    the RoI (RoIAlign, ``aligned=True``: pixel ``p`` covers ``[p, p + 1)``; the samples per bin
    are ``ceil(RoI side / M)`` along each axis), so a RoI of exactly ``M x M`` pixels gives the
    pixels under it, and a ``2M x 2M`` one their ``2 x 2`` means.
    """
    total = sum(int(r.shape[0]) for r in rois)
    device = rois[0].device if rois else torch.device("cpu")
    if total == 0:
        return torch.zeros((0, resolution, resolution), device=device)
    # The masks that some RoI uses, of all images, zero-padded into one batch (images may hold
    # dozens of unused instances); each RoI points at its mask by index.
    used, index, offset = [], [], 0
    for idx in gt_index:
        u, inverse = torch.unique(idx.to(device), return_inverse=True)
        used.append(u)
        index.append(inverse + offset)
        offset += len(u)
    height = max(int(m.shape[-2]) for m in masks)
    width = max(int(m.shape[-1]) for m in masks)
    canvas = torch.zeros((offset, height, width), dtype=masks[0].dtype, device=device)
    offset = 0
    for m, u in zip(masks, used, strict=True):
        canvas[offset : offset + len(u), : m.shape[-2], : m.shape[-1]] = m.to(device)[u]
        offset += len(u)
    boxes = torch.cat([r.to(device=device, dtype=torch.float32) for r in rois])
    return resample_masks(canvas, torch.cat(index), boxes, resolution)


def _axis_average(lo: Tensor, hi: Tensor, cells: int, limit: int) -> tuple[Tensor, Tensor]:
    """RoIAlign's sampling (``aligned=True``, adaptive grid) along one axis as a linear map.

    For RoI sides ``lo, hi: [P]`` on an axis of ``limit`` pixels, returns ``(start [P], A [P, cells,
    span])``: bin ``j`` of RoI ``p`` is ``sum_k A[p, j, k] x[start[p] + k]``, the mean of
    ``ceil((hi - lo) / cells)`` bilinear samples at the bin's regular grid points, with the
    RoIAlign kernel's border rules (a sample beyond ``[-1, limit]`` counts 0, others are clamped
    into the axis): the sample positions of :func:`cnnkit.ops.roi_align`, computed the same way.
    """
    lo = lo - 0.5
    size = (hi - 0.5) - lo
    grid = torch.ceil(size / cells).clamp(min=0).long()  # samples per bin, per RoI
    taps = max(int(grid.max()), 1)
    bin_size = (size / cells)[:, None, None]
    p = torch.arange(cells, device=lo.device, dtype=lo.dtype)[None, :, None]
    t = torch.arange(taps, device=lo.device)
    per_bin = grid.clamp(min=1)[:, None, None]
    pos = lo[:, None, None] + p * bin_size + (t + 0.5)[None, None, :] * bin_size / per_bin
    valid = (t[None, None, :] < grid[:, None, None]) & (pos >= -1.0) & (pos <= limit)
    pos = pos.clamp(min=0)
    low = pos.floor().long()
    at_edge = low >= limit - 1
    low = torch.where(at_edge, limit - 1, low)
    high = torch.where(at_edge, limit - 1, low + 1)
    frac = torch.where(at_edge, 0.0, pos - low)
    scale = valid / per_bin
    # The window of pixels the RoI reads, as narrow as the widest RoI needs.
    first = torch.where(valid, low, limit - 1).amin((1, 2))
    last = torch.where(valid, high, 0).amax((1, 2))
    span = max(int((last - first).max()) + 1, 1)
    start = first.clamp(max=max(limit - span, 0))
    matrix = torch.zeros((lo.shape[0], cells, span), device=lo.device)
    offset = start[:, None, None]
    # Taps outside the window have weight 0: clamping their index keeps the scatter in bounds.
    matrix.scatter_add_(2, (low - offset).clamp(0, span - 1), (1.0 - frac) * scale)
    matrix.scatter_add_(2, (high - offset).clamp(0, span - 1), frac * scale)
    return start, matrix


def resample_masks(masks: Tensor, index: Tensor, boxes: Tensor, resolution: int) -> Tensor:
    """``roi_align(masks[:, None].float(), rois, resolution, 1.0, -1, aligned=True)[:, 0]`` for
    the RoIs ``(index, boxes)``, computed as ``A_y crop A_x^T`` per RoI.

    RoIAlign's bilinear sampling is separable, so each RoI's ``M x M`` output is two small
    matrix products on the window of the mask it reads (:func:`_axis_average`); with one
    channel this is several times faster than the general gather of :func:`roi_align` and
    never converts whole masks to float.

    Args:
        masks: ``[G, H, W]`` (any dtype; uint8 0/1 masks).
        index: int64 ``[P]``: the mask of each RoI.
        boxes: float32 ``[P, 4]`` xyxy in the masks' pixel coordinates.
        resolution: ``M``.

    Returns:
        float32 ``[P, M, M]``.
    """
    height, width = int(masks.shape[-2]), int(masks.shape[-1])
    if boxes.shape[0] == 0:
        return boxes.new_zeros((0, resolution, resolution))
    # RoIs per chunk: float crops of at most 2^22 values (16 MB) for the largest box.
    w, h = ((boxes[:, 2:] - boxes[:, :2]).amax(0).clamp(min=0).ceil() + 3).tolist()
    step = max(1, (1 << 22) // int(min(w, width) * min(h, height)))
    out = []
    for s in range(0, boxes.shape[0], step):
        b, idx = boxes[s : s + step], index[s : s + step]
        y0, ay = _axis_average(b[:, 1], b[:, 3], resolution, height)
        x0, ax = _axis_average(b[:, 0], b[:, 2], resolution, width)
        rows = y0[:, None] + torch.arange(ay.shape[2], device=b.device)
        cols = x0[:, None] + torch.arange(ax.shape[2], device=b.device)
        crop = masks[idx[:, None, None], rows[:, :, None], cols[:, None, :]].to(torch.float32)
        out.append(torch.bmm(torch.bmm(ay, crop), ax.transpose(1, 2)))
    return torch.cat(out)


def mask_loss(mask_logits: Tensor, labels: Tensor, targets: Tensor) -> Tensor:
    """``L_mask``: mean binary cross-entropy with logits of the ground-truth class's mask only.

    Args:
        mask_logits: ``[P, K + 1, M, M]`` (any float dtype; computed in float32).
        labels: int64 ``[P]`` in ``1..K``.
        targets: ``[P, M, M]`` in ``[0, 1]``.

    Returns:
        a scalar; ``0`` (still attached to ``mask_logits``) when ``P == 0``.
    """
    if labels.numel() == 0:
        return mask_logits.sum() * 0
    chosen = mask_logits[torch.arange(labels.numel(), device=labels.device), labels]
    return F.binary_cross_entropy_with_logits(chosen.float(), targets.to(torch.float32))


class MaskHead(InstanceHead):
    """The mask branch as an :class:`~cnnkit.detection.roi_heads.InstanceHead`.

    Args:
        pooler: a :class:`RoIPooler` (``output_size`` 14: the masks are twice that).
        in_channels: channels of the pooled features (FPN channels, or C4's).
        num_classes: ``K`` foreground classes; the last layer has ``K + 1`` outputs.
        channels: width of the convolutions and of the transposed convolution (paper: 256).
        num_convs: ``3 x 3`` convolutions before the upsampling (paper: 4).
        norm: ``"none"`` (biases, torchvision's layout) or a norm after each ``3 x 3`` conv
            (``"group"``: Wu & He).
        norm_groups: GroupNorm's most groups.

    ``forward(pooled [R, C, r, r]) -> logits [R, K + 1, 2r, 2r]``. Training adds ``loss_mask``;
    inference adds ``mask_probs`` float32 ``[D, 1, 2r, 2r]`` (the detected class's sigmoid).
    """

    def __init__(
        self,
        pooler: RoIPooler,
        in_channels: int,
        num_classes: int,
        channels: int = 256,
        num_convs: int = 4,
        norm: str = "none",
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        check_norm(norm)
        if num_classes < 1 or channels < 1 or num_convs < 0:
            raise ValueError(
                f"MaskHead needs num_classes >= 1, mask_channels >= 1 and num_convs >= 0, got "
                f"{num_classes}, {channels}, {num_convs}"
            )
        self.pooler = pooler
        self.num_classes = num_classes
        self.resolution = 2 * pooler.output_size
        blocks = [
            nn.Sequential(
                *conv_norm_relu(in_channels if i == 0 else channels, channels, norm, norm_groups)
            )
            for i in range(num_convs)
        ]
        self.convs = nn.Sequential(*blocks)
        self.upsample = nn.ConvTranspose2d(
            in_channels if num_convs == 0 else channels, channels, 2, 2
        )
        self.logits = nn.Conv2d(channels, num_classes + 1, 1)
        # torchvision's (and Detectron's MSRA) initialization: He normal (fan_out), zero biases
        # (conv_norm_relu initializes the convs the same way).
        for m in (self.upsample, self.logits):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)

    def forward(self, pooled: Tensor) -> Tensor:
        """``[R, C, r, r]`` -> mask logits ``[R, K + 1, 2r, 2r]``."""
        # RoIAlign's output is NCHW; oneDNN's convolutions run faster on NHWC (about 1.4x for
        # this head in bf16 on one core, 128 channels, 108 RoIs).
        x = self.convs(pooled.contiguous(memory_format=torch.channels_last))
        return self.logits(F.relu(self.upsample(x)))

    def loss(
        self,
        features: dict[str, Tensor],
        positive_proposals: list[Tensor],
        matched_targets: list[dict],
        image_shapes: list[tuple[int, int]],
    ) -> dict[str, Tensor]:
        """``{"loss_mask": L_mask}`` over the positive RoIs; targets from each matched instance's
        mask in its image's ``target["masks"]`` (resized-image coordinates)."""
        masks = []
        for i, matched in enumerate(matched_targets):
            target = matched["target"]
            if "masks" not in target:
                raise ValueError(f"targets[{i}] lacks 'masks' (uint8 [N, H, W]) for the mask head")
            masks.append(target["masks"])
        pooled, order = self.pooler.pool_sorted(features, positive_proposals, image_shapes)
        logits = self(pooled)
        labels = torch.cat([m["labels"] for m in matched_targets])
        targets = mask_targets(
            masks, [m["gt_index"] for m in matched_targets], positive_proposals, self.resolution
        )
        if order is not None:  # the pooler grouped the RoIs by FPN level
            labels, targets = labels[order], targets[order]
        return {"loss_mask": mask_loss(logits, labels, targets)}

    def predict(
        self,
        features: dict[str, Tensor],
        detections: list[dict[str, Tensor]],
        image_shapes: list[tuple[int, int]],
    ) -> None:
        """Add ``mask_probs`` float32 ``[D, 1, M, M]`` (the detected class's mask, box-local) to
        each detection dict (``boxes`` in resized-image coordinates, ``labels``)."""
        if not detections:
            return
        boxes = [d["boxes"] for d in detections]
        labels = torch.cat([d["labels"] for d in detections])
        size = self.resolution
        if labels.numel() == 0 and not torch.jit.is_tracing():
            for d in detections:
                d["mask_probs"] = d["boxes"].new_zeros((0, 1, size, size), dtype=torch.float32)
            return
        pooled, order = self.pooler.pool_sorted(features, boxes, image_shapes)
        logits = self(pooled)
        if order is not None:
            labels = labels[order]
        probs = logits[torch.arange(labels.numel(), device=labels.device), labels]
        probs = torch.sigmoid(probs.float())[:, None]
        if order is not None:
            probs = probs[torch.argsort(order)]
        for d, p in zip(detections, split_per_image(probs, [len(b) for b in boxes]), strict=True):
            d["mask_probs"] = p
