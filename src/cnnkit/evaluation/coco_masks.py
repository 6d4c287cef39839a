"""COCO masks through ``pycocotools.mask``: the format's reference RLE / polygon encoding.

Polygons, uncompressed RLE (``counts`` a list, used for crowd regions) and compressed RLE all
become compressed RLE dicts exactly as pycocotools' ``COCO.annToRLE`` makes them, so mask IoUs
(computed by ``pycocotools.mask.iou``, C) are bit-identical to COCOeval's. Polygons of one
image are rasterized in one ``frPyObjects`` call instead of one call per annotation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

# JSON numbers are int or float; bool is an int subclass, but ``true`` is not a number here.
JSON_NUMBER_TYPES = frozenset({int, float})


def is_int(v: Any) -> bool:
    """An integer (Python or numpy), not a boolean."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def is_number(v: Any) -> bool:
    """A number (Python or numpy int or float), not a boolean."""
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(
        v, (bool, np.bool_)
    )


def _finite_numbers(values: list[Any]) -> bool:
    """Whether every value is a finite number; plain ints and floats take a C-speed path."""
    if set(map(type, values)) <= JSON_NUMBER_TYPES:
        try:
            return all(map(math.isfinite, values))
        except OverflowError:  # an int beyond float's range: decided below, as for any type
            pass
    return all(is_number(v) and np.isfinite(v) for v in values)


def _check_rle(segm: dict[str, Any], h: int, w: int, where: str) -> None:
    """An RLE is ``{"size": [h, w], "counts": str | [int, ...]}`` of the image's size; run
    lengths (uncompressed) are non-negative integers covering exactly h * w pixels."""
    size, counts = segm.get("size"), segm.get("counts")
    if counts is None or size is None:
        raise ValueError(f"{where}.segmentation: an RLE needs 'counts' and 'size'")
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(map(is_int, size))):
        raise ValueError(f"{where}.segmentation: RLE size must be [height, width], got {size!r}")
    if [int(v) for v in size] != [h, w]:
        raise ValueError(f"{where}.segmentation: RLE size {list(size)} differs from image {[h, w]}")
    if isinstance(counts, list):
        if not all(is_int(c) and c >= 0 for c in counts):
            raise ValueError(
                f"{where}.segmentation: RLE counts must be non-negative integers (or a "
                f"compressed string)"
            )
        if sum(counts) != h * w:
            raise ValueError(
                f"{where}.segmentation: RLE counts add up to {sum(counts)} pixels, the image "
                f"has {h} x {w} = {h * w}"
            )
    elif isinstance(counts, bytes):
        if not counts.isascii():
            raise ValueError(f"{where}.segmentation: compressed RLE counts must be ASCII")
    elif not (isinstance(counts, str) and counts.isascii()):
        raise ValueError(
            f"{where}.segmentation: RLE counts must be a list of integers or a compressed "
            f"ASCII string, got {type(counts).__name__}"
        )


def _check_polygons(segm: list[Any], where: str) -> None:
    """Polygons: lists of an even number of finite numbers (x1, y1, x2, y2, ...)."""
    for j, part in enumerate(segm):
        if not (isinstance(part, list) and part and len(part) % 2 == 0):
            raise ValueError(
                f"{where}.segmentation[{j}]: a polygon is a list of x, y pairs (an even count "
                f"of numbers)"
            )
        if not _finite_numbers(part):
            bad = next(v for v in part if not (is_number(v) and np.isfinite(v)))
            raise ValueError(f"{where}.segmentation[{j}]: not a finite number: {bad!r}")


def check(segm: Any, h: int, w: int, name: str) -> None:
    """Validate one segmentation (polygons, or an RLE of the ``h`` x ``w`` image); errors
    name ``name.segmentation``."""
    if isinstance(segm, dict):
        _check_rle(segm, h, w, name)
    elif isinstance(segm, list) and segm and all(isinstance(p, list) for p in segm):
        _check_polygons(segm, name)
        if len(segm[0]) < 4:
            raise ValueError(f"{name}.segmentation: a polygon needs at least 3 points")
    else:
        raise ValueError(f"{name}.segmentation: expected polygons or an RLE dict")


def check_all(
    segms: Sequence[Any], heights: np.ndarray, widths: np.ndarray, name: Callable[[int], str]
) -> None:
    """``check`` every segmentation [N] (image sizes ``heights`` / ``widths`` [N]); an error
    names entry ``i`` as ``name(i)``, built only then."""
    for i, (segm, h, w) in enumerate(zip(segms, heights.tolist(), widths.tolist(), strict=True)):
        try:
            check(segm, int(h), int(w), "")  # every message starts with ".segmentation"
        except ValueError as err:
            raise ValueError(f"{name(i)}{err}") from None


def to_rles(segms: Sequence[Any], heights: np.ndarray, widths: np.ndarray) -> list[dict[str, Any]]:
    """Compressed RLE dicts [N] of ``segms`` (image sizes ``heights``/``widths`` [N]), which
    ``check_all`` has passed (``coco_io`` checks every segmentation as it reads it)."""
    out: list[Any] = [None] * len(segms)
    polys_by_size: dict[tuple[int, int], list[int]] = {}
    for i, segm in enumerate(segms):
        h, w = int(heights[i]), int(widths[i])
        if isinstance(segm, dict):
            if isinstance(segm["counts"], list):
                out[i] = mask_utils.frPyObjects(segm, h, w)  # uncompressed RLE
            else:
                out[i] = segm
        elif len(segm[0]) > 4:
            polys_by_size.setdefault((h, w), []).append(i)
        else:
            # pycocotools reads a 4-number first part as boxes; keep its behaviour.
            out[i] = mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
    for (h, w), members in polys_by_size.items():
        parts = [p for i in members for p in segms[i]]
        rles = mask_utils.frPyObjects(parts, h, w)  # parts[0] has > 4 numbers: polygons
        k = 0
        for i in members:
            n = len(segms[i])
            out[i] = rles[k] if n == 1 else mask_utils.merge(rles[k : k + n])
            k += n
    return out


def areas(rles: Sequence[dict[str, Any]]) -> np.ndarray:
    """Pixel counts [N] of RLE masks."""
    if not rles:
        return np.zeros(0)
    return np.asarray(mask_utils.area(list(rles)), dtype=np.float64)


def iou(
    dt: Sequence[dict[str, Any]], gt: Sequence[dict[str, Any]], iscrowd: np.ndarray
) -> np.ndarray:
    """Mask IoU [D, G]; against a crowd gt it is intersection over the detection's area."""
    return np.asarray(
        mask_utils.iou(list(dt), list(gt), [int(c) for c in iscrowd]), dtype=np.float64
    )


def encode_masks(masks: np.ndarray) -> list[dict[str, Any]]:
    """Compressed RLE dicts (JSON-ready: ``counts`` a str) of binary masks [N, H, W]."""
    if len(masks) == 0:
        return []
    fortran = np.asfortranarray(np.moveaxis(np.asarray(masks, dtype=np.uint8), 0, -1))
    rles = mask_utils.encode(fortran)
    for r in rles:
        r["counts"] = r["counts"].decode("ascii")
    return rles
