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


def _check_output(path: str | None, flag: str) -> None:
    """Refuse, before any work, an output path that cannot be a file we write."""
    if path is None:
        return
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path}: is a directory; give a file name")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):  # missing folders are created
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{flag} {path}: {parent} is not a directory")


def _check_outputs(args: argparse.Namespace) -> None:
    _check_output(args.json, "--json")
    _check_output(args.plot, "--plot")
    if args.json and args.plot and os.path.abspath(args.json) == os.path.abspath(args.plot):
        raise ValueError(f"--json and --plot name the same file {args.json}")


def _write(path: str, flag: str, write) -> None:
    """``write(path)``; an OSError names the user's path, never our temporary file."""
    try:
        write(path)
    except OSError as err:
        raise OSError(f"{flag} {path}: cannot write: {err.strerror or err}") from None


def _json_text(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, allow_nan=False) + "\n"  # strict JSON: no NaN


def _write_json(path: str, text: str) -> None:
    from cnnkit.atomic import atomic_write_text

    _write(path, "--json", lambda p: atomic_write_text(p, text))


def _plot(path: str, curves: dict, title: str, envelope: bool) -> None:
    from cnnkit.viz import plot_pr_curves

    _write(path, "--plot", lambda p: plot_pr_curves(curves, p, title=title, envelope=envelope))


def _check_inputs(*paths: str) -> None:
    for path in paths:
        if not os.path.exists(path):
            raise ValueError(f"{path}: no such file or directory")


def run_coco(args: argparse.Namespace) -> int:
    """Evaluate, then write every output; bad input stops before anything is printed or
    written."""
    from cnnkit.evaluation import coco_evaluate

    _check_inputs(args.gt, args.dt)
    _check_outputs(args)
    result = coco_evaluate(args.gt, args.dt, args.iou_type)
    text = _json_text(result.to_dict()) if args.json else None
    if args.plot:
        title = f"COCO {result.params.iou_type} precision / recall"
        curves = result.pr_curves()
        if not curves:
            raise ValueError("--plot: no category has ground truth, nothing to draw")
        _plot(args.plot, curves, title, False)
    if args.json:
        _write_json(args.json, text)
    print(result.summary())
    if args.per_class:
        print()
        print(result.per_class_table())
    return 0


def run_voc(args: argparse.Namespace) -> int:
    """As run_coco; the plot draws each class's interpolated precision (the AP's curve)."""
    from cnnkit.evaluation import voc_evaluate

    _check_inputs(args.gt, args.dt)
    _check_outputs(args)
    result = voc_evaluate(
        args.gt, args.dt, iou_threshold=args.iou, use_07_metric=not args.all_point
    )
    text = _json_text(result.to_dict()) if args.json else None
    if args.plot:
        curves = result.pr_curves()
        if not curves:
            raise ValueError("--plot: no class has ground truth, nothing to draw")
        title = f"PASCAL VOC precision / recall (IoU {args.iou:g})"
        _plot(args.plot, curves, title, True)
    if args.json:
        _write_json(args.json, text)
    print(result.summary())
    return 0
