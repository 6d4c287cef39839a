"""`cnnkit models`: the model zoo as a table."""

from __future__ import annotations

import argparse

import torch

# The lecture's order: ResNet, its grouped and widened variants, then DenseNet and PyramidNet.
FAMILY_ORDER = ("resnet", "resnext", "wide_resnet", "densenet", "pyramidnet")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the registered models with their parameter counts")
    p.add_argument("--family", help="only this family (resnet, resnext, wide_resnet, ...)")
    p.add_argument("--num-classes", type=int, help="override the classifier size")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cnnkit.models.registry import count_parameters, create_model, list_models, model_info

    names = list_models(args.family)
    rank = {f: i for i, f in enumerate(FAMILY_ORDER)}
    names.sort(key=lambda n: rank.get(model_info(n).family, len(rank)))  # stable within a family
    if not names:
        raise ValueError(f"--family {args.family!r} has no models")
    rows = []
    with torch.device("meta"):  # parameter counts without allocating 88M floats
        for name in names:
            info = model_info(name)
            overrides = {} if args.num_classes is None else {"num_classes": args.num_classes}
            params = count_parameters(create_model(name, **overrides))
            size = "x".join(map(str, info.input_size))
            rows.append((name, info.family, f"{params:,}", size, info.paper))
    head = ("model", "family", "params", "input", "paper")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for row in [head, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0
