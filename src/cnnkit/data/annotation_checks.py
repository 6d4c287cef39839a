"""Validation of detection annotations as they are read (COCO JSON and VOC XML alike).

Each check says what is wrong with one entry in words a user can act on; the reader prefixes
the message with the file, the annotation id and the image file. :class:`Problems` decides what
happens to a bad entry: the first one is a ``ValueError`` (the default), or with
``skip_invalid`` every bad entry is dropped and counted by reason.

The rules:

* box ``[x, y, w, h]``: 4 finite numbers, ``w > 0`` and ``h > 0``, inside the ``W x H`` image
  up to :data:`BOX_TOLERANCE` pixels on each side (annotation tools and rounding leave boxes a
  fraction of a pixel outside; the reader clips them), and still of positive size once clipped;
* segmentation: polygons (a non-empty list of even-length lists of >= 6 finite numbers: at
  least 3 points, each coordinate within ``-S..2S`` for the image's longer side ``S``: pycocotools
  rasterizes a polygon in time proportional to its extent, minutes at 10^8 px, and crashes
  beyond) or an RLE dict ``{"size": [H, W], "counts": str | [int, ...]}`` of the
  image's size (uncompressed counts: non-negative integers adding up to ``H * W``; compressed
  counts: pycocotools' string of 6-bit characters, whose runs must add up to ``H * W`` too);
* keypoints: ``3K`` finite numbers ``(x, y, v)`` with ``K`` the category's keypoint count and
  visibility ``v`` in ``{0, 1, 2}`` (COCO: 0 not labelled, 1 labelled but hidden, 2 visible),
  coordinates within float32's range (the keypoints are held as float32).

A number is a JSON number: not a boolean, not a string, and finite (an integer beyond float64's
range is not).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import numpy as np

# Boxes may stick out of the image by this many pixels (then they are clipped).
BOX_TOLERANCE = 1.0
# The largest image side an annotation file may declare (PIL's images are int32-sized).
MAX_IMAGE_SIDE = 2**31 - 1
_FLOAT32_MAX = float(np.finfo(np.float32).max)


class Problems:
    """The invalid entries of one split: an error, or (``skip``) dropped and counted by reason."""

    def __init__(self, skip: bool) -> None:
        self.skip = skip
        self.counts: dict[str, int] = {}

    def add(self, reason: str, message: str) -> None:
        """One bad entry: raise ``ValueError(message)`` unless skipping, then count it."""
        if not self.skip:
            raise ValueError(message)
        self.counts[reason] = self.counts.get(reason, 0) + 1

    def add_many(self, reason: str, bad: np.ndarray, message: Callable[[int], str]) -> None:
        """Entries ``bad`` (bool [A]): raise for the first (``message(i)``) or count them all."""
        index = np.flatnonzero(bad)
        if index.size:
            if not self.skip:
                raise ValueError(message(int(index[0])))
            self.counts[reason] = self.counts.get(reason, 0) + int(index.size)


def is_int(v: Any) -> bool:
    """A JSON integer (not a boolean)."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def is_number(v: Any) -> bool:
    """A finite JSON number (not a boolean; not an integer beyond float64's range)."""
    if not isinstance(v, (int, float, np.integer, np.floating)) or isinstance(v, (bool, np.bool_)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int beyond float's range (JSON allows 1e400 written out)
        return False


def _all_numbers(values: list[Any]) -> bool:
    """Whether every value is a finite number; plain ints and floats (what JSON gives) take a
    C-speed path (checking COCO's ~30M polygon coordinates one by one takes minutes)."""
    if set(map(type, values)) <= _JSON_NUMBERS:
        try:
            return all(map(math.isfinite, values))
        except OverflowError:  # an int beyond float's range
            return False
    return all(map(is_number, values))


_JSON_NUMBERS = frozenset({int, float})


def box_rows(values: list[Any]) -> np.ndarray:
    """``float64 [A, 4]`` of the ``bbox`` fields; a row that is not 4 numbers is NaN (so the
    box check reports it)."""
    try:
        # Without a dtype numpy keeps strings ("3" -> '<U1') apart from numbers, but not a
        # boolean among numbers ([true, 1, 2, 2] -> int64): those rows take the slow path.
        rows = np.array(values)
        if (
            rows.shape == (len(values), 4)
            and rows.dtype.kind in "iuf"
            and bool not in set(map(type, itertools.chain.from_iterable(values)))
        ):
            rows = rows.astype(np.float64)
            return np.where(np.isfinite(rows), rows, np.nan)
    except (TypeError, ValueError, OverflowError):
        pass
    rows = np.full((len(values), 4), np.nan)
    for i, v in enumerate(values):
        if isinstance(v, (list, tuple)) and len(v) == 4 and all(map(is_number, v)):
            rows[i] = v
    return rows


def clipped_xyxy(xywh: np.ndarray, width: np.ndarray, height: np.ndarray) -> np.ndarray:
    """``[A, 4]`` xyxy of COCO boxes ``xywh`` [A, 4] clipped to their ``width x height``
    images ([A] each): the boxes the detectors train on."""
    x1 = np.clip(xywh[:, 0], 0, width)
    y1 = np.clip(xywh[:, 1], 0, height)
    x2 = np.clip(xywh[:, 0] + xywh[:, 2], 0, width)
    y2 = np.clip(xywh[:, 1] + xywh[:, 3], 0, height)
    return np.stack([x1, y1, x2, y2], axis=1)


def valid_boxes(xywh: np.ndarray, width: np.ndarray, height: np.ndarray) -> np.ndarray:
    """bool [A]: the box rules of the module docstring (NaN rows are invalid)."""
    x, y, w, h = xywh.T
    t = BOX_TOLERANCE
    with np.errstate(invalid="ignore"):
        inside = (x >= -t) & (y >= -t) & (x + w <= width + t) & (y + h <= height + t)
        ok = np.isfinite(xywh).all(axis=1) & (w > 0) & (h > 0) & inside
        xyxy = clipped_xyxy(np.nan_to_num(xywh), width, height)
        return ok & (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])


def box_problem(box: Any, xywh: np.ndarray, width: int, height: int) -> str:
    """Why the box (as given: ``box``; as read: ``xywh`` [4]) of a ``width x height`` image is
    invalid."""
    if not np.isfinite(xywh).all():
        return f"bbox must be 4 finite numbers [x, y, width, height], got {_short(box)}"
    x, y, w, h = (float(v) for v in xywh)
    if w <= 0 or h <= 0:
        return f"bbox {_short(box)} has a non-positive size {w:g} x {h:g}"
    return (
        f"bbox {_short(box)} (x1, y1, x2, y2 = {x:g}, {y:g}, {x + w:g}, {y + h:g}) lies outside "
        f"the {width} x {height} image (by more than {BOX_TOLERANCE:g} px, or entirely)"
    )


def segmentation_problem(segm: Any, height: int, width: int) -> str | None:
    """Why ``segm`` is not a valid segmentation of a ``height x width`` image (None if it is)."""
    if isinstance(segm, dict):
        return _rle_problem(segm, height, width)
    if not isinstance(segm, list) or not segm:
        return f"segmentation must be polygons or an RLE dict, got {_short(segm)}"
    for j, part in enumerate(segm):
        if not isinstance(part, list) or len(part) < 6 or len(part) % 2:
            return (
                f"segmentation[{j}]: a polygon is a list of at least 3 x, y pairs (an even "
                f"count >= 6 of numbers), got {_short(part)}"
            )
        if not _all_numbers(part):
            bad = next(v for v in part if not is_number(v))
            return f"segmentation[{j}]: {_short(bad)} is not a finite number"
        reach = max(height, width)
        if min(part) < -reach or max(part) > 2 * reach:
            return (
                f"segmentation[{j}]: a point lies far outside the {width} x {height} image "
                f"(coordinates must be within -{reach}..{2 * reach})"
            )
    return None


def _rle_problem(segm: dict[str, Any], height: int, width: int) -> str | None:
    size, counts = segm.get("size"), segm.get("counts")
    if size is None or counts is None:
        return "segmentation: an RLE needs 'size' and 'counts'"
    if not (isinstance(size, list) and len(size) == 2 and all(map(is_int, size))):
        return f"segmentation: RLE size must be [height, width], got {_short(size)}"
    if list(size) != [height, width]:
        return f"segmentation: RLE size {list(size)} differs from the image's [{height}, {width}]"
    if isinstance(counts, str):
        return _compressed_rle_problem(counts, height * width)
    if not isinstance(counts, list) or not all(is_int(c) and c >= 0 for c in counts):
        return "segmentation: RLE counts must be a compressed string or non-negative integers"
    if sum(counts) != height * width:
        return (
            f"segmentation: RLE counts cover {sum(counts)} pixels, the image has "
            f"{height} x {width} = {height * width}"
        )
    return None


def _compressed_rle_problem(counts: str, pixels: int) -> str | None:
    """Why ``counts`` is not a compressed RLE of ``pixels`` pixels (None if it is).

    pycocotools' format (``rleFrString``): each run length is a little-endian sequence of
    6-bit groups, one character (``chr(48 + group)``) each, 5 bits of value and a continuation
    bit (0x20); the last group's 0x10 bit is the sign; from the third run on, a run is stored as
    its difference to the run two before. pycocotools decodes a string whose runs fall short of
    the image without a word (the rest of the mask is uninitialized memory), so check it here.
    """
    if not counts.isascii():
        return "segmentation: compressed RLE counts must be ASCII"
    runs: list[int] = []
    value = shift = 0
    for char in counts:
        group = ord(char) - 48
        if not 0 <= group < 64:
            return f"segmentation: {char!r} is not a character of compressed RLE counts"
        value |= (group & 0x1F) << shift
        shift += 5
        if group & 0x20:
            continue
        if group & 0x10:
            value -= 1 << shift
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            return f"segmentation: compressed RLE counts decode to a negative run ({value})"
        runs.append(value)
        value = shift = 0
    if shift:
        return "segmentation: compressed RLE counts end in the middle of a run"
    if sum(runs) != pixels:
        return (
            f"segmentation: compressed RLE counts cover {sum(runs)} pixels, the image has {pixels}"
        )
    return None


def keypoints_problem(values: Any, k: int) -> str | None:
    """Why ``values`` are not ``k`` keypoints ``(x, y, v)`` (None if they are)."""
    if not isinstance(values, list) or len(values) != 3 * k:
        n = len(values) if isinstance(values, list) else _short(values)
        return f"keypoints must be 3 x {k} numbers (x, y, visibility per keypoint), got {n}"
    if not _all_numbers(values):
        bad = next(v for v in values if not is_number(v))
        return f"keypoints: {_short(bad)} is not a finite number"
    if max(map(abs, values), default=0) > _FLOAT32_MAX:
        bad = next(v for v in values if abs(v) > _FLOAT32_MAX)
        return f"keypoints: {_short(bad)} is beyond float32's range"
    bad_v = [v for v in values[2::3] if v not in (0, 1, 2)]
    if bad_v:
        return f"keypoints: visibility must be 0, 1 or 2, got {bad_v[0]!r}"
    return None


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."
