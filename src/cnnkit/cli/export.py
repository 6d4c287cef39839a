"""`cnnkit export RUN_DIR --format onnx|torchscript`: a deployable model, verified first.

The exported model takes raw images (``--input uint8``: ``uint8 [N, C, H, W]`` 0..255, the
default; ``--input float``: ``float32`` in ``[0, 1]``) at the run's input size, with the run's
normalization folded in, and returns logits ``float32 [N, K]``; ``N`` is 1 for ONNX unless
``--dynamic-batch``, any for TorchScript. Before anything is written its
logits are compared with the eager model's on the first images of the run's test split (read as
`cnnkit evaluate` reads them); a difference above 1e-4 writes nothing and exits 2.

A detection run (`cnnkit detect train`) exports to TorchScript or ONNX: one image
``[3, H, W]`` of a fixed size (that of its val split's first image) in, the detections out (a
dict, or named ONNX outputs; :class:`cnnkit.export.Detecting`), verified on the first val
images and on a blank and a white image (every output within 1e-4, relative above 1).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cnnkit.cli.runs import _data_section, _eval_split, _input_size, _run_dir

VERIFY_IMAGES = 16


def register(sub: argparse._SubParsersAction) -> None:
    from cnnkit.export import DEFAULT_OPSET, FORMATS, INPUT_KINDS

    p = sub.add_parser(
        "export",
        help="a classifier or detector run as ONNX or TorchScript, verified",
    )
    p.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        help="run directory written by `cnnkit train` or `cnnkit detect train`",
    )
    p.add_argument("--format", choices=FORMATS, required=True, help="onnx | torchscript")
    p.add_argument(
        "--out",
        metavar="FILE",
        help="file to write (default: RUN_DIR/model.onnx or RUN_DIR/model.ts.pt)",
    )
    p.add_argument(
        "--input",
        choices=INPUT_KINDS,
        default="uint8",
        help="uint8: images 0..255 (default); float: float32 in [0, 1]",
    )
    p.add_argument(
        "--opset", type=int, default=DEFAULT_OPSET, metavar="N", help="ONNX opset (default: 17)"
    )
    p.add_argument(
        "--dynamic-batch",
        action="store_true",
        help="ONNX: any batch size (default: batch 1); TorchScript always takes any batch",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing export")
    p.set_defaults(func=run_export)


def _is_detection(config: dict) -> bool:
    return any((config.get(s) or {}).get("task") == "detection" for s in ("train", "data"))


def _out_path(run_dir: Path, fmt: str, out: str | None, overwrite: bool) -> Path:
    """Where to write: never a directory, never a file a run directory owns (its config,
    weights, history, ...), an earlier export only with ``--overwrite``."""
    from cnnkit.export import EXPORT_SUFFIXES
    from cnnkit.train.checkpoint import CONFIG_NAME

    path = Path(out) if out else run_dir / f"model{EXPORT_SUFFIXES[fmt]}"
    if path.is_dir():
        raise ValueError(
            f"--out {path}: is a directory; give a file name, e.g. "
            f"{path / ('model' + EXPORT_SUFFIXES[fmt])}"
        )
    if not path.exists():
        return path
    if (path.parent / CONFIG_NAME).is_file() and not path.name.endswith(
        tuple(EXPORT_SUFFIXES.values())
    ):
        raise ValueError(
            f"--out {path}: a file of the run directory {path.parent}; choose another name"
        )
    if not overwrite:
        raise ValueError(f"--out {path}: already exists; pass --overwrite to replace it")
    return path


def _data_spec(run_dir: Path, config: dict) -> str:
    """The run's ``data.spec`` (where its verification images come from); ValueError naming
    the field when it is missing or not a spec."""
    spec = (config.get("data") or {}).get("spec")
    if spec is None:
        raise ValueError(f"{run_dir / 'config.json'}: field 'data.spec' is missing")
    if not isinstance(spec, str) or not spec:
        raise ValueError(
            f"{run_dir / 'config.json'}: field 'data.spec' must be a --data spec (digits, "
            f"scenes, coco:ROOT...), got {spec!r}"
        )
    return spec


def _verification_images(run_dir: Path, config: dict, model) -> tuple[object, str]:
    """The first :data:`VERIFY_IMAGES` uint8 images of the run's test split, and a label."""
    spec = _data_spec(run_dir, config)
    _, batches = _eval_split(run_dir, config, model, spec, "test", VERIFY_IMAGES)
    images = next(iter(batches))[0][:VERIFY_IMAGES]
    return images, f"the first {images.shape[0]} images of {spec}'s test split"


def run_export(args: argparse.Namespace) -> int:
    from cnnkit.atomic import atomic_write_bytes
    from cnnkit.export import TOLERANCE, InputSpec, check_opset, export, require_onnx
    from cnnkit.train.checkpoint import load_model, read_config

    run_dir = _run_dir(args.run_dir)
    config = read_config(run_dir)
    if _is_detection(config):
        return _export_detector(args, run_dir)
    data = _data_section(run_dir, config, "mean", "std", "input_size")
    channels, height, width = _input_size(run_dir, data)
    out = _out_path(run_dir, args.format, args.out, args.overwrite)
    if args.format == "onnx":
        require_onnx()  # before the data is read: the fix is an install
        check_opset(args.opset)
    # A traced TorchScript module takes any batch: it is verified (and described) as such.
    dynamic = args.dynamic_batch or args.format == "torchscript"
    spec = InputSpec(channels, height, width, args.input, dynamic)
    model = load_model(run_dir)
    images, source = _verification_images(run_dir, config, model)
    result = export(
        model,
        mean=data["mean"],
        std=data["std"],
        spec=spec,
        fmt=args.format,
        images=images,
        opset=args.opset,
    )
    atomic_write_bytes(out, result.data)
    classes = len(data.get("classes") or []) or "K"
    batch = "N" if spec.dynamic_batch else "1"
    print(f"wrote {out} ({args.format}, {result.detail}, {len(result.data) / 1024:.0f} KiB)")
    print(f"input  'images': {spec.describe()}; normalization folded in")
    print(f"output 'logits': float32 [{batch}, {classes}]")
    print(
        f"verified on {source}: max |logit difference| {result.max_difference:.2g} "
        f"(tolerance {TOLERANCE:g})"
    )
    return 0


def _detector_images(run_dir: Path, config: dict) -> tuple[list, str]:
    """The first :data:`VERIFY_IMAGES` images of the run's val split (read as `cnnkit detect
    predict` reads files), those of the first one's size, and a label."""
    from cnnkit.cli.detect import _read_rgb
    from cnnkit.data.detection import load_detection

    spec = _data_spec(run_dir, config)
    val = load_detection(spec).val
    images = []
    for i in range(min(len(val.file_names), 4 * VERIFY_IMAGES)):
        image = _read_rgb(str(Path(val.image_dir) / val.file_names[i]))
        if not images or image.shape == images[0].shape:
            images.append(image)
        if len(images) == VERIFY_IMAGES:
            break
    if not images:
        raise ValueError(f"--data {spec}: the val split has no images to verify the export on")
    h, w = images[0].shape[-2:]
    return images, f"the first {len(images)} {h}x{w} images of {spec}'s val split"


def _export_detector(args: argparse.Namespace, run_dir: Path) -> int:
    from cnnkit.atomic import atomic_write_bytes
    from cnnkit.cli.detect import _load_run
    from cnnkit.export import (
        TOLERANCE,
        check_detector_opset,
        detector_outputs,
        export_detector,
        require_onnx,
    )

    if args.dynamic_batch:
        raise ValueError("--dynamic-batch: an exported detector takes one image per call")
    out = _out_path(run_dir, args.format, args.out, args.overwrite)
    if args.format == "onnx":
        require_onnx()  # before the data is read: the fix is an install
        check_detector_opset(args.opset)
    model, config = _load_run(str(run_dir))
    images, source = _detector_images(run_dir, config)
    result = export_detector(
        model, kind=args.input, images=images, fmt=args.format, opset=args.opset
    )
    atomic_write_bytes(out, result.data)
    h, w = images[0].shape[-2:]
    dtype, values = ("uint8", "0..255") if args.input == "uint8" else ("float32", "[0, 1]")
    k = model.num_keypoints
    shapes = {"boxes": "[D, 4]", "labels": "[D]", "scores": "[D]", "masks": f"[D, 1, {h}, {w}]",
              "keypoints": f"[D, {k}, 3]", "keypoints_scores": f"[D, {k}]"}  # fmt: skip
    outputs = [f"{name} {shapes[name]}" for name in detector_outputs(model)]
    print(f"wrote {out} ({args.format}, {result.detail}, {len(result.data) / 1024:.0f} KiB)")
    print(f"input 'image': one image {dtype} [3, {h}, {w}], values {values} (this size only)")
    kind = "a dict of" if args.format == "torchscript" else "named outputs"
    print(f"output: {kind} {', '.join(outputs)}")
    print(
        f"verified on {source} and a blank and a white image: max difference "
        f"{result.max_difference:.2g} (tolerance {TOLERANCE:g}, relative above 1)"
    )
    return 0
