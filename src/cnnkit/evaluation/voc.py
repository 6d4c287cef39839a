"""PASCAL VOC Average Precision (Everingham et al., IJCV 2010) and the VOC XML loader.

Per class, detections are ranked by confidence (stable sort: equal scores keep input order).
Each takes the ground-truth box of its image with the highest IoU (the first on ties, as the
VOC devkit); if that IoU is >= the threshold (0.5) the detection is a true positive when the box
is not yet taken, a false positive when it is, and neither when the box is "difficult";
otherwise it is a false positive. With TP_i, FP_i the cumulative counts and npos the
non-difficult ground truths, recall_i = TP_i / npos and precision_i = TP_i / (TP_i + FP_i);

    AP_11 = 1/11 sum_{r in {0, 0.1, ..., 1}} max_{i: recall_i >= r} precision_i   (VOC2007)
    AP_all = sum_i (r_{i+1} - r_i) p~(r_{i+1}),  p~(r) = max_{r' >= r} precision(r')   (VOC2010+)

mAP is the mean over the classes that have ground truth; a class without (non-difficult)
ground truth has AP NaN in the devkit and is left out of the mean here (listed in
``excluded``). The recall levels are exactly i / 10 (the devkit's ``np.arange(0, 1.1, 0.1)``
drifts above 0.3, 0.6, 0.7, 0.9, which only matters when a recall equals one of them exactly).

Coordinates: VOC XML boxes are 1-based inclusive pixel indices, which the loader turns into
continuous pixel-edge coordinates (x - 1, y - 1, x_max, y_max), so a box is as wide as the
devkit's ``x_max - x_min + 1``; every IoU, ground truth and detections alike (COCO-style
``[x, y, w, h]`` results), is then the continuous one, without the devkit's +1.
"""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cnnkit.evaluation.coco import box_iou_pairs, ragged_ranges
from cnnkit.evaluation.coco_io import (
    load_json,
    parse_results,
    read_detections,
    read_ground_truth,
)


@dataclass
class VOCResult:
    """Per-class AP (NaN without ground truth), mAP over the classes with ground truth, and
    each class's precision/recall curve [N_detections] in ranked order."""

    ap: dict[Any, float]
    map: float
    precision: dict[Any, np.ndarray]
    recall: dict[Any, np.ndarray]
    npos: dict[Any, int]
    excluded: list[Any]
    iou_threshold: float
    use_07_metric: bool
    notes: list[str] = field(default_factory=list)

    @property
    def per_class(self) -> dict[Any, float]:
        return self.ap

    def pr_curves(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{"<class> (AP 0.912)": (recall [N], precision [N])}`` of every class with ground
        truth, in ranked order (draw them with their envelope: the curve AP measures)."""
        return {
            f"{k} (AP {self.ap[k]:.3f})": (self.recall[k], self.precision[k])
            for k in self.ap
            if k not in self.excluded
        }

    def summary(self) -> str:
        """Per-class AP table and the mAP line."""
        metric = "11-point" if self.use_07_metric else "all-point"
        width = max([len(str(k)) for k in self.ap] + [5])
        rows = [f"{'class':<{width}}  {'AP':>6}  {'npos':>6}"]
        for k, v in self.ap.items():
            rows.append(f"{k!s:<{width}}  {v:6.4f}  {self.npos[k]:>6d}")
        rows.append(f"mAP@{self.iou_threshold:g} ({metric}) = {self.map:0.4f}")
        return "\n".join(rows + self.notes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (NaN APs and mAP as null)."""
        return {
            "metric": "voc11" if self.use_07_metric else "voc_all_point",
            "iou_threshold": self.iou_threshold,
            "map": None if np.isnan(self.map) else self.map,
            "per_class": {str(k): (None if np.isnan(v) else v) for k, v in self.ap.items()},
            "npos": {str(k): v for k, v in self.npos.items()},
            "excluded": [str(k) for k in self.excluded],
        }


def ap_11_point(recall: np.ndarray, precision: np.ndarray) -> float:
    """Mean over r in {0, 0.1, ..., 1} of the max precision at recall >= r (0 if none)."""
    total = 0.0
    for i in range(11):
        above = precision[recall >= i / 10]
        total += float(above.max()) if above.size else 0.0
    return total / 11


def ap_all_point(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under the interpolated (monotone from the right) precision/recall curve."""
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def _text(node: ET.Element, path: str, file: Path, what: str) -> str:
    value = node.findtext(path)
    if value is None or not value.strip():
        raise ValueError(f"{file}: {what} has no <{path}>")
    return value.strip()


def _number(node: ET.Element, path: str, file: Path, what: str) -> float:
    text = _text(node, path, file, what)
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{file}: {what} <{path}> is not a number: {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{file}: {what} <{path}> is not a finite number: {text!r}")
    return value


def _size(doc: ET.Element, key: str, file: Path) -> int | None:
    """Image ``<size><width>`` / ``<height>``: a positive integer, or None where absent."""
    text = doc.findtext(f"size/{key}")
    if text is None or not text.strip():
        return None
    value = _number(doc, f"size/{key}", file, "the image")
    if value <= 0 or not value.is_integer() or value > 2**31 - 1:
        raise ValueError(f"{file}: <size><{key}> must be a positive integer, got {text.strip()!r}")
    return int(value)


def _difficult(obj: ET.Element, file: Path, what: str) -> int:
    """``<difficult>``: 0 or 1 (absent or empty: 0)."""
    text = obj.findtext("difficult")
    if text is None or not text.strip():
        return 0
    if text.strip() not in ("0", "1"):
        raise ValueError(f"{file}: {what} <difficult> must be 0 or 1, got {text.strip()!r}")
    return int(text.strip())


def load_voc_annotations(directory: str | os.PathLike) -> dict[str, Any]:
    """A VOC ``Annotations/*.xml`` directory (or the VOC root above it) as a COCO-format dict.

    Images get ids 1..N in file-name order and keep their stem as "voc_id" (results may name
    images by either); categories are the object names sorted, ids 1..C; each object becomes
    an annotation with bbox [x_min - 1, y_min - 1, x_max - x_min + 1, y_max - y_min + 1]
    (continuous coordinates of the 1-based pixel indices) and its "difficult" flag.
    """
    root = Path(directory)
    ann_dir = root / "Annotations" if (root / "Annotations").is_dir() else root
    files = sorted(ann_dir.glob("*.xml"))
    if not files:
        raise ValueError(f"{os.fspath(directory)!r}: no VOC annotation files (*.xml) found")
    images, objects = [], []
    for image_id, file in enumerate(files, start=1):
        try:
            doc = ET.parse(file).getroot()
        except ET.ParseError as err:
            raise ValueError(f"{file}: not valid XML: {err}") from None
        image = {"id": image_id, "voc_id": file.stem}
        image["file_name"] = (doc.findtext("filename") or f"{file.stem}.jpg").strip()
        for key in ("width", "height"):
            value = _size(doc, key, file)
            if value is not None:
                image[key] = value
        images.append(image)
        for j, obj in enumerate(doc.iter("object")):
            what = f"object {j}"
            name = _text(obj, "name", file, what)
            box = obj.find("bndbox")
            if box is None:
                raise ValueError(f"{file}: {what} ({name}) has no <bndbox>")
            x1, y1, x2, y2 = (_number(box, k, file, what) for k in ("xmin", "ymin", "xmax", "ymax"))
            if x2 < x1 or y2 < y1:
                raise ValueError(f"{file}: {what} ({name}) has xmax < xmin or ymax < ymin")
            difficult = _difficult(obj, file, what)
            objects.append((image_id, name, [x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1], difficult))
    names = sorted({o[1] for o in objects})
    cat_of = {n: i for i, n in enumerate(names, start=1)}
    annotations = [
        {
            "id": i,
            "image_id": img,
            "category_id": cat_of[name],
            "bbox": bbox,
            "area": bbox[2] * bbox[3],
            "iscrowd": 0,
            "difficult": diff,
        }
        for i, (img, name, bbox, diff) in enumerate(objects, start=1)
    ]
    return {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c, "name": n} for n, c in cat_of.items()],
    }


def _resolve_names(results: list[Any], gt: Mapping[str, Any]) -> list[Any]:
    """Results may name images by VOC id / file stem and categories by name."""
    stems: dict[str, Any] = {}
    for img in gt["images"]:
        if isinstance(img, Mapping) and "id" in img:
            stems[str(img.get("voc_id", Path(str(img.get("file_name", ""))).stem))] = img["id"]
    cats = {c["name"]: c["id"] for c in gt["categories"] if isinstance(c, Mapping) and "name" in c}
    ids = {img.get("id") for img in gt["images"] if isinstance(img, Mapping)}
    out = []
    for r in results:
        if isinstance(r, Mapping):
            img, cat = r.get("image_id"), r.get("category_id")
            if isinstance(img, str) and img not in ids and img in stems:
                r = {**r, "image_id": stems[img]}
            if isinstance(cat, str) and cat in cats:
                r = {**r, "category_id": cats[cat]}
        out.append(r)
    return out


def voc_evaluate(
    gt: str | os.PathLike | Mapping[str, Any],
    dt: str | os.PathLike | Sequence[Mapping[str, Any]] | Mapping[Any, Mapping[str, Any]],
    iou_threshold: float = 0.5,
    use_07_metric: bool = True,
    label_map: Mapping[int, Any] | None = None,
) -> VOCResult:
    """PASCAL VOC AP per class and mAP.

    gt: a VOC ``Annotations`` directory (or VOC root), a COCO JSON path or dict (an
    annotation's "difficult", "ignore" or "iscrowd" flag makes it difficult). dt: COCO-style
    results (path, list, or per-image predictions with xyxy "boxes"); "image_id" may be the
    VOC image id (file stem), "category_id" a class name. use_07_metric: 11-point AP (VOC2007)
    if True, else the all-point area (VOC2010+).
    """
    if not 0.0 <= float(iou_threshold) <= 1.0:
        raise ValueError(f"iou_threshold must be in [0, 1], got {iou_threshold!r}")
    gt_name = None
    if isinstance(gt, (str, os.PathLike)):
        gt_name = os.fspath(gt)
        gt = load_voc_annotations(gt) if Path(gt).is_dir() else load_json(gt, "ground truth")
    g = read_ground_truth(gt, "bbox", name=gt_name)  # validated before its names are read
    where = f"results {os.fspath(dt)!r}" if isinstance(dt, (str, os.PathLike)) else "results"
    dt = parse_results(dt, "bbox", label_map)
    if isinstance(gt, Mapping) and isinstance(dt, list):
        dt = _resolve_names(dt, gt)
    d = read_detections(dt, g, "bbox", where=where)
    difficult = g.difficult | g.ignore_flag | g.iscrowd
    num_c = len(g.cat_ids)

    # Each detection's best ground truth of its (image, class): static, as in the devkit.
    g_key = g.ann_img * num_c + g.ann_cat
    g_order = np.argsort(g_key, kind="stable")
    g_sorted = g_key[g_order]
    d_key = d.img * num_c + d.cat
    start = np.searchsorted(g_sorted, d_key, side="left")
    count = np.searchsorted(g_sorted, d_key, side="right") - start
    owner, local, offset = ragged_ranges(count)
    g_rows = g_order[start[owner] + local]
    iou = box_iou_pairs(d.bbox[owner], g.bbox[g_rows], np.zeros(len(owner), dtype=bool))
    has = count > 0
    best = np.full(len(d_key), -np.inf)
    best_row = np.zeros(len(d_key), dtype=np.int64)
    if has.any():
        best[has] = np.maximum.reduceat(iou, offset[has])
        first = np.where(iou == best[owner], local, np.iinfo(np.int64).max)
        best_row[has] = g_order[start[has] + np.minimum.reduceat(first, offset[has])]

    order = np.lexsort((-d.score, d.cat))  # by class, then confidence (stable)
    hit = (best >= iou_threshold)[order]
    row = best_row[order]
    neither = np.zeros_like(hit)
    neither[hit] = difficult[row[hit]]  # (hit only where there is ground truth to index)
    claim = hit & ~neither
    tp = np.zeros(len(order), dtype=bool)
    # First claim of a ground truth (in ranked order, per class) is the true positive.
    claimed = np.flatnonzero(claim)
    _, first_claim = np.unique(row[claimed], return_index=True)
    tp[claimed[first_claim]] = True
    # The ranked detections that count, one contiguous run per class.
    tp_counted = tp[~neither]
    bounds = np.searchsorted(d.cat[order][~neither], np.arange(num_c + 1))

    names = list(g.cat_names)
    keys = names if len(set(names)) == len(names) else [c.item() for c in g.cat_ids]
    npos_all = np.bincount(g.ann_cat[~difficult], minlength=num_c)
    result = VOCResult({}, float("nan"), {}, {}, {}, [], float(iou_threshold), use_07_metric)
    for c, key in enumerate(keys):
        hits = tp_counted[bounds[c] : bounds[c + 1]]
        tps = np.cumsum(hits).astype(np.float64)
        fps = np.cumsum(~hits).astype(np.float64)
        npos = int(npos_all[c])
        result.npos[key] = npos
        result.precision[key] = prec = tps / np.maximum(tps + fps, np.finfo(np.float64).eps)
        if npos == 0:
            result.ap[key] = float("nan")
            result.excluded.append(key)
            result.recall[key] = np.zeros(len(tps))
            continue
        result.recall[key] = rec = tps / npos
        result.ap[key] = ap_11_point(rec, prec) if use_07_metric else ap_all_point(rec, prec)
    valid = [v for v in result.ap.values() if not np.isnan(v)]
    result.map = float(np.mean(valid)) if valid else float("nan")
    if result.excluded:
        result.notes.append(
            f"note: {len(result.excluded)} class(es) without non-difficult ground truth left out "
            f"of the mAP (AP NaN, as in the devkit): {', '.join(map(str, result.excluded))}"
        )
    return result
