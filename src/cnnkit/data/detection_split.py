"""One split of a detection data set, held as flat numpy arrays, and its COCO ground truth.

COCO train2017 has 118k images and 860k annotations. Held as one Python dict per annotation
(as pycocotools does) it takes gigabytes, and every forked DataLoader worker that reads it
touches the objects' reference counts and so copies their pages ("the DataLoader memory
leak"). Here a split is a few numpy arrays: per image its id, size and file name (one byte
buffer), per annotation its id, box, label, flags, area, keypoints, and the segmentations as
flat coordinate / byte buffers with offsets. Workers share them copy-on-write, untouched.
The annotations are sorted by image: those of image ``i`` are rows
``ann_start[i]:ann_start[i + 1]``.

Boxes are kept as the file gives them (COCO ``[x, y, w, h]``, float64), so :meth:`coco_gt` is
the file's ground truth (less what ``skip_invalid`` dropped); :meth:`DetectionSplit.record`
gives them as ``x1, y1, x2, y2`` clipped to the image, the boxes detectors train on.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cnnkit.data.annotation_checks import clipped_xyxy


class StringTable:
    """Strings ``[N]`` in one UTF-8 byte buffer plus end offsets (no Python object per string)."""

    def __init__(self, strings: Iterable[str]) -> None:
        encoded = [s.encode("utf-8", "surrogateescape") for s in strings]
        self._bytes = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self._ends = np.cumsum([len(e) for e in encoded], dtype=np.int64)

    def __len__(self) -> int:
        return int(self._ends.shape[0])

    def __getitem__(self, i: int) -> str:
        start = int(self._ends[i - 1]) if i > 0 else 0
        return self._bytes[start : int(self._ends[i])].tobytes().decode("utf-8", "surrogateescape")

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def nbytes(self) -> int:
        return int(self._bytes.nbytes + self._ends.nbytes)


# Segmentation kinds.
NO_SEGMENTATION, POLYGONS, RLE = 0, 1, 2


class Segmentations:
    """Raw COCO segmentations ``[A]`` (validated), as flat arrays.

    Polygons: annotation ``a`` has parts ``part_start[a]:part_start[a + 1]``, part ``p`` the
    coordinates ``coords[coord_start[p]:coord_start[p + 1]]`` (x1, y1, x2, y2, ..., float64:
    the JSON values exactly, so masks rasterize as pycocotools rasterizes the file). RLE: the
    compressed counts as ASCII bytes ``rle[rle_start[a]:rle_start[a + 1]]``; its size is the
    image's. Uncompressed RLE (COCO's crowd regions) is compressed when read: the same mask.
    """

    def __init__(self, segms: Sequence[Any], heights: np.ndarray, widths: np.ndarray) -> None:
        from pycocotools import mask as mask_utils

        n = len(segms)
        self.kind = np.zeros(n, dtype=np.int8)
        parts_per_ann = np.zeros(n, dtype=np.int64)
        rle_len = np.zeros(n, dtype=np.int64)
        part_lengths: list[int] = []
        polygons: list[list[float]] = []
        rles: list[bytes] = []
        for a, segm in enumerate(segms):
            if isinstance(segm, list):
                self.kind[a] = POLYGONS
                parts_per_ann[a] = len(segm)
                part_lengths += [len(p) for p in segm]
                polygons += segm
            elif isinstance(segm, dict):
                self.kind[a] = RLE
                counts = segm["counts"]
                if isinstance(counts, list):  # uncompressed: compress it
                    h, w = int(heights[a]), int(widths[a])
                    counts = mask_utils.frPyObjects(segm, h, w)["counts"]
                data = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
                rles.append(data)
                rle_len[a] = len(data)
        self.part_start = _offsets(parts_per_ann)
        self.coord_start = _offsets(np.asarray(part_lengths, dtype=np.int64))
        total = int(self.coord_start[-1])
        flat = (v for p in polygons for v in p)
        self.coords = np.fromiter(flat, dtype=np.float64, count=total)
        self.rle_start = _offsets(rle_len)
        self.rle = np.frombuffer(b"".join(rles), dtype=np.uint8)

    @property
    def nbytes(self) -> int:
        arrays = (self.kind, self.part_start, self.coord_start, self.coords, self.rle_start)
        return sum(int(x.nbytes) for x in arrays) + int(self.rle.nbytes)

    def raw(self, a: int, height: int, width: int) -> list[list[float]] | dict[str, Any] | None:
        """Annotation ``a``'s segmentation as COCO JSON: polygons or ``{"size", "counts"}``."""
        kind = self.kind[a]
        if kind == POLYGONS:
            lo, hi = self.part_start[a], self.part_start[a + 1]
            bounds = self.coord_start[lo : hi + 1]
            return [self.coords[s:e].tolist() for s, e in zip(bounds[:-1], bounds[1:], strict=True)]
        if kind == RLE:
            counts = self.rle[self.rle_start[a] : self.rle_start[a + 1]].tobytes()
            return {"size": [height, width], "counts": counts.decode("ascii")}
        return None

    def masks(self, rows: Sequence[int], height: int, width: int) -> np.ndarray:
        """``uint8 [N, H, W]`` binary masks of annotations ``rows`` of one ``height x width``
        image (zeros where an annotation has no segmentation), decoded in one call."""
        from pycocotools import mask as mask_utils

        out = np.zeros((len(rows), height, width), dtype=np.uint8)
        rles, where = [], []
        for j, a in enumerate(rows):
            segm = self.raw(a, height, width)
            if isinstance(segm, list):
                rles.append(mask_utils.merge(mask_utils.frPyObjects(segm, height, width)))
            elif segm is not None:
                rles.append({"size": segm["size"], "counts": segm["counts"].encode("ascii")})
            else:
                continue
            where.append(j)
        if rles:
            with warnings.catch_warnings():
                # pycocotools' decode trips numpy 2's __array__(copy=...) deprecation; harmless.
                warnings.simplefilter("ignore", DeprecationWarning)
                decoded = mask_utils.decode(rles)  # [H, W, N] Fortran order
            out[where] = np.moveaxis(decoded, -1, 0)
        return out


def _offsets(counts: np.ndarray) -> np.ndarray:
    """``int64 [N + 1]``: 0 then the running sum of ``counts`` [N]."""
    out = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=out[1:])
    return out


@dataclass(frozen=True)
class Category:
    """A category of the data set: its own ``id`` (COCO: 1..90 with gaps) and the contiguous
    training ``label`` (1..K; 0 is the background) that detectors predict."""

    id: int
    name: str
    label: int
    supercategory: str = ""
    keypoints: tuple[str, ...] = ()
    skeleton: tuple[tuple[int, int], ...] = ()  # 1-based keypoint index pairs (COCO)
    keypoint_sigmas: tuple[float, ...] | None = None  # OKS per-keypoint sigmas

    def to_coco(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "name": self.name}
        if self.supercategory:
            out["supercategory"] = self.supercategory
        if self.keypoints:
            out["keypoints"] = list(self.keypoints)
            out["skeleton"] = [list(p) for p in self.skeleton]
        if self.keypoint_sigmas is not None:
            out["keypoint_sigmas"] = list(self.keypoint_sigmas)
        return out


def keypoint_flip_map(names: Sequence[str]) -> list[int]:
    """The keypoint permutation of a horizontal flip: ``flip_map[k]`` is the index of the name
    with "left" and "right" swapped (case kept: "Left_Hand" <-> "Right_Hand"), or ``k`` when
    that name is absent or the name says neither ("nose", "top"). An involution."""
    index = {n: i for i, n in reversed(list(enumerate(names)))}
    out = []
    for k, name in enumerate(names):
        out.append(index.get(_swap_left_right(name), k))
    return out


def _swap_left_right(name: str) -> str:
    pairs = (("left", "right"), ("Left", "Right"), ("LEFT", "RIGHT"))
    out = name
    for a, b in pairs:
        out = out.replace(a, "\0").replace(b, a).replace("\0", b)
    return out


@dataclass
class ImageRecord:
    """One image and its annotations (``N`` of them), as the training data set reads it."""

    path: str
    image_id: int
    width: int
    height: int
    boxes: np.ndarray  # float32 [N, 4] x1, y1, x2, y2, clipped to the image
    labels: np.ndarray  # int64 [N] in 1..K
    iscrowd: np.ndarray  # bool [N]
    difficult: np.ndarray  # bool [N] (VOC; False elsewhere)
    ann_ids: np.ndarray  # int64 [N]
    keypoints: np.ndarray | None  # float32 [N, K, 3] or None
    segmentations: list[Any]  # [N] raw COCO segmentations (None where absent)


@dataclass
class DetectionSplit:
    """One split (``train`` / ``val``) of a detection data set: ``I`` images, ``A`` annotations.

    Attributes:
        name: "train" or "val".
        kind: "coco", "voc" or "scenes".
        source: the annotation file (COCO) or devkit folder (VOC), for messages.
        image_dir: the folder that the file names are relative to.
        categories: the data set's categories, in label order (label ``i`` is ``[i - 1]``).
        image_ids: int64 [I]; widths, heights: int64 [I]; file_names: [I].
        ann_start: int64 [I + 1] (annotations of image ``i``: ``ann_start[i]:ann_start[i+1]``).
        ann_ids: int64 [A]; bbox: float64 [A, 4] COCO ``[x, y, w, h]`` as given;
        labels: int64 [A] in 1..K; iscrowd, difficult: bool [A]; area: float64 [A].
        keypoints: float32 [A, K, 3] or None; segmentations: :class:`Segmentations` or None.
        voc_ids: the VOC image names (file stems), or None.
        skipped: dropped entries by reason (``skip_invalid``).
    """

    name: str
    kind: str
    source: str
    image_dir: str
    categories: tuple[Category, ...]
    image_ids: np.ndarray
    widths: np.ndarray
    heights: np.ndarray
    file_names: StringTable
    ann_start: np.ndarray
    ann_ids: np.ndarray
    bbox: np.ndarray
    labels: np.ndarray
    iscrowd: np.ndarray
    difficult: np.ndarray
    area: np.ndarray
    keypoints: np.ndarray | None = None
    segmentations: Segmentations | None = None
    voc_ids: StringTable | None = None
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.image_ids.shape[0])

    @property
    def num_annotations(self) -> int:
        return int(self.ann_ids.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    @property
    def label_to_category(self) -> list[int]:
        """``[K + 1]``: label -> the data set's category id (index 0, the background: -1)."""
        return [-1] + [c.id for c in self.categories]

    @property
    def category_names(self) -> list[str]:
        """``[K + 1]``: label -> name (index 0: "__background__")."""
        return ["__background__"] + [c.name for c in self.categories]

    @property
    def keypoint_names(self) -> list[str]:
        """The keypoint names (of the categories that have keypoints; [] without)."""
        return next((list(c.keypoints) for c in self.categories if c.keypoints), [])

    @property
    def flip_map(self) -> list[int] | None:
        """:func:`keypoint_flip_map` of :attr:`keypoint_names`, None without keypoints."""
        if self.keypoints is None:
            return None
        names = self.keypoint_names or [str(k) for k in range(self.keypoints.shape[1])]
        return keypoint_flip_map(names)

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays (what the split costs in memory, roughly)."""
        arrays = [self.image_ids, self.widths, self.heights, self.ann_start, self.ann_ids]
        arrays += [self.bbox, self.labels, self.iscrowd, self.difficult, self.area]
        total = sum(int(a.nbytes) for a in arrays) + self.file_names.nbytes
        if self.keypoints is not None:
            total += int(self.keypoints.nbytes)
        if self.segmentations is not None:
            total += self.segmentations.nbytes
        return total + (self.voc_ids.nbytes if self.voc_ids is not None else 0)

    def path(self, i: int) -> str:
        """The image file of image ``i``."""
        return os.path.join(self.image_dir, self.file_names[i])

    def rows(self, i: int) -> slice:
        """The annotation rows of image ``i``."""
        return slice(int(self.ann_start[i]), int(self.ann_start[i + 1]))

    def record(self, i: int) -> ImageRecord:
        """Image ``i`` and its annotations (boxes xyxy clipped to the image, float32)."""
        r = self.rows(i)
        w, h = int(self.widths[i]), int(self.heights[i])
        kps = None if self.keypoints is None else self.keypoints[r]
        segms = self.segmentations
        return ImageRecord(
            path=self.path(i),
            image_id=int(self.image_ids[i]),
            width=w,
            height=h,
            boxes=clipped_xyxy(self.bbox[r], w, h).astype(np.float32),
            labels=self.labels[r].copy(),
            iscrowd=self.iscrowd[r].copy(),
            difficult=self.difficult[r].copy(),
            ann_ids=self.ann_ids[r].copy(),
            keypoints=kps,
            segmentations=[
                None if segms is None else segms.raw(a, h, w) for a in range(r.start, r.stop)
            ],
        )

    def masks(self, i: int) -> np.ndarray:
        """``uint8 [N, H, W]``: the binary masks of image ``i``'s annotations."""
        if self.segmentations is None:
            raise ValueError(f"{self.source}: the {self.name} split has no segmentations")
        r = self.rows(i)
        h, w = int(self.heights[i]), int(self.widths[i])
        return self.segmentations.masks(range(r.start, r.stop), h, w)

    def coco_gt(self) -> dict[str, Any]:
        """The split's ground truth in the COCO format (as ``cnnkit.evaluation.coco_evaluate``
        and ``voc_evaluate`` read it): images (id, file_name, width, height; VOC: "voc_id"),
        annotations (the data set's category ids, ``bbox`` ``[x, y, w, h]`` as given, area,
        iscrowd; VOC: "difficult"; "segmentation" and "keypoints" / "num_keypoints" where the
        data set has them) and the categories (with keypoints, skeleton, keypoint_sigmas)."""
        images = []
        for i in range(len(self)):
            image = {
                "id": int(self.image_ids[i]),
                "file_name": self.file_names[i],
                "width": int(self.widths[i]),
                "height": int(self.heights[i]),
            }
            if self.voc_ids is not None:
                image["voc_id"] = self.voc_ids[i]
            images.append(image)
        return {
            "images": images,
            "annotations": self._coco_annotations(),
            "categories": [c.to_coco() for c in self.categories],
        }

    def _coco_annotations(self) -> list[dict[str, Any]]:
        cat_of = np.asarray(self.label_to_category, dtype=np.int64)
        image_of = np.repeat(np.arange(len(self)), np.diff(self.ann_start))
        columns = {
            "id": self.ann_ids.tolist(),
            "image_id": self.image_ids[image_of].tolist(),
            "category_id": cat_of[self.labels].tolist(),
            "bbox": self.bbox.tolist(),
            "area": self.area.tolist(),
            "iscrowd": self.iscrowd.astype(np.int64).tolist(),
        }
        if self.kind == "voc":
            columns["difficult"] = self.difficult.astype(np.int64).tolist()
        if self.keypoints is not None:
            kps = self.keypoints.reshape(len(self.ann_ids), -1)
            columns["keypoints"] = kps.tolist()
            columns["num_keypoints"] = np.count_nonzero(kps[:, 2::3] > 0, axis=1).tolist()
        out = [dict(zip(columns, v, strict=True)) for v in zip(*columns.values(), strict=True)]
        segms = self.segmentations
        if segms is not None:
            heights, widths = self.heights[image_of].tolist(), self.widths[image_of].tolist()
            for a, ann in enumerate(out):
                segm = segms.raw(a, heights[a], widths[a])
                if segm is not None:
                    ann["segmentation"] = segm
        return out
