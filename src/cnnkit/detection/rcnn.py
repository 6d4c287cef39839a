"""Faster R-CNN (Ren et al., 2015), Fast R-CNN (Girshick, 2015), Mask R-CNN (He et al., 2017)
and keypoint R-CNN (the same paper, sec. 5) as one configurable module.

The pipeline reads as torchvision's ``GeneralizedRCNN``::

    transform -> backbone (+ FPN) -> RPN -> RoI heads -> postprocess

``head="fpn"``: a feature pyramid P2..P6 over C2..C5 (Lin et al., 2017); the RPN runs on every
level (one anchor size per level) and RoIs are pooled from the level of FPN eq. 1 into the
two-layer MLP head. ``head="c4"``: the original ResNet design (He et al., 2016, appendix A): RPN
and RoI pooling on C4 (stride 16), the last stage (C5) run on each pooled RoI as the box head.
``rpn=False`` is Fast R-CNN: the proposals come from outside (e.g. selective search, or a trained
RPN's ``propose``). ``mask=True`` adds Mask R-CNN's mask branch and ``num_keypoints > 0`` the
keypoint branch: heads on the positive RoIs in training and on the detections in inference
(:class:`~cnnkit.detection.mask_head.MaskHead`,
:class:`~cnnkit.detection.keypoint_head.KeypointHead`), pooling ``14 x 14`` RoIs from the same
maps as the box branch.

In training ``model(images, targets)`` returns named scalar losses; in eval ``model(images)``
returns one dict per image (``boxes`` in original image coordinates, ``labels`` in ``1..K``,
``scores``; with a mask head ``mask_probs [D, 1, 28, 28]`` box-local and ``masks [D, 1, H, W]``
pasted into the original image; with a keypoint head ``keypoints [D, K, 3]`` in original
coordinates, ``keypoints_scores [D, K]`` and ``keypoint_heatmaps [D, K, 56, 56]``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from cnnkit.detection.anchors import AnchorGenerator
from cnnkit.detection.backbone import Backbone
from cnnkit.detection.fpn import FeaturePyramid
from cnnkit.detection.keypoint_head import KeypointHead
from cnnkit.detection.mask_head import MaskHead
from cnnkit.detection.paste import paste_masks as paste_into_image
from cnnkit.detection.roi_heads import (
    ROI_OPS,
    BoxPredictor,
    InstanceHead,
    ResStageHead,
    RoIHeads,
    RoIPooler,
    TwoMLPHead,
)
from cnnkit.detection.rpn import RegionProposalNetwork, RPNHead
from cnnkit.detection.transform import DetectionTransform, resize_boxes
from cnnkit.ops import clip_boxes_to_image

__all__ = ["HEADS", "FasterRCNN"]

HEADS = ("fpn", "c4")
# Anchor sizes of the two designs: one size per FPN level P2..P6 (FPN sec. 4.1), or all three
# scales on the single C4 map (Faster R-CNN sec. 3.1.1: 128^2, 256^2, 512^2).
DEFAULT_ANCHOR_SIZES = {"fpn": (32, 64, 128, 256, 512), "c4": (128, 256, 512)}
# RoIAlign size of the mask and keypoint branches (Mask R-CNN, fig. 4: 14 x 14 -> 28 x 28 masks;
# sec. 5: 56 x 56 keypoint heatmaps).
INSTANCE_ROI_SIZE = 14


class FasterRCNN(nn.Module):
    """Faster / Fast R-CNN with a ResNet backbone, FPN or C4 head. Arguments are JSON values (the
    registry records them); ``num_classes`` = K foreground classes (labels ``1..K``).

    Backbone: ``backbone`` (a registry ResNet name), ``backbone_widths``, ``norm``
    (``"frozen_batch"`` for ImageNet weights, ``"batch"``/``"group"`` from scratch), ``norm_groups``,
    ``trainable_layers`` (torchvision's rule; ``None``: 3 with frozen BN, else all). With
    ``norm="group"`` the FPN convs get GroupNorm too (Wu & He, 2018); otherwise they have biases
    and no norm (torchvision's layout).

    RPN: ``anchor_sizes`` (``None``: the design's default), ``aspect_ratios``, ``rpn_*``.
    RoI heads: ``roi_op`` (``"align"`` | ``"pool"``), ``roi_output_size``, ``sampling_ratio``,
    ``representation_size`` (FPN's MLP), ``box_*`` (sampling and inference, see
    :class:`~cnnkit.detection.roi_heads.RoIHeads`). Transform: ``min_size``, ``max_size``,
    ``image_mean``, ``image_std``.

    Instance heads: ``mask`` (Mask R-CNN's branch, ``mask_channels`` wide; 256 in the paper),
    ``num_keypoints`` (0: none; else the keypoint branch, ``keypoint_convs`` convolutions of
    ``keypoint_channels``; 8 x 512 in the paper); ``instance_rois_per_image`` caps the positive
    RoIs per image that they train on (``None``: all, the paper's). With ``norm="group"`` their convolutions get
    GroupNorm (Wu & He); otherwise biases and no norm (torchvision's layout). Both pool with
    ``roi_op`` (so RoIPool vs RoIAlign can be compared on masks, Mask R-CNN table 2c).

    ``forward(images, targets=None, proposals=None, *, paste_masks=True)``: ``images`` a list of
    ``[3, H_i, W_i]`` float images in [0, 1]; ``targets`` per-image dicts (``boxes`` xyxy,
    ``labels``; ``masks`` uint8 ``[N, H_i, W_i]`` for a mask head, ``keypoints`` ``[N, K, 3]`` for
    a keypoint head) in original coordinates, required in training; ``proposals`` per-image
    ``[P_i, 4]`` in original coordinates, required when ``rpn=False`` (ignored otherwise).
    ``paste_masks=False`` skips the dense ``masks`` (``[D, H, W]`` floats per image: 426 MB for
    100 detections at 800 x 1333); ``mask_probs`` and the boxes are then what
    :func:`~cnnkit.detection.paste.masks_to_rles` needs.
    """

    def __init__(
        self,
        num_classes: int = 80,
        backbone: str = "resnet50",
        backbone_widths: list[int] | None = None,
        norm: str = "frozen_batch",
        norm_groups: int = 32,
        trainable_layers: int | None = None,
        head: str = "fpn",
        fpn_channels: int = 256,
        anchor_sizes: list[float] | None = None,
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        rpn: bool = True,
        rpn_pre_nms_top_n_train: int = 2000,
        rpn_pre_nms_top_n_test: int = 1000,
        rpn_post_nms_top_n_train: int = 2000,
        rpn_post_nms_top_n_test: int = 1000,
        rpn_nms_thresh: float = 0.7,
        rpn_fg_iou: float = 0.7,
        rpn_bg_iou: float = 0.3,
        rpn_batch_size_per_image: int = 256,
        rpn_positive_fraction: float = 0.5,
        roi_op: str = "align",
        roi_output_size: int = 7,
        sampling_ratio: int = 2,
        representation_size: int = 1024,
        box_fg_iou: float = 0.5,
        box_bg_iou_lo: float = 0.1,
        box_batch_size_per_image: int = 64,
        box_positive_fraction: float = 0.25,
        box_score_thresh: float = 0.05,
        box_nms_thresh: float = 0.3,
        box_detections_per_img: int = 100,
        min_size: int = 800,
        max_size: int = 1333,
        image_mean: Sequence[float] = (0.485, 0.456, 0.406),
        image_std: Sequence[float] = (0.229, 0.224, 0.225),
        mask: bool = False,
        mask_channels: int = 256,
        num_keypoints: int = 0,
        keypoint_channels: int = 512,
        keypoint_convs: int = 8,
        instance_rois_per_image: int | None = None,
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if roi_op not in ROI_OPS:
            raise ValueError(f"roi_op must be one of {ROI_OPS}, got {roi_op!r}")
        if (
            isinstance(num_keypoints, bool)
            or not isinstance(num_keypoints, int)
            or num_keypoints < 0
        ):
            raise ValueError(f"num_keypoints must be an integer >= 0, got {num_keypoints!r}")
        self.num_classes = num_classes
        self.min_size = min_size
        self.max_size = max_size
        self.has_rpn = bool(rpn)
        self.head = head
        self.transform = DetectionTransform(min_size, max_size, image_mean, image_std)
        self.backbone = Backbone(backbone, backbone_widths, norm, norm_groups, trainable_layers)
        channels = self.backbone.stage_channels
        if head == "fpn":
            self.fpn = FeaturePyramid(
                channels,
                fpn_channels,
                norm="group" if norm == "group" else "none",
                norm_groups=norm_groups,
            )
            rpn_maps = list(self.fpn.names)  # P2..P6
            pool_maps = rpn_maps[:-1]  # P2..P5: P6 serves only the RPN (FPN sec. 4.2)
            rpn_channels = fpn_channels
            box_head: nn.Module = TwoMLPHead(fpn_channels * roi_output_size**2, representation_size)
            head_channels = representation_size
            pooled_channels = fpn_channels
        else:
            self.fpn = None
            rpn_maps = pool_maps = ["c4"]
            rpn_channels = channels[-2]
            last = getattr(self.backbone.body, self.backbone.stage_names[-1])
            box_head = ResStageHead(last, channels[-1], shared=True)
            head_channels = channels[-1]
            pooled_channels = channels[-2]
        self._rpn_maps = rpn_maps
        sizes = list(DEFAULT_ANCHOR_SIZES[head] if anchor_sizes is None else anchor_sizes)
        ratios = [float(r) for r in aspect_ratios]
        if head == "fpn":
            if len(sizes) != len(rpn_maps):
                raise ValueError(
                    f"anchor_sizes needs one size per FPN level {rpn_maps}, got {sizes}"
                )
            generator = AnchorGenerator([[float(s)] for s in sizes], [ratios] * len(sizes))
        else:
            generator = AnchorGenerator([[float(s) for s in sizes]], [ratios])
        if self.has_rpn:
            self.rpn = RegionProposalNetwork(
                generator,
                RPNHead(rpn_channels, generator.num_anchors_per_location()[0]),
                fg_iou=rpn_fg_iou,
                bg_iou=rpn_bg_iou,
                batch_size_per_image=rpn_batch_size_per_image,
                positive_fraction=rpn_positive_fraction,
                pre_nms_top_n={
                    "training": rpn_pre_nms_top_n_train,
                    "testing": rpn_pre_nms_top_n_test,
                },
                post_nms_top_n={
                    "training": rpn_post_nms_top_n_train,
                    "testing": rpn_post_nms_top_n_test,
                },
                nms_thresh=rpn_nms_thresh,
            )
        else:
            self.rpn = None
        self.num_keypoints = num_keypoints
        instance_heads = self._instance_heads(
            pool_maps,
            pooled_channels,
            sampling_ratio,
            roi_op,
            norm="group" if norm == "group" else "none",
            norm_groups=norm_groups,
            mask=mask,
            mask_channels=mask_channels,
            keypoint_channels=keypoint_channels,
            keypoint_convs=keypoint_convs,
        )
        self.roi_heads = RoIHeads(
            RoIPooler(pool_maps, roi_output_size, sampling_ratio, roi_op),
            box_head,
            BoxPredictor(head_channels, num_classes + 1),
            fg_iou=box_fg_iou,
            bg_iou_lo=box_bg_iou_lo,
            batch_size_per_image=box_batch_size_per_image,
            positive_fraction=box_positive_fraction,
            score_thresh=box_score_thresh,
            nms_thresh=box_nms_thresh,
            detections_per_img=box_detections_per_img,
            instance_heads=instance_heads,
            instance_rois_per_image=instance_rois_per_image,
        )

    def _instance_heads(
        self,
        pool_maps: list[str],
        in_channels: int,
        sampling_ratio: int,
        roi_op: str,
        *,
        norm: str,
        norm_groups: int,
        mask: bool,
        mask_channels: int,
        keypoint_channels: int,
        keypoint_convs: int,
    ) -> list[InstanceHead]:
        """The mask and keypoint branches asked for, each with its own 14 x 14 pooler."""
        heads: list[InstanceHead] = []
        if mask:
            pooler = RoIPooler(pool_maps, INSTANCE_ROI_SIZE, sampling_ratio, roi_op)
            heads.append(
                MaskHead(
                    pooler,
                    in_channels,
                    self.num_classes,
                    channels=mask_channels,
                    num_convs=4,
                    norm=norm,
                    norm_groups=norm_groups,
                )
            )
        if self.num_keypoints:
            pooler = RoIPooler(pool_maps, INSTANCE_ROI_SIZE, sampling_ratio, roi_op)
            heads.append(
                KeypointHead(
                    pooler,
                    in_channels,
                    self.num_keypoints,
                    channels=keypoint_channels,
                    num_convs=keypoint_convs,
                    norm=norm,
                    norm_groups=norm_groups,
                )
            )
        return heads

    @property
    def mask_head(self) -> MaskHead | None:
        """The mask branch (inside ``roi_heads.instance_heads``), or None."""
        return next((h for h in self.roi_heads.instance_heads if isinstance(h, MaskHead)), None)

    @property
    def keypoint_head(self) -> KeypointHead | None:
        """The keypoint branch (inside ``roi_heads.instance_heads``), or None."""
        heads = self.roi_heads.instance_heads
        return next((h for h in heads if isinstance(h, KeypointHead)), None)

    @property
    def has_masks(self) -> bool:
        """Whether the model predicts instance masks."""
        return self.mask_head is not None

    def features(self, x: Tensor) -> dict[str, Tensor]:
        """``[B, 3, H, W]`` -> the named feature maps (``p2``..``p6``, or ``c4``)."""
        # Channels-last activations: oneDNN's CPU convolutions skip their layout reorders (7-10%
        # of a training step measured on R18-FPN at 128 px), and RoIAlign reads NHWC rows anyway.
        x = x.contiguous(memory_format=torch.channels_last)
        if self.fpn is not None:
            return self.fpn(self.backbone(x))
        return {"c4": self.backbone(x, num_stages=len(self.backbone.stage_names) - 1)[-1]}

    def forward(
        self,
        images: list[Tensor],
        targets: list[dict] | None = None,
        proposals: list[Tensor] | None = None,
        *,
        paste_masks: bool = True,
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        if self.training and targets is None:
            raise ValueError("FasterRCNN needs targets in training mode")
        if not self.has_rpn and proposals is None:
            raise ValueError("this Fast R-CNN model (rpn=False) needs proposals")
        if self.training:
            self._check_instance_targets(images, targets)
        batch, targets = self.transform(images, targets)
        features = self.features(batch.tensors)
        if self.rpn is not None:
            rpn_features = {name: features[name] for name in self._rpn_maps}
            boxes, losses = self.rpn(batch.image_sizes, batch.padded_size, rpn_features, targets)
        else:
            boxes = self._resize_proposals(proposals, batch.original_sizes, batch.image_sizes)
            losses = {}
        detections, roi_losses = self.roi_heads(features, boxes, batch.image_sizes, targets)
        if self.training:
            return {**losses, **roi_losses}
        detections = self.transform.postprocess(detections, batch.image_sizes, batch.original_sizes)
        if paste_masks and self.has_masks:
            for det, size in zip(detections, batch.original_sizes, strict=True):
                det["masks"] = paste_into_image(det["mask_probs"], det["boxes"], size)
        return detections

    def _check_instance_targets(self, images: list[Tensor], targets: list[dict]) -> None:
        """The masks / keypoints the instance heads need, with shapes that fit the boxes and
        images (the transform would silently stretch a mask of the wrong size)."""
        if not isinstance(targets, (list, tuple)) or not isinstance(images, (list, tuple)):
            return  # the transform reports it
        for i, (image, target) in enumerate(zip(images, targets, strict=False)):
            if not isinstance(image, Tensor) or not isinstance(target, dict):
                continue  # the transform reports it
            if not isinstance(target.get("boxes"), Tensor):
                continue
            n = target["boxes"].shape[0]
            if self.has_masks:
                masks = target.get("masks")
                size = tuple(image.shape[-2:])
                if not isinstance(masks, Tensor) or tuple(masks.shape) != (n, *size):
                    got = list(masks.shape) if isinstance(masks, Tensor) else masks
                    raise ValueError(
                        f"targets[{i}]['masks'] must be a uint8 Tensor[{n}, {size[0]}, "
                        f"{size[1]}] (one mask per box, the image's size) for the mask head, "
                        f"got {got}"
                    )
            if self.num_keypoints:
                points = target.get("keypoints")
                shape = (n, self.num_keypoints, 3)
                if not isinstance(points, Tensor) or tuple(points.shape) != shape:
                    got = list(points.shape) if isinstance(points, Tensor) else points
                    raise ValueError(
                        f"targets[{i}]['keypoints'] must be a float Tensor{list(shape)} (x, y, "
                        f"visibility per keypoint) for the keypoint head, got {got}"
                    )

    @staticmethod
    def _resize_proposals(
        proposals: list[Tensor],
        original_sizes: list[tuple[int, int]],
        image_sizes: list[tuple[int, int]],
    ) -> list[Tensor]:
        if len(proposals) != len(original_sizes):
            raise ValueError(f"got {len(original_sizes)} images but {len(proposals)} proposals")
        out = []
        for i, (p, old, new) in enumerate(zip(proposals, original_sizes, image_sizes, strict=True)):
            if not isinstance(p, Tensor) or p.dim() != 2 or p.shape[1] != 4:
                shape = list(p.shape) if isinstance(p, Tensor) else type(p).__name__
                raise ValueError(f"proposals[{i}] must be a Tensor[P, 4] (xyxy), got {shape}")
            out.append(clip_boxes_to_image(resize_boxes(p.float(), old, new), new))
        return out

    @torch.no_grad()
    def propose(self, images: list[Tensor]) -> list[Tensor]:
        """The RPN's proposals ``[P_i, 4]`` for each image, in original image coordinates (the
        testing settings: ``rpn_pre/post_nms_top_n_test``), whatever the module's mode."""
        if self.rpn is None:
            raise ValueError("this Fast R-CNN model (rpn=False) has no RPN to propose with")
        was_training = self.training
        self.eval()
        try:
            batch, _ = self.transform(images)
            features = self.features(batch.tensors)
            rpn_features = {name: features[name] for name in self._rpn_maps}
            boxes, _ = self.rpn(batch.image_sizes, batch.padded_size, rpn_features)
        finally:
            self.train(was_training)
        return [
            resize_boxes(b, new, old)
            for b, new, old in zip(boxes, batch.image_sizes, batch.original_sizes, strict=True)
        ]
