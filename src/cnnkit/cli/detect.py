"""`cnnkit detect train | evaluate | predict | proposals`: region-based object detectors.

    cnnkit detect train [--model NAME] [--data SPEC] [--epochs N] [--out RUN_DIR] ...
    cnnkit detect evaluate RUN_DIR [--data SPEC]
    cnnkit detect predict RUN_DIR IMAGE... [--out DIR] [--score-threshold T]
    cnnkit detect proposals RUN_DIR [--data SPEC] --out FILE

``--data`` is ``scenes[:SEED]`` (the synthetic digit scenes, generated into a cache on first
use: the default), ``coco:ROOT`` or ``voc:ROOT``. Training runs on the engine of `cnnkit train`
(run directory, history, curves, diagnosis, checkpoints, --resume, precision, torchrun).
Exit status 2 with one line for bad input, as everywhere.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DEFAULT_MODEL = "faster_rcnn_r18_fpn_lite"
DEFAULT_DATA = "scenes"
# The scenes recipe (README, "Detection"): measured on an AMX Xeon, 2 cores.
DETECT_EPOCHS = 20
DETECT_LR = 0.02
DETECT_DECAY = 1e-4
DETECT_WARMUP = 0.5
# Classification flags `detect train` does not have, at the values that mean "off".
_NOT_DETECTION = {
    "image_size": 32,
    "in_chans": None,
    "train_subset": None,
    "storage": "stream",
    "label_smoothing": None,
    "drop_path": 0.0,
    "dropblock": None,
    "dropout": 0.0,
    "cutout": 0,
    "crop_padding": None,
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("detect", help="train, evaluate and run object detectors (Faster R-CNN)")
    cmds = p.add_subparsers(dest="detect_command", metavar="COMMAND", required=True)
    _register_train(cmds)
    _register_evaluate(cmds)
    _register_predict(cmds)
    _register_proposals(cmds)


def _register_train(cmds: argparse._SubParsersAction) -> None:
    from cnnkit.cli.train import (
        _HelpFormatter,
        _model_arg,
        _positive_int,
        _track_given,
        add_hardware_and_run_args,
        add_optimization_args,
    )
    from cnnkit.layers.norm import NORMS
    from cnnkit.train.config import TOGGLES

    p = cmds.add_parser(
        "train",
        help=f"train a detector (default: {DEFAULT_MODEL} on the synthetic digit scenes)",
        description="Train a region-based detector and write a run directory.",
        formatter_class=_HelpFormatter,
    )
    _track_given(p)
    g = p.add_argument_group("what to train")
    g.add_argument(
        "--model", default=DEFAULT_MODEL, help="detector (`cnnkit models --task detection`)"
    )
    g.add_argument(
        "--data",
        default=DEFAULT_DATA,
        help="scenes[:SEED] | coco:ROOT | voc:ROOT (scenes: generated into a cache on first use)",
    )
    g.add_argument(
        "--proposals",
        metavar="FILE",
        help="precomputed proposals for a Fast R-CNN model (JSON {image_id: [[x1, y1, x2, y2], "
        "...]} or .npz), e.g. from `cnnkit detect proposals`",
    )
    g.add_argument(
        "--backbone-weights",
        metavar="FILE|RUN_DIR",
        help="initial backbone weights: a torchvision-format ImageNet checkpoint (safetensors "
        "or weights-only torch.load) or a cnnkit classification run directory",
    )
    g.add_argument(
        "--norm",
        choices=NORMS,
        help="normalization of the backbone (frozen_batch for pretrained backbones; batch or "
        "group from scratch; group also puts GroupNorm in the FPN; default: the model's own)",
    )
    g.add_argument("--norm-groups", type=_positive_int, help="most groups of --norm group (32)")
    g.add_argument(
        "--flip", choices=TOGGLES, default="auto", help="horizontal flip; auto: off for scenes"
    )
    g.add_argument(
        "--workers", type=int, help="DataLoader workers (default: the cores per process)"
    )
    g.add_argument(
        "--skip-invalid",
        action="store_true",
        help="drop invalid annotations and unreadable images and report how many",
    )
    g.add_argument(
        "--model-arg",
        type=_model_arg,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="detector constructor argument, e.g. --model-arg box_batch_size_per_image=128",
    )
    add_optimization_args(
        p,
        epochs=DETECT_EPOCHS,
        batch_size=8,
        lr_batch=16,
        lr_help=f"default: {DETECT_LR} for sgd (a batch of 16), 1e-4 for adamw",
        decay_help=f"default {DETECT_DECAY} (sgd), 0.05 (adamw)",
        warmup_epochs=DETECT_WARMUP,
    )
    add_hardware_and_run_args(p)
    p.set_defaults(func=run_train, task="detection", compile="off", **_NOT_DETECTION)


def _detect_config(args: argparse.Namespace):
    from cnnkit.cli.train import config_from_args

    if args.lr is None and args.optimizer == "sgd":
        args.lr = DETECT_LR
    if args.weight_decay is None and args.optimizer == "sgd":
        args.weight_decay = DETECT_DECAY
    return config_from_args(args)


def run_train(args: argparse.Namespace) -> int:
    from cnnkit.cli.train import run

    return run(args, make_config=_detect_config)


# --------------------------------------------------------------------------- evaluate


def _register_evaluate(cmds: argparse._SubParsersAction) -> None:
    p = cmds.add_parser("evaluate", help="COCO box AP and VOC mAP@0.5 of a detection run")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory of `cnnkit detect train`")
    p.add_argument("--data", metavar="SPEC", help="data to evaluate on (default: the run's own)")
    p.add_argument("--proposals", metavar="FILE", help="proposals (Fast R-CNN models)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--out", metavar="DIR", help="where to write the outputs (default: RUN_DIR)")
    p.set_defaults(func=run_evaluate)


def _load_run(run_dir: str):
    """``(model, config)`` of a detection run directory; ValueError when it is not one."""
    from cnnkit.cli.runs import _run_dir
    from cnnkit.train.checkpoint import load_model, read_config

    path = _run_dir(run_dir)
    config = read_config(path)
    data = config.get("data")
    if not isinstance(data, dict) or data.get("task") != "detection":
        raise ValueError(f"{path}: not a detection run (train one with `cnnkit detect train`)")
    for key in ("classes", "label_to_category"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{path / 'config.json'}: field 'data.{key}' is missing or not a list")
    return load_model(path), config


def _task_for(config: dict, data_spec: str | None, proposals: str | None, device: str):
    """A detection task reading ``data_spec`` (or the run's own data) for inference."""
    import torch

    from cnnkit.train.config import TrainConfig
    from cnnkit.train.detection import DetectionTask
    from cnnkit.train.distributed import DistContext
    from cnnkit.train.task import Runtime

    train = dict(config.get("train") or {})
    spec = data_spec or config["data"].get("spec") or train.get("data")
    cfg = TrainConfig(
        task="detection",
        model=config.get("name", DEFAULT_MODEL),
        data=str(spec),
        proposals=proposals if proposals is not None else train.get("proposals"),
        compile="off",
    )
    task = DetectionTask(cfg)
    runtime = Runtime(torch.device(device), DistContext(), "fp32", False)
    task.setup(runtime)
    return task


class _One:
    """The reducer of one process."""

    def sum(self, values):
        return values

    def gather(self, obj):
        return [obj]


def run_evaluate(args: argparse.Namespace) -> int:
    from cnnkit.cli.runs import _device
    from cnnkit.train.detect_eval import write_evaluation

    device = _device(args.device)
    model, config = _load_run(args.run_dir)
    task = _task_for(config, args.data, args.proposals, device)
    _check_classes(task, config, args.data)
    model.to(device)
    results = task.predict_split(model, "val")
    out = Path(args.out) if args.out else Path(args.run_dir)
    coco, voc, _ = write_evaluation(out, task.data.val.coco_gt(), results)
    print(coco.summary())
    print()
    print(coco.per_class_table())
    print()
    print(voc.summary())
    print(f"wrote {out / 'evaluation.json'}, {out / 'detections.json'} and the PR curves")
    return 0


def _check_classes(task, config: dict, spec: str | None) -> None:
    saved = config["data"]["classes"]
    names = list(task.data.category_names[1:])
    if names != list(saved):
        raise ValueError(
            f"--data {spec}: its classes {names[:5]}... differ from the model's {saved[:5]}..."
        )


# --------------------------------------------------------------------------- predict


def _register_predict(cmds: argparse._SubParsersAction) -> None:
    p = cmds.add_parser("predict", help="draw a detector's boxes on image files")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory of `cnnkit detect train`")
    p.add_argument("images", metavar="IMAGE", nargs="+", help="image files (png, jpg, ...)")
    p.add_argument("--out", metavar="DIR", default="predictions", help="output folder")
    p.add_argument(
        "--score-threshold", type=float, default=0.5, metavar="T", help="drawn detections' score"
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.set_defaults(func=run_predict)


def _read_rgb(path: str):
    """``uint8 [3, H, W]`` of the image file ``path`` (any PIL mode); ValueError naming it."""
    import numpy as np
    import torch
    from PIL import Image

    from cnnkit.data.streaming import _read_errors, to_uint8_mode

    if not Path(path).is_file():
        raise ValueError(f"{path}: no such image file")
    try:
        with Image.open(path) as im:
            rgb = np.asarray(to_uint8_mode(im, 3))
    except _read_errors() as err:
        raise ValueError(f"{path}: cannot read the image ({err})") from None
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


def picture_names(paths: list[str]) -> list[str]:
    """The output PNG name of each input image: its stem, numbered where two stems clash
    (``a/x.jpg`` and ``b/x.png`` must not overwrite each other's picture)."""
    stems = [Path(p).stem for p in paths]
    clash = {s for s in stems if stems.count(s) > 1}
    return [f"{s}-{i}.png" if s in clash else f"{s}.png" for i, s in enumerate(stems)]


def run_predict(args: argparse.Namespace) -> int:
    import torch

    from cnnkit.atomic import atomic_write_text
    from cnnkit.cli.runs import _device
    from cnnkit.train.detect_eval import predict_batch, to_results
    from cnnkit.viz import draw_detections

    if not 0 <= args.score_threshold <= 1:
        raise ValueError(f"--score-threshold must be in [0, 1], got {args.score_threshold}")
    device = torch.device(_device(args.device))
    model, config = _load_run(args.run_dir)
    if not model.has_rpn:
        raise ValueError(
            f"{args.run_dir}: a Fast R-CNN model needs proposals; predict runs Faster R-CNN"
        )
    classes = config["data"]["classes"]
    mapping = config["data"]["label_to_category"]
    images = [_read_rgb(p) for p in args.images]  # every file checked before any output
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.to(device)
    results = []
    for i, (path, image, name) in enumerate(
        zip(args.images, images, picture_names(args.images), strict=True)
    ):
        pred = predict_batch(model, [image], device=device, precision="fp32")[0]
        keep = pred["scores"] >= args.score_threshold
        pred = {k: v[keep] for k, v in pred.items()}
        results += [dict(r, file_name=path) for r in to_results([pred], [i], mapping)]
        draw_detections(
            image.permute(1, 2, 0).numpy(),
            pred["boxes"].numpy(),
            [classes[int(label) - 1] for label in pred["labels"]],
            pred["scores"].numpy(),
            out / name,
            classes=classes,  # one colour per class across the pictures
        )
        print(f"{path}: {int(keep.sum())} detection(s) -> {out / name}")
    atomic_write_text(out / "detections.json", json.dumps(results, indent=1) + "\n")
    print(f"wrote {out / 'detections.json'} (image_id: the image's position on the command line)")
    return 0


# --------------------------------------------------------------------------- proposals


def _register_proposals(cmds: argparse._SubParsersAction) -> None:
    p = cmds.add_parser(
        "proposals", help="write a trained RPN's proposals for every image (Fast R-CNN input)"
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a Faster R-CNN run directory")
    p.add_argument("--data", metavar="SPEC", help="data (default: the run's own)")
    p.add_argument("--out", metavar="FILE", required=True, help="JSON or .npz file to write")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.set_defaults(func=run_proposals)


def run_proposals(args: argparse.Namespace) -> int:
    import torch

    from cnnkit.cli.runs import _device
    from cnnkit.data.detection import DetectionDataset, detection_loader
    from cnnkit.data.proposals import write_proposals
    from cnnkit.data.streaming import EvalBatchSampler

    device = _device(args.device)
    model, config = _load_run(args.run_dir)
    if not getattr(model, "has_rpn", False):
        raise ValueError(f"{args.run_dir}: the model has no RPN to propose regions")
    task = _task_for(config, args.data, None, device)
    model.to(device)
    table = {}
    for split in (task.data.train, task.data.val):
        dataset = DetectionDataset(split, train=False, seed=0)
        sampler = EvalBatchSampler(len(dataset), 16)
        for batch in detection_loader(dataset, sampler, workers=task.workers, pin_memory=False):
            if batch.invalid:
                raise ValueError(f"cannot read image {batch.invalid[0]}")
            x = [im.to(device).float().div_(255) for im in batch.images]
            with torch.no_grad():
                boxes = model.propose(x)
            for t, b in zip(batch.targets, boxes, strict=True):
                if int(t["image_id"]) in table:
                    raise ValueError(
                        f"image id {int(t['image_id'])} appears in both splits; proposals are "
                        "keyed by image id"
                    )
                table[int(t["image_id"])] = b.float().cpu().numpy()
    write_proposals(args.out, table)
    print(f"wrote proposals of {len(table)} images to {args.out}")
    return 0
