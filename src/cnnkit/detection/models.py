"""Named detectors: one literal table row per registry entry (``create_model(name)``).

Importing this module registers them (``cnnkit.models.registry`` imports it lazily). Families:
``faster_rcnn`` (with an RPN), ``fast_rcnn`` (fed external proposals), ``mask_rcnn`` (+ the mask
branch) and ``keypoint_rcnn`` (+ the keypoint branch); all carry the task tag ``"detection"``. The C4 rows pool 14 x 14 RoIs: the last ResNet stage (stride 2) makes them
7 x 7 before the average pooling (He et al., 2016, appendix A; Detectron's C4 setting).
"""

from __future__ import annotations

from typing import Any

from cnnkit.detection.rcnn import FasterRCNN
from cnnkit.models.registry import register_model

TASK = "detection"

# (name, family, paper, constructor arguments); inputs are 800 px (the transform's default
# min_size) except for the 128 px scenes model.
# The digit-scenes default: trained from scratch (plain BatchNorm) on 128 x 128 images
# (README, "Detection": how each value was chosen).
_LITE: dict[str, Any] = {
    "backbone": "resnet18",
    "backbone_widths": [32, 64, 128, 256],
    "norm": "batch",
    "head": "fpn",
    "fpn_channels": 128,
    "anchor_sizes": [16, 32, 64, 128, 256],
    "representation_size": 256,
    "min_size": 128,
    "max_size": 128,
    "rpn_pre_nms_top_n_train": 600,
    "rpn_post_nms_top_n_train": 600,
    "rpn_pre_nms_top_n_test": 300,
    "rpn_post_nms_top_n_test": 300,
}

_MODELS: tuple[tuple[str, str, str, dict[str, Any]], ...] = (
    (
        "faster_rcnn_r50_fpn",
        "faster_rcnn",
        "41.8M params with norm=batch, 91 classes; 37.0 box AP COCO (torchvision)",
        {"backbone": "resnet50", "head": "fpn"},
    ),
    ("faster_rcnn_r18_fpn", "faster_rcnn", "", {"backbone": "resnet18", "head": "fpn"}),
    (
        "faster_rcnn_r50_c4",
        "faster_rcnn",
        "ResNet C4 design (He et al. 2016, appendix A)",
        {"backbone": "resnet50", "head": "c4", "roi_output_size": 14},
    ),
    (
        "fast_rcnn_r50_c4",
        "fast_rcnn",
        "Fast R-CNN on external proposals (Girshick 2015), ResNet C4",
        {"backbone": "resnet50", "head": "c4", "roi_output_size": 14, "rpn": False},
    ),
    (
        "fast_rcnn_r50_fpn",
        "fast_rcnn",
        "Fast R-CNN on external proposals, FPN head",
        {"backbone": "resnet50", "head": "fpn", "rpn": False},
    ),
    (
        "fast_rcnn_r18_fpn",
        "fast_rcnn",
        "Fast R-CNN on external proposals, FPN head",
        {"backbone": "resnet18", "head": "fpn", "rpn": False},
    ),
    (
        # The digit-scenes default: trained from scratch (plain BatchNorm) on 128 x 128 images.
        "faster_rcnn_r18_fpn_lite",
        "faster_rcnn",
        "light R18-FPN for 128 px digit scenes",
        _LITE,
    ),
    (
        # Fast R-CNN of the scenes: the same network fed the proposals of a trained RPN.
        "fast_rcnn_r18_fpn_lite",
        "fast_rcnn",
        "light R18-FPN Fast R-CNN for 128 px digit scenes (external proposals)",
        {**_LITE, "rpn": False},
    ),
    (
        "mask_rcnn_r50_fpn",
        "mask_rcnn",
        "44.5M params with norm=batch, 91 classes; 37.9 box / 34.6 mask AP COCO (torchvision)",
        {"backbone": "resnet50", "head": "fpn", "mask": True},
    ),
    (
        # The digit-scenes Mask R-CNN: the scenes detector plus a mask head a quarter of the
        # paper's width, trained on at most 8 positive RoIs per image (of up to 16; a scene
        # holds 1-6 digits). Once the RPN works, a training step (bf16, 2 threads, 8 images)
        # costs 0.23 s box-only, 0.42 s with the head on every positive RoI, 0.30 s with 8.
        "mask_rcnn_r18_fpn",
        "mask_rcnn",
        "light R18-FPN Mask R-CNN for 128 px digit scenes",
        {**_LITE, "mask": True, "mask_channels": 64, "instance_rois_per_image": 8},
    ),
    (
        "keypoint_rcnn_r50_fpn",
        "keypoint_rcnn",
        "59.2M params with norm=batch, 1 class, 17 keypoints; 65.0 keypoint AP COCO (torchvision)",
        {"backbone": "resnet50", "head": "fpn", "num_keypoints": 17},
    ),
    (
        # The digit-scenes keypoint R-CNN: 4 keypoints per digit, a narrower and shallower
        # keypoint head (a training step costs ~1.5x the box-only model's with 4 x 128 channels,
        # ~2.4x with 8 x 128), trained on at most 8 positive RoIs per image, as the mask head.
        "keypoint_rcnn_r18_fpn",
        "keypoint_rcnn",
        "light R18-FPN keypoint R-CNN for 128 px digit scenes (4 keypoints)",
        {
            **_LITE,
            "num_keypoints": 4,
            "keypoint_channels": 128,
            "keypoint_convs": 4,
            "instance_rois_per_image": 8,
        },
    ),
)

for _name, _family, _paper, _config in _MODELS:
    register_model(
        _name,
        FasterRCNN,
        family=_family,
        input_size=(3, _config.get("min_size", 800), _config.get("min_size", 800)),
        paper=_paper,
        tags=(TASK,),
        **_config,
    )
