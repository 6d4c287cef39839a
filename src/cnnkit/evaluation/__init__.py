"""Evaluation of predictions against ground truth (knows nothing of models)."""

from cnnkit.evaluation.classification import accuracy, confusion_matrix, per_class_accuracy, topk
from cnnkit.evaluation.coco import COCOResult, coco_evaluate
from cnnkit.evaluation.voc import VOCResult, load_voc_annotations, voc_evaluate

__all__ = [
    "accuracy",
    "confusion_matrix",
    "per_class_accuracy",
    "topk",
    "COCOResult",
    "VOCResult",
    "coco_evaluate",
    "load_voc_annotations",
    "voc_evaluate",
]
