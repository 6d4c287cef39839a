"""Detection data: ``--data`` specs, the streamed torch Dataset, its collate and loader.

Specs (:func:`load_detection`):

* ``scenes`` / ``scenes:SEED``: the synthetic digit scenes (:mod:`cnnkit.data.scenes`),
  generated into a cache on first use, read as COCO;
* ``coco:ROOT``: COCO JSON, in the official 2017 layout or the one ``cnnkit data scenes``
  writes (:mod:`cnnkit.data.coco_source`);
* ``voc:ROOT``: a VOCdevkit year folder (:mod:`cnnkit.data.voc_source`).

Every annotation is validated when read (:mod:`cnnkit.data.annotation_checks`): a bad one is a
``ValueError`` naming its file, id and image file, or with ``skip_invalid`` it is dropped and
counted (:attr:`DetectionData.skipped`). Images are not decoded up front: the image file must
exist, and whether it decodes (at the size the annotation says) is checked by the Dataset,
which hands an :class:`~cnnkit.data.streaming.Invalid` marker to the collate when not.

:class:`DetectionDataset` serves the engine's ``(epoch, index)`` keys
(:class:`~cnnkit.data.streaming.ShardBatchSampler` / ``EvalBatchSampler``): ``uint8 [3, H, W]``
images at their own size (the detector resizes and normalizes, as torchvision's do) and
targets with boxes in original image pixels. Training draws a horizontal flip with probability
1/2 from ``numpy.random.default_rng([seed, epoch, index])``: the same for an image whatever
the rank, the worker or a resume. The training data set serves only the images with at least
one box to learn from (not crowd, not VOC-difficult), as torchvision's reference scripts drop
the others; evaluation serves every image of the split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from cnnkit.data.annotation_checks import clipped_xyxy
from cnnkit.data.detection_split import (
    Category,
    DetectionSplit,
    ImageRecord,
    keypoint_flip_map,
)
from cnnkit.data.streaming import (
    Invalid,
    SampleKey,
    _read_errors,
    stream_loader,
    to_uint8_mode,
)
from cnnkit.data.transforms import hflip_detection

__all__ = [
    "Category",
    "DetectionBatch",
    "DetectionData",
    "DetectionDataset",
    "DetectionSplit",
    "ImageRecord",
    "detection_collate",
    "detection_loader",
    "keypoint_flip_map",
    "load_detection",
]

SPEC_FORMS = "scenes[:SEED], coco:ROOT or voc:ROOT"


@dataclass
class DetectionData:
    """A detection data set: its two splits and what they share.

    Attributes:
        spec: the ``--data`` spec it was read from.
        kind: "scenes", "coco" or "voc".
        root: the data set's folder.
        categories: in label order (label ``i`` is ``categories[i - 1]``).
        train, val: the splits.
        flip_map: the keypoints' left/right permutation (None without keypoints).
    """

    spec: str
    kind: str
    root: Path
    categories: tuple[Category, ...]
    train: DetectionSplit
    val: DetectionSplit
    flip_map: list[int] | None = None

    @property
    def num_classes(self) -> int:
        """K, the number of foreground classes (labels 1..K)."""
        return len(self.categories)

    @property
    def label_to_category(self) -> list[int]:
        """``[K + 1]``: label -> the data set's category id (index 0, the background: -1)."""
        return self.train.label_to_category

    @property
    def category_names(self) -> list[str]:
        """``[K + 1]``: label -> name (index 0: "__background__")."""
        return self.train.category_names

    @property
    def skipped_by_reason(self) -> dict[str, int]:
        """``{"train: bbox": 3, ...}``: what ``skip_invalid`` dropped, per split and reason."""
        return {
            f"{s.name}: {reason}": n
            for s in (self.train, self.val)
            for reason, n in s.skipped.items()
        }

    @property
    def skipped(self) -> int:
        """How many entries (annotations, and images with their annotations) were dropped."""
        return sum(self.skipped_by_reason.values())


def load_detection(
    spec: str, *, skip_invalid: bool = False, voc_sets: tuple[str, str] | None = None
) -> DetectionData:
    """Read a detection data set from its ``--data`` spec (module docstring).

    Args:
        spec: ``scenes``, ``scenes:SEED``, ``coco:ROOT`` or ``voc:ROOT``.
        skip_invalid: drop invalid annotations (and images whose entry or file is bad) and
            count them, instead of failing on the first.
        voc_sets: VOC image-set names of the train and val splits (default: train and val,
            or test where there is no val).
    Raises:
        ValueError: an unknown spec, a missing folder or file, an invalid annotation.
    """
    if not isinstance(spec, str):
        raise TypeError(f"--data must be a string ({SPEC_FORMS}), got {type(spec).__name__}")
    kind, _, rest = spec.partition(":")
    if kind == "scenes":
        from cnnkit.data.scenes import scenes_root

        if rest and not (rest.isdigit() and rest.isascii()):
            raise ValueError(f"--data {spec}: the scenes seed must be an integer >= 0")
        root = scenes_root(int(rest) if rest else 0)
        return _read_coco(spec, "scenes", root, skip_invalid)
    if kind in ("coco", "voc") and rest:
        root = Path(rest).expanduser()
        if not root.is_dir():
            raise ValueError(f"--data {spec}: no such folder {root}")
        if kind == "coco":
            return _read_coco(spec, "coco", root, skip_invalid)
        from cnnkit.data.voc_source import read_voc

        splits = read_voc(root, skip_invalid=skip_invalid, sets=voc_sets)
        return DetectionData(spec, "voc", root, splits["train"].categories, **splits)
    raise ValueError(f"--data {spec!r}: expected {SPEC_FORMS}")


def _read_coco(spec: str, kind: str, root: Path, skip_invalid: bool) -> DetectionData:
    from cnnkit.data.coco_source import coco_layout, read_coco_split

    layout = coco_layout(root)
    train = read_coco_split(*layout["train"], name="train", kind=kind, skip_invalid=skip_invalid)
    val = read_coco_split(
        *layout["val"],
        name="val",
        kind=kind,
        skip_invalid=skip_invalid,
        categories=train.categories,
    )
    both = train.keypoints is not None and val.keypoints is not None
    if both and train.keypoints.shape[1] != val.keypoints.shape[1]:
        raise ValueError(f"--data {spec}: the splits have different keypoint counts")
    flip_map = train.flip_map if train.keypoints is not None else val.flip_map
    return DetectionData(spec, kind, root, train.categories, train, val, flip_map)


# --------------------------------------------------------------------------- the Dataset


class DetectionDataset(Dataset):
    """``(epoch, index) -> (uint8 [3, H, W], target)``, or :class:`Invalid` for an image that
    does not decode or whose decoded size is not the annotation's.

    The target: ``boxes`` float32 [N, 4] (x1, y1, x2, y2 in original image pixels), ``labels``
    int64 [N] (1..K), ``iscrowd`` bool [N], ``image_id`` int; with ``with_masks`` ``masks``
    uint8 [N, H, W] (from the polygons / RLE, by pycocotools.mask), with ``with_keypoints``
    ``keypoints`` float32 [N, K, 3]. Training leaves VOC-difficult objects out.

    Args:
        split: the split to serve.
        train: serve only images with a box to learn from, and flip them at random.
        seed: the run's seed (the flips are a function of ``(seed, epoch, index)``).
        flip: flip training images at random (default: ``train``); a flipped image's target
            says ``flipped`` (precomputed proposals must be flipped with it).
    """

    def __init__(
        self,
        split: DetectionSplit,
        *,
        train: bool,
        seed: int,
        with_masks: bool = False,
        with_keypoints: bool = False,
        flip: bool | None = None,
    ) -> None:
        if not isinstance(split, DetectionSplit):
            raise TypeError(f"split must be a DetectionSplit, got {type(split).__name__}")
        if with_masks and split.segmentations is None:
            raise ValueError(f"{split.source}: the {split.name} split has no segmentations")
        if with_keypoints and split.keypoints is None:
            raise ValueError(f"{split.source}: the {split.name} split has no keypoints")
        self.split, self.train, self.seed = split, train, seed
        self.flip = train if flip is None else flip
        self.with_masks, self.with_keypoints = with_masks, with_keypoints
        self.flip_map = split.flip_map
        if train:
            learnable = ~(split.iscrowd | split.difficult)
            image_of = np.repeat(np.arange(len(split)), np.diff(split.ann_start))
            per_image = np.bincount(image_of[learnable], minlength=len(split))
            self.indices = np.flatnonzero(per_image > 0)
        else:
            self.indices = np.arange(len(split))

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def __getitem__(self, key: SampleKey) -> tuple[Tensor, dict[str, Any]] | Invalid:
        epoch, index = key
        i = int(self.indices[index])
        path = self.split.path(i)
        try:
            image = _decode(path, int(self.split.widths[i]), int(self.split.heights[i]))
        except _read_errors() as err:
            return Invalid(path, f"{type(err).__name__}: {err}")
        if isinstance(image, str):
            return Invalid(path, image)
        target = self._target(i)
        if self.flip and np.random.default_rng([self.seed, epoch, index]).random() < 0.5:
            image, target = hflip_detection(image, target, self.flip_map)
            target["flipped"] = True
        return image, target

    def _target(self, i: int) -> dict[str, Any]:
        split, rows = self.split, self.split.rows(i)
        keep = np.arange(rows.start, rows.stop)
        if self.train:
            keep = keep[~split.difficult[rows]]
        w, h = int(split.widths[i]), int(split.heights[i])
        target: dict[str, Any] = {
            "boxes": torch.from_numpy(clipped_xyxy(split.bbox[keep], w, h).astype(np.float32)),
            "labels": torch.from_numpy(split.labels[keep]),
            "iscrowd": torch.from_numpy(split.iscrowd[keep]),
            "image_id": int(split.image_ids[i]),
        }
        if self.with_masks:
            target["masks"] = torch.from_numpy(split.segmentations.masks(keep.tolist(), h, w))
        if self.with_keypoints:
            target["keypoints"] = torch.from_numpy(split.keypoints[keep])
        return target


def _decode(path: str, width: int, height: int) -> Tensor | str:
    """``uint8 [3, H, W]`` of the image file (any PIL mode, see ``to_uint8_mode``), or why it
    is unusable when its size is not the annotation's ``width x height``."""
    from PIL import Image

    with Image.open(path) as im:
        if im.size != (width, height):
            return (
                f"decoded size {im.size[0]} x {im.size[1]} differs from the annotation's "
                f"{width} x {height}"
            )
        rgb = to_uint8_mode(im, 3)
        array = np.array(rgb, dtype=np.uint8).reshape(height, width, 3)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


# --------------------------------------------------------------------------- batches


@dataclass
class DetectionBatch:
    """What :func:`detection_loader` yields: images at their own sizes and their targets.

    Attributes:
        images: ``[B]`` of ``uint8 [3, H_i, W_i]``.
        targets: ``[B]`` target dicts (:class:`DetectionDataset`).
        invalid: ``"PATH: reason"`` of the images that could not be used (not in ``images``).
    """

    images: list[Tensor]
    targets: list[dict[str, Any]]
    invalid: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def pin_memory(self) -> DetectionBatch:
        """Called by the DataLoader's pin-memory thread (``pin_memory=True``)."""
        targets = [
            {k: v.pin_memory() if isinstance(v, Tensor) else v for k, v in t.items()}
            for t in self.targets
        ]
        return DetectionBatch([im.pin_memory() for im in self.images], targets, self.invalid)


def detection_collate(samples: list[tuple[Tensor, dict[str, Any]] | Invalid]) -> DetectionBatch:
    """Samples -> :class:`DetectionBatch`; :class:`Invalid` ones are dropped and reported."""
    good = [s for s in samples if not isinstance(s, Invalid)]
    invalid = [f"{s.path}: {s.reason}" for s in samples if isinstance(s, Invalid)]
    return DetectionBatch([s[0] for s in good], [s[1] for s in good], invalid)


def detection_loader(
    dataset: DetectionDataset,
    sampler: Sampler[list[SampleKey]],
    *,
    workers: int,
    pin_memory: bool,
) -> DataLoader:
    """A DataLoader of :class:`DetectionBatch` es in ``sampler``'s batches of keys
    (:func:`cnnkit.data.streaming.stream_loader` with :func:`detection_collate`)."""
    return stream_loader(
        dataset, sampler, workers=workers, pin_memory=pin_memory, collate_fn=detection_collate
    )
