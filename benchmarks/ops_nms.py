"""nms / batched_nms: cnnkit vs torchvision's CPU kernel, same run, identical keep lists.

    PYTHONPATH=src /tmp/cnnkit-peers/bin/python benchmarks/ops_nms.py [--repeats 5] [--threads N]
        [--baseline OLD_NMS_PY]

Boxes like a detector's proposals: centres uniform in 1000x1000 ("uniform") or around 8
cluster centres with sigma 30 ("clustered"), sides uniform in 10..200, scores uniform.
IoU thresholds 0.7 (RPN) and 0.5 (detection); batched_nms with 20 classes.
Timings alternate between the libraries; medians and the ratio torchvision / cnnkit.
``--baseline`` also times another copy of ``cnnkit/ops/nms.py`` (e.g. before a change), interleaved
with the others, and prints torchvision / baseline too.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from functools import partial

import torch
import torchvision.ops as tv

import cnnkit.ops as ck
from crosscheck_ops import random_boxes  # the same proposal-like boxes (this directory)


def make_boxes(n: int, clustered: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return random_boxes(gen, n, clustered), torch.rand(n, generator=gen)


def _median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000])
    parser.add_argument("--baseline", default=None, help="path of another nms.py to time too")
    args = parser.parse_args()
    base = None
    if args.baseline:
        spec = importlib.util.spec_from_file_location("nms_baseline", args.baseline)
        base = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(base)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"threads={torch.get_num_threads()} repeats={args.repeats} (median ms)")
    extra = f" {'base':>8s} {'tv/base':>7s}" if base else ""
    print(
        f"{'op':12s} {'boxes':>6s} {'layout':10s} {'iou':>4s} {'kept':>6s} {'cnnkit':>8s} {'tv':>8s} {'ratio':>7s}"
        f"{extra} same"
    )
    for n in args.sizes:
        for clustered in (False, True):
            boxes, scores = make_boxes(n, clustered, seed=n + clustered)
            labels = torch.randint(0, 20, (n,), generator=torch.Generator().manual_seed(n))
            for op, thr in (("nms", 0.7), ("nms", 0.5), ("batched_nms", 0.5)):
                args_ = (boxes, scores, thr) if op == "nms" else (boxes, scores, labels, thr)
                impls = {
                    "ck": partial(getattr(ck, op), *args_),
                    "tv": partial(getattr(tv, op), *args_),
                }
                if base:
                    impls["base"] = partial(getattr(base, op), *args_)
                keys = list(impls)
                times = {k: [] for k in keys}
                keeps = {}
                for rep in range(args.repeats + 1):
                    for key in keys if rep % 2 == 0 else keys[::-1]:
                        t0 = time.perf_counter()
                        keeps[key] = impls[key]()
                        if rep > 0:
                            times[key].append(time.perf_counter() - t0)
                ck_ms, tv_ms = (statistics.median(times[k]) * 1e3 for k in ("ck", "tv"))
                same = all(torch.equal(keeps[k], keeps["tv"]) for k in keys)
                layout = "clustered" if clustered else "uniform"
                print(
                    f"{op:12s} {n:6d} {layout:10s} {thr:4.1f} {len(keeps['ck']):6d} {ck_ms:8.2f} {tv_ms:8.2f} "
                    f"{tv_ms / ck_ms:6.2f}x"
                    + (
                        f" {_median_ms(times['base']):8.2f} {tv_ms / _median_ms(times['base']):6.2f}x"
                        if base
                        else ""
                    )
                    + f" {'yes' if same else 'NO'}"
                )


if __name__ == "__main__":
    main()
