"""Object Keypoint Similarity (OKS), the IoU of keypoint detection (COCO keypoints task).

    OKS = sum_i exp(-d_i^2 / (2 s^2 k_i^2)) [v_i > 0] / sum_i [v_i > 0],   k_i = 2 sigma_i,

with d_i the distance between detected and labelled keypoint i, s^2 the ground-truth area and
v_i the labelled visibility. A ground truth with no labelled keypoint measures, as pycocotools
does, each detected point's distance to the gt box enlarged to three times its size, averaged
over all K keypoints. The arithmetic follows pycocotools' ``computeOks`` operation by operation
(including the sum over the visible points only), so values are bit-identical.
"""

from __future__ import annotations

import numpy as np


def oks_pairs(
    dt_kpts: np.ndarray,
    gt_kpts: np.ndarray,
    gt_bbox: np.ndarray,
    gt_area: np.ndarray,
    sigmas: np.ndarray,
) -> np.ndarray:
    """OKS [P] of P (detection, ground truth) pairs.

    dt_kpts [P, 3K] and gt_kpts [P, 3K] flat (x, y, v) triples, gt_bbox [P, 4] xywh,
    gt_area [P], sigmas [K].
    """
    p = len(dt_kpts)
    out = np.zeros(p)
    if p == 0:
        return out
    k = len(sigmas)
    variances = (sigmas * 2) ** 2
    xd, yd = dt_kpts[:, 0::3], dt_kpts[:, 1::3]
    xg, yg, vg = gt_kpts[:, 0::3], gt_kpts[:, 1::3], gt_kpts[:, 2::3]
    visible = vg > 0
    k1 = np.count_nonzero(visible, axis=1)

    dx = xd - xg
    dy = yd - yg
    boxed = k1 == 0
    if boxed.any():
        bb = gt_bbox[boxed]
        x0 = (bb[:, 0] - bb[:, 2])[:, None]
        x1 = (bb[:, 0] + bb[:, 2] * 2)[:, None]
        y0 = (bb[:, 1] - bb[:, 3])[:, None]
        y1 = (bb[:, 1] + bb[:, 3] * 2)[:, None]
        xb, yb = xd[boxed], yd[boxed]
        dx[boxed] = np.maximum(0.0, x0 - xb) + np.maximum(0.0, xb - x1)
        dy[boxed] = np.maximum(0.0, y0 - yb) + np.maximum(0.0, yb - y1)
    e = (dx**2 + dy**2) / variances / (gt_area[:, None] + np.spacing(1)) / 2

    # Sum exactly the terms pycocotools sums (all K, or the k1 visible ones in order), each
    # row as one contiguous reduction, so the floating-point grouping is the same.
    for count in np.unique(k1):
        rows = np.flatnonzero(k1 == count)
        if count == 0:
            terms = np.ascontiguousarray(e[rows])
            n = k
        else:
            order = np.argsort(~visible[rows], axis=1, kind="stable")[:, :count]
            terms = np.ascontiguousarray(np.take_along_axis(e[rows], order, axis=1))
            n = int(count)
        out[rows] = np.sum(np.exp(-terms), axis=1) / n
    return out
