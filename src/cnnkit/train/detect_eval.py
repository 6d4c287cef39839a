"""A detector run over a data split: predictions, COCO results, AP, and the files that say so.

Shared by the detection task (dev AP at every epoch) and ``cnnkit detect evaluate``:

* :func:`predict_batch`: one batch of uint8 images through the detector, boxes in original
  image pixels;
* :func:`to_results`: predictions -> COCO results (``bbox`` as ``[x, y, w, h]``, the data
  set's category ids);
* :func:`box_metrics`: COCO AP of results against the split's ground truth, the history's
  ``box_ap`` / ``box_ap50`` / ``box_ap75``;
* :func:`write_evaluation`: ``detections.json``, ``evaluation.json`` (the 12 COCO numbers, VOC
  11-point mAP@0.5, per-class APs) and the precision/recall curves.
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
    ``labels int64 [D]`` (1..K), ``scores float32 [D]``.
    """
    x = [im.to(device, non_blocking=True).float().div_(255) for im in images]
    kwargs = {}
    if proposals is not None:
        kwargs["proposals"] = [p.to(device) for p in proposals]
    with autocast(device, precision):
        out = model(x, **kwargs)
    return [
        {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu() for k, v in o.items()}
        for o in out
    ]


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
        for box, score, label in zip(xywh.tolist(), scores.tolist(), labels.tolist(), strict=True):
            results.append(
                {
                    "image_id": int(image_id),
                    "category_id": int(label_to_category[label]),
                    "bbox": box,
                    "score": score,
                }
            )
    return results


def coco_box_result(gt: Mapping[str, Any], results: list[dict[str, Any]]):
    """:class:`cnnkit.evaluation.COCOResult` of box ``results``; an empty list is a model that
    found nothing (AP 0), not an error."""
    from cnnkit.evaluation import coco_evaluate

    return coco_evaluate(gt, results, "bbox")


def box_metrics(gt: Mapping[str, Any], results: list[dict[str, Any]]) -> dict[str, float]:
    """``box_ap`` (AP@[.5:.95]), ``box_ap50``, ``box_ap75`` of ``results`` (-1 -> 0: a split
    without ground truth scores nothing)."""
    stats = coco_box_result(gt, results).stats
    return {
        "box_ap": max(float(stats[0]), 0.0),
        "box_ap50": max(float(stats[1]), 0.0),
        "box_ap75": max(float(stats[2]), 0.0),
    }


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def evaluation_record(coco, voc, names: Mapping[int, str]) -> dict[str, Any]:
    """``evaluation.json``: ``{"bbox": [12 stats], "voc_map50": x, "per_class": {name:
    {"ap", "ap50", "voc_ap50"}}}`` (``names`` maps category ids to names)."""
    per_class: dict[str, dict[str, float | None]] = {}
    ap50 = _per_class_at(coco, 0.5)
    for cat_id, ap in coco.per_class.items():
        name = names.get(cat_id, str(cat_id))
        per_class[name] = {
            "ap": _finite(ap),
            "ap50": _finite(ap50.get(cat_id, float("nan"))),
            "voc_ap50": _finite(voc.ap.get(name, float("nan"))),
        }
    return {
        "bbox": [float(s) for s in coco.stats],
        "voc_map50": _finite(voc.map),
        "per_class": per_class,
    }


def _per_class_at(coco, iou: float) -> dict[Any, float]:
    """AP of each category at one IoU threshold (all areas, the largest maxDets)."""
    p = coco.params
    t = np.flatnonzero(np.isclose(p.iou_thrs, iou))
    if len(t) == 0:
        return {}
    out = {}
    for k, cat_id in enumerate(coco.cat_ids):
        s = coco.precision[t[0], :, k, 0, -1]
        s = s[s > -1]
        out[cat_id] = float(s.mean()) if s.size else float("nan")
    return out


def write_evaluation(
    run_dir: Path,
    gt: Mapping[str, Any],
    results: list[dict[str, Any]],
    *,
    plots: bool = True,
):
    """Evaluate ``results`` against ``gt`` (COCO AP and VOC 11-point mAP@0.5) and write
    ``detections.json``, ``evaluation.json`` and the PR curves into ``run_dir``.

    Returns ``(coco_result, voc_result, record)``.
    """
    from cnnkit.atomic import atomic_write_text
    from cnnkit.evaluation import voc_evaluate

    coco = coco_box_result(gt, results)
    voc = voc_evaluate(gt, results, iou_threshold=0.5, use_07_metric=True)
    names = {int(c["id"]): str(c["name"]) for c in gt.get("categories", [])}
    record = evaluation_record(coco, voc, names)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / DETECTIONS_NAME, json.dumps(results, separators=(",", ":")) + "\n")
    atomic_write_text(
        run_dir / EVALUATION_NAME, json.dumps(record, indent=2, allow_nan=False) + "\n"
    )
    if plots:
        _plot_curves(run_dir, coco, voc)
    return coco, voc, record


def _plot_curves(run_dir: Path, coco, voc) -> None:
    from cnnkit.viz import plot_pr_curves

    p = coco.params
    curves = {}
    for thr in (0.5, 0.75):
        t = np.flatnonzero(np.isclose(p.iou_thrs, thr))
        s = coco.precision[t[0], :, :, 0, -1]
        s = np.where(s > -1, s, np.nan)
        if len(t) and not np.isnan(s).all():
            curves[f"IoU={thr:.2f} (mean over categories)"] = (p.rec_thrs, np.nanmean(s, axis=1))
    if curves:
        plot_pr_curves(curves, run_dir / PR_CURVES_NAME, title="COCO box precision / recall")
    voc_curves = {
        f"{k} (AP {voc.ap[k]:.3f})": (voc.recall[k], voc.precision[k])
        for k in voc.ap
        if k not in voc.excluded
    }
    if voc_curves:
        plot_pr_curves(
            voc_curves,
            run_dir / VOC_CURVES_NAME,
            title="VOC precision / recall per class (IoU 0.5)",
            envelope=True,
        )
