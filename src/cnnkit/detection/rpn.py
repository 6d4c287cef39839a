"""Region Proposal Network (Ren et al., 2015, Sec. 3.1), torchvision's formulation.

A small conv head slides over every feature map and predicts, for each of the ``A`` anchors at
each position, an objectness logit and box deltas ``(t_x, t_y, t_w, t_h)`` relative to the
anchor (box coder weights 1, 1, 1, 1). Training minimizes (Ren et al., eq. 1)::

    L = 1/N_cls sum_i BCE(p_i, p*_i) + 1/N_cls sum_i p*_i smoothL1_{beta=1/9}(t_i - t*_i)

over the anchors sampled by :class:`BalancedSampler` (``N_cls`` = the number sampled;
torchvision's normalization of the regression term, in place of the paper's lambda / N_reg).
Proposals: decode, keep the ``pre_nms_top_n`` best per level, clip, drop tiny and low-score
boxes, NMS per level, keep the ``post_nms_top_n`` best per image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnnkit.detection.anchors import AnchorGenerator
from cnnkit.detection.matching import BELOW_LOW, BETWEEN, BalancedSampler, Matcher
from cnnkit.ops import (
    batched_nms,
    box_iou,
    clip_boxes_to_image,
    decode_boxes,
    encode_boxes,
    remove_small_boxes,
    smooth_l1_loss,
)

BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
BOX_LOSS_BETA = 1.0 / 9


class RPNHead(nn.Module):
    """``conv_depth`` x (3x3 conv + ReLU), then 1x1 convs to ``A`` logits and ``4A`` deltas.

    The same head runs on every level (Ren et al.'s "n x n sliding window" with n = 3). Layout,
    initialization (normal, std 0.01, bias 0) and module names as torchvision's ``RPNHead``.
    """

    def __init__(self, in_channels: int, num_anchors: int, conv_depth: int = 1) -> None:
        super().__init__()
        if num_anchors < 1 or conv_depth < 1 or in_channels < 1:
            raise ValueError(
                f"RPNHead needs positive in_channels, num_anchors and conv_depth, got "
                f"{in_channels}, {num_anchors}, {conv_depth}"
            )
        self.num_anchors = num_anchors
        self.conv = nn.Sequential(
            *(
                nn.Sequential(nn.Conv2d(in_channels, in_channels, 3, padding=1), nn.ReLU(True))
                for _ in range(conv_depth)
            )
        )
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(in_channels, 4 * num_anchors, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """``[N, C, H_l, W_l]`` per level -> (``[N, A, H_l, W_l]`` logits, ``[N, 4A, H_l, W_l]``
        deltas) per level."""
        logits, deltas = [], []
        for x in features:
            t = self.conv(x)
            logits.append(self.cls_logits(t))
            deltas.append(self.bbox_pred(t))
        return logits, deltas


def _flatten(maps: list[Tensor], channels: int) -> Tensor:
    """``[N, A * C, H, W]`` per level -> ``[N, sum_l H_l W_l A, C]`` in the anchors' order
    (level, position, anchor)."""
    out = []
    for m in maps:
        n, _, h, w = m.shape
        out.append(m.view(n, -1, channels, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, channels))
    return torch.cat(out, dim=1)


class RegionProposalNetwork(nn.Module):
    """Proposals (and, in training, the RPN losses) for a padded batch.

    Args:
        anchor_generator: the anchors of each feature map.
        head: an :class:`RPNHead` whose ``num_anchors`` equals the anchors per location.
        fg_iou, bg_iou: anchors with IoU >= ``fg_iou`` are positives, < ``bg_iou`` negatives
            (plus each ground truth's best anchors, :class:`Matcher`'s low-quality matches).
        batch_size_per_image, positive_fraction: the anchors sampled for the loss.
        pre_nms_top_n, post_nms_top_n: ``{"training": n, "testing": n}``; the first per level,
            the second per image.
        nms_thresh, score_thresh, min_size: NMS IoU, minimum objectness probability and
            minimum box side (pixels of the resized image).

    ``nms_trace``: ``None``, or a list to which every image's NMS appends ``(boxes [N, 4],
    scores [N], levels [N], kept [M])``: the candidates before NMS and the indices it kept, by
    decreasing score (the proposals are ``boxes[kept[:post_nms_top_n]]``); what
    :func:`cnnkit.detection.explain.explain` shows.
    """

    def __init__(
        self,
        anchor_generator: AnchorGenerator,
        head: RPNHead,
        fg_iou: float = 0.7,
        bg_iou: float = 0.3,
        batch_size_per_image: int = 256,
        positive_fraction: float = 0.5,
        pre_nms_top_n: dict[str, int] | None = None,
        post_nms_top_n: dict[str, int] | None = None,
        nms_thresh: float = 0.7,
        score_thresh: float = 0.0,
        min_size: float = 1e-3,
    ) -> None:
        super().__init__()
        per_location = set(anchor_generator.num_anchors_per_location())
        if per_location != {head.num_anchors}:
            raise ValueError(
                f"the RPN head predicts {head.num_anchors} anchors per location but the anchor "
                f"generator makes {sorted(per_location)}: give every level as many sizes x "
                f"aspect ratios as the head's num_anchors"
            )
        self.anchor_generator = anchor_generator
        self.head = head
        self.matcher = Matcher(fg_iou, bg_iou, allow_low_quality_matches=True)
        self.sampler = BalancedSampler(batch_size_per_image, positive_fraction)
        self.pre_nms_top_n = _top_n(pre_nms_top_n, "pre_nms_top_n")
        self.post_nms_top_n = _top_n(post_nms_top_n, "post_nms_top_n")
        self.nms_thresh = nms_thresh
        self.score_thresh = score_thresh
        self.min_size = min_size
        self.nms_trace: list[tuple[Tensor, ...]] | None = None

    def _mode(self) -> str:
        return "training" if self.training else "testing"

    def forward(
        self,
        image_sizes: list[tuple[int, int]],
        padded_size: tuple[int, int],
        features: dict[str, Tensor],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """Proposals per image and the losses.

        Args:
            image_sizes: ``(h, w)`` of each image inside the padded batch (after resizing).
            padded_size: ``(H, W)`` of the padded batch tensor.
            features: ``{name: Tensor[B, C, H_l, W_l]}``, fine to coarse.
            targets: per image ``boxes`` ``[G_i, 4]`` in resized coordinates (optional
                ``iscrowd``); required in training.

        Returns:
            (``[Tensor[P_i, 4]]`` detached proposals in resized image coordinates, losses: in
            training ``loss_objectness`` and ``loss_rpn_box_reg``, else empty).
        """
        maps = list(features.values())
        logits, deltas = self.head(maps)
        anchors = self.anchor_generator(
            padded_size, [m.shape[-2:] for m in maps], device=maps[0].device
        )
        per_level = [lg.shape[1] * lg.shape[2] * lg.shape[3] for lg in logits]
        objectness = _flatten(logits, 1).squeeze(2)  # [B, A_total]
        box_deltas = _flatten(deltas, 4)  # [B, A_total, 4]
        proposals = self._proposals(
            anchors, objectness.detach(), box_deltas.detach(), per_level, image_sizes
        )
        losses: dict[str, Tensor] = {}
        if self.training:
            if targets is None:
                raise ValueError("RegionProposalNetwork needs targets in training mode")
            losses = self._losses(anchors, objectness, box_deltas, targets)
        return proposals, losses

    # --- proposals ----------------------------------------------------------------------------

    def _proposals(
        self,
        anchors: Tensor,
        objectness: Tensor,
        deltas: Tensor,
        per_level: list[int],
        image_sizes: list[tuple[int, int]],
    ) -> list[Tensor]:
        """Top-k per level (all images at once), decode, then per image clip / filter / NMS."""
        pre_n = self.pre_nms_top_n[self._mode()]
        post_n = self.post_nms_top_n[self._mode()]
        objectness = objectness.float()
        top, levels, start = [], [], 0
        for level, count in enumerate(per_level):
            k = min(pre_n, count)
            idx = objectness[:, start : start + count].topk(k, dim=1).indices + start
            top.append(idx)
            levels.append(torch.full((k,), level, dtype=torch.int64, device=idx.device))
            start += count
        top_idx = torch.cat(top, dim=1)  # [B, K]
        level_ids = torch.cat(levels)  # [K]
        scores = torch.sigmoid(objectness.gather(1, top_idx))  # [B, K]
        batch = top_idx.shape[0]
        chosen_deltas = deltas.float().gather(1, top_idx[..., None].expand(-1, -1, 4))
        boxes = decode_boxes(
            anchors[top_idx.reshape(-1)].float(), chosen_deltas.reshape(-1, 4), BOX_WEIGHTS
        ).view(batch, -1, 4)
        proposals = []
        for i, size in enumerate(image_sizes):
            b = clip_boxes_to_image(boxes[i], size)
            s, lv = scores[i], level_ids
            keep = remove_small_boxes(b, self.min_size)
            b, s, lv = b[keep], s[keep], lv[keep]
            keep = torch.where(s >= self.score_thresh)[0]
            b, s, lv = b[keep], s[keep], lv[keep]
            keep = batched_nms(b, s, lv, self.nms_thresh)
            if self.nms_trace is not None:
                self.nms_trace.append((b, s, lv, keep))
            proposals.append(b[keep[:post_n]])
        return proposals

    # --- losses -------------------------------------------------------------------------------

    def _assign(self, anchors: Tensor, target: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """One image: (int64 labels ``[A]`` 1 / 0 / -1 = positive / negative / ignored,
        matched gt boxes ``[A, 4]``)."""
        gt = target["boxes"].to(anchors)
        crowd = target.get("iscrowd")
        crowd_boxes = gt[:0]
        if crowd is not None and bool(crowd.any()):
            crowd = crowd.to(torch.bool)
            gt, crowd_boxes = gt[~crowd], gt[crowd]  # crowd boxes never become positives
        matches = self.matcher(box_iou(gt, anchors))
        labels = torch.ones_like(matches)
        labels[matches == BELOW_LOW] = 0
        labels[matches == BETWEEN] = -1
        if crowd_boxes.shape[0]:
            # An anchor overlapping a crowd region is no clean negative: ignore it.
            near_crowd = box_iou(crowd_boxes, anchors).max(dim=0).values >= self.matcher.low
            labels[(labels == 0) & near_crowd] = -1
        matched = gt[matches.clamp(min=0)] if gt.shape[0] else torch.zeros_like(anchors)
        return labels, matched

    def _losses(
        self,
        anchors: Tensor,
        objectness: Tensor,
        deltas: Tensor,
        targets: list[dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        labels, matched = zip(*(self._assign(anchors, t) for t in targets), strict=True)
        positives, negatives = self.sampler(list(labels))
        pos = torch.cat(positives)  # [B * A]
        sampled = pos | torch.cat(negatives)
        num_sampled = int(sampled.sum())
        logits = objectness.reshape(-1).float()
        pred = deltas.reshape(-1, 4).float()
        if num_sampled == 0:  # nothing to learn from: zero losses that keep the graph
            zero = logits.sum() * 0.0 + pred.sum() * 0.0
            return {"loss_objectness": zero, "loss_rpn_box_reg": zero.clone()}
        pos_idx = torch.where(pos)[0]
        # Image i's anchor a sits at i * A + a in the flattened batch.
        targets_reg = encode_boxes(
            anchors[pos_idx % anchors.shape[0]], torch.cat(matched)[pos_idx], BOX_WEIGHTS
        )
        box_loss = (
            smooth_l1_loss(pred[pos_idx], targets_reg, beta=BOX_LOSS_BETA, reduction="sum")
            / num_sampled
        )
        objectness_loss = F.binary_cross_entropy_with_logits(
            logits[sampled], pos[sampled].to(logits.dtype)
        )
        return {"loss_objectness": objectness_loss, "loss_rpn_box_reg": box_loss}


def _top_n(value: dict[str, int] | None, name: str) -> dict[str, int]:
    if value is None:
        return {"training": 2000, "testing": 1000}
    if set(value) != {"training", "testing"} or any(
        isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value.values()
    ):
        raise ValueError(
            f'{name} must be {{"training": n, "testing": m}} with positive integers, got {value!r}'
        )
    return dict(value)
