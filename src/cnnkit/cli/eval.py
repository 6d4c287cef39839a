"""`cnnkit eval coco|voc`: Average Precision of detection results.

    cnnkit eval coco GT.json DT.json [--iou-type bbox|segm|keypoints] [--per-class]
                     [--json OUT] [--plot PR.png]
    cnnkit eval voc GT DT.json [--iou 0.5] [--all-point] [--json OUT] [--plot PR.png]

The COCO summary is printed exactly as pycocotools prints it; progress bars (stderr) appear
on evaluations of more than 1000 images.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import numpy as np


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="Average Precision of detection results (COCO or VOC)")
    metrics = p.add_subparsers(dest="metric", metavar="METRIC", required=True)

    c = metrics.add_parser("coco", help="COCO AP (pycocotools' COCOeval numbers)")
    c.add_argument("gt", help="COCO ground-truth JSON")
    c.add_argument("dt", help="COCO results JSON (list of {image_id, category_id, score, ...})")
    c.add_argument("--iou-type", choices=("bbox", "segm", "keypoints"), default="bbox")
    c.add_argument("--per-class", action="store_true", help="also print AP per category")
    c.add_argument("--json", metavar="OUT", help="write {stats, per_class, lines} as JSON")
    c.add_argument("--plot", metavar="PNG", help="draw the PR curves at IoU .50 and .75")
    c.set_defaults(func=run_coco)

    v = metrics.add_parser("voc", help="PASCAL VOC AP (11-point, or all-point)")
    v.add_argument("gt", help="VOC Annotations directory (or VOC root) or COCO ground-truth JSON")
    v.add_argument("dt", help="COCO-style results JSON (bbox [x, y, w, h])")
    v.add_argument("--iou", type=float, default=0.5, help="IoU threshold (default 0.5)")
    v.add_argument("--all-point", action="store_true", help="area under the curve (VOC2010+)")
    v.add_argument("--json", metavar="OUT", help="write {map, per_class, ...} as JSON")
    v.add_argument("--plot", metavar="PNG", help="draw the PR curve of each class")
    v.set_defaults(func=run_voc)


def _write_json(path: str, data: dict[str, Any]) -> None:
    from cnnkit.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def _check_inputs(*paths: str) -> None:
    for path in paths:
        if not os.path.exists(path):
            raise ValueError(f"{path}: no such file or directory")


def run_coco(args: argparse.Namespace) -> int:
    from cnnkit.evaluation import coco_evaluate

    _check_inputs(args.gt, args.dt)
    result = coco_evaluate(args.gt, args.dt, args.iou_type)
    print(result.summary())
    if args.per_class:
        print()
        print(result.per_class_table())
    if args.json:
        _write_json(args.json, result.to_dict())
    if args.plot:
        from cnnkit.viz import plot_pr_curves

        p = result.params
        curves = {}
        for thr in (0.5, 0.75):
            t = np.flatnonzero(np.isclose(p.iou_thrs, thr))
            if len(t) == 0:
                continue
            s = result.precision[t[0], :, :, 0, -1]  # [R, K], area "all", largest maxDets
            s = np.where(s > -1, s, np.nan)
            if np.isnan(s).all():
                continue
            curves[f"IoU={thr:.2f} (mean over categories)"] = (p.rec_thrs, np.nanmean(s, axis=1))
        if not curves:
            raise ValueError("--plot: no category has ground truth, nothing to draw")
        plot_pr_curves(curves, args.plot, title=f"COCO {p.iou_type} precision / recall")
    return 0


def run_voc(args: argparse.Namespace) -> int:
    from cnnkit.evaluation import voc_evaluate

    _check_inputs(args.gt, args.dt)
    result = voc_evaluate(
        args.gt, args.dt, iou_threshold=args.iou, use_07_metric=not args.all_point
    )
    print(result.summary())
    if args.json:
        _write_json(args.json, result.to_dict())
    if args.plot:
        from cnnkit.viz import plot_pr_curves

        curves = {
            f"{k} (AP {result.ap[k]:.3f})": (result.recall[k], result.precision[k])
            for k in result.ap
            if k not in result.excluded
        }
        if not curves:
            raise ValueError("--plot: no class has ground truth, nothing to draw")
        plot_pr_curves(curves, args.plot, title=f"PASCAL VOC precision / recall (IoU {args.iou:g})")
    return 0
