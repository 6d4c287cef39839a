"""Peak memory of streaming one epoch: does it grow with the data set? (Goal: 8,000 vs 2,000
images differ by < 200 MB.)

Generates folders of 256x256 PNGs (10 classes) in a temp dir, then for each folder runs, in a
fresh subprocess, either one training epoch through the real command

    python -m cnnkit train --data folder:DIR --stream --epochs 1 --model resnet20
        --model-arg depth=8 --image-size 64 --batch-size 64 --quiet --compile off ...

or (``--loader-only``) one pass of ``stream_loader`` over the training split. The subprocess
tree (main process + DataLoader workers, which are grandchildren) is sampled from /proc every
0.2 s; the figures are the peak of the tree's summed RSS (what the brief asks: shared pages
count once per process, so it overstates), the peak summed PSS (shared pages split among the
processes: the honest total), and ru_maxrss of RUSAGE_CHILDREN (the largest single process).

    PYTHONPATH=src .venv/bin/python benchmarks/data_memory.py --loader-only
    PYTHONPATH=src .venv/bin/python benchmarks/data_memory.py          # the training command
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MB = 2**20


def _write_pngs(args: tuple[Path, int, int, int, int, int]) -> None:
    from PIL import Image

    root, first, last, size, classes, seed = args
    rng = np.random.default_rng([seed, first])
    noise = rng.integers(0, 8, (4, size, size, 3), dtype=np.uint8)  # reused: generation is cheap
    block = size // 8
    for i in range(first, last):
        grid = rng.integers(0, 248, (8, 8, 3), dtype=np.uint8)
        image = grid.repeat(block, 0).repeat(block, 1) + noise[i % 4]
        Image.fromarray(image).save(root / f"c{i % classes}" / f"{i:06d}.png", compress_level=1)


def make_folder(root: Path, n: int, size: int = 256, classes: int = 10, seed: int = 0) -> Path:
    """``n`` PNGs of ``size x size`` in ``root/c<k>/``: a coarse random colour grid plus a little
    noise, PNG level 1, written by one process per CPU (PNG encoding is the cost)."""
    from concurrent.futures import ProcessPoolExecutor

    for k in range(classes):
        (root / f"c{k}").mkdir(parents=True, exist_ok=True)
    jobs = max(1, len(os.sched_getaffinity(0)))
    bounds = np.linspace(0, n, jobs * 4 + 1).astype(int)
    chunks = [
        (root, a, b, size, classes, seed) for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    with ProcessPoolExecutor(jobs) as pool:
        list(pool.map(_write_pngs, chunks))
    return root


def cpu_name() -> str:
    """``lscpu``'s model name (from /proc/cpuinfo)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of ``pid`` in bytes; (0, 0) once it has gone."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss, pss


def tree_memory(root_pid: int) -> tuple[int, int, int]:
    """Summed (RSS, PSS) of ``root_pid`` and all its descendants, and how many processes."""
    tree, todo, pids = _children(), [root_pid], []
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo += tree.get(pid, [])
    rss = pss = 0
    for pid in pids:
        r, p = _memory(pid)
        rss, pss = rss + r, pss + p
    return rss, pss, len(pids)


def run_sampled(cmd: list[str], env: dict[str, str]) -> dict[str, float]:
    """Run ``cmd``, sampling its process tree every 0.2 s; peak figures in MB."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak_rss = peak_pss = procs = 0
    while proc.poll() is None:
        rss, pss, n = tree_memory(proc.pid)
        peak_rss, peak_pss, procs = max(peak_rss, rss), max(peak_pss, pss), max(procs, n)
        time.sleep(0.2)
    out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-3000:]}")
    maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB, a running maximum
    return {
        "rss": peak_rss / MB,
        "pss": peak_pss / MB,
        "maxrss": max(maxrss, before) / 1024,
        "procs": procs,
        "seconds": time.perf_counter() - start,
        "tail": out.strip().splitlines()[-1] if out.strip() else "",
    }


def loader_pass(folder: str, workers: int, image_size: int, batch_size: int) -> None:
    """The ``--child`` side of ``--loader-only``: one epoch of the training split."""
    from cnnkit.data.classification import stream_splits
    from cnnkit.data.streaming import ShardBatchSampler, stream_loader

    splits = stream_splits(f"folder:{folder}", seed=0, image_size=image_size)
    data = splits.dataset("train", train=True, seed=0)
    sampler = ShardBatchSampler(len(data), batch_size, seed=0)
    sampler.set_epoch(1)
    seen = 0
    for batch in stream_loader(data, sampler, workers=workers, pin_memory=False):
        seen += len(batch)
    print(f"served {seen} images")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000])
    p.add_argument("--loader-only", action="store_true", help="a pure stream_loader pass")
    p.add_argument("--workers", type=int, help="DataLoader workers (default: default_workers())")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.workers is None:
        from cnnkit.data.streaming import default_workers

        args.workers = max(1, default_workers())
    if args.child:
        loader_pass(args.child, args.workers, args.image_size, args.batch_size)
        return
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    cpu = cpu_name()
    results = {}
    with tempfile.TemporaryDirectory(prefix="cnnkit-data-memory-") as tmp:
        for n in args.sizes:
            t0 = time.perf_counter()
            folder = make_folder(Path(tmp) / f"f{n}", n)
            print(f"generated {n} PNGs in {time.perf_counter() - t0:.1f} s", flush=True)
            if args.loader_only:
                cmd = [sys.executable, __file__, "--child", str(folder)]
                cmd += ["--workers", str(args.workers), "--image-size", str(args.image_size)]
                cmd += ["--batch-size", str(args.batch_size)]
            else:
                cmd = [sys.executable, "-m", "cnnkit", "train", "--data", f"folder:{folder}"]
                cmd += ["--stream", "--epochs", "1", "--model", "resnet20"]
                cmd += ["--model-arg", "depth=8", "--image-size", str(args.image_size)]
                cmd += ["--batch-size", str(args.batch_size), "--quiet", "--compile", "off"]
                cmd += ["--workers", str(args.workers), "--out", str(Path(tmp) / f"run{n}")]
            results[n] = r = run_sampled(cmd, env)
            print(
                f"{n:>6} images: peak tree RSS {r['rss']:.0f} MB, PSS {r['pss']:.0f} MB "
                f"({r['procs']} processes), largest process ru_maxrss {r['maxrss']:.0f} MB, "
                f"{r['seconds']:.1f} s  [{r['tail']}]",
                flush=True,
            )
    lo, hi = min(results), max(results)
    what = "stream_loader pass" if args.loader_only else "training epoch (cnnkit train --stream)"
    print(f"CPU: {cpu}; {what}, {args.workers} workers")
    for key, name in (("rss", "tree RSS"), ("pss", "tree PSS")):
        diff = results[hi][key] - results[lo][key]
        print(
            f"{name}: {hi} vs {lo} images: {diff:+.0f} MB "
            f"(ratio {results[hi][key] / results[lo][key]:.3f}; goal < 200 MB): "
            f"{'OK' if diff < 200 else 'OVER'}"
        )


if __name__ == "__main__":
    main()
