"""Reading and validating COCO ground truth and detection results into flat numpy arrays.

Ground truth: a COCO instances file (path) or the parsed dict. Detections: a results file
(path), a list of result dicts, or per-image predictions straight from a detector
``{image_id: {"boxes": [N, 4] xyxy, "scores": [N], "labels": [N], "masks": [N, 1, H, W],
"keypoints": [N, K, 3]}}`` (tensors or arrays). Boxes are COCO ``[x, y, w, h]`` only here, at
the JSON boundary.

Result areas follow pycocotools' ``COCO.loadRes`` exactly, because the area decides which
unmatched detections an area range ignores: the *first* result decides for the whole list.
If it has a non-empty "bbox", every area is ``w * h`` (a given "area" is overwritten);
otherwise, if it has a "segmentation", the mask area; otherwise, with "keypoints", the area of
the keypoints' extent.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cnnkit.evaluation import coco_masks


@dataclass
class GroundTruth:
    """Annotations as arrays [N]; images [I] and categories [C] sorted by id.

    ``ann_img`` / ``ann_cat`` index into ``image_ids`` / ``cat_ids``; ``bbox`` [N, 4] xywh;
    ``keypoints`` [N, 3K] or None; ``segmentation`` the raw objects (segm only).
    """

    image_ids: np.ndarray
    heights: np.ndarray
    widths: np.ndarray
    cat_ids: np.ndarray
    cat_names: list[str]
    ann_id: np.ndarray
    ann_img: np.ndarray
    ann_cat: np.ndarray
    bbox: np.ndarray
    area: np.ndarray
    iscrowd: np.ndarray
    ignore_flag: np.ndarray
    difficult: np.ndarray
    num_keypoints: np.ndarray | None = None
    keypoints: np.ndarray | None = None
    segmentation: list[Any] | None = None
    file_names: list[str] | None = None


@dataclass
class Detections:
    """Results as arrays [N] in the order given (their pycocotools ids are 1..N)."""

    img: np.ndarray
    cat: np.ndarray
    score: np.ndarray
    area: np.ndarray
    bbox: np.ndarray | None = None
    keypoints: np.ndarray | None = None
    segmentation: list[Any] | None = None


def load_json(source: str | os.PathLike, what: str) -> Any:
    """Parsed JSON of ``source``; bad JSON is a ValueError naming the file."""
    try:
        with open(source, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} file {os.fspath(source)!r} is not valid JSON: {err}") from None


def _column(records: Sequence[Any], key: str, where: str, default: Any = KeyError) -> list[Any]:
    """``[r[key] for r in records]``; a missing field names the first offending entry."""
    try:
        if default is KeyError:
            return [r[key] for r in records]
        return [r.get(key, default) for r in records]
    except (KeyError, TypeError, AttributeError):
        for i, r in enumerate(records):
            if not isinstance(r, Mapping):
                raise ValueError(
                    f"{where}[{i}]: expected an object, got {type(r).__name__}"
                ) from None
            if key not in r:
                raise ValueError(f"{where}[{i}]: missing field {key!r}") from None
        raise


def _numbers(values: list[Any], where: str, field: str, width: int | None = None) -> np.ndarray:
    """float64 array [N] (or [N, width]) whose entries are finite; errors name the entry."""
    if len(values) == 0:
        return np.zeros((0,) if width is None else (0, width))
    try:
        arr = np.asarray(values, dtype=np.float64)
        shape_ok = arr.ndim == 1 if width is None else arr.shape == (len(values), width)
    except (TypeError, ValueError):
        shape_ok = False
    if not shape_ok:
        for i, v in enumerate(values):
            try:
                a = np.asarray(v, dtype=np.float64)
            except (TypeError, ValueError):
                raise ValueError(f"{where}[{i}].{field}: not a number: {v!r}") from None
            if (width is None and a.ndim != 0) or (width is not None and a.shape != (width,)):
                want = "a number" if width is None else f"{width} numbers"
                raise ValueError(f"{where}[{i}].{field}: expected {want}, got {v!r}")
        raise ValueError(f"{where}: field {field!r} has inconsistent entries")
    bad = ~np.isfinite(arr) if arr.ndim == 1 else ~np.isfinite(arr).all(axis=1)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{where}[{i}].{field}: not finite: {values[i]!r}")
    return arr


def _id_array(values: list[Any], where: str, field: str) -> np.ndarray:
    arr = np.asarray(values)
    if (
        arr.ndim != 1
        or arr.dtype.kind not in "iuU"
        and not (arr.dtype.kind == "f" and np.all(arr == np.round(arr)))
    ):
        for i, v in enumerate(values):
            if not isinstance(v, (int, str, np.integer)) or isinstance(v, bool):
                raise ValueError(
                    f"{where}[{i}].{field}: expected an integer or string id, got {v!r}"
                )
        raise ValueError(f"{where}: field {field!r} mixes integer and string ids")
    return arr.astype(np.int64) if arr.dtype.kind == "f" else arr


def lookup(sorted_ids: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Index of each value in ``sorted_ids`` [I], -1 where absent."""
    if len(sorted_ids) == 0 or len(values) == 0:
        return np.full(len(values), -1, dtype=np.int64)
    if (sorted_ids.dtype.kind == "U") != (values.dtype.kind == "U"):
        return np.full(len(values), -1, dtype=np.int64)
    pos = np.searchsorted(sorted_ids, values)
    pos_c = np.minimum(pos, len(sorted_ids) - 1)
    return np.where(sorted_ids[pos_c] == values, pos_c, -1).astype(np.int64)


def _indices(
    records: Sequence[Any], key: str, where: str, sorted_ids: np.ndarray, absent: str
) -> np.ndarray:
    """Index in ``sorted_ids`` of each record's ``key`` id; an unknown id names its entry."""
    idx = lookup(sorted_ids, _id_array(_column(records, key, where), where, key))
    if (idx < 0).any():
        i = int(np.argmax(idx < 0))
        raise ValueError(f"{where}[{i}].{key}={records[i][key]!r}: {absent}")
    return idx


def _boxes(records: Sequence[Any], where: str) -> np.ndarray:
    """xywh boxes [N, 4] of the records; a negative width or height names its entry."""
    bbox = _numbers(_column(records, "bbox", where), where, "bbox", width=4)
    neg = (bbox[:, 2:] < 0).any(axis=1)
    if neg.any():
        i = int(np.argmax(neg))
        raise ValueError(f"{where}[{i}].bbox={records[i]['bbox']!r}: negative width or height")
    return bbox


def _flags(records: Sequence[Mapping[str, Any]], key: str, where: str) -> np.ndarray:
    values = _column(records, key, where, default=0)
    try:
        return np.asarray([bool(v) for v in values], dtype=bool)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: field {key!r} must hold 0/1 flags") from None


def read_ground_truth(gt: str | os.PathLike | Mapping[str, Any], iou_type: str) -> GroundTruth:
    """Validated arrays of a COCO ground truth; every error names the file and entry.

    Unlike pycocotools, which silently drops annotations of images or categories that the
    file does not list, those are errors here.
    """
    name = os.fspath(gt) if isinstance(gt, (str, os.PathLike)) else "ground truth"
    data = load_json(gt, "ground truth") if isinstance(gt, (str, os.PathLike)) else gt
    if not isinstance(data, Mapping):
        raise ValueError(f"{name}: a COCO ground truth is an object with 'images', 'annotations'")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{name}: missing list {key!r}")
    anns = data.get("annotations", [])
    if not isinstance(anns, list):
        raise ValueError(f"{name}: 'annotations' must be a list")
    images, cats = data["images"], data["categories"]
    where_i, where_c, where_a = f"{name}: images", f"{name}: categories", f"{name}: annotations"

    img_ids_raw = _id_array(_column(images, "id", where_i), where_i, "id")
    image_ids, first = np.unique(img_ids_raw, return_index=True)
    if iou_type == "segm":
        heights = _numbers(_column(images, "height", where_i), where_i, "height")[first]
        widths = _numbers(_column(images, "width", where_i), where_i, "width")[first]
    else:
        heights = widths = np.zeros(len(image_ids))
    file_names = [str(images[i].get("file_name", "")) for i in first]

    cat_ids_raw = _id_array(_column(cats, "id", where_c), where_c, "id")
    cat_ids, cfirst = np.unique(cat_ids_raw, return_index=True)
    names = [str(cats[i].get("name", cat_ids[j])) for j, i in enumerate(cfirst)]

    n = len(anns)
    ann_img = _indices(anns, "image_id", where_a, image_ids, "no such image")
    ann_cat = _indices(anns, "category_id", where_a, cat_ids, "no such category")
    ids = _column(anns, "id", where_a, default=None)
    if n and all(v is None for v in ids):
        ann_id = np.arange(1, n + 1, dtype=np.int64)  # ids only need to be distinct
    else:
        ann_id = _id_array(_column(anns, "id", where_a), where_a, "id")
        uniq, counts = np.unique(ann_id, return_counts=True)
        if (counts > 1).any():
            raise ValueError(f"{where_a}: duplicate annotation id {uniq[np.argmax(counts > 1)]!r}")

    bbox = np.zeros((n, 4))
    if iou_type != "segm" or (n and "bbox" in anns[0]):
        bbox = _boxes(anns, where_a)
    out = GroundTruth(
        image_ids=image_ids,
        heights=heights,
        widths=widths,
        cat_ids=cat_ids,
        cat_names=names,
        ann_id=ann_id,
        ann_img=ann_img,
        ann_cat=ann_cat,
        bbox=bbox,
        area=np.zeros(n),
        iscrowd=_flags(anns, "iscrowd", where_a),
        ignore_flag=_flags(anns, "ignore", where_a),
        difficult=_flags(anns, "difficult", where_a),
        file_names=file_names,
    )
    if iou_type == "segm":
        out.segmentation = _column(anns, "segmentation", where_a)
    if iou_type == "keypoints":
        out.keypoints = _keypoint_rows(_column(anns, "keypoints", where_a), where_a)
        vis = np.count_nonzero(out.keypoints[:, 2::3] > 0, axis=1)
        nk = _column(anns, "num_keypoints", where_a, default=None)
        # pycocotools requires num_keypoints; without it, count the labelled points.
        out.num_keypoints = np.asarray(
            [v if k is None else k for k, v in zip(nk, vis, strict=True)], dtype=np.int64
        )
    areas = _column(anns, "area", where_a, default=None)
    missing = [i for i, a in enumerate(areas) if a is None]
    if missing:
        # pycocotools requires "area"; we fall back to the box (or mask) area.
        idx = np.asarray(missing)
        if iou_type == "segm":
            rles = coco_masks.to_rles(
                [out.segmentation[i] for i in missing],
                heights[ann_img[idx]],
                widths[ann_img[idx]],
                where_a,
                idx,
            )
            fill = coco_masks.areas(rles)
        else:
            fill = bbox[idx, 2] * bbox[idx, 3]
        for i, f in zip(missing, fill.tolist(), strict=True):
            areas[i] = f
    out.area = _numbers(areas, where_a, "area")
    return out


def _keypoint_rows(values: list[Any], where: str) -> np.ndarray:
    if not values:
        return np.zeros((0, 0))
    lengths = {len(v) if isinstance(v, (list, tuple, np.ndarray)) else -1 for v in values}
    width = lengths.pop() if len(lengths) == 1 else None
    if width is None or width < 0 or width % 3:
        for i, v in enumerate(values):
            if (
                not isinstance(v, (list, tuple, np.ndarray))
                or len(v) % 3
                or len(v) != len(values[0])
            ):
                raise ValueError(f"{where}[{i}].keypoints: expected 3K numbers like the others")
    return _numbers(values, where, "keypoints", width=width).reshape(len(values), -1)


def is_predictions(dt: Any) -> bool:
    """True for ``{image_id: {"boxes": ..., "scores": ..., "labels": ...}}``."""
    return isinstance(dt, Mapping) and all(isinstance(v, Mapping) for v in dt.values())


def _array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def predictions_to_results(
    predictions: Mapping[Any, Mapping[str, Any]],
    iou_type: str,
    label_map: Mapping[int, Any] | None = None,
) -> list[dict[str, Any]]:
    """Model outputs -> COCO result dicts, as torchvision's reference evaluation writes them.

    boxes [N, 4] xyxy -> "bbox" xywh (float64 arithmetic); masks [N, 1, H, W] probabilities
    -> RLE of ``mask > 0.5`` (no "bbox", so the area is the mask's); keypoints [N, K, 3] ->
    flat "keypoints" (no "bbox", so the area is the keypoints' extent). ``labels`` are the
    category ids unless ``label_map`` maps them.
    """
    results: list[dict[str, Any]] = []
    for image_id, pred in predictions.items():
        where = f"predictions[{image_id!r}]"
        for key in ("scores", "labels"):
            if key not in pred:
                raise ValueError(f"{where}: missing {key!r}")
        scores = _array(pred["scores"]).astype(np.float64).reshape(-1)
        labels = _array(pred["labels"]).reshape(-1)
        n = len(scores)
        if len(labels) != n:
            raise ValueError(f"{where}: {n} scores but {len(labels)} labels")
        cats = [label_map[int(v)] if label_map is not None else int(v) for v in labels]
        extra: list[dict[str, Any]] = [{} for _ in range(n)]
        if iou_type == "bbox":
            if "boxes" not in pred:
                raise ValueError(f"{where}: missing 'boxes'")
            boxes = _array(pred["boxes"]).astype(np.float64).reshape(-1, 4)
            if len(boxes) != n:
                raise ValueError(f"{where}: {n} scores but {len(boxes)} boxes")
            xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
            for e, b in zip(extra, xywh.tolist(), strict=True):
                e["bbox"] = b
        elif iou_type == "segm":
            if "masks" not in pred:
                raise ValueError(f"{where}: missing 'masks'")
            masks = _array(pred["masks"])
            if masks.ndim == 4:
                masks = masks[:, 0]
            if masks.ndim != 3 or len(masks) != n:
                raise ValueError(
                    f"{where}: masks must be [N, 1, H, W] with N={n}, got {masks.shape}"
                )
            for e, rle in zip(extra, coco_masks.encode_masks(masks > 0.5), strict=True):
                e["segmentation"] = rle
        else:
            if "keypoints" not in pred:
                raise ValueError(f"{where}: missing 'keypoints'")
            kps = _array(pred["keypoints"]).astype(np.float64)
            if kps.ndim != 3 or kps.shape[0] != n or kps.shape[2] != 3:
                raise ValueError(
                    f"{where}: keypoints must be [N, K, 3] with N={n}, got {kps.shape}"
                )
            for e, k in zip(extra, kps.reshape(n, -1).tolist(), strict=True):
                e["keypoints"] = k
        image = image_id.item() if isinstance(image_id, np.generic) else image_id
        for s, c, e in zip(scores.tolist(), cats, extra, strict=True):
            results.append({"image_id": image, "category_id": c, "score": s, **e})
    return results


def parse_results(
    dt: str | os.PathLike | Sequence[Mapping[str, Any]] | Mapping[Any, Mapping[str, Any]],
    iou_type: str,
    label_map: Mapping[int, Any] | None = None,
) -> Any:
    """The result dicts of ``dt`` (unvalidated): a path is read, a COCO-style dict gives its
    "annotations", per-image predictions are converted; anything else is returned as is."""
    if isinstance(dt, (str, os.PathLike)):
        dt = load_json(dt, "results")
    if isinstance(dt, Mapping) and "annotations" in dt:
        return dt["annotations"]  # a COCO-style file whose annotations carry scores
    if is_predictions(dt):
        return predictions_to_results(dt, iou_type, label_map)
    return dt


def read_detections(
    dt: str | os.PathLike | Sequence[Mapping[str, Any]] | Mapping[Any, Mapping[str, Any]],
    gt: GroundTruth,
    iou_type: str,
    label_map: Mapping[int, Any] | None = None,
) -> Detections:
    """Validated arrays of detection results against ``gt``; errors name ``results[i].field``."""
    where = f"results {os.fspath(dt)!r}" if isinstance(dt, (str, os.PathLike)) else "results"
    dt = parse_results(dt, iou_type, label_map)
    if not isinstance(dt, list):
        raise ValueError(f"{where}: expected a list of result objects, got {type(dt).__name__}")
    n = len(dt)
    if n == 0:
        k = 0 if gt.keypoints is None else gt.keypoints.shape[1]
        return Detections(
            img=np.zeros(0, np.int64),
            cat=np.zeros(0, np.int64),
            score=np.zeros(0),
            area=np.zeros(0),
            bbox=np.zeros((0, 4)),
            keypoints=np.zeros((0, k)),
            segmentation=[],
        )
    img = _indices(dt, "image_id", where, gt.image_ids, "not an image of the ground truth")
    cat = _indices(dt, "category_id", where, gt.cat_ids, "not a category of the ground truth")
    score = _numbers(_column(dt, "score", where), where, "score")
    out = Detections(img=img, cat=cat, score=score, area=np.zeros(n))

    # The first result decides how areas are computed (pycocotools' loadRes).
    first = dt[0] if isinstance(dt[0], Mapping) else {}
    has_box = "bbox" in first and not (isinstance(first["bbox"], list) and first["bbox"] == [])
    need_box = iou_type == "bbox" or has_box
    if need_box:
        out.bbox = _boxes(dt, where)
    if iou_type == "segm" or (not has_box and "segmentation" in first):
        out.segmentation = _column(dt, "segmentation", where)
    if iou_type == "keypoints" or (not has_box and "segmentation" not in first):
        out.keypoints = _keypoint_rows(_column(dt, "keypoints", where), where)
        gk = gt.keypoints
        if gk is not None and len(gk) and out.keypoints.shape[1] != gk.shape[1]:
            raise ValueError(
                f"{where}[0].keypoints: {out.keypoints.shape[1] // 3} keypoints but the ground "
                f"truth has {gt.keypoints.shape[1] // 3}"
            )

    if has_box:
        out.area = out.bbox[:, 2] * out.bbox[:, 3]
    elif "segmentation" in first:
        rles = coco_masks.to_rles(
            out.segmentation, gt.heights[img], gt.widths[img], where, np.arange(n)
        )
        out.segmentation = rles
        out.area = coco_masks.areas(rles)
    elif "keypoints" in first:
        x, y = out.keypoints[:, 0::3], out.keypoints[:, 1::3]
        out.area = (x.max(axis=1) - x.min(axis=1)) * (y.max(axis=1) - y.min(axis=1))
    else:
        raise ValueError(f"{where}[0]: needs a 'bbox', 'segmentation' or 'keypoints' field")
    return out
