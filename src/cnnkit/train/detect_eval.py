"""A detector run over a data split: predictions, COCO results, AP, and the files that say so.

Shared by the detection task (dev AP at every epoch) and ``cnnkit detect evaluate``:

* :func:`predict_batch`: one batch of uint8 images through the detector, boxes in original
  image pixels;
* :func:`to_results`: predictions -> COCO results (``bbox`` as ``[x, y, w, h]``, the data
  set's category ids; ``segmentation`` as RLE straight from the box-local masks, ``keypoints``
  as ``[x, y, v] * K``);
* :func:`coco_metrics`: COCO AP of results against the split's ground truth for each of the
  model's outputs, the history's ``box_ap`` / ``box_ap50`` / ``box_ap75`` (and ``mask_*``,
  ``keypoint_*``);
* :func:`write_evaluation`: ``detections.json``, ``evaluation.json`` (the COCO numbers of each
  output, VOC 11-point mAP@0.5, per-class APs) and the precision/recall curves.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from cnnkit.train.device import autocast

DETECTIONS_NAME = "detections.json"
EVALUATION_NAME = "evaluation.json"
PR_CURVES_NAME = "pr_curves.png"
VOC_CURVES_NAME = "pr_curves_voc.png"
# Decimals kept in the results JSON: 0.01 px and 1e-5 in score change no AP.
BOX_DECIMALS = 2
SCORE_DECIMALS = 5


@torch.no_grad()
def predict_batch(
    model: nn.Module,
    images: Sequence[Tensor],
    *,
    device: torch.device,
    precision: str,
    proposals: Sequence[Tensor] | None = None,
) -> list[dict[str, Tensor]]:
    """Detections of ``images`` (each ``uint8 [3, H, W]``) by ``model`` in eval mode.

    Returns one dict per image on the CPU: ``boxes float32 [D, 4]`` (xyxy, original pixels),
    ``labels int64 [D]`` (1..K), ``scores float32 [D]``, ``image_size`` ``(h, w)``, and what
    the model's heads add: ``mask_probs [D, 1, M, M]`` (box-local: never pasted into dense
    image-size masks here), ``keypoints [D, K, 3]``, ``keypoints_scores [D, K]``.
    """
    x = [im.to(device, non_blocking=True).float().div_(255) for im in images]
    kwargs: dict[str, Any] = {}
    if proposals is not None:
        kwargs["proposals"] = [p.to(device) for p in proposals]
    if getattr(model, "has_masks", False):
        kwargs["paste_masks"] = False
    with autocast(device, precision):
        out = model(x, **kwargs)
    preds = []
    for o, im in zip(out, images, strict=True):
        pred = {
            k: v.detach().float().cpu() if v.is_floating_point() else v.cpu()
            for k, v in o.items()
            if k not in ("keypoint_heatmaps", "masks")
        }
        pred["image_size"] = (int(im.shape[-2]), int(im.shape[-1]))
        preds.append(pred)
    return preds


def to_results(
    predictions: Sequence[Mapping[str, Tensor]],
    image_ids: Sequence[int],
    label_to_category: Sequence[int],
) -> list[dict[str, Any]]:
    """COCO results (``image_id``, ``category_id``, ``bbox`` ``[x, y, w, h]``, ``score``) of
    per-image ``predictions``; labels 1..K map to the data set's category ids."""
    results = []
    for pred, image_id in zip(predictions, image_ids, strict=True):
        boxes = pred["boxes"].numpy().astype(np.float64)
        xywh = np.round(
            np.stack(
                [boxes[:, 0], boxes[:, 1], boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], 1
            ),
            BOX_DECIMALS,
        )
        scores = np.round(pred["scores"].numpy().astype(np.float64), SCORE_DECIMALS)
        labels = pred["labels"].numpy()
        extra = _instance_fields(pred)
        for i, (box, score, label) in enumerate(
            zip(xywh.tolist(), scores.tolist(), labels.tolist(), strict=True)
        ):
            entry = {
                "image_id": int(image_id),
                "category_id": int(label_to_category[label]),
                "bbox": box,
                "score": score,
            }
            for key, values in extra.items():
                entry[key] = values[i]
            results.append(entry)
    return results


def _instance_fields(pred: Mapping[str, Any]) -> dict[str, list[Any]]:
    """The per-detection ``segmentation`` (COCO RLE, thresholded at 0.5 from the box-local
    masks) and ``keypoints`` (``[x, y, 1] * K``, rounded to 0.01 px) of one image's
    predictions, where the model gives them."""
    fields: dict[str, list[Any]] = {}
    if "mask_probs" in pred:
        from cnnkit.detection.paste import masks_to_rles

        fields["segmentation"] = masks_to_rles(
            pred["mask_probs"], pred["boxes"], pred["image_size"], threshold=0.5
        )
    if "keypoints" in pred:
        kps = pred["keypoints"].numpy().astype(np.float64)
        kps[..., 2] = 1.0
        fields["keypoints"] = np.round(kps, BOX_DECIMALS).reshape(len(kps), -1).tolist()
    return fields


# The COCO evaluation of each model output and its prefix in the history (``box_ap`` ...).
METRIC_PREFIX = {"bbox": "box", "segm": "mask", "keypoints": "keypoint"}


def iou_types(model: nn.Module) -> list[str]:
    """The COCO evaluations a model's outputs call for: boxes, and masks / keypoints where it
    has those heads."""
    types = ["bbox"]
    if getattr(model, "has_masks", False):
        types.append("segm")
    if getattr(model, "num_keypoints", 0):
        types.append("keypoints")
    return types


def keypoint_sigmas(
    gt: Mapping[str, Any], given: Sequence[float] | None = None
) -> list[float] | None:
    """The OKS sigmas: ``given`` (``--kpt-sigmas``), else the data set's category
    ``keypoint_sigmas`` (the scenes write them), else None: COCO's 17 person values, which
    only a 17-keypoint skeleton may use (coco_evaluate says so otherwise)."""
    if given is not None:
        return [float(v) for v in given]
    for cat in gt.get("categories", []):
        sigmas = cat.get("keypoint_sigmas") if isinstance(cat, Mapping) else None
        if sigmas:
            return [float(v) for v in sigmas]
    return None


def coco_results(
    gt: Mapping[str, Any],
    results: list[dict[str, Any]],
    types: Sequence[str] = ("bbox",),
    kpt_sigmas: Sequence[float] | None = None,
) -> dict[str, Any]:
    """:class:`cnnkit.evaluation.COCOResult` of ``results`` for each of ``types``; an empty list
    is a model that found nothing (AP 0), not an error."""
    from cnnkit.evaluation import coco_evaluate

    out = {}
    for iou_type in types:
        params = {}
        if iou_type == "keypoints":
            sigmas = keypoint_sigmas(gt, kpt_sigmas)
            if sigmas is not None:
                params["kpt_oks_sigmas"] = sigmas
        out[iou_type] = coco_evaluate(gt, results, iou_type, **params)
    return out


def coco_metrics(
    gt: Mapping[str, Any],
    results: list[dict[str, Any]],
    types: Sequence[str] = ("bbox",),
    kpt_sigmas: Sequence[float] | None = None,
) -> dict[str, float]:
    """``box_ap`` (AP@[.5:.95]), ``box_ap50``, ``box_ap75``, and likewise ``mask_*`` and
    ``keypoint_*`` for the other ``types`` (-1 -> 0: a split without ground truth scores
    nothing)."""
    metrics = {}
    for iou_type, result in coco_results(gt, results, types, kpt_sigmas).items():
        prefix, stats = METRIC_PREFIX[iou_type], result.stats
        metrics[f"{prefix}_ap"] = max(float(stats[0]), 0.0)
        metrics[f"{prefix}_ap50"] = max(float(stats[1]), 0.0)
        metrics[f"{prefix}_ap75"] = max(float(stats[2]), 0.0)
    return metrics


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def evaluation_record(cocos: Mapping[str, Any], voc, names: Mapping[int, str]) -> dict[str, Any]:
    """``evaluation.json``: ``{"bbox": [12 stats], ("segm": [12 stats], "keypoints": [10
    stats],) "voc_map50": x, "per_class": {name: {"ap", "ap50", "voc_ap50"}}}`` (box APs per
    class; ``names`` maps category ids to names)."""
    coco = cocos["bbox"]
    per_class: dict[str, dict[str, float | None]] = {}
    ap50 = coco.per_class_at(0.5)
    for cat_id, ap in coco.per_class.items():
        name = names.get(cat_id, str(cat_id))
        per_class[name] = {
            "ap": _finite(ap),
            "ap50": _finite(ap50.get(cat_id, float("nan"))),
            "voc_ap50": _finite(voc.ap.get(name, float("nan"))),
        }
    record: dict[str, Any] = {t: [float(v) for v in r.stats] for t, r in cocos.items()}
    record["voc_map50"] = _finite(voc.map)
    record["per_class"] = per_class
    return record


def write_evaluation(
    run_dir: Path,
    gt: Mapping[str, Any],
    results: list[dict[str, Any]],
    types: Sequence[str] = ("bbox",),
    *,
    kpt_sigmas: Sequence[float] | None = None,
    plots: bool = True,
):
    """Evaluate ``results`` against ``gt`` (COCO AP of each of ``types``, VOC 11-point mAP@0.5
    of the boxes) and write ``detections.json``, ``evaluation.json`` and the box PR curves into
    ``run_dir``.

    Returns ``(coco_results by type, voc_result, record)``.
    """
    from cnnkit.atomic import atomic_write_text
    from cnnkit.evaluation import voc_evaluate

    cocos = coco_results(gt, results, types, kpt_sigmas)
    voc = voc_evaluate(gt, results, iou_threshold=0.5, use_07_metric=True)
    names = {int(c["id"]): str(c["name"]) for c in gt.get("categories", [])}
    record = evaluation_record(cocos, voc, names)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / DETECTIONS_NAME, json.dumps(results, separators=(",", ":")) + "\n")
    atomic_write_text(
        run_dir / EVALUATION_NAME, json.dumps(record, indent=2, allow_nan=False) + "\n"
    )
    if plots:
        _plot_curves(run_dir, cocos["bbox"], voc)
    return cocos, voc, record


def _plot_curves(run_dir: Path, coco, voc) -> None:
    from cnnkit.viz import plot_pr_curves

    curves = coco.pr_curves()
    if curves:
        plot_pr_curves(curves, run_dir / PR_CURVES_NAME, title="COCO box precision / recall")
    voc_curves = voc.pr_curves()
    if voc_curves:
        plot_pr_curves(
            voc_curves,
            run_dir / VOC_CURVES_NAME,
            title="VOC precision / recall per class (IoU 0.5)",
            envelope=True,
        )
