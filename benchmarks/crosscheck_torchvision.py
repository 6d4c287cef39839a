"""Cross-check: torchvision's ImageNet models load into ours with strict=True and agree on logits.

For every model of our registry that torchvision also has, build torchvision's (random init,
``weights=None``), randomize its norm statistics and affine parameters (so that a swapped or
mis-wired norm cannot hide behind the default mean 0 / var 1 / weight 1 / bias 0), load its
state_dict into ours with ``strict=True``, and compare the eval-mode logits on the same input.
Exit status 1 when a model fails to load or differs by more than ``--atol``.

Run in the peers environment (it has torchvision)::

    PYTHONPATH=src /tmp/cnnkit-peers/bin/python benchmarks/crosscheck_torchvision.py
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch import nn

from cnnkit import count_parameters, create_model, list_models

CANDIDATES = [
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "wide_resnet50_2",
    "wide_resnet101_2",
    "densenet121",
    "densenet161",
    "densenet169",
    "densenet201",
]


def randomize_norms(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BatchNorm statistics and affine parameters, so eval-mode BN matters."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)


def check(name: str, x: torch.Tensor, atol: float, seed: int) -> tuple[bool, list[str]]:
    import torchvision

    torch.manual_seed(seed)
    theirs = torchvision.models.get_model(name, weights=None).eval()
    randomize_norms(theirs, torch.Generator().manual_seed(seed))
    ours = create_model(name).eval()
    try:
        ours.load_state_dict(theirs.state_dict(), strict=True)
    except RuntimeError as err:
        return False, [name, "load failed", " ".join(str(err).split())[:120]]
    with torch.no_grad():
        a, b = ours(x), theirs(x)
    diff = (a - b).abs().max().item()
    scale = b.abs().max().item()
    ok = diff <= atol and a.shape == b.shape
    params = count_parameters(ours)
    rel = diff / max(scale, 1e-30)
    row = [name, f"{params:,}", f"{len(theirs.state_dict())}", f"{scale:.3g}", f"{diff:.2e}"]
    row.append(f"{rel:.1e}")
    return ok, [*row, "ok" if ok else "MISMATCH"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--atol", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", nargs="+", default=CANDIDATES)
    args = p.parse_args(argv)
    try:
        import torchvision
    except ImportError:
        print("needs torchvision: run in the peers environment", file=sys.stderr)
        return 2
    torch.use_deterministic_algorithms(True)
    known = set(list_models())
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    print(
        f"torch {torch.__version__}, torchvision {torchvision.__version__}; input "
        f"{args.batch}x3x{args.size}x{args.size}; eval mode; tolerance {args.atol:g}"
    )
    rows = [["model", "params", "keys", "max|logit|", "max|diff|", "relative", "result"]]
    failures = 0
    for name in args.models:
        if name not in known:
            print(f"note: {name} is not in our registry (yet); skipped")
            continue
        start = time.perf_counter()
        ok, row = check(name, x, args.atol, args.seed)
        failures += not ok
        rows.append(row)
        print(f"  checked {name} in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip())
    print(f"{len(rows) - 1 - failures}/{len(rows) - 1} models match")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
