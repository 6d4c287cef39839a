"""`cnnkit evaluate | predict | diagnose RUN_DIR`: inspect a finished (or running) training run.

A run directory holds ``config.json`` + ``model.safetensors`` (the model and the facts of its
data: class names, normalization statistics, input size) and ``history.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SPLITS = ("test", "dev", "train")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="accuracy, per-class accuracy and confusion matrix of a run's model on a data split",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory written by `cnnkit train`")
    p.add_argument("--data", metavar="SPEC", help="data to evaluate on (default: the run's own)")
    p.add_argument("--split", choices=SPLITS, default="test", help="which split (default: test)")
    p.add_argument("--batch-size", type=int, default=256, metavar="B", help="inference batch size")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--out", metavar="DIR", help="where to write the outputs (default: RUN_DIR)")
    p.set_defaults(func=run_evaluate)

    p = sub.add_parser("predict", help="top-k classes with probabilities for image files")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory written by `cnnkit train`")
    p.add_argument("images", metavar="IMAGE", nargs="+", help="image files (png, jpg, ...)")
    p.add_argument("--top-k", type=int, default=5, metavar="K", help="classes shown (default: 5)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.set_defaults(func=run_predict)

    p = sub.add_parser(
        "diagnose", help="underfitting / overfitting / train longer, from a run's history"
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory written by `cnnkit train`")
    p.set_defaults(func=run_diagnose)


# --------------------------------------------------------------------------- shared checks


def _run_dir(path: str) -> Path:
    from cnnkit.train.rundir import run_directory

    return run_directory(path, require_run=False)  # the file read next names what is missing


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return name


def _positive(value: int, flag: str) -> int:
    if value < 1:
        raise ValueError(f"{flag} must be >= 1, got {value}")
    return value


def _data_section(run_dir: Path, config: dict, *fields: str) -> dict:
    """config.json's ``data`` section, each of ``fields`` present and every field that is
    present valid (see :func:`_check_data`)."""
    data = config.get("data")
    file = run_dir / "config.json"
    if not isinstance(data, dict):
        raise ValueError(f"{file}: no 'data' section (class names, mean/std, input size)")
    if data.get("task") == "detection":
        raise ValueError(
            f"{run_dir} is a detection run: use `cnnkit detect evaluate` or `cnnkit detect predict`"
        )
    for name in fields:
        if name not in data:
            raise ValueError(f"{file}: field 'data.{name}' is missing")
    _check_data(file, data, config.get("kwargs"))
    return data


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_data(file: Path, data: dict, kwargs: Any) -> None:
    """Every field of a run's ``data`` section that is present must hold what training wrote:
    ``input_size`` ``[C, H, W]`` (C 1 or 3, sides 1..MAX_IMAGE_SIZE), ``mean`` / ``std`` C
    finite numbers (std > 0), ``classes`` distinct strings (as many as the model's outputs),
    ``spec`` a string, ``split_seed`` an integer in 0..2**63-1. A NaN std evaluates to 0%
    without a word; a 100000^2 input size exhausts the memory."""
    from cnnkit.train.config import MAX_IMAGE_SIZE, MAX_SEED

    saved = kwargs if isinstance(kwargs, dict) else {}
    channels = None
    if "input_size" in data:
        size = data["input_size"]
        if not (
            isinstance(size, list)
            and len(size) == 3
            and all(_is_int(v) for v in size)
            and size[0] in (1, 3)
            and all(1 <= v <= MAX_IMAGE_SIZE for v in size[1:])
        ):
            raise ValueError(
                f"{file}: field 'data.input_size' must be [C, H, W] with C 1 or 3 and sides "
                f"in 1..{MAX_IMAGE_SIZE}, got {size!r}"
            )
        channels = size[0]
        if _is_int(saved.get("in_chans")) and saved["in_chans"] != channels:
            raise ValueError(
                f"{file}: field 'data.input_size' has {channels} channel(s), but "
                f"'kwargs.in_chans' is {kwargs['in_chans']}"
            )
    for name in ("mean", "std"):
        if name not in data:
            continue
        values = data[name]
        if not (
            isinstance(values, list)
            and values
            and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                for v in values
            )
        ):
            raise ValueError(
                f"{file}: field 'data.{name}' must be a list of finite numbers, got {values!r}"
            )
        if channels is not None and len(values) != channels:
            raise ValueError(
                f"{file}: field 'data.{name}' must hold {channels} value(s), one per channel "
                f"of 'data.input_size', got {len(values)}"
            )
        if name == "std" and any(v <= 0 for v in values):
            raise ValueError(f"{file}: field 'data.std' must be positive, got {values!r}")
    if "classes" in data:
        classes = data["classes"]
        if not (
            isinstance(classes, list)
            and classes
            and all(isinstance(c, str) for c in classes)
            and len(set(classes)) == len(classes)
        ):
            raise ValueError(f"{file}: field 'data.classes' must be a list of distinct names")
        if _is_int(saved.get("num_classes")) and saved["num_classes"] != len(classes):
            raise ValueError(
                f"{file}: field 'data.classes' names {len(classes)} classes, but "
                f"'kwargs.num_classes' is {kwargs['num_classes']}"
            )
    if "spec" in data and not (isinstance(data["spec"], str) and data["spec"]):
        raise ValueError(f"{file}: field 'data.spec' must be a data spec, got {data['spec']!r}")
    if "split_seed" in data and not (
        _is_int(data["split_seed"]) and 0 <= data["split_seed"] <= MAX_SEED
    ):
        raise ValueError(
            f"{file}: field 'data.split_seed' must be an integer in 0..2**63-1, "
            f"got {data['split_seed']!r}"
        )


def _num_classes(model: Any) -> int | None:
    kwargs = getattr(model, "cnnkit_config", {}).get("kwargs", {})
    return kwargs.get("num_classes")


def _in_chans(config: dict) -> int | None:
    data = config.get("data") or {}
    size = data.get("input_size")
    if isinstance(size, list) and size:
        return size[0]
    return config.get("kwargs", {}).get("in_chans")


def _check_compatible(
    run_dir: Path, config: dict, model: Any, channels: int | None, classes: list, spec: str
) -> None:
    """The data must have the channels and classes the model was trained with."""
    expected = _in_chans(config)
    if expected is not None and channels != expected:
        raise ValueError(
            f"--data {spec}: images have {channels} channel(s), but the model in {run_dir} "
            f"expects {expected}"
        )
    classes = list(classes)
    num_classes = _num_classes(model)
    if num_classes is not None and len(classes) != num_classes:
        raise ValueError(
            f"--data {spec}: {len(classes)} classes, but the model in {run_dir} has "
            f"{num_classes} outputs"
        )
    saved = (config.get("data") or {}).get("classes")
    if isinstance(saved, list) and [str(c) for c in saved] != [str(c) for c in classes]:
        raise ValueError(
            f"--data {spec}: class names {classes[:5]}... differ from the run's {saved[:5]}..."
        )


def _split_seed(config: dict) -> dict[str, int]:
    """The ``seed`` keyword of load_data / stream_splits that reproduces the run's splits.

    The split seed is fixed per data set (not the training --seed), so the test split is the
    one the run was tested on.
    """
    seed = (config.get("data") or {}).get("split_seed")
    return {"seed": seed} if isinstance(seed, int) and not isinstance(seed, bool) else {}


def _load_options(config: dict) -> dict[str, Any]:
    """load_data keywords that reproduce the run's splits and image size (digits and folders
    are served at the run's image size)."""
    data = config.get("data") or {}
    options: dict[str, Any] = _split_seed(config)
    size = data.get("input_size")
    if isinstance(size, list) and len(size) == 3 and size[1] == size[2]:
        options["image_size"] = size[1]
    return options


def _input_size(run_dir: Path, data: dict) -> tuple[int, int, int]:
    size = data.get("input_size")
    if not (
        isinstance(size, list)
        and len(size) == 3
        and all(isinstance(v, int) and not isinstance(v, bool) for v in size)
    ):
        raise ValueError(f"{run_dir / 'config.json'}: field 'data.input_size' must be [C, H, W]")
    return size[0], size[1], size[2]


def _eval_crop_fraction(run_dir: Path, data: dict) -> float | None:
    """``data.eval_crop_fraction`` of a streamed folder run (its images are evaluated resized
    and centre-cropped), or None (older and in-memory runs: squashed to ``S x S``)."""
    if "eval_crop_fraction" not in data:
        return None
    value = data["eval_crop_fraction"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(
            f"{run_dir / 'config.json'}: field 'data.eval_crop_fraction' must be a number in "
            f"(0, 1] (the evaluation centre crop / resized shorter side), got {value!r}"
        )
    return float(value)


# --------------------------------------------------------------------------- evaluate


def run_evaluate(args: argparse.Namespace) -> int:
    import torch.nn.functional as F

    from cnnkit.atomic import atomic_write_text
    from cnnkit.evaluation.classification import accuracy, confusion_matrix, per_class_accuracy
    from cnnkit.train.checkpoint import load_model, read_config
    from cnnkit.train.rundir import CONFUSION_NAME, EVALUATION_NAME
    from cnnkit.viz import plot_confusion_matrix

    run_dir = _run_dir(args.run_dir)
    batch_size = _positive(args.batch_size, "--batch-size")
    device = _device(args.device)
    config = read_config(run_dir)
    data = _data_section(run_dir, config, "mean", "std")
    spec = args.data or data.get("spec")
    if not spec:
        raise ValueError(f"{run_dir / 'config.json'}: field 'data.spec' is missing; pass --data")
    model = load_model(run_dir)
    classes, batches = _eval_split(run_dir, config, model, spec, args.split, batch_size)
    logits, labels = _logits(model, batches, data, batch_size, device)
    classes = [str(c) for c in classes]
    matrix = confusion_matrix(logits, labels, len(classes))
    per_class = per_class_accuracy(matrix)
    acc = accuracy(logits, labels)
    loss = F.cross_entropy(logits, labels).item()

    name = config["name"]
    print(f"{name} on {spec}, {args.split} split: {len(labels)} images")
    print(f"accuracy {100 * acc:.2f}%  ({int(matrix.trace())}/{len(labels)})   loss {loss:.4f}")
    _print_per_class(classes, matrix, per_class)

    out = Path(args.out) if args.out else run_dir
    out.mkdir(parents=True, exist_ok=True)
    plot_confusion_matrix(matrix, classes, out / CONFUSION_NAME)
    result = {
        "model": name,
        "data": spec,
        "split": args.split,
        "images": len(labels),
        "accuracy": acc,
        "loss": loss,
        "classes": classes,
        "per_class_accuracy": [None if math.isnan(v) else v for v in per_class.tolist()],
        "confusion_matrix": matrix.tolist(),
        "device": str(device),
    }
    atomic_write_text(out / EVALUATION_NAME, json.dumps(result, indent=2) + "\n")
    print(f"wrote {out / CONFUSION_NAME} and {out / EVALUATION_NAME}")
    return 0


def _eval_split(
    run_dir: Path, config: dict, model: Any, spec: str, split: str, batch_size: int
) -> tuple[list, Iterator[tuple[Any, Any]]]:
    """The split's classes and ``(uint8 images, labels)`` batches, preprocessed as the run
    evaluated its dev split: streamed folders (``data.eval_crop_fraction``) resized and
    centre-cropped, read from disk; everything else squashed to ``S x S`` in memory."""
    data = config["data"]
    crop_fraction = _eval_crop_fraction(run_dir, data)
    if crop_fraction is None:
        return _memory_split(run_dir, config, model, spec, split)
    size = _input_size(run_dir, data)
    return _streamed_split(run_dir, config, model, spec, split, size, crop_fraction, batch_size)


def _logits(
    model: Any, batches: Iterator[tuple[Any, Any]], data: dict, batch_size: int, device: str
) -> tuple[Any, Any]:
    """``(float32 logits [N, K], int64 labels [N])`` on the CPU of every batch."""
    import torch

    from cnnkit.train.classification import predict_logits

    outs, targets = [], []
    for images, labels in batches:
        outs.append(
            predict_logits(
                model,
                images,
                mean=data["mean"],
                std=data["std"],
                batch_size=batch_size,
                device=device,
            )
        )
        targets.append(labels.long().cpu())
    return torch.cat(outs), torch.cat(targets)


def _memory_split(
    run_dir: Path, config: dict, model: Any, spec: str, split: str
) -> tuple[list, Iterator[tuple[Any, Any]]]:
    """The split decoded into memory, squashed to ``S x S`` (in-memory runs, older runs):
    its classes and one ``(uint8 images, labels)`` batch."""
    from cnnkit.data.classification import load_data

    dataset = getattr(load_data(spec, **_load_options(config)), split)
    if len(dataset.labels) == 0:
        raise ValueError(f"--data {spec}: the {split} split is empty")
    channels = dataset.images.shape[1] if dataset.images.ndim == 4 else None
    _check_compatible(run_dir, config, model, channels, dataset.classes, spec)
    return list(dataset.classes), iter([(dataset.images, dataset.labels)])


def _streamed_split(
    run_dir: Path,
    config: dict,
    model: Any,
    spec: str,
    split: str,
    size: tuple[int, int, int],
    crop_fraction: float,
    batch_size: int,
) -> tuple[list, Iterator[tuple[Any, Any]]]:
    """The split of a streamed folder run read from disk a batch at a time with the run's
    evaluation recipe (resize, centre crop): its classes and ``(uint8 images, labels)``
    batches. Nothing is decoded up front (an ImageNet-sized folder does not fit in memory)."""
    from cnnkit.data.classification import stream_splits
    from cnnkit.data.streaming import EvalBatchSampler, default_workers, stream_loader

    if size[1] != size[2]:
        raise ValueError(f"{run_dir / 'config.json'}: field 'data.input_size' must be square")
    splits = stream_splits(spec, image_size=size[1], **_split_seed(config))
    _check_compatible(run_dir, config, model, splits.channels, splits.classes, spec)
    dataset = splits.dataset(split, train=False, seed=0, crop_fraction=crop_fraction)
    if len(dataset) == 0:
        raise ValueError(f"--data {spec}: the {split} split is empty")
    sampler = EvalBatchSampler(len(dataset), batch_size)
    loader = stream_loader(dataset, sampler, workers=default_workers(), pin_memory=False)
    return list(splits.classes), _readable(loader)


def _readable(loader: Any) -> Iterator[tuple[Any, Any]]:
    """The loader's ``(images, labels)``; an unreadable file is an error naming it."""
    for batch in loader:
        if batch.invalid:
            raise ValueError(f"cannot read image {batch.invalid[0]}")
        yield batch.images, batch.labels


def _print_per_class(classes: list[str], matrix: Any, per_class: Any) -> None:
    width = max(5, *(len(c) for c in classes))
    print(f"{'class'.ljust(width)}  {'images':>6}  {'correct':>7}  {'accuracy':>8}")
    for i, name in enumerate(classes):
        total = int(matrix[i].sum())
        rate = per_class[i].item()
        shown = "-" if math.isnan(rate) else f"{100 * rate:.2f}%"
        print(f"{name.ljust(width)}  {total:>6}  {int(matrix[i, i]):>7}  {shown:>8}")


# --------------------------------------------------------------------------- predict


def run_predict(args: argparse.Namespace) -> int:
    import torch

    from cnnkit.data.classification import load_image
    from cnnkit.evaluation.classification import topk
    from cnnkit.train.checkpoint import load_model, read_config
    from cnnkit.train.classification import predict_logits

    run_dir = _run_dir(args.run_dir)
    k = _positive(args.top_k, "--top-k")
    device = _device(args.device)
    config = read_config(run_dir)
    data = _data_section(run_dir, config, "mean", "std", "classes", "input_size")
    size = _input_size(run_dir, data)
    crop_fraction = _eval_crop_fraction(run_dir, data)
    classes = [str(c) for c in data["classes"]]
    # Read every image before the model runs: a bad file fails fast, naming itself.
    images = [_read_image(load_image, path, size, crop_fraction) for path in args.images]
    model = load_model(run_dir)
    logits = predict_logits(  # float32 on the CPU
        model, torch.stack(images), mean=data["mean"], std=data["std"], device=device
    )
    if logits.shape[1] != len(classes):
        raise ValueError(
            f"{run_dir / 'config.json'}: {len(classes)} class names for {logits.shape[1]} outputs"
        )
    probs, indices = topk(logits, min(k, len(classes)))
    if not torch.isfinite(probs).all():  # never print "nan%"
        raise ValueError(
            f"{run_dir / 'model.safetensors'}: the model's outputs are not finite (NaN or "
            "infinite); its weights are damaged or come from a diverged run"
        )
    width = max(len(c) for c in classes)
    for path, p_row, i_row in zip(args.images, probs.tolist(), indices.tolist(), strict=True):
        print(path)
        for rank, (p, i) in enumerate(zip(p_row, i_row, strict=True), 1):
            print(f"  {rank}. {classes[i].ljust(width)}  {100 * p:6.2f}%")
    return 0


def _read_image(
    load_image: Any, path: str, size: tuple[int, int, int], crop_fraction: float | None
) -> Any:
    if not Path(path).is_file():
        raise ValueError(f"{path}: no such image file")
    try:
        return load_image(path, size, crop_fraction)
    except ValueError:
        raise
    except Exception as err:  # PIL raises OSError / its own errors for unreadable files
        raise ValueError(f"{path}: cannot read the image ({err})") from None


# --------------------------------------------------------------------------- diagnose


def run_diagnose(args: argparse.Namespace) -> int:
    from cnnkit.train.checkpoint import read_config
    from cnnkit.train.diagnose import diagnose
    from cnnkit.train.divergence import read_divergence
    from cnnkit.train.history import History

    run_dir = _run_dir(args.run_dir)
    history = History.load(run_dir)
    if not history.records:
        raise ValueError(f"{history.jsonl_path}: no epochs recorded yet")
    config = read_config(run_dir) if (run_dir / "config.json").is_file() else None
    resolved = ((config or {}).get("train") or {}).get("resolved") or {}
    metric = resolved.get("metric", "accuracy")
    higher = resolved.get("higher_is_better", True)
    if not isinstance(metric, str) or not isinstance(higher, bool):
        raise ValueError(
            f"{run_dir / 'config.json'}: train.resolved.metric must be a name and "
            "train.resolved.higher_is_better true or false"
        )
    stopped = read_divergence(run_dir)
    print(
        diagnose(history.records, config, metric=metric, higher_is_better=higher, diverged=stopped)
    )
    return 0
