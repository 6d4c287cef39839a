"""PASCAL VOC (a VOCdevkit year folder) -> :class:`DetectionSplit` s, validated as read.

``voc:ROOT`` names a year folder such as ``VOCdevkit/VOC2007``: ``Annotations/<name>.xml``,
``JPEGImages/<name>.jpg`` and ``ImageSets/Main/<set>.txt`` (one image name per line). The
train split is the image set ``train``, the val split ``val``, or ``test`` where the folder has
no ``val.txt``; ``sets=("trainval", "test")`` gives VOC2007's usual protocol.

Conventions, the same as :mod:`cnnkit.evaluation.voc`:

* the XML's boxes are 1-based inclusive pixel indices; they become continuous coordinates
  ``[xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]`` (COCO ``[x, y, w, h]``), so a box
  is as wide as the devkit's ``xmax - xmin + 1``;
* ``difficult`` objects are kept (VOC AP neither rewards nor punishes detecting them; the
  training data set leaves them out of the targets, as py-faster-rcnn does);
* categories: the 20 VOC classes in their usual (alphabetical) order, ids and labels 1..20,
  when every object name is one of them; otherwise (a custom data set in the VOC format) the
  names found in both splits, sorted, ids 1..K;
* image ids: the names' digits ("000005" -> 5, "2008_000123" -> 2008000123) when every name
  is digits with at most one "_" and no two names give the same number, otherwise 1..N over
  the sorted names of both splits; ``coco_gt`` keeps the name as "voc_id";
* annotation ids: 1..A, train then val, in image and object order;
* an image without ``<size>`` (or with 0, or a size no image has: not a whole number in
  1..``MAX_IMAGE_SIDE``) gets its size from the image file's header.

An image set file lists each image once, in UTF-8. The XML is parsed by the standard library's
expat, which neither fetches external entities nor (expat >= 2.4.1) expands entities beyond a
small amplification; besides, a file that declares an entity is refused (VOC annotations have
no DTD), so "billion laughs" files are safe whatever expat the Python links.

Every object is checked by :mod:`cnnkit.data.annotation_checks`' box rule, has a ``<name>``,
and ``<difficult>`` 0 or 1 (absent: 0); errors name the XML file, the object's index and id,
and the image file. A missing XML or image file, or XML that does not parse, is an error naming
it, or with ``skip_invalid`` the image is dropped.
"""

from __future__ import annotations

import math
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from xml.parsers import expat

import numpy as np

from cnnkit.data.annotation_checks import MAX_IMAGE_SIDE, Problems, box_problem, valid_boxes
from cnnkit.data.detection_split import Category, DetectionSplit, StringTable
from cnnkit.data.streaming import _read_errors

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip


@dataclass
class _Object:
    name: str | None
    bbox: list[float]  # COCO [x, y, w, h] (NaN where unreadable)
    difficult: int  # 0, 1, or -1 when malformed
    raw: str  # the <bndbox> as written, for messages


@dataclass
class _Image:
    name: str
    xml: Path
    file: Path
    width: int
    height: int
    objects: list[_Object] = field(default_factory=list)


def voc_set_files(root: Path, sets: tuple[str, str] | None = None) -> dict[str, Path]:
    """``{"train": .../train.txt, "val": .../val.txt (or test.txt)}`` of a year folder."""
    main = root / "ImageSets" / "Main"
    if sets is None:
        val = "val" if (main / "val.txt").is_file() else "test"
        sets = ("train", val)
    out = {}
    for split, name in zip(("train", "val"), sets, strict=True):
        path = main / f"{name}.txt"
        if not path.is_file():
            have = sorted(p.stem for p in main.glob("*.txt") if "_" not in p.stem)
            raise ValueError(f"voc:{root}: no image set {path} (image sets there: {have})")
        out[split] = path
    return out


def _check_root(root: Path) -> None:
    missing = [
        d for d in ("Annotations", "JPEGImages", "ImageSets/Main") if not (root / d).is_dir()
    ]
    if missing:
        years = sorted(p.name for p in root.glob("VOC*") if p.is_dir())
        hint = f" (give a year folder: {', '.join(str(root / y) for y in years)})" if years else ""
        raise ValueError(f"voc:{root}: not a VOC year folder, no {', '.join(missing)}{hint}")


def _names(set_file: Path) -> list[str]:
    try:
        with open(set_file, encoding="utf-8") as fh:
            names = [line.split()[0] for line in fh if line.strip()]
    except UnicodeDecodeError as err:
        raise ValueError(f"{set_file}: not UTF-8 text ({err.reason})") from None
    if len(set(names)) != len(names):
        seen: set[str] = set()
        dup = next(n for n in names if n in seen or seen.add(n))
        raise ValueError(f"{set_file}: image {dup} is listed more than once")
    return names


def _number(node: ET.Element | None, key: str) -> float:
    text = None if node is None else node.findtext(key)
    try:
        value = float(text) if text is not None else math.nan
    except ValueError:
        return math.nan
    return value if math.isfinite(value) else math.nan


def _object(obj: ET.Element) -> _Object:
    name = (obj.findtext("name") or "").strip() or None
    box = obj.find("bndbox")
    x1, y1, x2, y2 = (_number(box, k) for k in ("xmin", "ymin", "xmax", "ymax"))
    raw = "no <bndbox>" if box is None else "".join(ET.tostring(box, "unicode").split())
    flag = (obj.findtext("difficult") or "0").strip() or "0"
    return _Object(
        name,
        [x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1],
        int(flag) if flag in ("0", "1") else -1,
        raw,
    )


def _size(doc: ET.Element, file: Path) -> tuple[int, int]:
    """``(width, height)`` from ``<size>``, else (absent or 0) from the image's header."""
    w, h = _number(doc.find("size"), "width"), _number(doc.find("size"), "height")
    if 0 < w <= MAX_IMAGE_SIDE and 0 < h <= MAX_IMAGE_SIDE and w.is_integer() and h.is_integer():
        return int(w), int(h)
    from PIL import Image

    with Image.open(file) as im:  # reads the header only
        return im.size


def _parse_xml(path: Path) -> ET.Element:
    """The root element of the XML file ``path``; ValueError naming it when it declares an
    entity (checked by a first expat pass that stops at the declaration, before any
    expansion), ``ParseError`` / ``ExpatError`` when it is not XML."""
    data = path.read_bytes()
    guard = expat.ParserCreate()

    def refuse(name, *_):
        raise ValueError(
            f"{path}: declares the XML entity {name!r}; VOC annotations have none (refused: "
            "entity expansion)"
        )

    guard.EntityDeclHandler = refuse
    guard.Parse(data, True)
    return ET.fromstring(data)


def _read_image(root: Path, name: str, problems: Problems) -> _Image | None:
    xml = root / "Annotations" / f"{name}.xml"
    if not xml.is_file():
        problems.add("images", f"voc:{root}: image {name}: no annotation file {xml}")
        return None
    try:
        doc = _parse_xml(xml)
    except (ET.ParseError, expat.ExpatError) as err:
        problems.add("images", f"{xml}: not valid XML: {err}")
        return None
    except ValueError as err:  # an entity declaration
        problems.add("images", str(err))
        return None
    file = root / "JPEGImages" / f"{name}.jpg"
    given = Path((doc.findtext("filename") or "").strip())
    if not file.is_file() and not given.is_absolute() and ".." not in given.parts:
        file = root / "JPEGImages" / given  # (a file of JPEGImages/ only)
    if not file.is_file():
        problems.add("images", f"{xml}: image file {root / 'JPEGImages' / name}.jpg not found")
        return None
    try:
        width, height = _size(doc, file)
    except _read_errors() as err:
        problems.add("images", f"{xml}: no <size>, and the image {file} is unreadable: {err}")
        return None
    objects = [_object(obj) for obj in doc.iter("object")]
    return _Image(name, xml, file, width, height, objects)


def _categories(images: list[_Image]) -> tuple[Category, ...]:
    found = {o.name for im in images for o in im.objects if o.name is not None}
    names = VOC_CLASSES if found <= set(VOC_CLASSES) else tuple(sorted(found))
    return tuple(Category(id=i, name=n, label=i) for i, n in enumerate(names, start=1))


def _image_ids(names: list[str]) -> dict[str, int]:
    """Image name -> id (module docstring)."""
    digits = [re.fullmatch(r"(\d+)(?:_(\d+))?", n) for n in names]
    if all(digits):
        ids = {
            n: int("".join(g or "" for g in m.groups())) for n, m in zip(names, digits, strict=True)
        }
        if len(set(ids.values())) == len(ids):
            return ids
    return {n: i for i, n in enumerate(sorted(set(names)), start=1)}


def read_voc(
    root: str | os.PathLike, *, skip_invalid: bool = False, sets: tuple[str, str] | None = None
) -> dict[str, DetectionSplit]:
    """``{"train": split, "val": split}`` of a VOC year folder (rules: module docstring)."""
    root = Path(root)
    _check_root(root)
    files = voc_set_files(root, sets)
    problems = {s: Problems(skip_invalid) for s in files}
    images = {
        s: [im for n in _names(f) if (im := _read_image(root, n, problems[s])) is not None]
        for s, f in files.items()
    }
    cats = _categories([im for ims in images.values() for im in ims])
    ids = _image_ids([im.name for ims in images.values() for im in ims])
    out, first_id = {}, 1
    for split, ims in images.items():
        out[split] = _split(root, split, ims, cats, ids, first_id, problems[split])
        first_id += sum(len(im.objects) for im in ims)
    return out


def _split(
    root: Path,
    split: str,
    images: list[_Image],
    cats: tuple[Category, ...],
    ids: dict[str, int],
    first_id: int,
    problems: Problems,
) -> DetectionSplit:
    objects = [o for im in images for o in im.objects]
    n = len(objects)
    img = np.repeat(np.arange(len(images)), [len(im.objects) for im in images]).astype(np.int64)
    ann_ids = np.arange(first_id, first_id + n, dtype=np.int64)
    widths = np.asarray([im.width for im in images], dtype=np.int64)
    heights = np.asarray([im.height for im in images], dtype=np.int64)
    bbox = np.asarray([o.bbox for o in objects], dtype=np.float64).reshape(n, 4)
    label_of = {c.name: c.label for c in cats}
    labels = np.asarray([label_of.get(o.name, 0) for o in objects], dtype=np.int64)
    difficult = np.asarray([o.difficult for o in objects], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum([len(im.objects) for im in images])])

    def where(a: int) -> str:
        im = images[int(img[a])]
        j = a - int(starts[img[a]])
        return f"{im.xml}: object {j} ({objects[a].name!r}, annotation id {ann_ids[a]}) (image {im.file})"

    keep = np.ones(n, dtype=bool)
    checks = (
        ("name", labels == 0, lambda a: "has no <name>"),
        ("difficult", difficult < 0, lambda a: "<difficult> must be 0 or 1"),
        (
            "bbox",
            ~valid_boxes(bbox, widths[img].astype(np.float64), heights[img].astype(np.float64)),
            lambda a: box_problem(
                objects[a].raw, bbox[a], int(widths[img[a]]), int(heights[img[a]])
            ),
        ),
    )
    for reason, bad, message in checks:
        bad = bad & keep
        problems.add_many(reason, bad, lambda a, m=message: f"{where(a)}: {m(a)}")
        keep &= ~bad
    counts = np.bincount(img[keep], minlength=len(images))
    return DetectionSplit(
        name=split,
        kind="voc",
        source=str(root),
        image_dir=str(root / "JPEGImages"),
        categories=cats,
        image_ids=np.asarray([ids[im.name] for im in images], dtype=np.int64),
        widths=widths,
        heights=heights,
        file_names=StringTable(str(im.file.relative_to(root / "JPEGImages")) for im in images),
        ann_start=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        ann_ids=ann_ids[keep],
        bbox=bbox[keep],
        labels=labels[keep],
        iscrowd=np.zeros(int(keep.sum()), dtype=bool),
        difficult=difficult[keep] == 1,
        area=bbox[keep, 2] * bbox[keep, 3],
        voc_ids=StringTable(im.name for im in images),
        skipped=dict(problems.counts),
    )
