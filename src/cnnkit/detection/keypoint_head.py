"""The keypoint branch of Mask R-CNN (He et al., 2017, sec. 3 "Human Pose Estimation").

Each of the ``K`` keypoints of an instance is a one-hot ``S x S`` mask (``S = 56``): the head
predicts one ``S x S`` logit map per keypoint from the RoI's ``r x r`` features (``r = 14``) and
is trained with a softmax over the ``S^2`` positions of each map::

    L_kp = mean over visible keypoints k inside their RoI of  -log softmax(z_k)[c_k]

with ``z_k`` the flattened logits of keypoint ``k`` and ``c_k`` its cell (mean as torchvision's
``keypointrcnn_loss``). The head follows the paper and torchvision's ``KeypointRCNNHeads`` +
``KeypointRCNNPredictor`` (so the parameter counts agree): ``num_convs`` 3x3 convs of
``channels`` channels, each + ReLU (biases; kaiming normal, fan_out, ReLU gain; bias 0), a
``ConvTranspose2d(channels, K, 4, stride 2, padding 1)`` (``r -> 2r``) and bilinear x2
upsampling (``align_corners=False``) to ``S = 4r``. With ``norm="group"`` each conv is followed
by GroupNorm and has no bias (Wu & He, 2018).

Pixel convention: keypoints are points in the continuous frame of the boxes (pixel ``i`` spans
``[i, i + 1)``). Cell ``(row j_y, column j_x)`` of a RoI ``(x0, y0, x1, y1)`` covers
``x in [x0 + j_x w / S, x0 + (j_x + 1) w / S)`` (``w = x1 - x0``; likewise y), so encoding is
``j_x = floor((x - x0) S / w)`` (a point on the right / bottom edge goes to the last cell) and
a cell decodes to its centre ``x0 + (j_x + 1/2) w / S`` (as torchvision's decoder): the round
trip is unbiased and off by at most half a cell, ``w / (2S)`` (0.36 px for a 40 px box). A
COCO annotation (an integer pixel index ``i``, pixel centre ``i + 1/2``) can be fed as is (it
then decodes back in the same convention, with the same bound) or shifted by ``+1/2`` on
reading and ``-1/2`` on writing results (Detectron2); the head does not care which.

Decoding refines the arg-max cell to a sub-cell position with the vertex of the parabola
through the logits of the cell and its two neighbours, per axis (Newell et al. 2016 use a
quarter-cell step towards the larger neighbour; the parabola is exact for a softmax whose log is
quadratic, i.e. a Gaussian heatmap, and stays within the cell:
``dx = (z_left - z_right) / (2 (z_left - 2 z_max + z_right))`` in ``[-1/2, 1/2]``). It is one
gather on ``[D, K, S^2]`` instead of torchvision's per-RoI bicubic resize of every heatmap to
the box size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnnkit.detection.postprocess import split_per_image
from cnnkit.detection.roi_heads import InstanceHead, RoIPooler, conv_norm_relu
from cnnkit.layers.norm import check_norm

__all__ = [
    "KeypointHead",
    "heatmaps_to_keypoints",
    "keypoints_to_heatmap_targets",
    "loss_keypoint",
]


def keypoints_to_heatmap_targets(
    keypoints: Tensor, rois: Tensor, size: int = 56
) -> tuple[Tensor, Tensor]:
    """The cell of each keypoint in its RoI's ``size x size`` heatmap.

    Args:
        keypoints: ``[P, K, 3]`` (x, y, visibility) in the RoIs' frame (see the module
            docstring for the pixel convention).
        rois: ``[P, 4]`` xyxy.
        size: ``S``, the heatmap side.

    Returns:
        ``index`` int64 ``[P, K]``: ``j_y * S + j_x`` with ``j_x = floor((x - x0) S / w)`` (the
        last cell for ``x = x1``), 0 where invalid; ``valid`` bool ``[P, K]``: visibility > 0
        and ``x0 <= x <= x1``, ``y0 <= y <= y1`` (NaN coordinates are invalid). A RoI of zero
        width or height has no valid keypoint.
    """
    if keypoints.dim() != 3 or keypoints.shape[2] != 3:
        raise ValueError(f"keypoints must be [P, K, 3], got {list(keypoints.shape)}")
    if rois.dim() != 2 or rois.shape[1] != 4 or rois.shape[0] != keypoints.shape[0]:
        raise ValueError(
            f"rois must be [P, 4] with P = {keypoints.shape[0]}, got {list(rois.shape)}"
        )
    rois = rois.to(torch.float32)
    kp = keypoints.to(rois)
    x, y, vis = kp[..., 0], kp[..., 1], kp[..., 2]
    x0, y0, x1, y1 = (rois[:, i : i + 1] for i in range(4))
    valid = (vis > 0) & (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1) & (x1 > x0) & (y1 > y0)
    # Zero-size RoIs: any finite divisor; their keypoints are invalid above.
    scale_x = size / (x1 - x0).clamp(min=1e-6)
    scale_y = size / (y1 - y0).clamp(min=1e-6)
    fx = torch.where(valid, (x - x0) * scale_x, 0.0)
    fy = torch.where(valid, (y - y0) * scale_y, 0.0)
    # clamp: x = x1 lands on the last cell; rounding of (x - x0) * S / w cannot leave [0, S).
    jx = fx.floor().clamp(0, size - 1).long()
    jy = fy.floor().clamp(0, size - 1).long()
    index = torch.where(valid, jy * size + jx, 0)
    return index, valid


def _parabola_offset(left: Tensor, centre: Tensor, right: Tensor, interior: Tensor) -> Tensor:
    """Vertex of the parabola through ``(-1, left), (0, centre), (1, right)``; ``centre`` is a
    maximum, so the vertex lies in ``[-1/2, 1/2]``. 0 at the border or on a plateau."""
    curvature = left - 2.0 * centre + right  # <= 0 at a maximum
    ok = interior & (curvature < 0)
    offset = (left - right) / torch.where(ok, 2.0 * curvature, -1.0)
    return torch.where(ok, offset.clamp(-0.5, 0.5), 0.0)


def heatmaps_to_keypoints(heatmaps: Tensor, rois: Tensor) -> tuple[Tensor, Tensor]:
    """Keypoint positions and scores from the logit maps of ``D`` RoIs.

    Args:
        heatmaps: ``[D, K, S, S]`` logits (any ``S x S``; ``S_y x S_x`` works too).
        rois: ``[D, 4]`` xyxy, the RoIs the heatmaps were predicted for.

    Returns:
        ``xy`` float32 ``[D, K, 2]``: the arg-max cell's centre plus the parabolic sub-cell offset
        (module docstring), ``x = x0 + (j_x + 1/2 + dx) w / S``; ``scores`` float32 ``[D, K]``:
        the maximum logit (torchvision's keypoint score; not a probability).
    """
    if heatmaps.dim() != 4:
        raise ValueError(f"heatmaps must be [D, K, S, S], got {list(heatmaps.shape)}")
    num, k, height, width = heatmaps.shape
    if rois.dim() != 2 or rois.shape != (num, 4):
        raise ValueError(f"rois must be [D, 4] with D = {num}, got {list(rois.shape)}")
    flat = heatmaps.detach().to(torch.float32).flatten(2)  # [D, K, S^2]
    rois = rois.detach().to(flat)
    if num == 0 or k == 0:
        return flat.new_zeros((num, k, 2)), flat.new_zeros((num, k))
    scores, pos = flat.max(dim=2)
    jy, jx = pos // width, pos % width

    def at(dy: int, dx: int) -> Tensor:
        ny = (jy + dy).clamp(0, height - 1)
        nx = (jx + dx).clamp(0, width - 1)
        return flat.gather(2, (ny * width + nx).unsqueeze(2)).squeeze(2)

    off_x = _parabola_offset(at(0, -1), scores, at(0, 1), (jx > 0) & (jx < width - 1))
    off_y = _parabola_offset(at(-1, 0), scores, at(1, 0), (jy > 0) & (jy < height - 1))
    cell_w = ((rois[:, 2] - rois[:, 0]) / width).unsqueeze(1)
    cell_h = ((rois[:, 3] - rois[:, 1]) / height).unsqueeze(1)
    x = rois[:, 0:1] + (jx.to(flat) + 0.5 + off_x) * cell_w
    y = rois[:, 1:2] + (jy.to(flat) + 0.5 + off_y) * cell_h
    return torch.stack((x, y), dim=2), scores


def loss_keypoint(heatmaps: Tensor, index: Tensor, valid: Tensor) -> Tensor:
    """Mean cross-entropy of a softmax over the ``S^2`` positions of each valid keypoint's map.

    Args:
        heatmaps: ``[P, K, S, S]`` logits.
        index: int64 ``[P, K]`` target cells (:func:`keypoints_to_heatmap_targets`).
        valid: bool ``[P, K]``; invalid keypoints contribute nothing (zero gradient).

    Returns:
        A scalar; ``heatmaps.sum() * 0`` (zero, still connected to the graph) when no keypoint
        is valid.
    """
    if heatmaps.dim() != 4 or index.shape != heatmaps.shape[:2] or valid.shape != index.shape:
        raise ValueError(
            f"need heatmaps [P, K, S, S] and index / valid [P, K], got {list(heatmaps.shape)}, "
            f"{list(index.shape)} and {list(valid.shape)}"
        )
    if not bool(valid.any()):
        return heatmaps.sum() * 0.0
    logits = heatmaps.flatten(2)[valid].float()  # [V, S^2]
    return F.cross_entropy(logits, index[valid])


class KeypointHead(InstanceHead):
    """Keypoint R-CNN's head on the positive RoIs (training) or the detections (inference).

    Args:
        pooler: a :class:`RoIPooler` (RoIAlign ``r x r``, ``r = 14``) over the same maps as
            the box branch; heatmaps are ``S = 4r`` square.
        in_channels: channels of the pooled features.
        num_keypoints: ``K``.
        channels: channels of every 3x3 conv (512 in the paper).
        num_convs: number of 3x3 convs (8 in the paper).
        norm, norm_groups: ``"none"`` (conv biases, torchvision's layout) or a norm after every
            conv (``"group"``: Wu & He); ``"frozen_batch"`` is refused (a head trained from
            scratch needs statistics of its own).

    ``forward(pooled [R, in_channels, r, r]) -> [R, K, 4r, 4r]`` logits. Submodule names follow
    torchvision (``convs`` ~ ``keypoint_head``, ``kps_score_lowres`` as in its predictor).
    """

    def __init__(
        self,
        pooler: RoIPooler,
        in_channels: int,
        num_keypoints: int,
        channels: int = 512,
        num_convs: int = 8,
        norm: str = "none",
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        check_norm(norm)
        if norm == "frozen_batch":
            raise ValueError(
                "the keypoint head is trained from scratch: use norm 'group' or 'none' for it, "
                "not 'frozen_batch'"
            )
        if num_keypoints <= 0 or in_channels <= 0 or channels <= 0 or num_convs < 0:
            raise ValueError(
                f"KeypointHead needs num_keypoints > 0, positive channels and num_convs >= 0, "
                f"got num_keypoints={num_keypoints}, in_channels={in_channels}, "
                f"channels={channels}, num_convs={num_convs}"
            )
        self.pooler = pooler
        self.num_keypoints = num_keypoints
        self.heatmap_size = 4 * pooler.output_size
        layers: list[nn.Module] = []
        cin = in_channels
        for _ in range(num_convs):  # flat, as torchvision's KeypointRCNNHeads
            layers += conv_norm_relu(cin, channels, norm, norm_groups)
            cin = channels
        self.convs = nn.Sequential(*layers)
        self.kps_score_lowres = nn.ConvTranspose2d(cin, num_keypoints, 4, stride=2, padding=1)
        nn.init.kaiming_normal_(self.kps_score_lowres.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.kps_score_lowres.bias)

    def forward(self, pooled: Tensor) -> Tensor:
        x = self.kps_score_lowres(self.convs(pooled))  # [R, K, 2r, 2r]
        return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)

    def _zero(self) -> Tensor:
        # No positive RoI: a zero that still reaches every parameter (DDP expects gradients).
        return sum(p.sum() for p in self.parameters()) * 0.0

    def loss(
        self,
        features: dict[str, Tensor],
        positive_proposals: list[Tensor],
        matched_targets: list[dict],
        image_shapes: list[tuple[int, int]],
    ) -> dict[str, Tensor]:
        """``{"loss_keypoint": L_kp}`` over the positive RoIs (module docstring); the targets are
        each matched ground-truth instance's ``keypoints`` (resized-image coordinates)."""
        rois = torch.cat([p.detach() for p in positive_proposals]).to(torch.float32)
        keypoints = []
        for i, matched in enumerate(matched_targets):
            target = matched["target"]
            kp = target.get("keypoints")
            if kp is None:
                raise ValueError(
                    f"targets[{i}] has no 'keypoints': a keypoint R-CNN trains on data with "
                    "keypoint annotations"
                )
            if kp.dim() != 3 or kp.shape[1:] != (self.num_keypoints, 3):
                raise ValueError(
                    f"targets[{i}]['keypoints'] must be [N, {self.num_keypoints}, 3] "
                    f"(the model's num_keypoints), got {list(kp.shape)}"
                )
            gt_index = matched["gt_index"].to(rois.device)
            keypoints.append(kp.to(device=rois.device, dtype=torch.float32)[gt_index])
        if rois.shape[0] == 0:
            return {"loss_keypoint": self._zero()}
        index, valid = keypoints_to_heatmap_targets(torch.cat(keypoints), rois, self.heatmap_size)
        pooled, order = self.pooler.pool_sorted(features, positive_proposals, image_shapes)
        if order is not None:  # permute the small targets rather than the features
            index, valid = index[order], valid[order]
        return {"loss_keypoint": loss_keypoint(self(pooled), index, valid)}

    def predict(
        self,
        features: dict[str, Tensor],
        detections: list[dict[str, Tensor]],
        image_shapes: list[tuple[int, int]],
    ) -> None:
        """Add to each detection dict (``boxes`` ``[D, 4]``, resized-image coordinates):
        ``keypoints`` float32 ``[D, K, 3]`` (x, y, 1), ``keypoints_scores`` float32 ``[D, K]``
        (maximum logits) and ``keypoint_heatmaps`` float32 ``[D, K, S, S]`` (logits)."""
        if not detections:
            return
        boxes = [d["boxes"] for d in detections]
        counts = [int(b.shape[0]) for b in boxes]
        rois = torch.cat(boxes).to(torch.float32)
        k, size = self.num_keypoints, self.heatmap_size
        if rois.shape[0] == 0 and not torch.jit.is_tracing():
            heatmaps = rois.new_zeros((0, k, size, size))
        else:
            pooled, order = self.pooler.pool_sorted(features, boxes, image_shapes)
            heatmaps = self(pooled).to(torch.float32)
            if order is not None:
                heatmaps = heatmaps[torch.argsort(order)]
        xy, scores = heatmaps_to_keypoints(heatmaps, rois)
        keypoints = torch.cat((xy, torch.ones_like(xy[..., :1])), dim=2)
        for det, kp, sc, hm in zip(
            detections,
            split_per_image(keypoints, counts),
            split_per_image(scores, counts),
            split_per_image(heatmaps, counts),
            strict=True,
        ):
            det["keypoints"] = kp
            det["keypoints_scores"] = sc
            det["keypoint_heatmaps"] = hm
