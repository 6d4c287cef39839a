"""Object detection as a task of the training engine (:mod:`cnnkit.train.task`).

The images stream from disk through DataLoader workers (:mod:`cnnkit.data.detection`): each
worker decodes its images and flips them (with their boxes) as ``(seed, epoch, index)`` decides,
so runs reproduce and resume exactly; the detector resizes, normalizes and pads the batch
itself (:mod:`cnnkit.detection.transform`), as torchvision's detectors do, so that a saved
model takes images of any size.

A training step is the detector's dict of named losses (RPN objectness and box regression,
Fast R-CNN classification and box regression); the engine sums them. The primary metric is
COCO's box AP@[.5:.95] on the val split (``dev_box_ap``), with AP@.5 and AP@.75 beside it. The
val split is the ``test`` split too: detection data sets have no labelled test split, and the
final test figures are those of the last dev evaluation when the weights have not changed since.
Fast R-CNN (a model without an RPN) is fed ``--proposals`` (Girshick, 2015).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cnnkit.data.streaming import (
    EvalBatchSampler,
    ShardBatchSampler,
    check_invalid,
    default_workers,
)
from cnnkit.data.transforms import hflip_boxes
from cnnkit.train.config import TrainConfig
from cnnkit.train.task import Metric, Reducer, Runtime, StepOutput

# Evaluation batches: at most this many images (inference keeps no activations).
EVAL_BATCH = 16


def resolve_detection_flip(cfg: TrainConfig) -> bool:
    """``--flip`` or its default: on (torchvision's and Detectron's recipe), except for the
    synthetic digit scenes: a mirrored digit is not a digit of its class."""
    return cfg.flip == "on" or (cfg.flip == "auto" and not cfg.data.startswith("scenes"))


def model_kwargs(cfg: TrainConfig, num_classes: int) -> dict[str, Any]:
    """Constructor arguments of ``cfg.model``: the data's classes, ``--norm`` / ``--norm-groups``
    and every ``--model-arg``; a flag the detector does not take is a ValueError naming it."""
    import inspect

    from cnnkit.models.registry import model_info

    info = model_info(cfg.model)
    accepted = inspect.signature(info.builder).parameters
    if "num_classes" not in accepted or "rpn" not in accepted:
        raise ValueError(
            f"--model {cfg.model} is not a detector (see `cnnkit models --task detection`)"
        )
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    for name in ("norm", "norm_groups"):
        value = getattr(cfg, name)
        if value is not None:
            kwargs[name] = value
    for name, value in cfg.model_args.items():
        if name not in accepted:
            raise ValueError(f"--model-arg {name}: model {cfg.model!r} has no such argument")
        if name == "num_classes" and value != num_classes:
            raise ValueError(
                f"--model-arg num_classes={value!r} conflicts with --data {cfg.data}, which "
                f"has {num_classes} classes"
            )
        kwargs[name] = value
    return kwargs


def _skeleton(categories) -> list[list[int]]:
    """The first keypoint skeleton of the categories (1-based pairs), [] without one."""
    for cat in categories:
        if cat.skeleton:
            return [list(pair) for pair in cat.skeleton]
    return []


def model_heads(cfg: TrainConfig, num_classes: int) -> dict[str, bool]:
    """Which instance heads ``cfg.model`` will have (``{"segm": mask head, "keypoints":
    keypoint head}``), from its registry configuration and ``--model-arg`` s, before it is
    built: the data must decode masks / keypoints only for the models that learn them."""
    from cnnkit.models.registry import model_info, resolve_config

    info = model_info(cfg.model)
    kwargs = resolve_config(info.builder, {**info.config, **model_kwargs(cfg, num_classes)})
    return {"segm": bool(kwargs.get("mask")), "keypoints": bool(kwargs.get("num_keypoints"))}


class DetectionTask:
    """Detection on a COCO / VOC / scenes data set (:func:`cnnkit.data.detection.load_detection`)."""

    metric = Metric("box_ap", higher_is_better=True)

    def __init__(self, cfg: TrainConfig, data=None) -> None:
        self.cfg = cfg
        self.data = data
        self.flip = resolve_detection_flip(cfg)
        self.proposals: dict[int, Tensor] | None = None
        self._train_loader = None
        self._steps = 0  # training steps taken by this process (the test reuses the last dev)
        self._last_dev: tuple[int, dict[str, float]] | None = None
        self.last_results: list[dict[str, Any]] | None = None
        self.skipped: set[str] = set()

    # ------------------------------------------------------------------ data and model

    def setup(self, runtime: Runtime) -> None:
        from cnnkit.data.detection import DetectionDataset, load_detection

        self.runtime = runtime
        if self.data is None:
            self.data = load_detection(self.cfg.data, skip_invalid=self.cfg.skip_invalid)
        heads = model_heads(self.cfg, self.data.num_classes)
        self.iou_types = ["bbox"] + [t for t, on in heads.items() if on]
        self.train_set = DetectionDataset(
            self.data.train,
            train=True,
            seed=self.cfg.seed,
            flip=self.flip,
            with_masks=heads["segm"],
            with_keypoints=heads["keypoints"],
        )
        self.val_set = DetectionDataset(self.data.val, train=False, seed=self.cfg.seed)
        if len(self.train_set) == 0:
            raise ValueError(f"--data {self.cfg.data}: the train split has no annotated image")
        if len(self.val_set) == 0:
            raise ValueError(f"--data {self.cfg.data}: the val split has no image")
        if (self.data.val.iscrowd | self.data.val.difficult).all():
            raise ValueError(
                f"--data {self.cfg.data}: the val split has no box to evaluate against (none, "
                "or only crowd / difficult ones), so its AP is undefined"
            )
        # The val ground truth in the COCO format, built once (every epoch evaluates against it).
        self.val_gt = self.data.val.coco_gt()
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        self.workers = self.cfg.workers if self.cfg.workers is not None else default_workers(local)
        self.pin = runtime.device.type == "cuda"
        if self.cfg.proposals:
            self._read_proposals(self.cfg.proposals)

    def _read_proposals(self, path: str) -> None:
        from cnnkit.data.proposals import read_proposals

        table = read_proposals(path)
        train_ids, val_ids = self.data.train.image_ids.tolist(), self.data.val.image_ids.tolist()
        shared = set(train_ids).intersection(val_ids)
        if shared:
            raise ValueError(
                f"--proposals {path}: proposals are keyed by image id, and --data "
                f"{self.cfg.data} has {len(shared)} image id(s) in both splits, e.g. "
                f"{min(shared)} (one file cannot tell their images apart)"
            )
        missing = [
            i
            for split in (self.data.train, self.data.val)
            for i in split.image_ids
            if int(i) not in table
        ]
        if missing:
            raise ValueError(
                f"--proposals {path}: no proposals for {len(missing)} image(s) of --data "
                f"{self.cfg.data}, e.g. image id {missing[0]}"
            )
        self.proposals = {k: torch.from_numpy(v) for k, v in table.items()}

    def build_model(self) -> nn.Module:
        from cnnkit.models.registry import create_model

        kwargs = model_kwargs(self.cfg, self.data.num_classes)
        model = create_model(self.cfg.model, **kwargs)
        if not model.has_rpn and self.proposals is None:
            raise ValueError(
                f"--model {self.cfg.model} is a Fast R-CNN without an RPN: give --proposals FILE "
                "(`cnnkit detect proposals RUN_DIR --out FILE` writes them from a trained "
                "Faster R-CNN)"
            )
        if self.cfg.backbone_weights:
            from cnnkit.detection.weights import load_backbone_file

            load_backbone_file(model, self.cfg.backbone_weights)
        return model

    def train_size(self) -> int:
        return len(self.train_set)

    def _batch_to_device(self, batch) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
        """A collated :class:`DetectionBatch` on the device; unreadable images stop the run
        unless ``--skip-invalid``."""
        check_invalid(batch.invalid, self.cfg.skip_invalid, self.skipped)
        device = self.runtime.device
        images = [im.to(device, non_blocking=self.pin).float().div_(255) for im in batch.images]
        targets = [
            {
                k: v.to(device, non_blocking=self.pin) if isinstance(v, Tensor) else v
                for k, v in t.items()
            }
            for t in batch.targets
        ]
        return images, targets

    def _proposals_of(
        self, targets: list[dict[str, Any]], images: list[Tensor]
    ) -> list[Tensor] | None:
        if self.proposals is None:
            return None
        device, out = self.runtime.device, []
        for t, image in zip(targets, images, strict=True):
            boxes = self.proposals[int(t["image_id"])].to(device)
            if t.get("flipped"):  # the image was mirrored: its proposals with it
                boxes = hflip_boxes(boxes, image.shape[-1])
            out.append(boxes)
        return out

    def train_batches(self, sampler: ShardBatchSampler) -> Iterator[Any]:
        """``(images, targets, proposals)``: float [0, 1] images, targets on the device."""
        from cnnkit.data.detection import detection_loader

        if self._train_loader is None:
            # Persistent workers: the sampler is read at each epoch's iter(), after set_epoch.
            self._train_loader = detection_loader(
                self.train_set, sampler, workers=self.workers, pin_memory=self.pin
            )
        for batch in self._train_loader:
            images, targets = self._batch_to_device(batch)
            if images:
                yield images, targets, self._proposals_of(targets, images)

    def train_step(self, net: nn.Module, batch: Any) -> StepOutput:
        images, targets, proposals = batch
        kwargs = {} if proposals is None else {"proposals": proposals}
        losses = net(images, targets, **kwargs)
        self._steps += 1
        # "loss_objectness" -> history "train_loss_objectness" (the engine adds "loss_").
        named = {k.removeprefix("loss_"): v.float() for k, v in losses.items()}
        return StepOutput(named, len(images))

    # ------------------------------------------------------------------ evaluation

    def predict_split(self, model: nn.Module, split: str, rank: int = 0, world: int = 1):
        """COCO results of ``model`` on this rank's contiguous share of the val split."""
        from cnnkit.data.detection import detection_loader
        from cnnkit.train.detect_eval import predict_batch, to_results

        sampler = EvalBatchSampler(len(self.val_set), EVAL_BATCH, rank=rank, world_size=world)
        loader = detection_loader(
            self.val_set, sampler, workers=min(self.workers, 2), pin_memory=self.pin
        )
        results = []
        for batch in loader:
            check_invalid(batch.invalid, self.cfg.skip_invalid, self.skipped)
            ids = [int(t["image_id"]) for t in batch.targets]
            preds = predict_batch(
                model,
                batch.images,
                device=self.runtime.device,
                precision=self.runtime.precision,
                proposals=self._proposals_of(batch.targets, batch.images),
            )
            results += to_results(preds, ids, self.data.label_to_category)
        return results

    def evaluate(self, model: nn.Module, split: str, reduce: Reducer) -> dict[str, float]:
        """COCO box AP of ``model`` on the val split (``dev`` and ``test`` alike)."""
        from cnnkit.train.detect_eval import coco_metrics

        if split == "test" and self._last_dev is not None and self._last_dev[0] == self._steps:
            return dict(self._last_dev[1])
        ctx = self.runtime.dist
        mine = self.predict_split(model, split, ctx.rank, ctx.world_size)
        results = [r for part in reduce.gather(mine) for r in part]
        metrics = coco_metrics(self.val_gt, results, self.iou_types)
        self._last_dev = (self._steps, metrics)
        self.last_results = results
        return metrics

    # ------------------------------------------------------------------ the run's words and files

    def describe(self) -> str:
        d = self.data
        line = (
            f"{self.cfg.data}: {len(self.train_set)} train / {len(self.val_set)} val images, "
            f"{d.num_classes} classes; streamed by {self.workers} DataLoader worker(s) per "
            f"process; flip {'on' if self.flip else 'off'}"
        )
        if d.skipped:
            line += f"\n{d.skipped} invalid annotation(s) or image(s) dropped (--skip-invalid)"
        return line

    def facts(self) -> dict[str, Any]:
        """config.json's ``data`` section: what evaluate / predict need to read the model's
        outputs (class names and the data set's category ids)."""
        d = self.data
        return {
            "task": "detection",
            "spec": self.cfg.data,
            "kind": d.kind,
            "classes": list(d.category_names[1:]),
            "label_to_category": [int(c) for c in d.label_to_category],
            "keypoints": list(d.train.keypoint_names),
            "skeleton": _skeleton(d.categories),
            "sizes": {"train": len(self.train_set), "dev": len(self.val_set)},
            "storage": "stream",
        }

    def settings(self) -> dict[str, Any]:
        return {"flip": self.flip, "storage": "stream", "proposals": self.cfg.proposals}

    def summary(self, test: dict[str, float]) -> str:
        line = (
            f"val box AP {test['box_ap']:.3f} (AP50 {test['box_ap50']:.3f}, "
            f"AP75 {test['box_ap75']:.3f})"
        )
        if self.skipped:
            line += f"; {len(self.skipped)} unreadable image(s) skipped (--skip-invalid)"
        return line

    def finish(self, run_dir: Path, metrics: dict[str, Any]) -> None:
        """``detections.json``, ``evaluation.json`` and PR curves of the final val evaluation."""
        from cnnkit.train.detect_eval import write_evaluation

        if self.last_results is not None:
            write_evaluation(run_dir, self.val_gt, self.last_results, self.iou_types)
