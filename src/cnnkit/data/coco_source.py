"""COCO instances JSON -> :class:`DetectionSplit`, every annotation validated as it is read.

Layouts of ``ROOT`` (``coco:ROOT``), per split ``train`` / ``val``:

* the official COCO 2017 one: ``annotations/instances_train2017.json`` with images in
  ``train2017/`` (likewise ``val2017``);
* the one ``cnnkit data scenes`` writes: ``annotations/instances_train.json`` with ``train/``.

Categories get the contiguous labels 1..K in the order of their ids (COCO's 80 categories, ids
1..90 with gaps, become labels 1..80, as in detectron2). Both splits must list the same
categories. The rules for each entry are :mod:`cnnkit.data.annotation_checks`'; besides,
an image entry needs an integer id, a ``file_name`` that exists under the image folder and
positive integer ``width`` / ``height`` (at most ``MAX_IMAGE_SIDE``); a category needs an
integer id and, if it has one, a string ``name`` of its own (names are how per-class results and
predictions are labelled); an annotation needs an integer ``id`` (ids unique
in the file: they are how errors and evaluations name annotations), an ``image_id`` and a
``category_id`` of the file. A missing ``iscrowd`` is 0, a missing ``area`` the box's area.
Repeated image / annotation / category ids and malformed categories are errors even with
``skip_invalid`` (nothing sensible to drop); an image whose file is missing or whose entry is
malformed is dropped with its annotations under ``skip_invalid``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cnnkit.data.annotation_checks import (
    MAX_IMAGE_SIDE,
    Problems,
    box_problem,
    box_rows,
    is_int,
    is_number,
    keypoints_problem,
    segmentation_problem,
    valid_boxes,
)
from cnnkit.data.detection_split import Category, DetectionSplit, Segmentations, StringTable

SPLITS = ("train", "val")


def coco_layout(root: str | os.PathLike) -> dict[str, tuple[Path, Path]]:
    """``{split: (annotation file, image folder)}`` of a COCO ``root`` (either layout)."""
    root = Path(root)
    out = {}
    for split in SPLITS:
        for ann, images in (
            (f"instances_{split}2017.json", f"{split}2017"),
            (f"instances_{split}.json", split),
        ):
            if (root / "annotations" / ann).is_file():
                out[split] = (root / "annotations" / ann, root / images)
                break
        else:
            raise ValueError(
                f"coco:{root}: no annotations/instances_{split}2017.json (the COCO 2017 layout) "
                f"or annotations/instances_{split}.json (the `cnnkit data scenes` layout)"
            )
    return out


def read_json(path: Path) -> Any:
    """The parsed JSON file; ValueError naming the file when it is not JSON."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from None
    except ValueError as err:  # an integer of more than 4300 digits
        raise ValueError(f"{path}: not usable JSON: {err}") from None
    except RecursionError:
        raise ValueError(f"{path}: not usable JSON: nested too deeply") from None


def read_categories(records: Any, source: Path) -> tuple[Category, ...]:
    """Categories sorted by id, labels 1..K; malformed entries are errors naming the file."""
    if not isinstance(records, list) or not records:
        raise ValueError(f"{source}: 'categories' must be a non-empty list")
    for i, c in enumerate(records):
        if not isinstance(c, Mapping) or not _is_id(c.get("id")):
            raise ValueError(f"{source}: categories[{i}] needs an integer 'id' (64-bit)")
        if not isinstance(c.get("name", ""), str):
            raise ValueError(f"{source}: category id {c['id']}: 'name' must be a string")
    ids = [int(c["id"]) for c in records]
    if len(set(ids)) != len(ids):
        dup = next(v for v in ids if ids.count(v) > 1)
        raise ValueError(f"{source}: category id {dup} appears more than once")
    names = [str(c.get("name", c["id"])) for c in records]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"{source}: category name {dup!r} belongs to more than one category id")
    ordered = sorted(records, key=lambda c: int(c["id"]))
    return tuple(_category(c, label, source) for label, c in enumerate(ordered, start=1))


def _category(c: Mapping[str, Any], label: int, source: Path) -> Category:
    where = f"{source}: category id {c['id']}"
    names = c.get("keypoints") or []
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise ValueError(f"{where}: 'keypoints' must be a list of names")
    k = len(names)
    skeleton = c.get("skeleton") or []
    if not (
        isinstance(skeleton, list)
        and all(
            isinstance(p, list) and len(p) == 2 and all(is_int(v) and 1 <= v <= k for v in p)
            for p in skeleton
        )
    ):
        raise ValueError(f"{where}: 'skeleton' must be pairs of keypoint numbers 1..{k}")
    sigmas = c.get("keypoint_sigmas")
    if sigmas is not None and not (
        isinstance(sigmas, list)
        and len(sigmas) == k
        and all(is_number(s) and s > 0 for s in sigmas)
    ):
        raise ValueError(f"{where}: 'keypoint_sigmas' must be {k} positive numbers")
    return Category(
        id=int(c["id"]),
        name=str(c.get("name", c["id"])),
        label=label,
        supercategory=str(c.get("supercategory", "")),
        keypoints=tuple(names),
        skeleton=tuple((int(a), int(b)) for a, b in skeleton),
        keypoint_sigmas=None if sigmas is None else tuple(float(s) for s in sigmas),
    )


def _is_id(v: Any) -> bool:
    """An integer id that fits the int64 arrays."""
    return is_int(v) and -(2**63) <= v < 2**63


def _image_problem(entry: Any, image_dir: Path) -> str | None:
    if not isinstance(entry.get("file_name"), str) or not entry["file_name"]:
        return "needs a 'file_name'"
    for key in ("width", "height"):
        if not (is_int(entry.get(key)) and 0 < entry[key] <= MAX_IMAGE_SIDE):
            return (
                f"'{key}' must be a positive integer (at most {MAX_IMAGE_SIDE}), "
                f"got {entry.get(key)!r}"
            )
    path = image_dir / entry["file_name"]
    if not path.is_file():
        return f"image file {path} not found"
    return None


class _Images:
    """The usable image entries of a file, in file order."""

    def __init__(self, records: Any, source: Path, image_dir: Path, problems: Problems) -> None:
        if not isinstance(records, list):
            raise ValueError(f"{source}: 'images' must be a list")
        self.ids: list[int] = []
        self.names: list[str] = []
        self.widths: list[int] = []
        self.heights: list[int] = []
        self.index: dict[int, int] = {}  # image id -> position
        self.dropped: set[int] = set()
        seen: set[int] = set()
        for i, entry in enumerate(records):
            if not isinstance(entry, Mapping) or not _is_id(entry.get("id")):
                raise ValueError(f"{source}: images[{i}] needs an integer 'id' (64-bit)")
            image_id = int(entry["id"])
            if image_id in seen:
                raise ValueError(f"{source}: image id {image_id} appears more than once")
            seen.add(image_id)
            problem = _image_problem(entry, image_dir)
            if problem is not None:
                problems.add("images", f"{source}: image id {image_id}: {problem}")
                self.dropped.add(image_id)
                continue
            self.index[image_id] = len(self.ids)
            self.ids.append(image_id)
            self.names.append(entry["file_name"])
            self.widths.append(int(entry["width"]))
            self.heights.append(int(entry["height"]))

    def file_name(self, i: int) -> str:
        return self.names[i] if i >= 0 else "?"


def _flag(v: Any) -> int:
    """0 / 1 of an ``iscrowd`` value (0, 1, false, true); -1 when it is something else."""
    if isinstance(v, bool):
        return int(v)
    return int(v) if is_int(v) and v in (0, 1) else -1


def read_coco_split(
    ann_file: str | os.PathLike,
    image_dir: str | os.PathLike,
    *,
    name: str,
    kind: str = "coco",
    skip_invalid: bool = False,
    categories: Sequence[Category] | None = None,
) -> DetectionSplit:
    """A split from its COCO instances file and image folder (rules: module docstring).

    ``categories``: those of the other split, which this file must list identically.
    """
    source, image_dir = Path(ann_file), Path(image_dir)
    data = read_json(source)
    if not isinstance(data, Mapping):
        raise ValueError(f"{source}: a COCO file is an object with 'images' and 'annotations'")
    cats = read_categories(data.get("categories"), source)
    if categories is not None and [(c.id, c.name) for c in cats] != [
        (c.id, c.name) for c in categories
    ]:
        raise ValueError(f"{source}: its categories differ from those of the other split")
    problems = Problems(skip_invalid)
    images = _Images(data.get("images"), source, image_dir, problems)
    anns = data.get("annotations", [])
    if not isinstance(anns, list):
        raise ValueError(f"{source}: 'annotations' must be a list")
    table = _Annotations(anns, source, cats, images, problems, image_dir)
    order = table.order()
    img = table.img[order]
    heights = np.asarray(images.heights, dtype=np.int64)
    widths = np.asarray(images.widths, dtype=np.int64)
    segms = [anns[a].get("segmentation") for a in order]
    has_segm = any(s is not None for s in segms)
    counts = np.bincount(img, minlength=len(images.ids))
    return DetectionSplit(
        name=name,
        kind=kind,
        source=str(source),
        image_dir=str(image_dir),
        categories=cats,
        image_ids=np.asarray(images.ids, dtype=np.int64),
        widths=widths,
        heights=heights,
        file_names=StringTable(images.names),
        ann_start=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        ann_ids=table.ids[order],
        bbox=table.bbox[order],
        labels=table.labels[order],
        iscrowd=table.iscrowd[order].astype(bool),
        difficult=np.zeros(len(order), dtype=bool),
        area=table.area[order],
        keypoints=table.keypoint_array(order),
        segmentations=Segmentations(segms, heights[img], widths[img]) if has_segm else None,
        skipped=dict(problems.counts),
    )


class _Annotations:
    """The annotation columns of a file, validated; ``keep`` marks the usable rows."""

    def __init__(
        self,
        anns: list[Any],
        source: Path,
        cats: Sequence[Category],
        images: _Images,
        problems: Problems,
        image_dir: Path,
    ) -> None:
        self.anns, self.images, self.problems = anns, images, problems
        self.source, self.image_dir = source, image_dir
        n = len(anns)
        for i, a in enumerate(anns):
            if not isinstance(a, Mapping) or not _is_id(a.get("id")):
                raise ValueError(f"{source}: annotations[{i}] needs an integer 'id' (64-bit)")
        self.ids = np.fromiter((a["id"] for a in anns), dtype=np.int64, count=n)
        unique, first_count = np.unique(self.ids, return_counts=True)
        if (first_count > 1).any():
            raise ValueError(f"{source}: annotation id {unique[first_count > 1][0]} repeats")
        raw_img = (a.get("image_id") for a in anns)
        index = images.index
        self.img = np.fromiter(
            (index.get(v, -1) if is_int(v) else -1 for v in raw_img), dtype=np.int64, count=n
        )
        label_of = {c.id: c.label for c in cats}
        self.labels = np.fromiter(
            (label_of.get(v, 0) if is_int(v) else 0 for v in (a.get("category_id") for a in anns)),
            dtype=np.int64,
            count=n,
        )
        self.keep = np.ones(n, dtype=bool)
        on_dropped = np.fromiter(
            (is_int(v) and v in images.dropped for v in (a.get("image_id") for a in anns)),
            dtype=bool,
            count=n,
        )
        if on_dropped.any():  # their image was reported (or, skipping, counted) already
            problems.counts["annotations of dropped images"] = int(on_dropped.sum())
            self.keep &= ~on_dropped
        self._check(
            "image_id",
            self.img < 0,
            lambda i: f"image_id {anns[i].get('image_id')!r} is not an image of the file",
        )
        self._check(
            "category",
            self.labels == 0,
            lambda i: f"category_id {anns[i].get('category_id')!r} is not a category of the file",
        )
        self._check_boxes()
        self._check_flags()
        self.k = next((len(c.keypoints) for c in cats if c.keypoints), None)
        self._check_each("segmentation", self._segmentation_problem)
        self._check_each("keypoints", self._keypoints_problem)

    def where(self, i: int) -> str:
        """``FILE: annotation id N (image PATH)`` for messages."""
        j = int(self.img[i])
        image = self.image_dir / self.images.names[j] if j >= 0 else "unknown"
        return f"{self.source}: annotation id {int(self.ids[i])} (image {image})"

    def _check(self, reason: str, bad: np.ndarray, message) -> None:
        bad = bad & self.keep
        self.problems.add_many(reason, bad, lambda i: f"{self.where(i)}: {message(i)}")
        self.keep &= ~bad

    def _check_each(self, reason: str, problem_of) -> None:
        for i in np.flatnonzero(self.keep).tolist():
            problem = problem_of(i)
            if problem is not None:
                self.problems.add(reason, f"{self.where(i)}: {problem}")
                self.keep[i] = False

    def _size(self, i: int) -> tuple[int, int]:
        j = int(self.img[i])
        return self.images.heights[j], self.images.widths[j]

    def _check_boxes(self) -> None:
        raw = [a.get("bbox") for a in self.anns]
        self.bbox = box_rows(raw)
        img = np.maximum(self.img, 0)
        widths = np.asarray(self.images.widths + [0], dtype=np.float64)[img]
        heights = np.asarray(self.images.heights + [0], dtype=np.float64)[img]
        ok = valid_boxes(self.bbox, widths, heights)

        def message(i: int) -> str:
            h, w = self._size(i)
            return box_problem(raw[i], self.bbox[i], w, h)

        self._check("bbox", ~ok, message)

    def _check_flags(self) -> None:
        crowd = np.fromiter((_flag(a.get("iscrowd", 0)) for a in self.anns), np.int64, len(self))
        self._check(
            "iscrowd",
            crowd < 0,
            lambda i: f"iscrowd must be 0 or 1, got {self.anns[i].get('iscrowd')!r}",
        )
        self.iscrowd = crowd > 0
        box_area = self.bbox[:, 2] * self.bbox[:, 3]
        raw = [a.get("area") for a in self.anns]
        self.area = np.array(
            [v if is_number(v) and v >= 0 else -1.0 for v in raw], dtype=np.float64
        ).reshape(-1)
        missing = np.fromiter((v is None for v in raw), dtype=bool, count=len(self))
        self.area[missing] = box_area[missing]
        self._check(
            "area",
            self.area < 0,
            lambda i: f"area must be a finite number >= 0, got {raw[i]!r:.80}",
        )

    def __len__(self) -> int:
        return len(self.anns)

    def _segmentation_problem(self, i: int) -> str | None:
        segm = self.anns[i].get("segmentation")
        if segm is None:
            return None
        h, w = self._size(i)
        return segmentation_problem(segm, h, w)

    def _keypoints_problem(self, i: int) -> str | None:
        values = self.anns[i].get("keypoints")
        if values is None or values == []:
            return None
        if self.k is None:  # no category names its keypoints: the first annotation decides
            if not (isinstance(values, list) and len(values) % 3 == 0):
                return f"keypoints must be 3K numbers (x, y, visibility), got {values!r:.80}"
            self.k = len(values) // 3
        return keypoints_problem(values, self.k)

    def order(self) -> np.ndarray:
        """The kept rows, grouped by image (file order within an image)."""
        kept = np.flatnonzero(self.keep)
        return kept[np.argsort(self.img[kept], kind="stable")]

    def keypoint_array(self, order: np.ndarray) -> np.ndarray | None:
        """float32 [A, K, 3] of the rows ``order`` (zeros, "not labelled", where absent)."""
        rows = [self.anns[a].get("keypoints") or None for a in order.tolist()]
        if self.k is None or all(r is None for r in rows):
            return None
        out = np.zeros((len(rows), self.k, 3), dtype=np.float32)
        have = [j for j, r in enumerate(rows) if r is not None]
        out[have] = np.asarray([rows[j] for j in have], dtype=np.float32).reshape(-1, self.k, 3)
        return out
