"""COCO evaluation: cnnkit vs faster-coco-eval vs pycocotools, same files, interleaved.

    PYTHONPATH=src /tmp/cnnkit-peers/bin/python benchmarks/coco_eval.py [--repeats 3]
        [--pycocotools-repeats 1] [--data DIR] [--only bbox|segm]

Data: ../shared/tools/make_coco_bench.py (bbox: --images 5000; segm: --images 1000 --masks),
written once under --data. Each timing is end to end from the two JSON paths: loading the
ground truth and the results, evaluate, accumulate, summarize (every implementation parses
the JSON with Python's json module). Runs are interleaved (ours, faster-coco-eval,
pycocotools, ours, ...); the table shows medians and the ratio of each peer's median to ours.
Every summary number of ours is checked against pycocotools' (|difference| <= 1e-9).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
MAKER = HERE.parent.parent / "shared" / "tools" / "make_coco_bench.py"
if not MAKER.exists():
    MAKER = Path("/work/shared/tools/make_coco_bench.py")
TASKS = {"bbox": ["--images", "5000"], "segm": ["--images", "1000", "--masks"]}


def _ours(gt: str, dt: str, iou_type: str) -> list[float]:
    from cnnkit.evaluation import coco_evaluate

    return list(coco_evaluate(gt, dt, iou_type, progress=False).stats)


def _pycocotools(gt: str, dt: str, iou_type: str) -> list[float]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(gt)
        ev = COCOeval(coco, coco.loadRes(dt), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return list(ev.stats)


def _faster(gt: str, dt: str, iou_type: str) -> list[float]:
    from faster_coco_eval import COCO, COCOeval_faster

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(gt)
        ev = COCOeval_faster(coco, coco.loadRes(dt), iou_type, print_function=lambda *a: None)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return list(ev.stats)


def _timed(fn, *args) -> tuple[float, list[float]]:
    t0 = time.perf_counter()
    stats = fn(*args)
    return time.perf_counter() - t0, stats


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/tmp/cnnkit-coco-bench")
    ap.add_argument("--repeats", type=int, default=3, help="runs of ours and faster-coco-eval")
    ap.add_argument("--pycocotools-repeats", type=int, default=1)
    ap.add_argument("--only", choices=sorted(TASKS))
    args = ap.parse_args()
    rows, ok = [], True
    for task, flags in TASKS.items():
        if args.only and task != args.only:
            continue
        out = Path(args.data) / task
        if not (out / "dt.json").exists():
            subprocess.run([sys.executable, str(MAKER), str(out), *flags], check=True)
        gt, dt = os.fspath(out / "gt.json"), os.fspath(out / "dt.json")
        times: dict[str, list[float]] = {"cnnkit": [], "faster-coco-eval": [], "pycocotools": []}
        stats: dict[str, list[float]] = {}
        for r in range(args.repeats):
            for name, fn in (("cnnkit", _ours), ("faster-coco-eval", _faster)):
                t, stats[name] = _timed(fn, gt, dt, task)
                times[name].append(t)
            if r < args.pycocotools_repeats:
                t, stats["pycocotools"] = _timed(_pycocotools, gt, dt, task)
                times["pycocotools"].append(t)
        ref = np.asarray(stats["pycocotools"])
        diff = float(np.max(np.abs(np.asarray(stats["cnnkit"]) - ref)))
        diff_fce = float(np.max(np.abs(np.asarray(stats["faster-coco-eval"]) - ref)))
        ok &= diff <= 1e-9
        ours = statistics.median(times["cnnkit"])
        for name, ts in times.items():
            med = statistics.median(ts)
            rows.append((task, name, len(ts), med, med / ours))
        print(
            f"{task}: max |stats - pycocotools|: cnnkit {diff:.3g}, faster-coco-eval {diff_fce:.3g}"
        )
    print(f"\n{'task':<5} {'implementation':<17} {'runs':>4} {'median s':>9} {'x cnnkit':>9}")
    for task, name, n, med, ratio in rows:
        print(f"{task:<5} {name:<17} {n:>4} {med:>9.2f} {ratio:>9.2f}")
    print("\nall summary numbers equal pycocotools' (<= 1e-9):", "yes" if ok else "NO")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
