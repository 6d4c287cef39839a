"""Greedy detection-to-ground-truth matching of COCOeval, for all groups at once.

The rule (pycocotools ``evaluateImg``, per image and category, per IoU threshold t and area
range): detections are visited by decreasing score; each takes, among the ground truths it
may still take (not yet matched, or crowd), the one of highest IoU >= t, looking first at the
ground truths not ignored and only if none qualifies at the ignored ones; ties go to the later
ground truth in file order (pycocotools replaces its candidate on equal IoU).

Here the visit of the d-th detection is one array step over every (image, category) group, every
area range and every threshold together: arrays [groups, A, T, G]. Groups are bucketed by their
ground-truth count G (no padding along G) and sorted by detection count, so the groups still
active at step d are a prefix.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def _last_argmax(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of the last maximum along the last axis, and whether that maximum is finite."""
    g = values.shape[-1]
    idx = g - 1 - np.argmax(values[..., ::-1], axis=-1)
    best = np.take_along_axis(values, idx[..., None], axis=-1)[..., 0]
    return idx, best > -np.inf


def greedy_match(
    pair_iou: np.ndarray,
    pair_offset: np.ndarray,
    n_det: np.ndarray,
    det_start: np.ndarray,
    n_gt: np.ndarray,
    gt_start: np.ndarray,
    gt_ignore: np.ndarray,
    gt_crowd: np.ndarray,
    iou_thrs: np.ndarray,
    num_dets: int,
    progress: bool = False,
) -> np.ndarray:
    """Matched ground truth of every detection: int [num_dets, A, T], -1 where unmatched.

    Groups (image, category) with at least one detection and one ground truth [NG]: their
    detections are rows det_start..det_start+n_det (sorted by score), their ground truths rows
    gt_start..gt_start+n_gt (file order); pair_iou holds each group's [n_det, n_gt] IoU block,
    row-major, from pair_offset. gt_ignore [num_gts, A] bool, gt_crowd [num_gts] bool,
    iou_thrs [T].
    """
    a_count = gt_ignore.shape[1]
    t_count = len(iou_thrs)
    out = np.full((num_dets, a_count, t_count), -1, dtype=np.int64)
    thr = np.minimum(np.asarray(iou_thrs, dtype=np.float64), 1 - 1e-10)[None, None, :, None]
    sizes = np.unique(n_gt)
    steps: Iterable[int] = sizes
    if progress:
        from tqdm import tqdm

        steps = tqdm(sizes, desc="matching", unit="bucket", leave=False)
    for g in steps:
        g = int(g)
        grp = np.flatnonzero(n_gt == g)
        grp = grp[np.argsort(-n_det[grp], kind="stable")]
        d_of = n_det[grp]
        d_max = int(d_of[0])
        rows = np.minimum(np.arange(d_max)[None, :], d_of[:, None] - 1)
        iou = pair_iou[pair_offset[grp][:, None, None] + rows[:, :, None] * g + np.arange(g)]
        gts = gt_start[grp][:, None] + np.arange(g)  # [nb, G]
        not_ignored = ~gt_ignore[gts].transpose(0, 2, 1)[:, :, None, :]  # [nb, A, 1, G]
        crowd = gt_crowd[gts][:, None, None, :]
        matched = np.zeros((len(grp), a_count, t_count, g), dtype=bool)
        active = np.count_nonzero(d_of[None, :] > np.arange(d_max)[:, None], axis=1)
        for d in range(d_max):
            na = int(active[d])
            v = iou[:na, d][:, None, None, :]
            ok = (v >= thr) & (~matched[:na] | crowd[:na])
            if g == 1:
                m = np.zeros(ok.shape[:-1], dtype=np.int64)
                found = ok[..., 0]
            else:
                val = np.where(ok, v, -np.inf)
                first = not_ignored[:na]
                m1, found1 = _last_argmax(np.where(first, val, -np.inf))
                m2, found2 = _last_argmax(np.where(first, -np.inf, val))
                m = np.where(found1, m1, m2)
                found = found1 | found2
            out[det_start[grp[:na]] + d] = np.where(found, m + gts[:na, 0, None, None], -1)
            matched[:na] |= found[..., None] & (np.arange(g) == m[..., None])
    return out
