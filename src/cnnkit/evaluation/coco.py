"""COCO-style Average Precision for boxes, masks and keypoints (Lin et al., 2014).

``coco_evaluate(gt, dt, iou_type)`` reproduces pycocotools' COCOeval (evaluate + accumulate +
summarize) number for number, vectorized with numpy instead of Python loops per image:

1. detections and ground truths are grouped by (image, category) with one lexsort;
2. IoU (boxes: the formula of pycocotools' ``bbIou``; masks: ``pycocotools.mask.iou``;
   keypoints: OKS) for all (detection, ground truth) pairs of every group in bulk;
3. greedy matching of every group, area range and IoU threshold at once (``coco_match``);
4. precision/recall curves of every category at once (``coco_accumulate``);
5. the 12 summary numbers (10 for keypoints) in pycocotools' order and print format.

Behaviours kept from pycocotools on purpose (they change the numbers): a crowd ground truth
can absorb any number of detections, and IoU against it is intersection over the detection's
area; an annotation's own ``"ignore"`` field is overwritten by ``iscrowd`` (pass
``use_ignore_flag=True`` to honour it); a ground truth with annotation id 0 counts its match as
"unmatched" (COCOeval stores matched ids and tests them against 0); result areas come from
``loadRes`` (see ``coco_io``). An empty results list, on which pycocotools' ``loadRes`` fails
(it reads ``results[0]``), is evaluated as a detector that found nothing: what COCOeval gives
with an empty result set (0 where there is ground truth, -1 elsewhere).

Stricter than pycocotools on purpose: every field the evaluation reads must have its JSON type
(``coco_io.read_ground_truth`` lists them). ``iscrowd`` is 0, 1, true or false: pycocotools
reads the flag twice, as its truth value (ignore) and as ``int(v)`` (crowd IoU), and a string
such as "0" is set for the first and unset for the second, so it is an error here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cnnkit.evaluation import coco_masks
from cnnkit.evaluation.coco_accumulate import accumulate
from cnnkit.evaluation.coco_io import (
    Detections,
    GroundTruth,
    lookup,
    read_detections,
    read_ground_truth,
)
from cnnkit.evaluation.coco_match import greedy_match
from cnnkit.evaluation.coco_params import COCOParams, make_params
from cnnkit.evaluation.oks import oks_pairs

# (is AP, IoU threshold, area label, maxDets): an int is an index into max_dets; a string is
# pycocotools' literal value (its first line asks for maxDets=100 whatever the parameters).
_DET_LINES = (
    (1, None, "all", "100"),
    (1, 0.5, "all", 2),
    (1, 0.75, "all", 2),
    (1, None, "small", 2),
    (1, None, "medium", 2),
    (1, None, "large", 2),
    (0, None, "all", 0),
    (0, None, "all", 1),
    (0, None, "all", 2),
    (0, None, "small", 2),
    (0, None, "medium", 2),
    (0, None, "large", 2),
)
_KPT_LINES = tuple(
    (ap, thr, area, "20")
    for ap in (1, 0)
    for thr, area in ((None, "all"), (0.5, "all"), (0.75, "all"), (None, "medium"), (None, "large"))
)


@dataclass
class COCOResult:
    """Outcome of ``coco_evaluate``.

    stats: the summary numbers in pycocotools' order (12, or 10 for keypoints), -1 where
    undefined; precision [T, R, K, A, M] and recall [T, K, A, M] laid out as pycocotools'
    ``eval['precision']`` / ``eval['recall']``; per_class: AP@[.50:.95] of each category (area
    range ``per_class_area``, largest maxDets), -1 for a category without ground truth; keyed
    by category name (or id where names are missing or repeated). ``per_class_area`` is the
    range labelled "all" (found by its label, wherever it is in ``area_rng``), or without such
    a label the widest range (lowest low end, then highest high end).
    """

    params: COCOParams
    stats: list[float]
    precision: np.ndarray
    recall: np.ndarray
    per_class: dict[Any, float]
    cat_ids: list[Any]
    lines: list[str] = field(repr=False, default_factory=list)
    per_class_area: str = "all"

    @property
    def per_class_area_index(self) -> int:
        """Index into the area axis of ``precision`` / ``recall`` of ``per_class_area``."""
        return area_index(self.params, self.per_class_area)

    def summary(self) -> str:
        """pycocotools' printed summary, one line per number."""
        return "\n".join(self.lines)

    def _precision_at(self, iou: float) -> np.ndarray | None:
        """``precision [R, K]`` at IoU threshold ``iou`` (the per-class area range, the largest
        maxDets; -1 where undefined), None when ``iou`` is not one of the thresholds."""
        t = np.flatnonzero(np.isclose(self.params.iou_thrs, iou))
        if len(t) == 0:
            return None
        return self.precision[t[0], :, :, self.per_class_area_index, -1]

    def pr_curves(self, ious: tuple[float, ...] = (0.5, 0.75)) -> dict[str, tuple]:
        """``{"IoU=0.50 (mean over categories)": (recall thresholds [R], mean interpolated
        precision [R])}`` for each of ``ious`` where some category has ground truth."""
        curves = {}
        for iou in ious:
            s = self._precision_at(iou)
            if s is None:
                continue
            s = np.where(s > -1, s, np.nan)
            if not np.isnan(s).all():
                curves[f"IoU={iou:.2f} (mean over categories)"] = (
                    self.params.rec_thrs,
                    np.nanmean(s, axis=1),
                )
        return curves

    def per_class_at(self, iou: float) -> dict[Any, float]:
        """AP of each category at one IoU threshold (NaN without ground truth; empty when
        ``iou`` is not one of the thresholds)."""
        s = self._precision_at(iou)
        if s is None:
            return {}
        out = {}
        for k, cat_id in enumerate(self.cat_ids):
            column = s[:, k][s[:, k] > -1]
            out[cat_id] = float(column.mean()) if column.size else float("nan")
        return out

    def per_class_table(self) -> str:
        """Per-category AP@[.50:.95] as an aligned text table."""
        width = max([len(str(k)) for k in self.per_class] + [8])
        rows = [f"{'category':<{width}}  AP"]
        rows += [f"{k!s:<{width}}  {v:0.3f}" for k, v in self.per_class.items()]
        return "\n".join(rows)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready ``{"iou_type", "stats", "per_class", "per_class_area", "lines"}``."""
        return {
            "iou_type": self.params.iou_type,
            "stats": [float(s) for s in self.stats],
            "per_class": {str(k): float(v) for k, v in self.per_class.items()},
            "per_class_area": self.per_class_area,
            "lines": list(self.lines),
        }


def per_class_area(p: COCOParams) -> str:
    """Label of the area range that per-category AP uses: "all" where there is such a label,
    else the widest range (lowest low end, then highest high end)."""
    if "all" in p.area_rng_lbl:
        return "all"
    widest = min(range(len(p.area_rng)), key=lambda a: (p.area_rng[a][0], -p.area_rng[a][1]))
    return p.area_rng_lbl[widest]


def area_index(p: COCOParams, label: str) -> int:
    """Index of the area range labelled ``label`` (the first, if the label repeats)."""
    if label not in p.area_rng_lbl:
        raise ValueError(f"no area range labelled {label!r} (area_rng_lbl={p.area_rng_lbl})")
    return p.area_rng_lbl.index(label)


def _summarize(p: COCOParams, precision: np.ndarray, recall: np.ndarray) -> tuple[list, list]:
    """pycocotools' ``summarize``: means of the entries > -1 of each selected slice."""
    stats, lines = [], []
    fmt = " {:<18} {} @[ IoU={:<9} | area={:>6s} | maxDets={:>3d} ] = {:0.3f}"
    specs = _KPT_LINES if p.iou_type == "keypoints" else _DET_LINES
    for ap, thr, area, det in specs:
        max_det = int(det) if isinstance(det, str) else p.max_dets[min(det, len(p.max_dets) - 1)]
        aind = [i for i, lbl in enumerate(p.area_rng_lbl) if lbl == area]
        mind = [i for i, m in enumerate(p.max_dets) if m == max_det]
        s = precision if ap == 1 else recall
        if thr is not None:
            s = s[np.where(thr == p.iou_thrs)[0]]
        s = s[:, :, :, aind, mind] if ap == 1 else s[:, :, aind, mind]
        mean = -1 if len(s[s > -1]) == 0 else np.mean(s[s > -1])
        iou_str = f"{p.iou_thrs[0]:0.2f}:{p.iou_thrs[-1]:0.2f}" if thr is None else f"{thr:0.2f}"
        title = "Average Precision" if ap == 1 else "Average Recall"
        lines.append(fmt.format(title, "(AP)" if ap == 1 else "(AR)", iou_str, area, max_det, mean))
        stats.append(float(mean))
    return stats, lines


def box_iou_pairs(dt: np.ndarray, gt: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """IoU [P] of xywh box pairs dt, gt [P, 4], operation by operation as pycocotools' ``bbIou``
    (C); where ``crowd`` [P] is set, intersection over the detection's area. 0 without overlap.
    """
    w = np.minimum(dt[:, 2] + dt[:, 0], gt[:, 2] + gt[:, 0]) - np.maximum(dt[:, 0], gt[:, 0])
    h = np.minimum(dt[:, 3] + dt[:, 1], gt[:, 3] + gt[:, 1]) - np.maximum(dt[:, 1], gt[:, 1])
    inter = w * h
    da = dt[:, 2] * dt[:, 3]
    union = np.where(crowd, da, da + gt[:, 2] * gt[:, 3] - inter)
    ok = (w > 0) & (h > 0)
    return np.where(ok, inter / np.where(ok, union, 1.0), 0.0)


@dataclass
class _Groups:
    """Selected gts/dts sorted by group, and the groups that have both [NG]."""

    gt_rows: np.ndarray  # indices into GroundTruth arrays, sorted by (group, cat, file order)
    gt_group: np.ndarray
    dt_rows: np.ndarray  # kept detections (rank < max maxDets), sorted by (group, score)
    dt_group: np.ndarray
    dt_rank: np.ndarray
    both: np.ndarray  # group keys with detections and ground truths
    n_det: np.ndarray
    det_start: np.ndarray
    n_gt: np.ndarray
    gt_start: np.ndarray
    num_k: int = 1  # group key = image index * num_k + category index


def _group(
    gt: GroundTruth, dt: Detections, p: COCOParams, img_ok: np.ndarray, cat_ok: np.ndarray, k_of
) -> _Groups:
    num_k = int(k_of.max(initial=0)) + 1
    gsel = np.flatnonzero(img_ok[gt.ann_img] & cat_ok[gt.ann_cat])
    g_key = gt.ann_img[gsel] * num_k + k_of[gt.ann_cat[gsel]]
    g_order = np.lexsort((gt.ann_cat[gsel], g_key))
    gt_rows, gt_group = gsel[g_order], g_key[g_order]

    dsel = np.flatnonzero(img_ok[dt.img] & cat_ok[dt.cat])
    d_key = dt.img[dsel] * num_k + k_of[dt.cat[dsel]]
    d_order = np.lexsort((dt.cat[dsel], -dt.score[dsel], d_key))
    d_rows, d_group = dsel[d_order], d_key[d_order]
    first = np.searchsorted(d_group, d_group, side="left")
    rank = np.arange(len(d_rows)) - first
    keep = rank < p.max_dets[-1]
    d_rows, d_group, rank = d_rows[keep], d_group[keep], rank[keep]

    both = np.intersect1d(d_group, gt_group)
    det_start = np.searchsorted(d_group, both, side="left")
    n_det = np.searchsorted(d_group, both, side="right") - det_start
    gt_start = np.searchsorted(gt_group, both, side="left")
    n_gt = np.searchsorted(gt_group, both, side="right") - gt_start
    return _Groups(
        gt_rows, gt_group, d_rows, d_group, rank, both, n_det, det_start, n_gt, gt_start, num_k
    )


def ragged_ranges(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``range(counts[i])`` for every ``i``, concatenated without a Python loop.

    Returns ``owner`` and ``local`` ``[sum(counts)]`` (element ``j`` is ``local[j]`` of range
    ``owner[j]``) and ``offset`` ``[len(counts)]``, where each range starts.
    """
    offset = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    owner = np.repeat(np.arange(len(counts)), counts)
    return owner, np.arange(int(np.sum(counts))) - offset[owner], offset


def _pair_index(gr: _Groups) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted-detection and sorted-gt positions of every pair [P], and group block offsets."""
    owner, local, offset = ragged_ranges(gr.n_det * gr.n_gt)
    d = gr.det_start[owner] + local // gr.n_gt[owner]
    g = gr.gt_start[owner] + local % gr.n_gt[owner]
    return d, g, offset


def _pair_ious(
    gt: GroundTruth, dt: Detections, gr: _Groups, p: COCOParams, progress: bool
) -> tuple[np.ndarray, np.ndarray]:
    d, g, offset = _pair_index(gr)
    dr, gr_rows = gr.dt_rows[d], gr.gt_rows[g]
    if p.iou_type == "bbox":
        return box_iou_pairs(dt.bbox[dr], gt.bbox[gr_rows], gt.iscrowd[gr_rows]), offset
    if p.iou_type == "keypoints":
        ious = oks_pairs(
            dt.keypoints[dr],
            gt.keypoints[gr_rows],
            gt.bbox[gr_rows],
            gt.area[gr_rows],
            p.kpt_oks_sigmas,
        )
        return ious, offset
    return _mask_ious(gt, dt, gr, progress), offset


def _mask_ious(gt: GroundTruth, dt: Detections, gr: _Groups, progress: bool) -> np.ndarray:
    """Mask IoU blocks of every group, row-major, concatenated [P].

    One ``pycocotools.mask.iou`` call per image (all its groups' detections against all its
    groups' ground truths; pairs of different categories cost a box test in C), then each
    group's block is cut out: the per-call overhead, not the C work, dominates otherwise.
    """
    if len(gr.both) == 0:
        return np.zeros(0)
    d_owner, d_local, _ = ragged_ranges(gr.n_det)
    g_owner, g_local, _ = ragged_ranges(gr.n_gt)
    d_rows = gr.dt_rows[gr.det_start[d_owner] + d_local]
    g_rows = gr.gt_rows[gr.gt_start[g_owner] + g_local]
    d_rles = coco_masks.to_rles([dt.segmentation[i] for i in d_rows], *_hw(gt, dt.img[d_rows]))
    g_rles = coco_masks.to_rles([gt.segmentation[i] for i in g_rows], *_hw(gt, gt.ann_img[g_rows]))
    crowd = gt.iscrowd[g_rows]
    # Groups are sorted by image, so each image's groups, detections and gts are contiguous.
    img_of_group = gr.both // gr.num_k
    bounds = np.flatnonzero(np.r_[True, img_of_group[1:] != img_of_group[:-1], True])
    d_off = np.r_[0, np.cumsum(gr.n_det)]
    g_off = np.r_[0, np.cumsum(gr.n_gt)]
    blocks = []
    images = range(len(bounds) - 1)
    if progress:
        from tqdm import tqdm

        images = tqdm(images, desc="mask IoU", unit="image", leave=False)
    for b in images:
        j0, j1 = bounds[b], bounds[b + 1]
        d0, g0 = d_off[j0], g_off[j0]
        full = coco_masks.iou(d_rles[d0 : d_off[j1]], g_rles[g0 : g_off[j1]], crowd[g0 : g_off[j1]])
        for j in range(j0, j1):
            dl, gl = d_off[j] - d0, g_off[j] - g0
            blocks.append(full[dl : dl + gr.n_det[j], gl : gl + gr.n_gt[j]].ravel())
    return np.concatenate(blocks) if blocks else np.zeros(0)


def _hw(gt: GroundTruth, img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return gt.heights[img], gt.widths[img]


def coco_evaluate(
    gt: str | os.PathLike | Mapping[str, Any],
    dt: str | os.PathLike | Sequence[Mapping[str, Any]] | Mapping[Any, Mapping[str, Any]],
    iou_type: str = "bbox",
    *,
    label_map: Mapping[int, Any] | None = None,
    progress: bool | None = None,
    **params: Any,
) -> COCOResult:
    """COCO AP of detections ``dt`` against ground truth ``gt``, identical to COCOeval.

    gt: a COCO JSON path or dict. dt: a results JSON path, a list of result dicts, or per-image
    predictions ``{image_id: {"boxes" [N, 4] xyxy, "scores" [N], "labels" [N], "masks"
    [N, 1, H, W], "keypoints" [N, K, 3]}}`` (labels are category ids, or mapped by
    ``label_map``). iou_type: "bbox", "segm" or "keypoints". params: pycocotools' ``Params``
    by snake_case or camelCase name (iou_thrs/iouThrs, rec_thrs, max_dets, area_rng,
    area_rng_lbl, cat_ids, img_ids, use_cats, kpt_oks_sigmas) and ``use_ignore_flag``.
    progress: show progress bars on stderr (default: when there are more than 1000 images).
    Bad input raises ValueError naming the file, entry index and field.
    """
    p = make_params(iou_type, **params)
    g = read_ground_truth(gt, iou_type)
    d = read_detections(dt, g, iou_type, label_map)
    if (
        iou_type == "keypoints"
        and len(g.keypoints)
        and g.keypoints.shape[1] != 3 * len(p.kpt_oks_sigmas)
    ):
        raise ValueError(
            f"ground truth has {g.keypoints.shape[1] // 3} keypoints but kpt_oks_sigmas has "
            f"{len(p.kpt_oks_sigmas)}; pass kpt_oks_sigmas for this skeleton"
        )
    if progress is None:
        progress = len(g.image_ids) > 1000
    return _evaluate(g, d, p, bool(progress))


def _selection(g: GroundTruth, p: COCOParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    img_ok = np.ones(len(g.image_ids), dtype=bool)
    if p.img_ids is not None:
        img_ok[:] = False
        idx = lookup(g.image_ids, np.asarray(p.img_ids))
        img_ok[idx[idx >= 0]] = True  # ids without an image have nothing to evaluate
    cat_ok = np.ones(len(g.cat_ids), dtype=bool)
    if p.cat_ids is not None:
        idx = lookup(g.cat_ids, np.asarray(p.cat_ids))
        if (idx < 0).any():
            raise ValueError(f"cat_ids: {p.cat_ids[int(np.argmax(idx < 0))]!r} is not a category")
        cat_ok[:] = False
        cat_ok[idx] = True
    k_of = np.cumsum(cat_ok) - 1 if p.use_cats else np.zeros(len(g.cat_ids), dtype=np.int64)
    return img_ok, cat_ok, k_of.astype(np.int64)


def _evaluate(g: GroundTruth, d: Detections, p: COCOParams, progress: bool) -> COCOResult:
    img_ok, cat_ok, k_of = _selection(g, p)
    num_k = int(cat_ok.sum()) if p.use_cats else 1
    gr = _group(g, d, p, img_ok, cat_ok, k_of)

    # Ignore flags per area range: [rows, A].
    lo = np.array([r[0] for r in p.area_rng])
    hi = np.array([r[1] for r in p.area_rng])
    base = g.iscrowd.copy()
    if p.use_ignore_flag:
        base |= g.ignore_flag
    if p.iou_type == "keypoints":
        base |= g.num_keypoints == 0
    g_area = g.area[gr.gt_rows][:, None]
    gt_ignore = base[gr.gt_rows][:, None] | (g_area < lo) | (g_area > hi)
    d_area = d.area[gr.dt_rows][:, None]
    dt_out = (d_area < lo) | (d_area > hi)

    ious, offset = _pair_ious(g, d, gr, p, progress)
    match = greedy_match(
        ious,
        offset,
        gr.n_det,
        gr.det_start,
        gr.n_gt,
        gr.gt_start,
        gt_ignore,
        g.iscrowd[gr.gt_rows],
        p.iou_thrs,
        len(gr.dt_rows),
        progress,
    )
    matched = match >= 0
    safe = np.where(matched, match, 0)
    # COCOeval records the matched gt's id and later reads id 0 as "no match".
    gt_ids = g.ann_id[gr.gt_rows]
    counted = matched & (gt_ids[safe] != 0) if len(gt_ids) else matched
    a_idx = np.arange(len(p.area_rng))[None, :, None]
    matched_ignored = gt_ignore[safe, a_idx] if len(gt_ids) else np.zeros_like(matched)
    dt_ig = np.where(matched, matched_ignored, False) | (~counted & dt_out[:, :, None])
    tp = counted & ~dt_ig
    fp = ~counted & ~dt_ig

    npig = np.zeros((num_k, len(p.area_rng)), dtype=np.int64)
    np.add.at(npig, k_of[g.ann_cat[gr.gt_rows]], ~gt_ignore)
    precision, recall = accumulate(
        k_of[d.cat[gr.dt_rows]],
        d.score[gr.dt_rows],
        d.img[gr.dt_rows],
        gr.dt_rank,
        tp,
        fp,
        npig,
        p.max_dets,
        p.rec_thrs,
    )
    stats, lines = _summarize(p, precision, recall)
    area = area_index(p, per_class_area(p))
    cat_ids = [c.item() if isinstance(c, np.generic) else c for c in g.cat_ids[cat_ok]]
    names = [n for n, ok in zip(g.cat_names, cat_ok, strict=True) if ok]
    return COCOResult(
        params=p,
        stats=stats,
        precision=precision,
        recall=recall,
        per_class=_per_class(names, cat_ids, precision, area) if p.use_cats else {},
        cat_ids=cat_ids,
        lines=lines,
        per_class_area=p.area_rng_lbl[area],
    )


def _per_class(
    names: list[str], ids: list[Any], precision: np.ndarray, area: int
) -> dict[Any, float]:
    """AP@[.50:.95] (area range ``area``, largest maxDets) of each evaluated category, by name
    (by id where names repeat)."""
    keys = names if len(set(names)) == len(names) else ids
    out = {}
    for k, key in enumerate(keys):
        s = precision[:, :, k, area, -1]
        out[key] = float(np.mean(s[s > -1])) if (s > -1).any() else -1.0
    return out
