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
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np

from cnnkit.evaluation import coco_masks
from cnnkit.evaluation.coco_masks import JSON_NUMBER_TYPES, is_int, is_number


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
    """Parsed JSON of ``source``; a file that is empty, not UTF-8, not JSON or nested too
    deeply for Python's parser is a ValueError naming the file."""
    name = os.fspath(source)
    try:
        with open(source, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} file {name!r} is not UTF-8 text: {err.reason}") from None
    if not text.strip():
        raise ValueError(f"{what} file {name!r} is empty")
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(f"{what} file {name!r}: JSON nested too deeply to read") from None
    except ValueError as err:  # JSONDecodeError, or an integer of more than 4300 digits
        raise ValueError(f"{what} file {name!r} is not valid JSON: {err}") from None


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


def _note(records: Sequence[Any], i: int) -> str:
    """`` (id X)`` where entry ``i`` carries an id, to find it in the file."""
    r = records[i]
    if isinstance(r, Mapping) and "id" in r:
        return f" (id {_short(r['id'])})"
    return ""


def _entry(records: Sequence[Any], where: str):
    """``i -> "where[i]"`` (with `` (id X)`` where the entry has an id), for error messages."""
    return lambda i: f"{where}[{i}]{_note(records, i)}"


def _is_row(v: Any, width: int) -> bool:
    if isinstance(v, np.ndarray):
        return v.shape == (width,) and v.dtype.kind in "iuf"
    return isinstance(v, (list, tuple)) and len(v) == width and all(map(is_number, v))


def _plain_rows(values: list[Any], width: int) -> bool:
    """Whether every value is a list of ``width`` plain ints and floats (checked at C speed: the
    common case of a JSON file, before the per-row check that also takes tuples and arrays)."""
    return (
        set(map(type, values)) == {list}
        and set(map(len, values)) == {width}
        and set(map(type, chain.from_iterable(values))) <= JSON_NUMBER_TYPES
    )


def _numbers(
    values: list[Any],
    where: str,
    field: str,
    width: int | None = None,
    records: Sequence[Any] | None = None,
    nonnegative: bool = False,
) -> np.ndarray:
    """float64 array [N] (or [N, width]) of JSON numbers (not strings, not booleans) that are
    finite (and >= 0 if ``nonnegative``); errors name the entry (and its annotation id)."""
    if len(values) == 0:
        return np.zeros((0,) if width is None else (0, width))
    recs = values if records is None else records
    if width is None:
        ok = set(map(type, values)) <= JSON_NUMBER_TYPES or all(map(is_number, values))
    else:
        ok = _plain_rows(values, width) or all(_is_row(v, width) for v in values)
    arr = None
    if ok:
        try:
            arr = np.asarray(values, dtype=np.float64)
        except OverflowError:  # an integer beyond float64's range
            arr = None
    if arr is None:
        for i, v in enumerate(values):
            row = [v] if width is None else v
            if width is None and not is_number(v):
                raise ValueError(f"{where}[{i}].{field}: not a number: {_short(v)}{_note(recs, i)}")
            if width is not None and not _is_row(v, width):
                raise ValueError(
                    f"{where}[{i}].{field}: expected {width} numbers, got {_short(v)}{_note(recs, i)}"
                )
            try:
                [float(x) for x in row]
            except OverflowError:
                raise ValueError(
                    f"{where}[{i}].{field}: number too large: {_short(v)}{_note(recs, i)}"
                ) from None
        raise AssertionError("unreachable")  # pragma: no cover
    bad = ~np.isfinite(arr) if arr.ndim == 1 else ~np.isfinite(arr).all(axis=1)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{where}[{i}].{field}: not finite: {_short(values[i])}{_note(recs, i)}")
    if nonnegative:
        neg = arr < 0 if arr.ndim == 1 else (arr < 0).any(axis=1)
        if neg.any():
            i = int(np.argmax(neg))
            raise ValueError(f"{where}[{i}].{field}: negative: {_short(values[i])}{_note(recs, i)}")
    return arr


def _integers(
    values: list[Any], where: str, field: str, records: Sequence[Any], lo: int, hi: int
) -> np.ndarray:
    """int64 array [N] of integers in [lo, hi] (an integral float such as 3.0 counts)."""
    for i, v in enumerate(values):
        integral = is_number(v) and (
            isinstance(v, (int, np.integer)) or (math.isfinite(v) and float(v).is_integer())
        )
        if not (integral and lo <= v <= hi):
            raise ValueError(
                f"{where}[{i}].{field}: expected an integer in [{lo}, {hi}], got {_short(v)}"
                f"{_note(records, i)}"
            )
    return np.asarray(values, dtype=np.int64).reshape(-1)


# Integer ids are kept as int64; a float id must be integral and exactly representable.
_ID_MAX = 2**63 - 1
_FLOAT_ID_MAX = 2**53


def _id_array(
    values: list[Any], where: str, field: str, records: Sequence[Any] | None = None
) -> np.ndarray:
    """Ids [N] as int64 (integers, or integral floats such as 3.0) or str, never both."""
    recs = values if records is None else records
    if not values:
        return np.zeros(0, dtype=np.int64)
    kinds = set(map(type, values))
    if kinds == {str}:
        return np.asarray(values, dtype=str)
    if kinds == {int}:
        arr = np.asarray(values)
        if arr.dtype.kind == "i":  # else some id is beyond int64 (uint64 or object array)
            return arr.astype(np.int64)
    first: dict[str, int] = {}
    for i, v in enumerate(values):
        if isinstance(v, str):
            kind = "string"
        elif is_int(v):
            if not -_ID_MAX - 1 <= v <= _ID_MAX:
                raise ValueError(
                    f"{where}[{i}].{field}={_short(v)}: out of range; integer ids must lie "
                    f"within +-2**63 (64-bit){_note(recs, i)}"
                )
            kind = "integer"
        elif isinstance(v, (float, np.floating)) and np.isfinite(v) and float(v).is_integer():
            if abs(v) > _FLOAT_ID_MAX:
                raise ValueError(
                    f"{where}[{i}].{field}={v!r}: a float id must be an integer within +-2**53 "
                    f"(exactly representable); write it as an integer{_note(recs, i)}"
                )
            kind = "integer"
        else:
            raise ValueError(
                f"{where}[{i}].{field}: expected an integer or string id, got {_short(v)}"
                f"{_note(recs, i)}"
            )
        first.setdefault(kind, i)
    if len(first) > 1:
        i, j = first["integer"], first["string"]
        raise ValueError(
            f"{where}: field {field!r} mixes integer and string ids ([{i}] is {values[i]!r}, "
            f"[{j}] is {values[j]!r})"
        )
    if "string" in first:
        return np.asarray(values, dtype=str)
    return np.asarray([int(v) for v in values], dtype=np.int64)


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
    idx = lookup(sorted_ids, _id_array(_column(records, key, where), where, key, records))
    if (idx < 0).any():
        i = int(np.argmax(idx < 0))
        raise ValueError(
            f"{where}[{i}].{key}={_short(records[i][key])}: {absent}{_note(records, i)}"
        )
    return idx


def _unique_ids(records: Sequence[Any], where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted ids of ``records``, the entry of each, and the ids in file order; a repeated id
    is an error (pycocotools would silently keep the last entry of that id)."""
    raw = _id_array(_column(records, "id", where), where, "id", records)
    ids, first, counts = np.unique(raw, return_index=True, return_counts=True)
    if (counts > 1).any():
        dup = ids[int(np.argmax(counts > 1))]
        at = np.flatnonzero(raw == dup)[:2].tolist()
        raise ValueError(f"{where}: duplicate id {dup.item()!r} (entries {at[0]} and {at[1]})")
    return ids, first, raw


def _boxes(records: Sequence[Any], where: str) -> np.ndarray:
    """xywh boxes [N, 4] of the records: 4 finite numbers, width and height >= 0, whose
    corners and area are finite too (no overflow in the IoU)."""
    bbox = _numbers(_column(records, "bbox", where), where, "bbox", width=4, records=records)
    neg = (bbox[:, 2:] < 0).any(axis=1)
    if neg.any():
        i = int(np.argmax(neg))
        raise ValueError(
            f"{where}[{i}].bbox={_short(records[i]['bbox'])}: negative width or height"
            f"{_note(records, i)}"
        )
    with np.errstate(over="ignore"):
        derived = np.stack(
            [bbox[:, 0] + bbox[:, 2], bbox[:, 1] + bbox[:, 3], bbox[:, 2] * bbox[:, 3]], axis=1
        )
    huge = ~np.isfinite(derived).all(axis=1)
    if huge.any():
        i = int(np.argmax(huge))
        raise ValueError(
            f"{where}[{i}].bbox={_short(records[i]['bbox'])}: too large (its corner or area "
            f"overflows){_note(records, i)}"
        )
    return bbox


def _flags(records: Sequence[Any], key: str, where: str) -> np.ndarray:
    """0/1 flags (iscrowd, ignore, difficult) [N]; absent means 0.

    Accepted: 0, 1 and true, false (pycocotools reads a flag both as ``int(v)`` and as its
    truth value; these are the values on which both readings agree). A string such as "0" is
    an error: pycocotools would take it as set for one purpose and unset for the other.
    """
    values = _column(records, key, where, default=0)
    plain = set(map(type, values)) <= {int, bool} and set(values) <= {0, 1}  # C speed
    for i, v in enumerate([] if plain else values):
        if not (v is True or v is False or (is_number(v) and v in (0, 1))):
            raise ValueError(
                f"{where}[{i}].{key}: expected 0, 1, true or false, got {_short(v)}"
                f"{_note(records, i)}"
            )
    return np.asarray(values, dtype=bool).reshape(-1)


def read_ground_truth(
    gt: str | os.PathLike | Mapping[str, Any], iou_type: str, name: str | None = None
) -> GroundTruth:
    """Validated arrays of a COCO ground truth; every error names the file (or ``name``) and
    entry, and the annotation's id where it has one.

    Unlike pycocotools, which silently drops annotations of images or categories that the
    file does not list, those are errors here; so are repeated image, category or annotation
    ids. Every field that the evaluation of ``iou_type`` reads must have its JSON type: ids
    integers (64-bit; an integral float such as 3.0 counts) or strings, never both in one
    field; ``bbox`` 4 finite numbers with width, height >= 0; ``area`` a finite number >= 0;
    ``iscrowd`` / ``ignore`` / ``difficult`` 0, 1, true or false; for segm, image ``height``
    / ``width`` positive integers and ``segmentation`` polygons or an RLE of the image's size;
    for keypoints, ``keypoints`` 3K finite numbers and ``num_keypoints`` an integer >= 0.
    Fields the evaluation does not read are not checked.
    """
    if name is None:
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

    image_ids, first, _ = _unique_ids(images, where_i)
    if iou_type == "segm":
        # Masks are rasterized at the image size: positive integers (pycocotools' C int).
        size = {}
        for key in ("height", "width"):
            values = _column(images, key, where_i)
            size[key] = _integers(values, where_i, key, images, 1, 2**31 - 1)[first]
        heights, widths = size["height"], size["width"]
    else:
        heights = widths = np.zeros(len(image_ids))
    file_names = [str(images[i].get("file_name", "")) for i in first]

    cat_ids, cfirst, _ = _unique_ids(cats, where_c)
    names = [str(cats[i].get("name", cat_ids[j])) for j, i in enumerate(cfirst)]

    n = len(anns)
    ann_img = _indices(anns, "image_id", where_a, image_ids, "no such image")
    ann_cat = _indices(anns, "category_id", where_a, cat_ids, "no such category")
    ids = _column(anns, "id", where_a, default=None)
    if n and all(v is None for v in ids):
        ann_id = np.arange(1, n + 1, dtype=np.int64)  # ids only need to be distinct
    else:
        ann_id = _unique_ids(anns, where_a)[2]  # in file order

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
        coco_masks.check_all(
            out.segmentation, heights[ann_img], widths[ann_img], _entry(anns, where_a)
        )
    if iou_type == "keypoints":
        out.keypoints = _keypoint_rows(_column(anns, "keypoints", where_a), where_a, anns)
        vis = np.count_nonzero(out.keypoints[:, 2::3] > 0, axis=1)
        nk = _column(anns, "num_keypoints", where_a, default=None)
        # pycocotools requires num_keypoints; without it, count the labelled points.
        given = [i for i, k in enumerate(nk) if k is not None]
        nk_given = _integers([nk[i] for i in given], where_a, "num_keypoints", anns, 0, 2**31)
        out.num_keypoints = vis.astype(np.int64)
        out.num_keypoints[given] = nk_given
    areas = _column(anns, "area", where_a, default=None)
    missing = [i for i, a in enumerate(areas) if a is None]
    # The given areas are checked as given (a missing one reads 0 here, then is filled in).
    given = [0 if a is None else a for a in areas] if missing else areas
    out.area = _numbers(given, where_a, "area", records=anns, nonnegative=True)
    if missing:
        # pycocotools requires "area"; we fall back to the box (or mask) area.
        idx = np.asarray(missing)
        if iou_type == "segm":
            segms = [out.segmentation[i] for i in missing]
            fill = coco_masks.areas(
                coco_masks.to_rles(segms, heights[ann_img[idx]], widths[ann_img[idx]])
            )
        else:
            fill = bbox[idx, 2] * bbox[idx, 3]
        out.area[idx] = fill
    return out


def _keypoint_rows(values: list[Any], where: str, records: Sequence[Any]) -> np.ndarray:
    """Flat keypoints [N, 3K]: lists of the same length 3K of finite numbers."""
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
                raise ValueError(
                    f"{where}[{i}].keypoints: expected 3K numbers (x, y, v per keypoint) like "
                    f"the others ({len(values[0]) if isinstance(values[0], list) else '?'}), "
                    f"got {_short(v)}{_note(records, i)}"
                )
    return _numbers(values, where, "keypoints", width=width, records=records).reshape(
        len(values), -1
    )


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


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
        if labels.dtype.kind not in "iu" and not (
            labels.dtype.kind == "f" and np.isfinite(labels).all() and (labels % 1 == 0).all()
        ):
            raise ValueError(f"{where}: labels must be integers, got {labels.dtype} {labels[:5]}")
        cats = [int(v) for v in labels]
        if label_map is not None:
            unknown = [v for v in cats if v not in label_map]
            if unknown:
                raise ValueError(f"{where}: label {unknown[0]} is not in label_map")
            cats = [label_map[v] for v in cats]
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
        name = os.fspath(dt)
        dt = load_json(dt, "results")
        if isinstance(dt, Mapping) and "annotations" not in dt:
            # JSON keys are strings: per-image predictions cannot come from a file.
            raise ValueError(
                f"results {name!r}: expected a list of result objects (or a COCO-style object "
                f"with 'annotations'), got an object with keys {_short(list(dt)[:5])}"
            )
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
    where: str | None = None,
) -> Detections:
    """Validated arrays of detection results against ``gt``; errors name ``results[i].field``
    (``where`` replaces "results" / "results 'FILE'" for results already parsed)."""
    if where is None:
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
    score = _numbers(_column(dt, "score", where), where, "score", records=dt)
    out = Detections(img=img, cat=cat, score=score, area=np.zeros(n))

    # The first result decides how areas are computed (pycocotools' loadRes).
    first = dt[0] if isinstance(dt[0], Mapping) else {}
    has_box = "bbox" in first and not (isinstance(first["bbox"], list) and first["bbox"] == [])
    need_box = iou_type == "bbox" or has_box
    if need_box:
        out.bbox = _boxes(dt, where)
    if iou_type == "segm" or (not has_box and "segmentation" in first):
        out.segmentation = _column(dt, "segmentation", where)
        coco_masks.check_all(out.segmentation, gt.heights[img], gt.widths[img], _entry(dt, where))
    if iou_type == "keypoints" or (not has_box and "segmentation" not in first):
        out.keypoints = _keypoint_rows(_column(dt, "keypoints", where), where, dt)
        gk = gt.keypoints
        if gk is not None and len(gk) and out.keypoints.shape[1] != gk.shape[1]:
            raise ValueError(
                f"{where}[0].keypoints: {out.keypoints.shape[1] // 3} keypoints but the ground "
                f"truth has {gt.keypoints.shape[1] // 3}"
            )

    if has_box:
        out.area = out.bbox[:, 2] * out.bbox[:, 3]
    elif "segmentation" in first:
        rles = coco_masks.to_rles(out.segmentation, gt.heights[img], gt.widths[img])
        out.segmentation = rles
        out.area = coco_masks.areas(rles)
    elif "keypoints" in first:
        x, y = out.keypoints[:, 0::3], out.keypoints[:, 1::3]
        with np.errstate(over="ignore", invalid="ignore"):
            out.area = (x.max(axis=1) - x.min(axis=1)) * (y.max(axis=1) - y.min(axis=1))
        huge = ~np.isfinite(out.area)
        if huge.any():
            i = int(np.argmax(huge))
            raise ValueError(f"{where}[{i}].keypoints: too large (their extent overflows)")
    else:
        raise ValueError(f"{where}[0]: needs a 'bbox', 'segmentation' or 'keypoints' field")
    return out
