"""COCO masks through ``pycocotools.mask``: the format's reference RLE / polygon encoding.

Polygons, uncompressed RLE (``counts`` a list, used for crowd regions) and compressed RLE all
become compressed RLE dicts exactly as pycocotools' ``COCO.annToRLE`` makes them, so mask IoUs
(computed by ``pycocotools.mask.iou``, C) are bit-identical to COCOeval's. Polygons of one
image are rasterized in one ``frPyObjects`` call instead of one call per annotation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils


def _check_rle(segm: dict[str, Any], h: int, w: int, where: str) -> None:
    size = segm.get("size")
    if "counts" not in segm or size is None:
        raise ValueError(f"{where}.segmentation: an RLE needs 'counts' and 'size'")
    if [int(v) for v in size] != [h, w]:
        raise ValueError(f"{where}.segmentation: RLE size {list(size)} differs from image {[h, w]}")


def to_rles(
    segms: Sequence[Any],
    heights: np.ndarray,
    widths: np.ndarray,
    where: str,
    indices: np.ndarray,
) -> list[dict[str, Any]]:
    """Compressed RLE dicts [N] of ``segms`` (image sizes ``heights``/``widths`` [N]).

    ``where``/``indices`` name the entries in error messages (``where[indices[i]]``).
    """
    out: list[Any] = [None] * len(segms)
    polys_by_size: dict[tuple[int, int], list[int]] = {}
    for i, segm in enumerate(segms):
        h, w = int(heights[i]), int(widths[i])
        name = f"{where}[{int(indices[i])}]"
        if isinstance(segm, dict):
            _check_rle(segm, h, w, name)
            if isinstance(segm["counts"], list):
                out[i] = mask_utils.frPyObjects(segm, h, w)  # uncompressed RLE
            else:
                out[i] = segm
        elif isinstance(segm, list) and segm and all(isinstance(p, list) for p in segm):
            first = len(segm[0])
            if first > 4:
                polys_by_size.setdefault((h, w), []).append(i)
            elif first == 4:
                # pycocotools reads a 4-number first part as boxes; keep its behaviour.
                out[i] = mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
            else:
                raise ValueError(f"{name}.segmentation: a polygon needs at least 3 points")
        else:
            raise ValueError(f"{name}.segmentation: expected polygons or an RLE dict")
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
