"""Training throughput: cnnkit's training step against a plain fp32 PyTorch loop.

Both train the same architecture on the same 32x32 batch: forward, cross-entropy, backward,
SGD step. cnnkit's step is :meth:`cnnkit.train.loop.Trainer.train_step` exactly as a default
``cnnkit train`` run of a CIFAR-sized recipe would configure it (precision, memory format,
torch.compile as resolved for this machine); the plain loop is fp32, NCHW, eager. Steps are
timed in interleaved rounds and the medians compared, so machine load hits both alike.

Also printed:

* compilation time (paid once per run, amortized over its steps);
* an epoch's wall time over its pure compute time (the input pipeline's cost: indexing,
  moving, augmenting the uint8 batches on the device), goal <= 1.1;
* with ``--accuracy``: digits test accuracy of the demo recipe in fp32 and in bf16.

Usage::

    PYTHONPATH=src python benchmarks/train_throughput.py [--model resnet56] [--batch 128]
        [--steps 5] [--rounds 5] [--device auto] [--threads N] [--accuracy]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from cnnkit.data.classification import DataSplits, ImageDataset
from cnnkit.models.registry import create_model
from cnnkit.train.config import TrainConfig
from cnnkit.train.loop import Trainer

CIFAR_TRAIN = 45_000  # CIFAR-10 training images after the 5k dev split
CIFAR_EPOCHS = 164  # He et al.'s 64k iterations at batch 128


def synthetic_cifar(n: int, seed: int = 0) -> DataSplits:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    classes = [str(i) for i in range(10)]
    small = ImageDataset(images[:256], labels[:256], classes)
    train = ImageDataset(images, labels, classes)
    return DataSplits(train, small, small, [0.5] * 3, [0.25] * 3, "synthetic")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def plain_step_fn(model_name: str, x: torch.Tensor, y: torch.Tensor, device: torch.device):
    """The baseline: an fp32, NCHW, eager loop as a tutorial writes it."""
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=10).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)

    def step() -> None:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return step


def time_steps(step, steps: int, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - t0) / steps


def throughput(args: argparse.Namespace) -> None:
    data = synthetic_cifar(CIFAR_TRAIN)
    cfg = TrainConfig(
        model=args.model,
        data="synthetic",
        epochs=CIFAR_EPOCHS,
        batch_size=args.batch,
        device=args.device,
        quiet=True,
        flip="on",
        threads=args.threads,
    )
    trainer = Trainer(cfg, data=data, run_dir="/tmp/cnnkit-bench-unused", log=lambda s: None)
    device = trainer.device
    print(trainer.describe())
    idx = torch.arange(args.batch, device=device)
    x_uint8, y = trainer.train_x[idx], trainer.train_y[idx]
    x_ours = trainer.augment(x_uint8, train=True)
    x_plain = trainer.augment.normalize(x_uint8).contiguous()

    t0 = time.perf_counter()
    trainer.train_step(x_ours, y)
    trainer.train_step(x_ours, y)
    sync(device)
    warm = time.perf_counter() - t0
    plain = plain_step_fn(args.model, x_plain, y, device)
    plain()
    print(f"first two cnnkit steps (compilation included): {warm:.1f} s")

    ours_t, plain_t = [], []
    for _ in range(args.rounds):
        plain_t.append(time_steps(plain, args.steps, device))
        ours_t.append(time_steps(lambda: trainer.train_step(x_ours, y), args.steps, device))
    p, o = statistics.median(plain_t), statistics.median(ours_t)
    print(
        f"{args.model}, batch {args.batch}, {device}: plain fp32 loop {args.batch / p:.1f} img/s, "
        f"cnnkit {args.batch / o:.1f} img/s -> {p / o:.2f}x "
        f"(medians of {args.rounds} interleaved rounds of {args.steps} steps)"
    )

    # Epoch wall time over pure compute: the same steps with and without the input pipeline.
    steps = args.epoch_steps
    trainer.steps_per_epoch = steps
    stats = trainer.train_epoch(1)
    compute = time_steps(lambda: trainer.train_step(x_ours, y), steps, device) * steps
    print(
        f"epoch of {steps} steps: wall {stats.seconds:.2f} s, pure compute {compute:.2f} s -> "
        f"wall / compute {stats.seconds / compute:.3f}"
    )


def accuracy(args: argparse.Namespace) -> None:
    from cnnkit.data.classification import load_data

    data = load_data("digits")
    for precision in ("fp32", "bf16"):
        accs = []
        for seed in range(args.seeds):
            cfg = TrainConfig(precision=precision, seed=seed, device=args.device, quiet=True)
            run_dir = f"/tmp/cnnkit-bench-acc-{precision}-{seed}"
            trainer = Trainer(cfg, data=data, run_dir=run_dir, log=lambda s: None)
            t0 = time.perf_counter()
            metrics = trainer.fit()
            accs.append(metrics["test_accuracy"])
            print(
                f"digits, {cfg.model}, {precision}, seed {seed}: test accuracy "
                f"{metrics['test_accuracy']:.2%} ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
        print(f"{precision}: mean test accuracy {statistics.mean(accs):.2%} over {len(accs)} seeds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epoch-steps", type=int, default=10, help="length of the timed epoch")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--accuracy", action="store_true", help="also digits fp32 vs bf16")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--threads", type=int, help="torch threads for both loops")
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    if not args.skip_throughput:
        throughput(args)
    if args.accuracy:
        accuracy(args)


if __name__ == "__main__":
    main()
