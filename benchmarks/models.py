"""Training throughput (forward + backward, images/s) of the CIFAR models, and resnet50 vs peers.

Default table: resnet56, wrn16_8, densenet_bc_100_12, pyramidnet110_a48 and resnext29_8x64d on
32x32 inputs, in fp32 and under bf16 autocast, in contiguous (NCHW) and channels_last memory
format. The four settings of a model are measured interleaved (one timed chunk of each per
repeat) and the median over repeats is reported, so a noisy neighbour hits all settings alike.

With ``--peers`` (run in the peers environment, which has torchvision and timm)::

    PYTHONPATH=src /tmp/cnnkit-peers/bin/python benchmarks/models.py --peers

it also times our resnet50 against torchvision's and timm's on the same input and settings,
interleaved, and prints the time ratio ours / peer (<= 1.0: ours is not slower).

Examples::

    PYTHONPATH=src .venv/bin/python benchmarks/models.py                   # CPU, small defaults
    PYTHONPATH=src python benchmarks/models.py --device cuda --batch 64 --iters 20 --repeats 5
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit import create_model, list_models

MODELS = ["resnet56", "wrn16_8", "densenet_bc_100_12", "pyramidnet110_a48", "resnext29_8x64d"]
SETTINGS = [  # (label, autocast dtype or None, channels_last)
    ("fp32", None, False),
    ("fp32+CL", None, True),
    ("bf16", torch.bfloat16, False),
    ("bf16+CL", torch.bfloat16, True),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="default: 64 on cuda, 8 on cpu")
    p.add_argument("--size", type=int, default=32, help="input height = width for the table")
    p.add_argument("--iters", type=int, default=None, help="steps per timed chunk (cuda 20, cpu 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per setting first")
    p.add_argument("--repeats", type=int, default=3, help="interleaved chunks; median reported")
    p.add_argument("--models", nargs="+", default=MODELS, help="registered model names")
    p.add_argument(
        "--settings",
        nargs="+",
        default=None,
        help="subset of fp32 fp32+CL bf16 bf16+CL (default: all; on a CPU without native bf16, "
        "where autocast emulates it slowly, fp32 ones only)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (default: torch's); 1 is steadier on a shared machine, where other "
        "processes stall the OpenMP barriers of every small op",
    )
    p.add_argument("--peers", action="store_true", help="resnet50: ours vs torchvision vs timm")
    p.add_argument("--no-table", action="store_true", help="skip the CIFAR model table")
    p.add_argument("--peer-batch", type=int, default=None, help="default: 64 cuda, 8 cpu")
    p.add_argument("--peer-size", type=int, default=224)
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if args.settings is None:
        args.settings = [s[0] for s in SETTINGS]
        if not cuda and not cpu_has_native_bf16():
            args.settings = ["fp32", "fp32+CL"]
            print("note: this CPU lacks avx512_bf16/amx_bf16; bf16 settings skipped (--settings)")
    args.batch = args.batch or (64 if cuda else 8)
    args.iters = args.iters or (20 if cuda else 1)
    args.peer_batch = args.peer_batch or (64 if cuda else 8)
    unknown = set(args.settings) - {s[0] for s in SETTINGS}
    if unknown:
        p.error(f"--settings: unknown {sorted(unknown)}; choose from fp32 fp32+CL bf16 bf16+CL")
    return args


def cpu_has_native_bf16() -> bool:
    """Whether the CPU has bf16 arithmetic (AVX512-BF16 or AMX), read from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return True  # not Linux: let the user decide with --settings
    return "avx512_bf16" in flags or "amx_bf16" in flags


def train_step(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype | None
) -> Callable[[], None]:
    """One forward + backward pass (no optimizer step: it is the same for every model)."""
    device_type = x.device.type

    def step() -> None:
        with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_chunk(step: Callable[[], None], iters: int, device: torch.device) -> float:
    """Seconds per step over ``iters`` consecutive steps."""
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    sync(device)
    return (time.perf_counter() - start) / iters


def prepare(
    models: dict[str, nn.Module],
    settings: list[tuple[str, torch.dtype | None, bool]],
    batch: int,
    size: int,
    device: torch.device,
) -> dict[tuple[str, str], Callable[[], None]]:
    """A step closure per (model, setting); channels_last settings get their own model copy."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen).to(device)
    steps = {}
    for name, model in models.items():
        model = model.to(device).train()
        num_classes = model.fc.out_features if hasattr(model, "fc") else 10
        y = torch.randint(0, num_classes, (batch,), generator=gen).to(device)
        variants = {False: model}
        for label, dtype, channels_last in settings:
            if channels_last not in variants:
                variants[True] = copy.deepcopy(model).to(memory_format=torch.channels_last)
            xin = x.contiguous(memory_format=torch.channels_last) if channels_last else x
            steps[(name, label)] = train_step(variants[channels_last], xin, y, dtype)
    return steps


def measure(
    steps: dict[tuple[str, str], Callable[[], None]],
    args: argparse.Namespace,
    device: torch.device,
    group_by_model: bool = True,
) -> dict[tuple[str, str], float]:
    """Median seconds per step of every closure, repeats interleaved.

    ``group_by_model``: interleave the settings of one model (the table); otherwise interleave
    everything (the peer comparison, where models must share each repeat's conditions).
    """
    groups: dict[str, list[tuple[str, str]]] = {}
    for key in steps:
        groups.setdefault(key[0] if group_by_model else "all", []).append(key)
    times: dict[tuple[str, str], list[float]] = {key: [] for key in steps}
    for keys in groups.values():
        for key in keys:
            for _ in range(args.warmup):
                steps[key]()
        for repeat in range(args.repeats):
            # Alternate the order so that no closure always runs right after the same one.
            for key in keys if repeat % 2 == 0 else keys[::-1]:
                times[key].append(time_chunk(steps[key], args.iters, device))
    return {key: statistics.median(t) for key, t in times.items()}


def print_table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )


def model_table(args: argparse.Namespace, device: torch.device) -> None:
    known = set(list_models())
    settings = [s for s in SETTINGS if s[0] in args.settings]
    models = {}
    for name in args.models:
        if name not in known:
            print(f"note: {name} is not registered (yet); skipped")
            continue
        torch.manual_seed(0)
        models[name] = create_model(name)
    print(
        f"\nforward+backward throughput, img/s (batch {args.batch}, {args.size}x{args.size}, "
        f"{args.device}, {torch.get_num_threads()} CPU threads, median of {args.repeats} x "
        f"{args.iters} steps)"
    )
    rows = [["model", *[s[0] for s in settings], "best/fp32"]]
    for name, model in models.items():
        med = measure(prepare({name: model}, settings, args.batch, args.size, device), args, device)
        rates = [args.batch / med[(name, s[0])] for s in settings]
        base = rates[0] if settings[0][0] == "fp32" else float("nan")
        rows.append(
            [
                name,
                *[f"{r:,.0f}" if r >= 100 else f"{r:.1f}" for r in rates],
                f"{max(rates) / base:.2f}x",
            ]
        )
        del model
    print_table(rows)


def peer_comparison(args: argparse.Namespace, device: torch.device) -> int:
    try:
        import timm
        import torchvision
    except ImportError as err:
        print(f"--peers needs torchvision and timm (the peers environment): {err}", file=sys.stderr)
        return 2
    settings = [s for s in SETTINGS if s[0] in args.settings]
    torch.manual_seed(0)
    reference = torchvision.models.resnet50(weights=None)
    ours = create_model("resnet50")
    ours.load_state_dict(reference.state_dict(), strict=True)  # same weights, same arithmetic
    models = {"cnnkit": ours, "torchvision": reference, "timm": timm.create_model("resnet50")}
    steps = prepare(models, settings, args.peer_batch, args.peer_size, device)
    print(
        f"\nresnet50 forward+backward, img/s (batch {args.peer_batch}, {args.peer_size}x"
        f"{args.peer_size}, {args.device}, {torch.get_num_threads()} CPU threads, torch "
        f"{torch.__version__}, torchvision "
        f"{torchvision.__version__}, timm {timm.__version__}; median of {args.repeats} x "
        f"{args.iters} steps, all models interleaved per setting)"
    )
    rows = [["setting", "cnnkit", "torchvision", "timm", "ours/tv time", "ours/timm time"]]
    for label, *_ in settings:
        med = measure(
            {k: v for k, v in steps.items() if k[1] == label}, args, device, group_by_model=False
        )
        t = {name: med[(name, label)] for name in models}
        rows.append(
            [
                label,
                *[f"{args.peer_batch / t[n]:,.1f}" for n in models],
                f"{t['cnnkit'] / t['torchvision']:.3f}",
                f"{t['cnnkit'] / t['timm']:.3f}",
            ]
        )
    print_table(rows)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True
    if not args.no_table:
        model_table(args, device)
    return peer_comparison(args, device) if args.peers else 0


if __name__ == "__main__":
    sys.exit(main())
