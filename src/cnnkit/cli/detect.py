"""`cnnkit detect train | evaluate | predict | proposals`: region-based object detectors.

    cnnkit detect train [--model NAME] [--data SPEC] [--epochs N] [--out RUN_DIR] ...
    cnnkit detect evaluate RUN_DIR [--data SPEC]
    cnnkit detect predict RUN_DIR IMAGE... [--out DIR] [--score-threshold T]
    cnnkit detect proposals RUN_DIR [--data SPEC] --out FILE
    cnnkit detect explain RUN_DIR IMAGE [--out DIR] [--annotations COCO_JSON]

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
# Mask and keypoint R-CNN take longer steps: fewer epochs keep the recipe within 20 minutes.
INSTANCE_EPOCHS = 8
INSTANCE_FAMILIES = ("mask_rcnn", "keypoint_rcnn")
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
    _register_explain(cmds)


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
        epochs=None,
        epochs_help=f"passes over the training split (default: {DETECT_EPOCHS}; "
        f"{INSTANCE_EPOCHS} for Mask and keypoint R-CNN, whose steps take longer)",
        batch_size=8,
        lr_batch=16,
        lr_help=f"default: {DETECT_LR} for sgd (a batch of 16), 1e-4 for adamw",
        decay_help=f"default {DETECT_DECAY} (sgd), 0.05 (adamw)",
        warmup_epochs=DETECT_WARMUP,
    )
    add_hardware_and_run_args(p)
    p.set_defaults(func=run_train, task="detection", compile="off", **_NOT_DETECTION)


def default_epochs(model: str) -> int:
    """``--epochs``' default: the scenes recipe's length for ``model``'s family."""
    from cnnkit.models.registry import model_info

    family = model_info(model).family
    return INSTANCE_EPOCHS if family in INSTANCE_FAMILIES else DETECT_EPOCHS


def _detect_config(args: argparse.Namespace):
    from cnnkit.cli.train import config_from_args

    if args.epochs is None:
        args.epochs = default_epochs(args.model)
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
    p.add_argument(
        "--kpt-sigmas",
        type=_sigmas,
        metavar="S,S,...",
        help="OKS sigma of each keypoint (default: the data set's category keypoint_sigmas, "
        "else COCO's 17 person values)",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--out", metavar="DIR", help="where to write the outputs (default: RUN_DIR)")
    p.set_defaults(func=run_evaluate)


def _sigmas(text: str) -> list[float]:
    """``--kpt-sigmas 0.05,0.05,...``: positive finite numbers."""
    import math

    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"sigmas must be positive finite numbers, got {text!r}")
    return values


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
    _check_run_fields(path / "config.json", config)
    model = load_model(path)
    k = getattr(model, "num_classes", len(data["classes"]))
    if k != len(data["classes"]):
        raise ValueError(
            f"{path / 'config.json'}: field 'data.classes' names {len(data['classes'])} "
            f"class(es), the model has {k}"
        )
    return model, config


def _check_run_fields(source: Path, config: dict) -> None:
    """The fields of a detection run's config.json that evaluate / predict / proposals read
    besides the model's: class names (strings), label -> category id (K + 1 integers), the
    training's proposals file (a path or null); ValueError naming the field."""
    from cnnkit.data.annotation_checks import is_int

    classes, mapping = config["data"]["classes"], config["data"]["label_to_category"]
    if not all(isinstance(c, str) for c in classes):
        raise ValueError(f"{source}: field 'data.classes' must be class names (strings)")
    if len(mapping) != len(classes) + 1 or not all(
        is_int(c) and -(2**63) <= c < 2**63 for c in mapping
    ):
        raise ValueError(
            f"{source}: field 'data.label_to_category' must be {len(classes) + 1} integers (the "
            "background's -1, then the category id of each of 'data.classes')"
        )
    proposals = (config.get("train") or {}).get("proposals")
    if proposals is not None and not isinstance(proposals, str):
        raise ValueError(f"{source}: field 'train.proposals' must be a file name or null")


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
    from cnnkit.train.detect_eval import iou_types, write_evaluation

    if args.out:
        _check_out_dir(Path(args.out))
    device = _device(args.device)
    model, config = _load_run(args.run_dir)
    task = _task_for(config, args.data, args.proposals, device)
    _check_classes(task, config, args.data)
    _check_sigmas(args.kpt_sigmas, model)
    model.to(device)
    results = task.predict_split(model, "val")
    out = Path(args.out) if args.out else Path(args.run_dir)
    cocos, voc, _ = write_evaluation(
        out, task.val_gt, results, iou_types(model), kpt_sigmas=args.kpt_sigmas
    )
    for iou_type, coco in cocos.items():
        print(f"{iou_type}:")
        print(coco.summary())
        print()
        print(coco.per_class_table())
        print()
    print(voc.summary())
    print(f"wrote {out / 'evaluation.json'}, {out / 'detections.json'} and the PR curves")
    return 0


def _check_sigmas(sigmas: list[float] | None, model) -> None:
    """``--kpt-sigmas`` fits the model's keypoints, checked before minutes of prediction."""
    if sigmas is None:
        return
    count = getattr(model, "num_keypoints", 0)
    if not count:
        raise ValueError("--kpt-sigmas: this run's model predicts no keypoints")
    if len(sigmas) != count:
        raise ValueError(
            f"--kpt-sigmas gives {len(sigmas)} sigmas, but the model predicts {count} keypoints"
        )


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

    if Path(path).is_dir():
        raise ValueError(f"{path}: is a directory; give image files (e.g. {path}/*.png)")
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


def _pasted(pred: dict):
    """The detections' masks pasted into the image, ``[D, H, W]`` probabilities (None for a
    model without a mask head)."""
    if "mask_probs" not in pred:
        return None
    from cnnkit.detection.paste import paste_masks

    return paste_masks(pred["mask_probs"], pred["boxes"], pred["image_size"])[:, 0].numpy()


def _check_out_dir(out: Path) -> None:
    """``--out DIR``, before any work: a directory, or a name that one can be made at."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a directory")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"--out {out}: {parent} is not a directory")


def _check_predict_out(out: Path) -> None:
    """``--out`` of predict: a directory (made if missing) that holds no run, whose files
    (detections.json, curves.png, ...) the pictures and results would replace."""
    from cnnkit.train.rundir import run_markers

    _check_out_dir(out)
    found = run_markers(out) if out.is_dir() else []
    if found:
        raise ValueError(
            f"--out {out} holds a run ({', '.join(found)}), whose files the pictures and "
            "detections.json would replace; give another --out"
        )


def run_predict(args: argparse.Namespace) -> int:
    import torch

    from cnnkit.atomic import atomic_write_text
    from cnnkit.cli.runs import _device
    from cnnkit.train.detect_eval import predict_batch, to_results
    from cnnkit.viz import draw_instances

    if not 0 <= args.score_threshold <= 1:
        raise ValueError(f"--score-threshold must be in [0, 1], got {args.score_threshold}")
    _check_predict_out(Path(args.out))
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
        pred = {k: v[keep] if isinstance(v, torch.Tensor) else v for k, v in pred.items()}
        results += [dict(r, file_name=path) for r in to_results([pred], [i], mapping)]
        draw_instances(
            image.permute(1, 2, 0).numpy(),
            pred["boxes"].numpy(),
            [classes[int(label) - 1] for label in pred["labels"]],
            out / name,
            scores=pred["scores"].numpy(),
            masks=_pasted(pred),
            keypoints=pred["keypoints"].numpy() if "keypoints" in pred else None,
            skeleton=config["data"].get("skeleton") or None,
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


def _check_proposals_out(out: Path) -> None:
    """``--out`` of proposals, before the inference: a file name (not a directory), in a
    folder (made if missing), and not a file of a run directory."""
    from cnnkit.train.detect_eval import DETECTIONS_NAME
    from cnnkit.train.rundir import RUN_FILES, run_markers

    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; name the .json or .npz file to write")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():  # (a file where a folder of the path would be)
        raise ValueError(f"--out {out}: {parent} is not a directory")
    if (
        out.name in (*RUN_FILES, DETECTIONS_NAME)
        and out.parent.is_dir()
        and run_markers(out.parent)
    ):
        raise ValueError(f"--out {out} is a file of the run in {out.parent}; give another name")


def run_proposals(args: argparse.Namespace) -> int:
    import torch

    from cnnkit.cli.runs import _device
    from cnnkit.data.detection import DetectionDataset, detection_loader
    from cnnkit.data.proposals import write_proposals
    from cnnkit.data.streaming import EvalBatchSampler

    _check_proposals_out(Path(args.out))
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


# --------------------------------------------------------------------------- explain


def _register_explain(cmds: argparse._SubParsersAction) -> None:
    from cnnkit.cli.train import _positive_int

    p = cmds.add_parser(
        "explain",
        help="a detector's pipeline on one image, stage by stage, as pictures",
        description="Draw what each stage of a Faster / Mask / keypoint R-CNN does on one image "
        "(the anchors matched to each ground-truth box, the RPN's proposals before and after "
        "NMS, the RoIs a training step samples, the class-specific boxes before and after "
        "per-class NMS, the masks and keypoint heatmaps of the top detections) into DIR, with "
        "an index.md saying what each picture shows.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory of `cnnkit detect train`")
    p.add_argument("image", metavar="IMAGE", help="an image file (png, jpg, ...)")
    p.add_argument("--out", metavar="DIR", default="explain", help="output folder")
    p.add_argument(
        "--annotations",
        metavar="COCO_JSON",
        help="COCO instances file with the image's boxes (its entry found by file name): adds "
        "the anchors matched to each box and the RoIs a training step would sample",
    )
    p.add_argument(
        "--top", type=_positive_int, default=50, metavar="N", help="boxes drawn per stage"
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.set_defaults(func=run_explain)


def _coco_target(annotations: str, image_path: str, size: tuple[int, int], mapping: list[int]):
    """The ground truth of the image file ``image_path`` (``size = (h, w)``) in the COCO file
    ``annotations``: its entry is the one whose ``file_name`` ends in the image's name; boxes
    xyxy (clipped, as training reads them), the run's labels (``mapping``: label -> category
    id), ``iscrowd``. ValueError naming the file and the entry otherwise."""
    import numpy as np
    import torch

    from cnnkit.data.annotation_checks import box_problem, box_rows, clipped_xyxy, valid_boxes
    from cnnkit.data.coco_source import read_json

    source, image = Path(annotations), Path(image_path)
    # COCO's layouts keep annotations/instances_val2017.json's images in val2017/ (the scenes':
    # instances_val.json, val/): file names repeat across splits, so check the folder too.
    folder = source.parent.parent / source.stem.removeprefix("instances_")
    layout = source.parent.name == "annotations" and folder.is_dir()
    if layout and image.resolve().parent != folder.resolve():
        raise ValueError(
            f"--annotations {annotations} describes the images in {folder}, and {image_path} "
            "is not one of them"
        )
    data = read_json(source)
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise ValueError(f"--annotations {annotations}: not a COCO file (no 'images' list)")
    name = image.name
    entries = [
        e for e in images if isinstance(e, dict) and Path(str(e.get("file_name", ""))).name == name
    ]
    if len(entries) != 1:
        how = "no image entry" if not entries else f"{len(entries)} image entries"
        raise ValueError(f"--annotations {annotations}: {how} with the file name {name!r}")
    entry = entries[0]
    h, w = size
    if (entry.get("height"), entry.get("width")) != (h, w):
        raise ValueError(
            f"--annotations {annotations}: image id {entry.get('id')} ({name}) is "
            f"{entry.get('width')} x {entry.get('height')} there but {image_path} is {w} x {h}"
        )
    anns = [
        a
        for a in data.get("annotations") or []
        if isinstance(a, dict) and a.get("image_id") == entry.get("id")
    ]
    xywh = box_rows([a.get("bbox") for a in anns])
    ok = valid_boxes(xywh, np.full(len(anns), w), np.full(len(anns), h))
    label_of = {c: label for label, c in enumerate(mapping) if label > 0}
    for a, row, good in zip(anns, xywh, ok, strict=True):
        where = f"--annotations {annotations}: annotation id {a.get('id')} ({name})"
        if not good:
            raise ValueError(f"{where}: {box_problem(a.get('bbox'), row, w, h)}")
        if a.get("category_id") not in label_of:
            raise ValueError(
                f"{where}: category_id {a.get('category_id')!r} is not one of the model's "
                "categories (the run's data.label_to_category)"
            )
    return {
        "boxes": torch.from_numpy(clipped_xyxy(xywh, w, h).astype(np.float32)).reshape(-1, 4),
        "labels": torch.tensor([label_of[a["category_id"]] for a in anns], dtype=torch.int64),
        "iscrowd": torch.tensor([bool(a.get("iscrowd", 0)) for a in anns], dtype=torch.bool),
    }


def run_explain(args: argparse.Namespace) -> int:
    import torch

    from cnnkit.cli.runs import _device
    from cnnkit.detection.explain import explain, write_explanation

    device = torch.device(_device(args.device))
    model, config = _load_run(args.run_dir)
    if not model.has_rpn:
        raise ValueError(
            f"{args.run_dir}: a Fast R-CNN model gets its proposals from outside; explain runs "
            "a model with an RPN (Faster, Mask or keypoint R-CNN)"
        )
    image = _read_rgb(args.image)
    size = (int(image.shape[1]), int(image.shape[2]))
    target = None
    if args.annotations:
        mapping = config["data"]["label_to_category"]
        target = _coco_target(args.annotations, args.image, size, mapping)
    model.to(device)
    expl = explain(model, image, target, top=args.top)
    written = write_explanation(
        expl, image.permute(1, 2, 0).numpy(), args.out, config["data"]["classes"]
    )
    for path in written:
        print(path)
    if target is None:
        print("(no --annotations: the anchors matched to the boxes and the sampled RoIs need them)")
    return 0
