"""The CUDA path, checked on a GPU machine in one short run.

    PYTHONPATH=src python3 benchmarks/cuda_check.py [--out DIR]

1. Operators on CUDA equal the same operators on the CPU (and torchvision's CUDA kernels when
   torchvision is importable there), forward and backward; speed ratio vs torchvision on CUDA.
2. Every CIFAR family takes training steps on CUDA in fp32 and under bf16 autocast with
   channels_last: finite losses, images/s; resnet50 vs torchvision's resnet50 (ratio).
3. `cnnkit train --device cuda` end to end on the digits, and the same through torchrun (nccl).

Prints one line per check and exits non-zero when a check fails. Not part of the test suite
(CI has no GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

FAILURES: list[str] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"[{'ok' if ok else 'FAIL'}] {name} {detail}", flush=True)
    if not ok:
        FAILURES.append(name)


def cuda_time(fn, repeats: int = 20, warmup: int = 3) -> float:
    """Median seconds of fn() measured with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def random_boxes(n: int, size: float, device: str, gen: torch.Generator) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=gen) * size
    wh = torch.rand(n, 2, generator=gen) * 190 + 10
    return torch.cat([xy, xy + wh], 1).to(device)


def check_ops() -> None:
    from cnnkit import ops

    try:
        import torchvision.ops as tv
    except Exception:  # noqa: BLE001 - torchvision is optional on the GPU machine
        tv = None
    gen = torch.Generator().manual_seed(0)
    for n in (1000, 5000, 20000):
        boxes = random_boxes(n, 1000.0, "cpu", gen)
        scores = torch.rand(n, generator=gen)
        keep_cpu = ops.nms(boxes, scores, 0.5)
        keep_gpu = ops.nms(boxes.cuda(), scores.cuda(), 0.5).cpu()
        check(f"nms n={n} cuda == cpu", torch.equal(keep_cpu, keep_gpu), f"kept {len(keep_cpu)}")
        if tv is not None:
            ref = tv.nms(boxes.cuda(), scores.cuda(), 0.5).cpu()
            check(f"nms n={n} cuda == torchvision", torch.equal(ref, keep_gpu))
            b, s = boxes.cuda(), scores.cuda()
            ours = cuda_time(lambda b=b, s=s: ops.nms(b, s, 0.5))
            theirs = cuda_time(lambda b=b, s=s: tv.nms(b, s, 0.5))
            print(
                f"    nms n={n}: ours {ours * 1e3:.2f} ms, torchvision {theirs * 1e3:.2f} ms, "
                f"ratio {ours / theirs:.2f}"
            )
        idxs = torch.randint(0, 20, (n,), generator=gen)
        check(
            f"batched_nms n={n} cuda == cpu",
            torch.equal(
                ops.batched_nms(boxes, scores, idxs, 0.5),
                ops.batched_nms(boxes.cuda(), scores.cuda(), idxs.cuda(), 0.5).cpu(),
            ),
        )
    a, b = random_boxes(300, 500.0, "cpu", gen), random_boxes(200, 500.0, "cpu", gen)
    diff = (ops.box_iou(a, b) - ops.box_iou(a.cuda(), b.cuda()).cpu()).abs().max().item()
    check("box_iou cuda == cpu", diff < 1e-6, f"max diff {diff:.1e}")

    feats = torch.randn(2, 256, 50, 68, generator=gen)
    rois = random_boxes(512, 800.0, "cpu", gen)
    rois = torch.cat([torch.randint(0, 2, (512, 1), generator=gen).float(), rois], 1)
    for name, fn, kwargs in (
        ("roi_align", ops.roi_align, dict(spatial_scale=1 / 16, sampling_ratio=2, aligned=True)),
        ("roi_pool", ops.roi_pool, dict(spatial_scale=1 / 16)),
    ):
        for size in (7, 14):
            results = {}
            for dev in ("cpu", "cuda"):
                x = feats.to(dev).requires_grad_()
                out = fn(x, rois.to(dev), size, **kwargs)
                out.square().sum().backward()
                results[dev] = (out.detach().cpu(), x.grad.cpu())
            fwd = (results["cpu"][0] - results["cuda"][0]).abs().max().item()
            bwd = (results["cpu"][1] - results["cuda"][1]).abs().max().item()
            check(
                f"{name} {size}x{size} cuda == cpu",
                fwd < 1e-4 and bwd < 1e-3,
                f"fwd {fwd:.1e} grad {bwd:.1e}",
            )
            if tv is None:
                continue
            x = feats.cuda().requires_grad_()
            r = rois.cuda()
            tv_fn = getattr(tv, name)
            ref = tv_fn(x, r, size, **kwargs)
            diff = (ref.detach().cpu() - results["cuda"][0]).abs().max().item()
            check(f"{name} {size}x{size} cuda == torchvision", diff < 1e-4, f"max diff {diff:.1e}")

            def step(f, x=x, r=r, size=size, kwargs=kwargs):
                x.grad = None
                f(x, r, size, **kwargs).sum().backward()

            ours = cuda_time(lambda f=fn: step(f))
            theirs = cuda_time(lambda f=tv_fn: step(f))
            print(
                f"    {name} {size}x{size} fwd+bwd: ours {ours * 1e3:.2f} ms, torchvision "
                f"{theirs * 1e3:.2f} ms, ratio {ours / theirs:.2f}"
            )


def train_step_rate(
    model: torch.nn.Module, batch: int, size: int, bf16: bool
) -> tuple[float, float]:
    """(images/s, last loss) of SGD training steps on CUDA."""
    model = model.cuda().to(memory_format=torch.channels_last if bf16 else torch.contiguous_format)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device="cuda")
    if bf16:
        x = x.to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device="cuda")
    loss = torch.zeros(())

    def step():
        nonlocal loss
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    seconds = cuda_time(step, repeats=10)
    return batch / seconds, float(loss)


def check_models() -> None:
    import cnnkit

    for name in (
        "resnet56",
        "wrn16_8",
        "densenet_bc_100_12",
        "pyramidnet110_a48",
        "resnext29_8x64d",
    ):
        for bf16 in (False, True):
            rate, loss = train_step_rate(cnnkit.create_model(name), 64, 32, bf16)
            check(
                f"{name} train step {'bf16+cl' if bf16 else 'fp32'}",
                torch.isfinite(torch.tensor(loss)).item(),
                f"{rate:,.0f} img/s loss {loss:.3f}",
            )
    try:
        import torchvision
    except Exception:  # noqa: BLE001
        return
    for bf16 in (False, True):
        ours, _ = train_step_rate(cnnkit.create_model("resnet50", num_classes=10), 64, 224, bf16)
        theirs, _ = train_step_rate(torchvision.models.resnet50(num_classes=10), 64, 224, bf16)
        print(
            f"    resnet50 {'bf16+cl' if bf16 else 'fp32'}: ours {ours:,.0f} img/s, "
            f"torchvision {theirs:,.0f} img/s, ratio (their time / ours) {ours / theirs:.2f}"
        )


def check_training(out: Path) -> None:
    env = {**os.environ, "PYTHONPATH": "src"}
    train = ["-m", "cnnkit", "train", "--device", "cuda", "--quiet"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1"]
    runs = {
        "train --device cuda": [sys.executable, *train, "--out", str(out / "run-cuda")],
        "torchrun nccl x1": [*torchrun, *train, "--epochs", "3", "--out", str(out / "run-ddp")],
    }
    for name, cmd in runs.items():
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        seconds = time.perf_counter() - t0
        run_dir = Path(cmd[cmd.index("--out") + 1])
        metrics_file = run_dir / "metrics.json"
        if proc.returncode or not metrics_file.exists():
            check(name, False, f"rc={proc.returncode}\n{proc.stderr[-2000:]}")
            continue
        metrics = json.loads(metrics_file.read_text())
        check(
            name,
            True,
            f"{seconds:.0f}s test_accuracy {metrics['test_accuracy']:.4f} "
            f"train_seconds {metrics['train_seconds']:.1f}",
        )
        print("    " + proc.stdout.strip().replace("\n", "\n    ")[-1500:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/cuda-check"))
    parser.add_argument("--skip", nargs="*", default=[], choices=["ops", "models", "train"])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, fn in (
        ("ops", check_ops),
        ("models", check_models),
        ("train", lambda: check_training(out)),
    ):
        if name not in args.skip:
            t0 = time.perf_counter()
            try:
                fn()
            except Exception as err:  # noqa: BLE001 - report and go on to the next section
                check(f"{name} section", False, f"{type(err).__name__}: {err}")
            print(f"--- {name}: {time.perf_counter() - t0:.0f}s", flush=True)
    print(f"{len(FAILURES)} failed: {FAILURES}" if FAILURES else "all CUDA checks passed")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    raise SystemExit(main())
