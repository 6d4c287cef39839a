"""The RoI heads of Fast / Faster R-CNN: pool each region, classify it, refine its box.

Training (Fast R-CNN, sec. 2.3; Faster R-CNN, sec. 3.2): the ground-truth boxes are appended to
each image's proposals; a RoI whose best IoU with a ground-truth box is ``>= fg_iou`` is
foreground with that box's class, one with best IoU in ``[bg_iou_lo, fg_iou)`` is background
(label 0; Fast R-CNN's lower bound 0.1 "acts as a heuristic for hard example mining"), the rest
are ignored. ``batch_size_per_image`` RoIs are sampled per image, at most ``positive_fraction``
of them foreground. The loss is Fast R-CNN's eq. 1::

    L = L_cls(p, u) + [u >= 1] L_loc(t^u, v)

with ``L_cls`` the cross-entropy over the sampled RoIs and ``L_loc`` the smooth L1 loss
(``beta = 1/9``) of the true class's deltas, summed over the foreground RoIs and divided by the
number of sampled RoIs (torchvision's normalization); targets use the weights (10, 10, 5, 5).

Assignment and sampling are done for the whole batch at once (one IoU matrix, one sort), never
per RoI or per image in Python.

Heads on the positive RoIs (masks, keypoints) slot in as :class:`InstanceHead` modules.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnnkit.detection.postprocess import BOX_CODER_WEIGHTS, postprocess_detections
from cnnkit.layers.norm import make_norm
from cnnkit.ops import box_iou, encode_boxes, roi_align, roi_pool, smooth_l1_loss
from cnnkit.ops.roi import convert_boxes_to_rois, fpn_levels

__all__ = [
    "ROI_OPS",
    "BoxPredictor",
    "InstanceHead",
    "ResStageHead",
    "RoIHeads",
    "RoIPooler",
    "RoISample",
    "TwoMLPHead",
    "fast_rcnn_loss",
    "sample_rois",
]

ROI_OPS = ("align", "pool")


# ------------------------------------------------------------------------------ box branch


class TwoMLPHead(nn.Module):
    """FPN's box head: ``[R, C, r, r]`` -> flatten -> fc6 -> ReLU -> fc7 -> ReLU -> ``[R, D]``.

    Module names ``fc6``/``fc7`` and plain ``nn.Linear`` layers as torchvision's ``TwoMLPHead``,
    so the parameter counts agree.
    """

    def __init__(self, in_channels: int, representation_size: int) -> None:
        super().__init__()
        self.fc6 = nn.Linear(in_channels, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size)
        self.out_channels = representation_size

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.fc6(x.flatten(1)))
        return F.relu(self.fc7(x))


class ResStageHead(nn.Module):
    """The ResNet C4 box head (He et al. 2016, appendix A; Faster R-CNN with ResNet): the
    backbone's last stage run on each pooled RoI ``[R, C4, r, r]``, then global average pooling
    -> ``[R, C5]``.

    Args:
        stage: the stage module (e.g. ResNet's ``layer4``; its first block has stride 2, so a
            14 x 14 RoI becomes 7 x 7).
        out_channels: channels of the stage's output.
        shared: the stage belongs to another module (the backbone) that registers, moves and
            freezes it; it is then not registered here, so checkpoints hold it once.
    """

    def __init__(self, stage: nn.Module, out_channels: int, shared: bool = False) -> None:
        super().__init__()
        if shared:
            self._shared = (stage,)  # a tuple is not registered as a submodule
        else:
            self.stage = stage
        self.out_channels = out_channels

    def _stage(self) -> nn.Module:
        return self._shared[0] if hasattr(self, "_shared") else self.stage

    def forward(self, x: Tensor) -> Tensor:
        return self._stage()(x).mean((2, 3))


class BoxPredictor(nn.Module):
    """``[R, D]`` -> class logits ``[R, num_classes]`` and deltas ``[R, 4 num_classes]``.

    ``num_classes`` counts the background (index 0), as torchvision's ``FastRCNNPredictor``.
    Initialized as Fast R-CNN (sec. 2.2: zero-mean Gaussians of std 0.01 and 0.001, biases 0).
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(
                f"num_classes must count the background and >= 1 class, got {num_classes}"
            )
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, 4 * num_classes)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.flatten(1)
        return self.cls_score(x), self.bbox_pred(x)


# ---------------------------------------------------------------------------------- pooling


def _infer_scale(feature: Tensor, image_shapes: Sequence[tuple[int, int]]) -> float:
    # As MultiScaleRoIAlign: backbone strides are powers of 2, measured on the largest image.
    height = max(s[0] for s in image_shapes)
    return 2.0 ** round(math.log2(feature.shape[-2] / height))


class RoIPooler(nn.Module):
    """RoI features from one or several feature maps.

    ``op="align"``: RoIAlign (Mask R-CNN, :func:`cnnkit.ops.roi_align`); ``op="pool"``: RoI max
    pooling (Fast R-CNN, :func:`cnnkit.ops.roi_pool`). With several maps (an FPN), each RoI is
    pooled from the level of FPN eq. 1 (``k = floor(4 + log2(sqrt(wh) / 224))``), the same
    assignment as :class:`cnnkit.ops.MultiScaleRoIAlign`.

    ``forward(features, boxes, image_shapes)``: ``features`` maps names to ``[B, C, H_l, W_l]``,
    ``boxes`` one ``Tensor[L_i, 4]`` per image (resized-image coordinates) -> ``[sum L_i, C, r,
    r]`` in the order of the boxes. :meth:`pool_sorted` skips the final reordering.
    """

    def __init__(
        self,
        featmap_names: Sequence[str],
        output_size: int,
        sampling_ratio: int = 2,
        op: str = "align",
    ) -> None:
        super().__init__()
        if op not in ROI_OPS:
            raise ValueError(f"roi_op must be one of {ROI_OPS}, got {op!r}")
        if isinstance(featmap_names, str) or not featmap_names:
            raise ValueError(f"featmap_names must be a non-empty list, got {featmap_names!r}")
        self.featmap_names = list(featmap_names)
        self.output_size = int(output_size)
        self.sampling_ratio = int(sampling_ratio)
        self.op = op

    def _pool(self, feature: Tensor, rois: Tensor, scale: float) -> Tensor:
        if self.op == "align":
            return roi_align(feature, rois, self.output_size, scale, self.sampling_ratio)
        return roi_pool(feature, rois, self.output_size, scale)

    def pool_sorted(
        self,
        features: dict[str, Tensor],
        boxes: list[Tensor],
        image_shapes: list[tuple[int, int]],
    ) -> tuple[Tensor, Tensor | None]:
        """``(pooled, order)``: row ``j`` of ``pooled`` is RoI ``order[j]`` (``None``: the boxes'
        order). RoIs are grouped by level, so the levels' outputs are simply concatenated: the
        caller un-permutes a smaller tensor (the class scores) or nothing at all, instead of
        scattering ``[R, C, r, r]`` features level by level, forward and backward."""
        missing = [name for name in self.featmap_names if name not in features]
        if missing:
            raise ValueError(f"features lack the maps {missing}; they have {list(features)}")
        maps = [features[name] for name in self.featmap_names]
        scales = [_infer_scale(m, image_shapes) for m in maps]
        rois = convert_boxes_to_rois(boxes, maps[0])
        if len(maps) == 1:
            return self._pool(maps[0], rois, scales[0]), None
        k_min, k_max = round(-math.log2(scales[0])), round(-math.log2(scales[-1]))
        levels = fpn_levels(rois[:, 1:], k_min, k_max)
        if torch.jit.is_tracing():
            # The level sizes are data: split by masks, not by a Python list of counts. The
            # stable order by level as a plain sort of unique keys (ONNX has no stable sort).
            rank = torch.arange(levels.shape[0], device=levels.device)
            order = torch.argsort(levels * levels.shape[0] + rank)
            sorted_rois, sorted_levels = rois[order], levels[order]
            parts = [
                self._pool(feature, sorted_rois[sorted_levels == level], scale)
                for level, (feature, scale) in enumerate(zip(maps, scales, strict=True))
            ]
            return torch.cat(parts), order
        order = torch.argsort(levels, stable=True)
        counts = torch.bincount(levels, minlength=len(maps)).tolist()
        pooled = [
            self._pool(feature, part, scale)
            for feature, part, scale, n in zip(
                maps, rois[order].split(counts), scales, counts, strict=True
            )
            if n
        ]
        if not pooled:
            return self._pool(maps[0], rois, scales[0]), None
        return torch.cat(pooled) if len(pooled) > 1 else pooled[0], order

    def forward(
        self,
        features: dict[str, Tensor],
        boxes: list[Tensor],
        image_shapes: list[tuple[int, int]],
    ) -> Tensor:
        pooled, order = self.pool_sorted(features, boxes, image_shapes)
        return pooled if order is None else pooled[torch.argsort(order)]


# --------------------------------------------------------------------------------- sampling


@dataclass
class RoISample:
    """The RoIs sampled from a batch for the heads' losses, image-major.

    Attributes:
        boxes: ``Tensor[S, 4]`` the sampled RoIs (resized-image coordinates).
        counts: RoIs per image (``sum = S``).
        labels: int64 ``[S]``: the matched class for foreground, 0 for background.
        gt_index: int64 ``[S]``: index of the matched box in its image's target (-1: background).
        regression_targets: ``Tensor[F, 4]`` encoded targets of the foreground RoIs
            (``labels > 0``), in their order.
    """

    boxes: Tensor
    counts: list[int]
    labels: Tensor
    gt_index: Tensor
    regression_targets: Tensor

    def per_image(self, x: Tensor) -> list[Tensor]:
        """Split a ``[S, ...]`` tensor into one piece per image."""
        return list(x.split(self.counts))


def _gather_targets(
    targets: Sequence[dict], device: torch.device
) -> tuple[Tensor, Tensor, Tensor, Tensor, list[int]]:
    """Non-crowd ground truth of all images (crowd boxes never become foreground, as in
    Detectron): boxes ``[G, 4]``, labels ``[G]``, image index ``[G]``, index in its image's
    target ``[G]``, and the count per image. Image-major; no per-image tensor work."""
    counts = [int(t["boxes"].shape[0]) for t in targets]
    boxes = torch.cat([t["boxes"] for t in targets]).to(device=device, dtype=torch.float32)
    labels = torch.cat([t["labels"] for t in targets]).to(device=device, dtype=torch.int64)
    sizes = torch.tensor(counts, device=device)
    image = torch.repeat_interleave(torch.arange(len(targets), device=device), sizes)
    index = torch.arange(boxes.shape[0], device=device) - (torch.cumsum(sizes, 0) - sizes)[image]
    if any("iscrowd" in t for t in targets):
        crowd = torch.cat(
            [
                t.get("iscrowd", t["boxes"].new_zeros(n, dtype=torch.bool)).reshape(n)
                for t, n in zip(targets, counts, strict=True)
            ]
        ).to(device=device, dtype=torch.bool)
        if crowd.any():
            keep = torch.where(~crowd)[0]
            boxes, labels, image, index = boxes[keep], labels[keep], image[keep], index[keep]
            counts = torch.bincount(image, minlength=len(targets)).tolist()
    return boxes, labels, image, index, counts


def sample_rois(
    proposals: Sequence[Tensor],
    targets: Sequence[dict],
    *,
    fg_iou: float = 0.5,
    bg_iou_lo: float = 0.1,
    batch_size_per_image: int = 64,
    positive_fraction: float = 0.25,
    weights: Sequence[float] = BOX_CODER_WEIGHTS,
) -> RoISample:
    """Label and sample the training RoIs of a batch (ground-truth boxes appended).

    Foreground: best IoU ``>= fg_iou`` (class of that box). Background: best IoU in
    ``[bg_iou_lo, fg_iou)``, or any RoI of an image without ground-truth boxes. Crowd boxes
    (``iscrowd``) are neither appended nor matched. Sampling:
    per image at most ``int(batch_size_per_image * positive_fraction)`` foreground RoIs, then
    background ones up to ``batch_size_per_image``, uniformly at random (torch's global
    generator), as torchvision's ``BalancedPositiveNegativeSampler``.
    """
    device = proposals[0].device if proposals else torch.device("cpu")
    gt_boxes, gt_labels, gt_image, gt_index, gt_counts = _gather_targets(targets, device)
    num_images = len(proposals)
    # Each image's proposals followed by its ground-truth boxes, in one concatenation.
    appended = gt_boxes.split(gt_counts)
    parts = [t for pair in zip(proposals, appended, strict=True) for t in pair]
    boxes = torch.cat(parts).detach().to(torch.float32)
    owner = [p.shape[0] + n for p, n in zip(proposals, gt_counts, strict=True)]
    image = torch.repeat_interleave(
        torch.arange(num_images, device=device), torch.tensor(owner, device=device)
    )
    # Best IoU with a ground-truth box of the same image; -1 where the image has none.
    if gt_boxes.shape[0]:
        iou = box_iou(boxes, gt_boxes).masked_fill_(image[:, None] != gt_image[None, :], -1.0)
        best, match = iou.max(dim=1)
    else:
        best = boxes.new_full((boxes.shape[0],), -1.0)
        match = torch.zeros_like(image)
    # Crowd boxes count here: a crowd-only image gives no background RoIs (they could lie on
    # the crowd); an image with no box at all gives only background.
    has_gt = torch.tensor([t["boxes"].shape[0] > 0 for t in targets], device=device)
    fg = best >= fg_iou
    bg = ~fg & ((best >= bg_iou_lo) | ~has_gt[image])

    chosen = _balanced_sample(image, fg, bg, num_images, batch_size_per_image, positive_fraction)
    is_fg = fg[chosen]
    match = match[chosen]
    labels = torch.where(is_fg, gt_labels[match] if gt_labels.numel() else 0, 0)
    fg_rows = torch.where(is_fg)[0]
    sampled = boxes[chosen]
    targets_fg = encode_boxes(sampled[fg_rows], gt_boxes[match[fg_rows]], weights)
    return RoISample(
        boxes=sampled,
        counts=torch.bincount(image[chosen], minlength=num_images).tolist(),
        labels=labels,
        gt_index=torch.where(is_fg, gt_index[match] if gt_index.numel() else -1, -1),
        regression_targets=targets_fg,
    )


def _balanced_sample(
    image: Tensor,
    fg: Tensor,
    bg: Tensor,
    num_images: int,
    batch_size_per_image: int,
    positive_fraction: float,
) -> Tensor:
    """Indices (ascending, hence image-major) of the sampled rows: per image at most
    ``int(batch * fraction)`` of ``fg`` and ``batch - #fg chosen`` of ``bg``, uniformly.

    One random permutation and one stable sort by group ``(image, fg/bg)`` give every candidate
    a uniformly random rank inside its group; a row is taken when its rank is under its group's
    quota.
    """
    candidates = torch.where(fg | bg)[0]
    shuffled = candidates[torch.randperm(candidates.numel(), device=image.device)]
    group = image[shuffled] * 2 + (~fg[shuffled]).long()  # (image, 0 = fg / 1 = bg)
    order = torch.argsort(group, stable=True)
    shuffled, group = shuffled[order], group[order]
    sizes = torch.bincount(group, minlength=2 * num_images)
    start = torch.cumsum(sizes, 0) - sizes
    rank = torch.arange(group.numel(), device=image.device) - start[group]
    num_fg = sizes[0::2].clamp(max=int(batch_size_per_image * positive_fraction))
    num_bg = torch.minimum(sizes[1::2], batch_size_per_image - num_fg)
    quota = torch.stack((num_fg, num_bg), dim=1).view(-1)
    return shuffled[rank < quota[group]].sort().values


def fast_rcnn_loss(
    class_logits: Tensor, box_regression: Tensor, labels: Tensor, regression_targets: Tensor
) -> dict[str, Tensor]:
    """Fast R-CNN's multi-task loss (eq. 1) over ``S`` sampled RoIs.

    Args:
        class_logits: ``[S, K + 1]``.
        box_regression: ``[S, 4 (K + 1)]``.
        labels: int64 ``[S]`` (0 background).
        regression_targets: ``[F, 4]`` for the rows with ``labels > 0``, in order.

    Returns:
        ``loss_classifier`` (mean cross-entropy) and ``loss_box_reg`` (smooth L1, beta 1/9, of the
        true class's deltas summed over foreground RoIs, divided by ``S``).
    """
    num = labels.numel()
    if num == 0:
        zero = class_logits.sum() * 0 + box_regression.sum() * 0
        return {"loss_classifier": zero, "loss_box_reg": zero}
    loss_classifier = F.cross_entropy(class_logits.float(), labels)
    fg = torch.where(labels > 0)[0]
    deltas = box_regression.view(num, -1, 4)[fg, labels[fg]].float()
    loss_box = smooth_l1_loss(deltas, regression_targets.float(), beta=1.0 / 9, reduction="sum")
    return {"loss_classifier": loss_classifier, "loss_box_reg": loss_box / num}


# ---------------------------------------------------------------------------------- modules


def conv_norm_relu(cin: int, cout: int, norm: str, norm_groups: int) -> list[nn.Module]:
    """A 3x3 convolution (bias only without a norm), its norm (GroupNorm with ``"group"``, Wu &
    He) and a ReLU, He-initialized (fan_out, zero bias): the unit of torchvision's mask and
    keypoint heads. Returned as a list, so a head lays the units out as its peer does."""
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=norm == "none")
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    layers: list[nn.Module] = [conv]
    if norm != "none":
        layers.append(make_norm(norm, cout, norm_groups))
    return [*layers, nn.ReLU(inplace=True)]


class InstanceHead(nn.Module):
    """A head on the positive RoIs (Mask R-CNN's mask branch, the keypoint branch).

    ``loss(features, positive_proposals, matched_targets, image_shapes) -> dict`` of named losses
    in training: ``positive_proposals`` one ``Tensor[P_i, 4]`` per image; ``matched_targets`` one
    dict per image with ``labels [P_i]``, ``gt_index [P_i]`` (the matched ground truth, an
    index into the image's target) and ``target`` (the image's whole target dict,
    resized coordinates). ``predict(features, detections, image_shapes) -> None`` adds its keys
    to each image's detection dict in inference.
    """

    def loss(
        self,
        features: dict[str, Tensor],
        positive_proposals: list[Tensor],
        matched_targets: list[dict],
        image_shapes: list[tuple[int, int]],
    ) -> dict[str, Tensor]:
        raise NotImplementedError

    def predict(
        self,
        features: dict[str, Tensor],
        detections: list[dict[str, Tensor]],
        image_shapes: list[tuple[int, int]],
    ) -> None:
        raise NotImplementedError


class RoIHeads(nn.Module):
    """Box branch (+ optional instance heads) on the proposals of a batch.

    Args:
        pooler: a :class:`RoIPooler`.
        box_head: ``[R, C, r, r]`` -> ``[R, D]`` (:class:`TwoMLPHead` or :class:`ResStageHead`).
        box_predictor: a :class:`BoxPredictor`.
        fg_iou, bg_iou_lo, batch_size_per_image, positive_fraction: training RoI sampling
            (:func:`sample_rois`).
        score_thresh, nms_thresh, detections_per_img: inference
            (:func:`cnnkit.detection.postprocess.postprocess_detections`).
        instance_heads: :class:`InstanceHead` modules run on the positive RoIs / detections.
        instance_rois_per_image: in training, the instance heads see at most this many of an
            image's positive RoIs, a uniform random subset (``None``: all of them, as in the
            paper). The mask / keypoint heads cost more per RoI than the whole box branch, and
            an object covered by several positive RoIs gives them near-identical targets.

    ``forward(features, proposals, image_shapes, targets=None) -> (detections, losses)``:
    proposals and targets in resized-image coordinates; in training ``detections`` is empty and
    ``losses`` holds ``loss_classifier`` and ``loss_box_reg`` (and the instance heads' losses);
    in eval ``losses`` is empty.
    """

    def __init__(
        self,
        pooler: RoIPooler,
        box_head: nn.Module,
        box_predictor: BoxPredictor,
        *,
        fg_iou: float = 0.5,
        bg_iou_lo: float = 0.1,
        batch_size_per_image: int = 64,
        positive_fraction: float = 0.25,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.3,
        detections_per_img: int = 100,
        instance_heads: Sequence[InstanceHead] = (),
        instance_rois_per_image: int | None = None,
    ) -> None:
        super().__init__()
        if instance_rois_per_image is not None and (
            isinstance(instance_rois_per_image, bool)
            or not isinstance(instance_rois_per_image, int)
            or instance_rois_per_image < 1
        ):
            raise ValueError(
                "instance_rois_per_image must be a positive integer or None, got "
                f"{instance_rois_per_image!r}"
            )
        if not 0.0 <= bg_iou_lo <= fg_iou <= 1.0:
            raise ValueError(
                f"need 0 <= box_bg_iou_lo <= box_fg_iou <= 1, got {bg_iou_lo} and {fg_iou}"
            )
        if batch_size_per_image <= 0 or not 0.0 < positive_fraction <= 1.0:
            raise ValueError(
                f"box_batch_size_per_image must be > 0 and box_positive_fraction in (0, 1], got "
                f"{batch_size_per_image} and {positive_fraction}"
            )
        self.pooler = pooler
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.fg_iou = fg_iou
        self.bg_iou_lo = bg_iou_lo
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.weights = BOX_CODER_WEIGHTS
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.instance_heads = nn.ModuleList(instance_heads)
        self.instance_rois_per_image = instance_rois_per_image
        # None, or a list collecting the per-class NMS of each image (postprocess_detections).
        self.nms_trace: list[tuple[Tensor, ...]] | None = None

    def box_outputs(
        self, features: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> tuple[Tensor, Tensor]:
        """Class logits ``[R, K + 1]`` and deltas ``[R, 4 (K + 1)]`` of the RoIs ``boxes``."""
        pooled, order = self.pooler.pool_sorted(features, boxes, image_shapes)
        class_logits, box_regression = self.box_predictor(self.box_head(pooled))
        if order is None:
            return class_logits, box_regression
        inverse = torch.argsort(order)  # back to the boxes' order: [R, K + 1] rows, not features
        return class_logits[inverse], box_regression[inverse]

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if self.training:
            if targets is None:
                raise ValueError("RoIHeads needs targets in training")
            return [], self._losses(features, proposals, image_shapes, targets)
        class_logits, box_regression = self.box_outputs(features, proposals, image_shapes)
        detections = postprocess_detections(
            class_logits,
            box_regression,
            proposals,
            image_shapes,
            weights=self.weights,
            score_thresh=self.score_thresh,
            nms_thresh=self.nms_thresh,
            detections_per_img=self.detections_per_img,
            nms_trace=self.nms_trace,
        )
        for head in self.instance_heads:
            head.predict(features, detections, image_shapes)
        return detections, {}

    def _losses(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict],
    ) -> dict[str, Tensor]:
        sample = sample_rois(
            proposals,
            targets,
            fg_iou=self.fg_iou,
            bg_iou_lo=self.bg_iou_lo,
            batch_size_per_image=self.batch_size_per_image,
            positive_fraction=self.positive_fraction,
            weights=self.weights,
        )
        class_logits, box_regression = self.box_outputs(
            features, sample.per_image(sample.boxes), image_shapes
        )
        losses = fast_rcnn_loss(
            class_logits, box_regression, sample.labels, sample.regression_targets
        )
        if len(self.instance_heads):
            positives, matched = self._positives(sample, targets, self.instance_rois_per_image)
            for head in self.instance_heads:
                losses.update(head.loss(features, positives, matched, image_shapes))
        return losses

    @staticmethod
    def _positives(
        sample: RoISample, targets: list[dict], limit: int | None
    ) -> tuple[list[Tensor], list[dict]]:
        positives, matched = [], []
        for boxes, labels, gt_index, target in zip(
            sample.per_image(sample.boxes),
            sample.per_image(sample.labels),
            sample.per_image(sample.gt_index),
            targets,
            strict=True,
        ):
            fg = torch.nonzero(labels > 0).flatten()
            if limit is not None and fg.numel() > limit:
                # The global RNG: the engine seeds it per step, so runs and resumes repeat.
                keep = torch.randperm(fg.numel())[:limit].to(fg.device)
                fg = fg[keep.sort().values]
            idx = gt_index[fg]
            positives.append(boxes[fg])
            matched.append(
                {
                    "labels": labels[fg],
                    "gt_index": idx,
                    "target": target,
                }
            )
        return positives, matched
