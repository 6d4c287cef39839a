"""Object detection models: Faster R-CNN and Fast R-CNN, read as torchvision's pipeline.

transform -> backbone (+ feature pyramid) -> region proposal network -> RoI heads ->
postprocess, one concept per module (``backbone``, ``fpn``, ``anchors``, ``matching``, ``rpn``,
``transform``, ``roi_heads``, ``postprocess``, ``rcnn``). The package knows nothing of training
loops or data files.
"""
