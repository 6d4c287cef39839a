"""Precision/recall accumulation of COCOeval, vectorized over categories and IoU thresholds.

For one category, area range a and detection limit m, the detections (each image's first m)
are ranked by score (stable: ties keep image order, then rank within the image) and

    recall_i = TP_i / npig,   precision_i = TP_i / (FP_i + TP_i + eps),

with TP_i / FP_i the cumulative counts of non-ignored matched / unmatched detections and
npig the non-ignored ground truths. The precision envelope p~_i = max_{j >= i} precision_j is
sampled at each recall threshold r at the first i with recall_i >= r (0 if none), giving
pycocotools' ``eval['precision']`` [T, R, K, A, M]; ``eval['recall']`` [T, K, A, M] is the
final recall. Categories without non-ignored ground truth stay -1.

All categories live in one ranked array, one segment each. Ignored detections and those beyond
the limit m stay in place with zero increments: they repeat the previous point of the curve,
which changes neither the envelope nor the first index reaching a recall level. "First i with
recall_i >= r" is found on exact integers: the smallest count c with float(c / npig) >= r,
then the c-th true positive.
"""

from __future__ import annotations

import numpy as np


def _min_counts(npig: np.ndarray, rec_thrs: np.ndarray) -> np.ndarray:
    """Smallest integer c with c / n >= r (float division, as pycocotools compares) [K, R].

    -1 where no c <= n qualifies (r > 1). Rows with n == 0 are meaningless.
    """
    n = np.maximum(npig, 1).astype(np.float64)[:, None]
    r = rec_thrs[None, :]
    c = np.ceil(r * n)
    for _ in range(2):  # r * n may round to either side of the exact value
        c = np.where((c - 1 >= 0) & ((c - 1) / n >= r), c - 1, c)
        c = np.where(c / n < r, c + 1, c)
    c = np.maximum(c, 0)
    return np.where(c <= n, c, -1).astype(np.int64)


def accumulate(
    det_cat: np.ndarray,
    det_score: np.ndarray,
    det_img: np.ndarray,
    det_rank: np.ndarray,
    tp: np.ndarray,
    fp: np.ndarray,
    npig: np.ndarray,
    max_dets: list[int],
    rec_thrs: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """precision [T, R, K, A, M] and recall [T, K, A, M].

    Per detection [N]: category index det_cat, score, image index, rank within its
    (image, category) group; tp / fp [N, A, T] bool (neither where ignored). npig [K, A].
    """
    num_k, num_a = npig.shape
    num_t = tp.shape[2]
    num_r, num_m = len(rec_thrs), len(max_dets)
    precision = -np.ones((num_t, num_r, num_k, num_a, num_m))
    recall = -np.ones((num_t, num_k, num_a, num_m))
    order = np.lexsort((det_rank, det_img, -det_score, det_cat))
    cat, rank = det_cat[order], det_rank[order]
    seg_start = np.searchsorted(cat, np.arange(num_k), side="left")
    tp_all = np.ascontiguousarray(tp[order].transpose(1, 2, 0))  # [A, T, N]
    fp_all = np.ascontiguousarray(fp[order].transpose(1, 2, 0))
    rec_thrs = np.asarray(rec_thrs, dtype=np.float64)
    for a in range(num_a):
        has_gt = npig[:, a] > 0  # [K]
        if not has_gt.any():
            continue
        counts = _min_counts(npig[:, a], rec_thrs)  # [K, R]
        for mi, max_det in enumerate(max_dets):
            keep = rank < max_det
            tp_m = tp_all[a] & keep if not keep.all() else tp_all[a]
            fp_m = fp_all[a] & keep if not keep.all() else fp_all[a]
            q, total = _curves(tp_m, fp_m, cat, seg_start, counts, num_k)
            recall[:, :, a, mi] = np.where(has_gt, total / np.maximum(npig[:, a], 1), -1.0)
            precision[:, :, :, a, mi] = np.where(has_gt[:, None], q, -1.0).transpose(0, 2, 1)
    return precision, recall


def _curves(
    tp: np.ndarray,
    fp: np.ndarray,
    cat: np.ndarray,
    seg_start: np.ndarray,
    counts: np.ndarray,
    num_k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Sampled precision envelope [T, K, R] and TP totals [T, K] of ranked tp/fp [T, N].

    Precision only rises at a true positive, so the envelope from any point on is the max
    over the true positives from there: all work after one cumsum is on the TP list.
    """
    num_t, n = tp.shape
    fpc = np.zeros((num_t, n + 1), dtype=np.int64)  # FP count before each position
    np.cumsum(fp, axis=1, out=fpc[:, 1:])
    fp_base = fpc[:, seg_start]  # [T, K]
    flat = np.flatnonzero(tp)  # TPs, ordered by (row, position)
    t_of, i_of = np.divmod(flat, max(n, 1))
    group = t_of * num_k + cat[i_of]  # (row, category) of each TP, nondecreasing
    total = np.bincount(group, minlength=num_t * num_k)
    start = np.concatenate([[0], np.cumsum(total)[:-1]])
    j = (np.arange(len(flat)) - start[group] + 1).astype(np.float64)  # TP count so far
    fp_at = (fpc[:, 1:].ravel()[flat] - fp_base.ravel()[group]).astype(np.float64)
    pr = j / (fp_at + j + np.spacing(1))

    # Query: the first position with TP count >= c is the max(c, 1)-th TP of the segment.
    need = np.maximum(counts, 1)[None, :, :]  # [1, K, R]
    tot = total.reshape(num_t, num_k)[:, :, None]
    valid = (counts[None, :, :] >= 0) & (need <= tot)
    q = np.zeros((num_t, num_k, counts.shape[1]))
    if valid.any():
        first = (start.reshape(num_t, num_k)[:, :, None] + need - 1)[valid]
        end = np.broadcast_to((start + total).reshape(num_t, num_k)[:, :, None], q.shape)[valid]
        idx = np.empty(2 * len(first), dtype=np.int64)
        idx[0::2], idx[1::2] = first, end
        q[valid] = np.maximum.reduceat(np.concatenate([pr, [0.0]]), idx)[0::2]
    return q, total.reshape(num_t, num_k).astype(np.float64)
