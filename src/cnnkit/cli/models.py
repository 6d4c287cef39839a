"""`cnnkit models`: the model zoo as a table."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

from cnnkit.cli.table import text_table

# The lecture's order: ResNet, its grouped and widened variants, then DenseNet and PyramidNet;
# then the detectors built on them.
FAMILY_ORDER = (
    "resnet",
    "resnext",
    "wide_resnet",
    "densenet",
    "pyramidnet",
    "fast_rcnn",
    "faster_rcnn",
)
TASKS = ("classification", "detection")


def model_task(info) -> str:
    """A registry entry's task: its ``"detection"`` tag, else classification."""
    return "detection" if "detection" in info.tags else "classification"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the registered models with their parameter counts")
    p.add_argument("--family", help="only this family (resnet, resnext, wide_resnet, ...)")
    p.add_argument("--task", choices=TASKS, help="only the models of this task")
    p.add_argument("--num-classes", type=int, help="override the classifier size")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cnnkit.models.registry import count_parameters, create_model, list_models, model_info

    names = list_models(args.family)
    if args.task is not None:
        names = [n for n in names if model_task(model_info(n)) == args.task]
    rank = {f: i for i, f in enumerate(FAMILY_ORDER)}
    names.sort(key=lambda n: rank.get(model_info(n).family, len(rank)))  # stable within a family
    if not names:
        raise ValueError(
            f"--family {args.family!r}"
            + (f" --task {args.task}" if args.task else "")
            + " has no models"
        )
    rows = []
    with _shapes_only():  # parameter counts without allocating or initializing 88M floats
        for name in names:
            info = model_info(name)
            overrides = {} if args.num_classes is None else {"num_classes": args.num_classes}
            params = count_parameters(create_model(name, **overrides))
            size = "x".join(map(str, info.input_size))
            rows.append((name, info.family, f"{params:,}", size, info.paper))
    head = ("model", "family", "params", "input", "paper")
    for line in text_table(head, rows):
        print(line)
    return 0


@contextlib.contextmanager
def _shapes_only() -> Iterator[None]:
    """Build modules on the meta device and skip their weight initialization: a count needs
    shapes, not values, and ``normal_``/``uniform_`` on meta tensors go through torch's Python
    reference kernels (and import torch._dynamo): 6 of the 7.5 s this command took."""
    import torch
    from torch.overrides import TorchFunctionMode

    tensor_init = {
        torch.Tensor.normal_,
        torch.Tensor.uniform_,
        torch.Tensor.fill_,
        torch.Tensor.zero_,
    }

    def is_init(func) -> bool:  # in-place initializers: Tensor methods and torch.nn.init's
        return func in tensor_init or getattr(func, "__module__", "") == "torch.nn.init"

    class SkipInit(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if args and getattr(args[0], "is_meta", False) and is_init(func):
                return args[0]
            return func(*args, **(kwargs or {}))

    with torch.device("meta"), SkipInit():
        yield
