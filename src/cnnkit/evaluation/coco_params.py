"""Parameters of COCO-style evaluation (the defaults of pycocotools' ``Params``).

Every parameter has a readable snake_case name; pycocotools' camelCase spelling is accepted too
(``iouThrs`` == ``iou_thrs``), so settings copied from a COCOeval script keep working.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

IOU_TYPES = ("bbox", "segm", "keypoints")

# Per-keypoint standard deviations of the 17 COCO person keypoints (Ronchi & Perona 2017),
# nose, eyes, ears, shoulders, elbows, wrists, hips, knees, ankles.
COCO_KEYPOINT_SIGMAS = (
    np.array(
        [0.26, 0.25, 0.25, 0.35, 0.35, 0.79, 0.79, 0.72, 0.72, 0.62, 0.62, 1.07, 1.07, 0.87, 0.87]
        + [0.89, 0.89]
    )
    / 10.0
)

_ALIASES = {
    "iouThrs": "iou_thrs",
    "recThrs": "rec_thrs",
    "maxDets": "max_dets",
    "areaRng": "area_rng",
    "areaRngLbl": "area_rng_lbl",
    "catIds": "cat_ids",
    "imgIds": "img_ids",
    "useCats": "use_cats",
    "kptOksSigmas": "kpt_oks_sigmas",
}


@dataclass
class COCOParams:
    """Evaluation settings; field names follow pycocotools' ``Params`` in snake_case.

    iou_thrs [T], rec_thrs [R], max_dets [M] (sorted), area_rng [A] of (lo, hi) with labels
    area_rng_lbl [A], cat_ids / img_ids (None = all of the ground truth), use_cats,
    kpt_oks_sigmas [K] (keypoints only), use_ignore_flag (also ignore gts whose own
    ``"ignore"`` field is set; pycocotools overwrites that field with ``iscrowd``, so False
    reproduces it).
    """

    iou_type: str
    iou_thrs: np.ndarray
    rec_thrs: np.ndarray
    max_dets: list[int]
    area_rng: list[tuple[float, float]]
    area_rng_lbl: list[str]
    cat_ids: list[Any] | None = None
    img_ids: list[Any] | None = None
    use_cats: bool = True
    kpt_oks_sigmas: np.ndarray | None = None
    use_ignore_flag: bool = False


def _thresholds(lo: float, hi: float, step: float) -> np.ndarray:
    # pycocotools uses linspace: arange's points drift above the intended values.
    return np.linspace(lo, hi, int(np.round((hi - lo) / step)) + 1, endpoint=True)


def default_params(iou_type: str) -> COCOParams:
    """pycocotools' defaults: IoU .50:.05:.95, 101 recall points, maxDets 1/10/100 (20)."""
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    iou_thrs = _thresholds(0.5, 0.95, 0.05)
    rec_thrs = _thresholds(0.0, 1.0, 0.01)
    if iou_type == "keypoints":
        return COCOParams(
            iou_type,
            iou_thrs,
            rec_thrs,
            [20],
            [(0.0, 1e5**2), (32.0**2, 96.0**2), (96.0**2, 1e5**2)],
            ["all", "medium", "large"],
            kpt_oks_sigmas=COCO_KEYPOINT_SIGMAS.copy(),
        )
    return COCOParams(
        iou_type,
        iou_thrs,
        rec_thrs,
        [1, 10, 100],
        [(0.0, 1e5**2), (0.0, 32.0**2), (32.0**2, 96.0**2), (96.0**2, 1e5**2)],
        ["all", "small", "medium", "large"],
    )


def _float_vector(name: str, value: Any) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if arr.size == 0 or not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be a non-empty sequence of finite numbers, got {value!r}")
    return arr


def make_params(iou_type: str = "bbox", **overrides: Any) -> COCOParams:
    """Defaults for ``iou_type`` with ``overrides`` applied (snake_case or camelCase names)."""
    p = default_params(iou_type)
    given: dict[str, Any] = {}
    for key, value in overrides.items():
        name = _ALIASES.get(key, key)
        if name not in COCOParams.__dataclass_fields__ or name == "iou_type":
            raise TypeError(f"unknown evaluation parameter {key!r}")
        if name in given:
            raise TypeError(f"evaluation parameter {name!r} given twice ({key!r})")
        given[name] = value
    if "iou_thrs" in given:
        p.iou_thrs = _float_vector("iou_thrs", given["iou_thrs"])
    if "rec_thrs" in given:
        p.rec_thrs = _float_vector("rec_thrs", given["rec_thrs"])
    if "max_dets" in given:
        dets = [int(m) for m in np.asarray(given["max_dets"]).reshape(-1)]
        if not dets or min(dets) < 1:
            raise ValueError(f"max_dets must be positive integers, got {given['max_dets']!r}")
        p.max_dets = dets
    p.max_dets = sorted(p.max_dets)
    if "area_rng" in given:
        rng = np.asarray(given["area_rng"], dtype=np.float64)
        if rng.ndim != 2 or rng.shape[1] != 2 or len(rng) == 0:
            raise ValueError(
                f"area_rng must be a list of [lo, hi] pairs, got {given['area_rng']!r}"
            )
        p.area_rng = [(float(lo), float(hi)) for lo, hi in rng]
    if "area_rng_lbl" in given:
        p.area_rng_lbl = [str(s) for s in given["area_rng_lbl"]]
    if len(p.area_rng_lbl) != len(p.area_rng):
        raise ValueError(
            f"area_rng has {len(p.area_rng)} ranges but area_rng_lbl has "
            f"{len(p.area_rng_lbl)} labels; give both"
        )
    for name in ("cat_ids", "img_ids"):
        if given.get(name) is not None:
            value = given[name]
            if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
                value = [value]
            setattr(p, name, list(value))
    if "use_cats" in given:
        p.use_cats = bool(given["use_cats"])
    if "use_ignore_flag" in given:
        p.use_ignore_flag = bool(given["use_ignore_flag"])
    if "kpt_oks_sigmas" in given:
        if iou_type != "keypoints":
            raise TypeError("kpt_oks_sigmas applies to iou_type='keypoints' only")
        sig = _float_vector("kpt_oks_sigmas", given["kpt_oks_sigmas"])
        if np.any(sig <= 0):
            raise ValueError("kpt_oks_sigmas must be positive")
        p.kpt_oks_sigmas = sig
    return p


def params_dict(p: COCOParams) -> Mapping[str, Any]:
    """JSON-friendly view of the parameters (for reports)."""
    out: dict[str, Any] = {
        "iou_type": p.iou_type,
        "iou_thrs": p.iou_thrs.tolist(),
        "rec_thrs_count": len(p.rec_thrs),
        "max_dets": list(p.max_dets),
        "area_rng": [list(r) for r in p.area_rng],
        "area_rng_lbl": list(p.area_rng_lbl),
        "use_cats": p.use_cats,
    }
    if p.kpt_oks_sigmas is not None:
        out["kpt_oks_sigmas"] = p.kpt_oks_sigmas.tolist()
    return out
