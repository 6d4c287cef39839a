"""Training throughput: a 1-epoch ``cnnkit train`` run against a plain fp32 PyTorch loop.

The goal (CPU with AMX): a 1-epoch run of ``cnnkit train --model resnet56 --batch-size 128`` on
CIFAR-shaped data (45,000 training images = 351 steps) at >= 3x the effective throughput of a
plain fp32, NCHW, eager loop (same model, same SGD with momentum and weight decay) over the same
number of steps. "Effective" counts what the run pays: compilation where cnnkit compiles, the
input pipeline (indexing, augmenting and normalizing the uint8 batches on the device).

Printed:

* the CPU (name, AMX / AVX512-BF16) and how cnnkit configured the run (precision, memory
  format, compiled or eager, as resolved for this machine and a 1-epoch run);
* the run ratio: plain loop wall time / cnnkit run wall time, one run each, both over the same
  number of steps (the run's first step, which compiles, plus one epoch); sensitive to machine
  load, so also
* the steady-state step ratio: medians of interleaved rounds of single steps, and the run ratio
  projected from those medians plus the measured first-step (compilation) cost;
* the epoch's wall time over its pure compute time (the input pipeline's cost), goal <= 1.1;
* with ``--accuracy``: digits test accuracy of the demo recipe in fp32 and in bf16.

Usage::

    PYTHONPATH=src python benchmarks/train_throughput.py [--images 45000] [--model resnet56]
        [--batch 128] [--compile auto|on|off] [--rounds 10] [--threads N] [--accuracy]

``--images 2560`` (20 steps) is enough to iterate; the full 45,000 takes minutes. Run it pinned
(``taskset -c 0,1``) with ``--threads`` matching, on a machine as idle as you can get.

cnnkit's side is built by :func:`cnnkit_run`, the only function that knows the engine's API.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from cnnkit.data.classification import DataSplits, ImageDataset
from cnnkit.models.registry import create_model
from cnnkit.train.config import TrainConfig

CIFAR_TRAIN = 45_000  # CIFAR-10 training images after the 5k dev split


def synthetic_cifar(n: int, seed: int = 0) -> DataSplits:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    classes = [str(i) for i in range(10)]
    small = ImageDataset(images[:256], labels[:256], classes)
    train = ImageDataset(images, labels, classes)
    return DataSplits(train, small, small, [0.5] * 3, [0.25] * 3, "synthetic")


def cpu_description() -> str:
    """``"<model name>, N CPUs, AMX-BF16: yes/no, AVX512-BF16: yes/no"`` from /proc/cpuinfo."""
    name, flags, cpus = "unknown CPU", set(), 0
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    name, cpus = value.strip(), cpus + 1
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    yes = {True: "yes", False: "no"}
    return (
        f"{name}, {cpus} CPU(s), AMX-BF16: {yes['amx_bf16' in flags]}, "
        f"AVX512-BF16: {yes['avx512_bf16' in flags]}"
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class CnnkitRun:
    """What the benchmark needs of a cnnkit run: ``step(batch)`` (one optimizer step on a
    prepared batch), ``epoch()`` (one training epoch from the run's input pipeline, returning
    its wall and compute seconds and its step count), ``batch()`` (one prepared batch),
    ``describe()`` and ``device``."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.device = engine.device

    def step(self, batch) -> None:
        self.engine.train_step(batch)

    def batch(self):
        return next(iter(self.engine.task.train_batches(self.engine.sampler)))

    def epoch(self) -> tuple[float, float, int]:
        totals = self.engine.train_epoch(1)
        return totals.seconds, totals.compute, self.engine.steps_per_epoch

    def describe(self) -> str:
        return self.engine.describe()

    def fit(self) -> dict[str, Any]:
        return self.engine.fit()


def cnnkit_run(cfg: TrainConfig, data: DataSplits | None, run_dir: str) -> CnnkitRun:
    """cnnkit's training run for ``cfg`` exactly as ``cnnkit train`` would configure it
    (precision, memory format, torch.compile as resolved for this machine and run length).
    The one place that knows the engine's API: repoint it when that API changes."""
    from cnnkit.train.classification import ClassificationTask
    from cnnkit.train.engine import Engine

    task = ClassificationTask(cfg, data)
    return CnnkitRun(Engine(cfg, task, run_dir=run_dir, log=lambda s: None))


def plain_loop(model_name: str, images: torch.Tensor, labels: torch.Tensor, batch: int, device):
    """The baseline, as a tutorial writes it: fp32, NCHW, eager, ``torch.optim.SGD`` defaults.

    Returns ``step(i)``: one optimizer step on batch ``i`` (wrapping) of ``images`` (uint8),
    normalized on the fly (the same per-channel normalization; no augmentation)."""
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=10).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    mean = torch.tensor([0.5, 0.5, 0.5], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.25, 0.25, 0.25], device=device).view(1, 3, 1, 1)
    images, labels = images.to(device), labels.to(device)
    n = images.shape[0] // batch

    def step(i: int) -> None:
        sl = slice((i % n) * batch, (i % n + 1) * batch)
        x = (images[sl].float() / 255 - mean) / std
        opt.zero_grad()
        loss = F.cross_entropy(model(x), labels[sl])
        loss.backward()
        opt.step()

    return step


def timed(fn, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def throughput(args: argparse.Namespace) -> None:
    data = synthetic_cifar(args.images)
    cfg = TrainConfig(
        model=args.model,
        data="synthetic",
        epochs=1,
        batch_size=args.batch,
        device=args.device,
        quiet=True,
        compile=args.compile,
        threads=args.threads,
    )
    run = cnnkit_run(cfg, data, "/tmp/cnnkit-bench-unused")
    device = run.device
    print(run.describe())
    plain = plain_loop(args.model, data.train.images, data.train.labels, args.batch, device)

    # The run: its first step (compilation where it compiles), then one epoch.
    batch = run.batch()
    first = timed(lambda: run.step(batch), device)
    epoch_s, compute_s, steps = run.epoch()
    run_s = first + epoch_s
    print(
        f"cnnkit run: first step {first:.1f} s (compilation included), epoch of {steps} steps "
        f"{epoch_s:.1f} s (wall / compute {epoch_s / compute_s:.3f}, goal <= 1.1) -> "
        f"{run_s:.1f} s for {steps + 1} steps"
    )
    plain_s = timed(lambda: [plain(i) for i in range(steps + 1)], device)
    print(f"plain fp32 loop: {steps + 1} steps {plain_s:.1f} s")

    # Steady state: single steps in interleaved rounds, medians.
    ours_t, plain_t = [], []
    for r in range(args.rounds):
        plain_t.append(timed(lambda r=r: plain(r), device))
        ours_t.append(timed(lambda: run.step(batch), device))
    p, o = statistics.median(plain_t), statistics.median(ours_t)
    n = steps + 1
    projected = n * p / (first + steps * o * epoch_s / compute_s)
    print(
        f"steady state ({args.model}, batch {args.batch}, {device}, medians of {args.rounds} "
        f"interleaved steps): plain {args.batch / p:.1f} img/s, cnnkit {args.batch / o:.1f} "
        f"img/s -> step ratio {p / o:.2f}x"
    )
    print(
        f"{args.images} images, {n} steps: run ratio {plain_s / run_s:.2f}x measured "
        f"(one run each), {projected:.2f}x projected from the medians + first step "
        f"(goal >= 3x)"
    )


def accuracy(args: argparse.Namespace) -> None:
    for precision in ("fp32", "bf16"):
        accs = []
        for seed in range(args.seeds):
            cfg = TrainConfig(precision=precision, seed=seed, device=args.device, quiet=True)
            run = cnnkit_run(cfg, None, f"/tmp/cnnkit-bench-acc-{precision}-{seed}")
            t0 = time.perf_counter()
            metrics = run.fit()
            acc = metrics["test_accuracy"]
            accs.append(acc)
            print(
                f"digits, {cfg.model}, {precision}, seed {seed}: test accuracy {acc:.2%} "
                f"({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
        print(f"{precision}: mean test accuracy {statistics.mean(accs):.2%} over {len(accs)} seeds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--images", type=int, default=CIFAR_TRAIN, help="training images")
    parser.add_argument("--compile", default="auto", choices=("auto", "on", "off"))
    parser.add_argument("--rounds", type=int, default=10, help="interleaved steady-state steps")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--accuracy", action="store_true", help="also digits fp32 vs bf16")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--threads", type=int, help="torch threads for both loops")
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{cpu_description()}; torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    if not args.skip_throughput:
        throughput(args)
    if args.accuracy:
        accuracy(args)


if __name__ == "__main__":
    main()
