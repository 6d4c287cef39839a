"""Detection operators with torchvision's signatures, in pure PyTorch (CPU and CUDA)."""

from cnnkit.ops.boxes import (
    box_area,
    box_convert,
    box_iou,
    clip_boxes_to_image,
    decode_boxes,
    elementwise_box_iou,
    encode_boxes,
    remove_small_boxes,
    smooth_l1_loss,
)
from cnnkit.ops.nms import batched_nms, nms
from cnnkit.ops.roi import MultiScaleRoIAlign, RoIAlign, roi_align
from cnnkit.ops.roi_pool import RoIPool, roi_pool

__all__ = [
    "MultiScaleRoIAlign",
    "RoIAlign",
    "RoIPool",
    "batched_nms",
    "box_area",
    "box_convert",
    "box_iou",
    "clip_boxes_to_image",
    "decode_boxes",
    "elementwise_box_iou",
    "encode_boxes",
    "nms",
    "remove_small_boxes",
    "roi_align",
    "roi_pool",
    "smooth_l1_loss",
]
