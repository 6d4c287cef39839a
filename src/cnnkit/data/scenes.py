"""Synthetic digit scenes: the embedded default detection data set, in the COCO layout.

Each scene is an RGB image (grey or coloured) with 1 to :data:`MAX_DIGITS` handwritten digits
(scikit-learn's bundled 8x8 digits, values 0..16, no download) upsampled bicubically to
varied sizes (about 12 to 64 px tall at 128 x 128; the range scales with the image size) and
placed on a textured background (a random colour gradient, smooth low-frequency texture and
pixel noise) with clutter that is not a digit (blobs, long thin lines, arcs, dots).

Layout written by :func:`generate_scenes` (the COCO 2017 layout with split names
``train`` / ``val``)::

    OUT/annotations/instances_train.json   OUT/train/000000.png ...
    OUT/annotations/instances_val.json     OUT/val/000000.png ...

Annotations (one per digit):

* ``category_id`` 1..10 for the digits "0".."9";
* ``segmentation``: the digit's pixels (its upsampled intensity above :data:`MASK_LEVEL`) as
  COCO RLE from ``pycocotools.mask.encode`` (``counts`` a str); ``area`` = its pixel count;
  ``bbox`` ``[x, y, w, h]``: the tight box of the mask in COCO's continuous coordinates
  (pixel ``i`` spans ``[i, i + 1]``, as ``pycocotools.mask.toBbox``);
* ``keypoints`` ``[x, y, 2] * 4``: the mask's top-, bottom-, left- and right-most pixels as
  integer pixel indices (COCO's convention; a pixel's centre is at ``+ 0.5``). Ties: the top
  (bottom) keypoint is the middle pixel of the mask's first (last) row, the left (right) one
  the middle pixel of its first (last) column: the ``(n - 1) // 2``-th of the ``n`` mask
  pixels of that row or column in index order. It is always a mask pixel (a row may have gaps,
  so the middle of the row's extent would not be);
* ``iscrowd`` 0, ``num_keypoints`` 4.

Digits never overlap each other's ink (an antialiased digit is drawn over the background
only, so every mask holds exactly the pixels its digit coloured) and the boxes of a scene
overlap by IoU <= :data:`MAX_BOX_IOU`. The train and val scenes draw from disjoint pools of
the 1,797 digits (a fixed 80/20 split per class, the same for every seed), so val AP measures
digits the detector has not seen.

Every image is a function of ``(seed, split, index)`` alone (its own numpy generator), so the
data set is deterministic per seed, train and val come from different streams, and images
could be generated in any order.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Bump when the generated pictures or annotations change: the cache directory is named by it.
FORMAT_VERSION = 2  # 2: keypoint_sigmas measured (were 0.05 each)
# Image ids are unique across the splits, as in COCO 2017 (train 1.., val 1,000,000,001..):
# proposal files and results are keyed by image id alone.
SPLIT_ID_STRIDE = 1_000_000_000
DEFAULT_IMAGES = 2000
DEFAULT_VAL_IMAGES = 500
DEFAULT_SIZE = 128
MIN_SIZE, MAX_SIZE = 32, 4096
# Scenes per split at most: 8x COCO's train2017, ~40 min of rendering on 2 cores, a few GB of
# annotations held until the JSON is written. Beyond, the chunk list and annotations alone
# exhaust memory (a typo of 10^11 was killed by the OOM killer, taking others with it), and
# image ids would run into the val split's (SPLIT_ID_STRIDE).
MAX_IMAGES = 1_000_000
SPLITS = ("train", "val")
CATEGORY_NAMES = tuple(str(d) for d in range(10))
KEYPOINT_NAMES = ("top", "bottom", "left", "right")
# 1-based keypoint pairs (COCO): top - left - bottom - right - top, the outline of a diamond.
SKELETON = ((1, 3), (3, 2), (2, 4), (4, 1))
# OKS sigma per keypoint (COCO's k_i / 2; OKS = exp(-d^2 / (2 s^2 (2 sigma)^2)), s^2 = area),
# measured the way COCO measured its own: sigma_i^2 = E[d_i^2 / s^2], the spread of equally
# valid placements of keypoint i relative to the object's scale (COCO: 5,000 redundantly
# annotated images; sigmas 0.025 for the eyes to 0.107 for the hips). Here every mask pixel of
# the extreme row (column) is an equally valid "top" ("left") point, and the middle one is only
# a convention: the RMS distance from it to them, over the 1,662 val digits of seed 0, is
# 0.1055, 0.1173, 0.2869, 0.2088 x sqrt(area). Left and right are the vague ones: a vertical
# stroke (a 1, the stem of a 4) is extreme along its whole length. At the median area (330 px)
# OKS = 0.5 at d = 2.5 px (top) and 6.5 px (left); at 0.05 for all it would be 1.1 px for a
# digit of 50 px area, tighter than the pixel grid of its ties.
# tests/data/test_scenes.py re-measures them on generated scenes.
KEYPOINT_SIGMAS = (0.11, 0.12, 0.29, 0.21)

# Digit heights at 128 px (scaled with the image size; never below 8 px, the digits' own size).
DIGIT_HEIGHT = (12, 64)
# Width = height x this factor: handwriting is a little narrower than the 8x8 box.
DIGIT_ASPECT = (0.8, 1.05)
MAX_DIGITS = 6
MAX_BOX_IOU = 0.3
PLACEMENT_TRIES = 8
# Upsampled intensity (digit values / 16) above which a pixel is the digit's (its mask), and
# the ramp of the antialiased ink around it: opacity 0 at INK_LEVELS[0], 1 at INK_LEVELS[1],
# 0.5 at the mask level, so the mask is exactly the pixels drawn more than half in the
# digit's colour. 0.55 opens the loops that a lower level fills (the 6s and 8s of 8x8 digits).
MASK_LEVEL = 0.55
INK_LEVELS = (MASK_LEVEL - 0.2, MASK_LEVEL + 0.2)
# Luminance difference between a digit and the background where it lies, at least.
MIN_CONTRAST = 0.35
# Share of greyscale scenes (the rest are coloured).
GREY_SCENES = 0.3
# Digits held out for the val scenes: this share of each class, by a fixed permutation.
VAL_DIGITS = 0.2
_POOL_SEED = 20160613
# Domain tag of the generators: keeps the scene streams apart from any other user of
# numpy.random.default_rng([seed, ...]) (e.g. the detection data's flips).
_STREAM_TAG = 0x5CE4E5
# Worker processes at most (the CPUs this process may use, up to this many).
MAX_WORKERS = 8
# A temporary directory of ours older than this (outside the cache lock) was left by a
# generator that was killed (a live one writes its files within seconds).
STALE_TMP_SECONDS = 3600
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


# --------------------------------------------------------------------------- public API


def generate_scenes(
    out: str | os.PathLike,
    *,
    images: int = DEFAULT_IMAGES,
    val_images: int = DEFAULT_VAL_IMAGES,
    size: int = DEFAULT_SIZE,
    seed: int = 0,
    workers: int | None = None,
) -> Path:
    """Write a scenes data set to ``out`` (see the module docstring for the layout).

    Args:
        out: directory to create; it must not exist or be empty.
        images: number of training scenes, ``1..MAX_IMAGES``.
        val_images: number of val scenes, ``1..MAX_IMAGES``.
        size: side of the square images in pixels, ``MIN_SIZE..MAX_SIZE``.
        seed: non-negative seed; the same seed writes the same files.
        workers: processes rendering scenes (default: the usable CPUs, at most
            :data:`MAX_WORKERS`); the files do not depend on it.

    The data set is written into a temporary directory beside ``out`` and renamed to ``out``
    when complete, so an interrupted run never leaves half a data set under ``out``; of two
    processes writing the same ``out`` at once, one succeeds and the other says so. ``out``
    gets the permissions of a new directory (``0o777`` less the umask).

    Returns:
        ``Path(out)``.
    """
    _check_arguments(images, val_images, size, seed)
    out = Path(out)
    _check_output(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(out, older_than=STALE_TMP_SECONDS)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        counts = {"train": images, "val": val_images}
        _write_dataset(tmp, counts, size, seed, workers or default_workers())
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _publish(tmp: Path, out: Path) -> None:
    """Rename the complete data set ``tmp`` to ``out`` (missing, or an empty directory)."""
    from cnnkit.atomic import current_umask

    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp made it 0o700
    try:
        if out.is_dir():  # empty (checked before): rename replaces only a missing name everywhere
            out.rmdir()
        os.rename(tmp, out)
    except OSError as err:
        if err.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise ValueError(
                f"{out}: another process wrote a data set there while this one was generating "
                "(kept as it is); choose a new OUT"
            ) from None
        raise


def scenes_root(seed: int = 0) -> Path:
    """The default scenes data set of ``seed`` (generated on first use), as a directory.

    It lives in ``$CNNKIT_CACHE`` (else ``~/.cache/cnnkit``) under
    ``scenes-v<FORMAT_VERSION>-seed<seed>``, with :data:`DEFAULT_IMAGES` /
    :data:`DEFAULT_VAL_IMAGES` scenes of :data:`DEFAULT_SIZE` px. Generation holds an
    exclusive lock (``fcntl.flock`` on ``<name>.lock``) and renames a complete temporary
    directory into place, so processes started together generate it once and readers only
    ever see a complete data set; temporary directories left by a killed generator are
    removed by the next one. Data sets of earlier format versions are removed on every call.
    """
    from cnnkit.atomic import current_umask

    _check_arguments(DEFAULT_IMAGES, DEFAULT_VAL_IMAGES, DEFAULT_SIZE, seed)
    root = cache_dir() / f"scenes-v{FORMAT_VERSION}-seed{seed}"
    _prune_older_versions(root.parent)
    if _is_complete(root):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with _locked(root.parent / f"{root.name}.lock"):
        if _is_complete(root):  # another process generated it while we waited for the lock
            return root
        if root.exists():
            raise ValueError(
                f"{root} exists but is not a complete scenes data set; delete it to regenerate"
            )
        # Under the lock, every temporary directory of this name is a dead generator's.
        _remove_stale_tmp(root, older_than=0.0)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".tmp", dir=root.parent))
        try:
            counts = {"train": DEFAULT_IMAGES, "val": DEFAULT_VAL_IMAGES}
            _write_dataset(tmp, counts, DEFAULT_SIZE, seed, default_workers())
            os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp made it 0o700
            os.rename(tmp, root)
        except OSError:
            # A generator that did not take the lock (a file system without flock) finished
            # first: its data set is the same one; use it.
            shutil.rmtree(tmp, ignore_errors=True)
            if not _is_complete(root):
                raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return root


def _prune_older_versions(parent: Path) -> None:
    """Remove the cached scenes of earlier :data:`FORMAT_VERSION` s (~93 MB each; no cnnkit of
    this version reads them), each under its own lock; newer versions (a newer cnnkit sharing
    the cache) and anything else stay."""
    for old in sorted(parent.glob("scenes-v*-seed*")):
        version, _, seed = old.name.removeprefix("scenes-v").partition("-seed")
        # A lock file ("scenes-v1-seed0.lock") has the seed "0.lock", not a number: skipped.
        if not (version.isdigit() and seed.isdigit() and int(version) < FORMAT_VERSION):
            continue
        if not old.is_dir():
            continue
        with _locked(parent / f"{old.name}.lock"):
            shutil.rmtree(old, ignore_errors=True)
        (parent / f"{old.name}.lock").unlink(missing_ok=True)


def default_workers() -> int:
    """The CPUs this process may run on (its affinity mask), at most :data:`MAX_WORKERS`."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_WORKERS))


def cache_dir() -> Path:
    """``$CNNKIT_CACHE`` if set, else ``~/.cache/cnnkit``."""
    env = os.environ.get("CNNKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cnnkit"


def categories() -> list[dict[str, Any]]:
    """The COCO ``categories`` of the scenes: ids 1..10 for the digits "0".."9"."""
    return [
        {
            "id": i + 1,
            "name": name,
            "supercategory": "digit",
            "keypoints": list(KEYPOINT_NAMES),
            "skeleton": [list(pair) for pair in SKELETON],
            "keypoint_sigmas": list(KEYPOINT_SIGMAS),
        }
        for i, name in enumerate(CATEGORY_NAMES)
    ]


# --------------------------------------------------------------------------- checks and files


def _check_arguments(images: Any, val_images: Any, size: Any, seed: Any) -> None:
    for name, flag, value, low, high in (
        ("images", "--images", images, 1, None),
        ("val_images", "--val-images", val_images, 1, None),
        ("size", "--size", size, MIN_SIZE, MAX_SIZE),
        ("seed", "--seed", seed, 0, None),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} ({flag}) must be an integer, got {value!r}")
        if value < low or (high is not None and value > high):
            allowed = f"at least {low}" if high is None else f"between {low} and {high}"
            raise ValueError(f"{flag} {value}: must be {allowed}")
    for flag, value in (("--images", images), ("--val-images", val_images)):
        if value > MAX_IMAGES:
            raise ValueError(f"{flag} {value}: must be at most {MAX_IMAGES} (scenes per split)")


def _check_output(out: Path) -> None:
    if out.is_symlink():  # the final rename would replace the link, not fill its target
        raise ValueError(f"{out}: is a symbolic link; give the directory itself as OUT")
    if out.is_dir():
        if any(out.iterdir()):
            raise ValueError(f"{out}: directory exists and is not empty; choose a new OUT")
    elif out.exists() or out.is_symlink():
        raise ValueError(f"{out}: exists and is not a directory")
    parent = out.parent
    while not parent.exists():  # missing folders are created
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{out}: {parent} is not a directory")


def _is_complete(root: Path) -> bool:
    # A data set appears under its name only by a rename of the complete directory.
    return all((root / "annotations" / f"instances_{s}.json").is_file() for s in SPLITS)


def _remove_stale_tmp(final: Path, older_than: float) -> None:
    now = time.time()
    for tmp in final.parent.glob(f".{final.name}.*.tmp"):
        with contextlib.suppress(OSError):
            if tmp.is_dir() and now - tmp.stat().st_mtime >= older_than:
                shutil.rmtree(tmp)


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive advisory lock on ``path`` (no-op where fcntl does not exist: Windows)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _write_dataset(root: Path, counts: dict[str, int], size: int, seed: int, workers: int) -> None:
    (root / "annotations").mkdir()
    for split_id, split in enumerate(SPLITS):
        coco = _write_split(root / split, split_id, counts[split], size, seed, workers)
        coco["info"]["description"] = f"cnnkit synthetic digit scenes ({split})"
        text = json.dumps(coco, separators=(",", ":"))
        (root / "annotations" / f"instances_{split}.json").write_text(text + "\n")


# Scenes per task of a worker process; below two tasks' worth, one process does it all (a
# worker costs a fork, ~10 ms).
_CHUNK = 100


def _write_split(
    folder: Path, split_id: int, count: int, size: int, seed: int, workers: int
) -> dict:
    """Render and write the ``count`` scenes of one split; return its COCO dict.

    Chunks of scenes go to ``workers`` forked processes (each scene depends only on its
    index, so the result does not depend on the number of workers)."""
    folder.mkdir()
    _digit_pool(split_id)  # loaded once, before the workers fork
    chunks = [(i, min(i + _CHUNK, count)) for i in range(0, count, _CHUNK)]
    job = functools.partial(_write_scenes, folder, split_id, size, seed)
    if workers > 1 and len(chunks) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # fork: the workers need this module only, and re-importing cnnkit (torch) in a
        # spawned process costs more than the whole default data set.
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(min(workers, len(chunks)), mp_context=context) as pool:
            results = list(pool.map(job, chunks))
    else:
        results = [job(chunk) for chunk in chunks]
    images, annotations = [], []
    for chunk_images, chunk_annotations in results:
        images += chunk_images
        for ann in chunk_annotations:
            ann["id"] = len(annotations) + 1
            annotations.append(ann)
    return {
        "info": {"version": str(FORMAT_VERSION), "seed": seed, "split": SPLITS[split_id]},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories(),
    }


def _write_scenes(
    folder: Path, split_id: int, size: int, seed: int, chunk: tuple[int, int]
) -> tuple[list[dict], list[dict]]:
    """Render scenes ``chunk[0]..chunk[1]-1`` of a split, write their PNGs, and return their
    COCO ``images`` and ``annotations`` entries (annotation ids to be assigned)."""
    from pycocotools import mask as mask_utils

    pool = _digit_pool(split_id)
    images, annotations = [], []
    for index in range(*chunk):
        rng = np.random.default_rng([_STREAM_TAG, FORMAT_VERSION, seed, split_id, index])
        pixels, digits = render_scene(rng, pool, size)
        name = f"{index:06d}.png"
        (folder / name).write_bytes(png_bytes(pixels))
        image_id = split_id * SPLIT_ID_STRIDE + index + 1
        images.append({"id": image_id, "file_name": name, "width": size, "height": size})
        if not digits:
            continue
        masks = np.zeros((size, size, len(digits)), dtype=np.uint8, order="F")
        for k, d in enumerate(digits):
            h, w = d.mask.shape
            masks[d.y : d.y + h, d.x : d.x + w, k] = d.mask
        for d, rle in zip(digits, mask_utils.encode(masks), strict=True):
            rle["counts"] = rle["counts"].decode("ascii")
            annotations.append(_annotation(image_id, d, rle))
    return images, annotations


def png_bytes(pixels: np.ndarray) -> bytes:
    """``uint8 [H, W, 3]`` RGB as a PNG file (8-bit truecolour, no interlace).

    Each row is stored with PNG's "Sub" filter (the difference to the pixel on the left:
    small numbers on smooth backgrounds) and deflated with Huffman coding only: the pixel
    noise leaves LZ77 nothing to find. Measured on 128 px scenes: 35 KiB in 0.38 ms, where
    zlib's default strategy at level 1 gives 37 KiB in 0.8 ms and Pillow (which tries all
    five filters on every row) 36 KiB in 1.7 ms; stored raw, 48 KiB."""
    import struct
    import zlib

    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"png_bytes: expected uint8 [H, W, 3], got {pixels.dtype} {pixels.shape}")
    h, w, _ = pixels.shape
    rows = pixels.reshape(h, w * 3)
    raw = np.empty((h, w * 3 + 1), dtype=np.uint8)
    raw[:, 0] = 1  # filter type Sub
    raw[:, 1:4] = rows[:, :3]
    np.subtract(rows[:, 3:], rows[:, :-3], out=raw[:, 4:])  # modulo 256, as PNG defines it

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(data, zlib.crc32(tag))
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8 bits, RGB, deflate, no interlace
    deflate = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            chunk(b"IHDR", header),
            chunk(b"IDAT", deflate.compress(raw.tobytes()) + deflate.flush()),
            chunk(b"IEND", b""),
        )
    )


def _annotation(image_id: int, d: PlacedDigit, rle: dict) -> dict:
    x0, y0, x1, y1 = _tight_box(d.mask)
    keypoints = []
    for x, y in extreme_points(d.mask):
        keypoints += [x + d.x, y + d.y, 2]
    return {
        "id": 0,  # numbered by the caller, across the split
        "image_id": image_id,
        "category_id": d.label + 1,
        "segmentation": rle,
        "area": float(np.count_nonzero(d.mask)),
        "bbox": [float(d.x + x0), float(d.y + y0), float(x1 - x0), float(y1 - y0)],
        "iscrowd": 0,
        "keypoints": keypoints,
        "num_keypoints": len(KEYPOINT_NAMES),
    }


def extreme_points(mask: np.ndarray) -> list[tuple[int, int]]:
    """``(x, y)`` pixel indices of the top-, bottom-, left- and right-most pixels of ``mask``
    ``[H, W]`` (non-empty); ties broken by the middle pixel of the extreme row / column (the
    ``(n - 1) // 2``-th of its ``n`` mask pixels in index order, always a mask pixel)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("extreme_points: empty mask")

    def middle(line: np.ndarray) -> int:
        idx = np.flatnonzero(line)
        return int(idx[(idx.size - 1) // 2])

    top, bottom, left, right = rows[0], rows[-1], cols[0], cols[-1]
    return [
        (middle(mask[top]), int(top)),
        (middle(mask[bottom]), int(bottom)),
        (int(left), middle(mask[:, left])),
        (int(right), middle(mask[:, right])),
    ]


# --------------------------------------------------------------------------- digits


@dataclass
class PlacedDigit:
    """A digit in a scene: ``label`` 0..9, ``mask`` bool ``[h, w]`` placed at column ``x``,
    row ``y`` of the image."""

    label: int
    mask: np.ndarray
    x: int
    y: int


@dataclass
class DigitPool:
    """The 8x8 digits of one split: ``images`` float32 ``[N, 8, 8]`` in [0, 1], ``labels``
    int64 ``[N]``."""

    images: np.ndarray
    labels: np.ndarray


@functools.lru_cache(maxsize=2)
def _digit_pool(split_id: int) -> DigitPool:
    """The digits of split 0 (train) or 1 (val): disjoint, :data:`VAL_DIGITS` of each class
    held out for val by a fixed permutation (independent of the scenes' seed)."""
    images, labels = _bundled_digits()
    rng = np.random.default_rng(_POOL_SEED)
    val = np.zeros(labels.size, dtype=bool)
    for c in range(10):
        members = rng.permutation(np.flatnonzero(labels == c))
        val[members[: round(VAL_DIGITS * members.size)]] = True
    keep = val if split_id == 1 else ~val
    return DigitPool(images[keep], labels[keep])


# scikit-learn's handwritten digits: 1,797 rows of 64 values 0..16 and the label.
_DIGITS_SHAPE = (1797, 65)


@functools.lru_cache(maxsize=1)
def _bundled_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits: ``float32 [1797, 8, 8]`` in [0, 1], ``int64 [1797]``.

    The file (``sklearn/datasets/data/digits.csv.gz``) is read directly: importing
    scikit-learn costs ~1 s of CPU (scipy and more), as long as generating 400 scenes, and
    the data sets are generated on first use. Where the file is not where this version of
    scikit-learn keeps it, ``sklearn.datasets.load_digits`` reads it."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("sklearn")  # finds the package without importing it
    locations = spec.submodule_search_locations if spec is not None else None
    if locations:
        path = Path(next(iter(locations))) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            with gzip.open(path, "rb") as fh:
                fields = fh.read().replace(b"\n", b",").strip(b",").split(b",")
            table = np.array(fields, dtype=np.float32)
            if table.size == _DIGITS_SHAPE[0] * _DIGITS_SHAPE[1]:
                table = table.reshape(_DIGITS_SHAPE)
                return table[:, :64].reshape(-1, 8, 8) / 16.0, table[:, 64].astype(np.int64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32) / 16.0
    return images, np.asarray(bunch.target, dtype=np.int64)


def _cubic(t: np.ndarray, a: float = -0.5) -> np.ndarray:
    """Keys' cubic convolution kernel; a = -0.5 is Keys' choice and PIL's (OpenCV and
    PyTorch use -0.75, which overshoots more)."""
    t = np.abs(t)
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


@functools.lru_cache(maxsize=512)
def _upsample_matrix(n_out: int, n_in: int, margin: int, normalize: bool) -> np.ndarray:
    """``[n_out + 2 margin, n_in]`` bicubic resampling weights: row ``i`` samples output pixel
    ``i - margin`` of an ``n_in -> n_out`` resize (align_corners=False). Source pixels
    outside ``0..n_in-1`` are zero (a digit fades out on a blank page); ``normalize`` rescales
    the rows to sum 1 instead (a texture continues past its edge)."""
    i = np.arange(-margin, n_out + margin, dtype=np.float64)
    u = (i + 0.5) * (n_in / n_out) - 0.5
    w = _cubic(u[:, None] - np.arange(n_in, dtype=np.float64)[None, :])
    if normalize:
        w /= w.sum(axis=1, keepdims=True)
    w = w.astype(np.float32)
    w.setflags(write=False)  # shared by the cache
    return w


def _digit_ink(digit: np.ndarray, height: int, width: int) -> np.ndarray:
    """The opacity ``[h, w]`` of the 8x8 ``digit`` drawn ``height`` x ``width`` px: upsampled
    bicubically (zero outside the 8x8 grid, so the strokes fade out), mapped through the ink
    ramp INK_LEVELS and cropped to the pixels it reaches (a few pixels around the nominal
    size: the kernel's reach)."""
    margin = math.ceil(2 * max(height, width) / 8)  # the kernel reaches 2 source pixels
    ry = _upsample_matrix(height, 8, margin, False)
    rx = _upsample_matrix(width, 8, margin, False)
    values = ry @ digit @ rx.T
    alpha = np.clip((values - INK_LEVELS[0]) * (1.0 / (INK_LEVELS[1] - INK_LEVELS[0])), 0.0, 1.0)
    rows = np.flatnonzero(alpha.any(axis=1))
    cols = np.flatnonzero(alpha.any(axis=0))
    if rows.size == 0:
        return alpha[:0, :0]
    return alpha[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` pixel edges of the non-empty ``mask [h, w]``."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


# --------------------------------------------------------------------------- rendering


def render_scene(
    rng: np.random.Generator, pool: DigitPool, size: int
) -> tuple[np.ndarray, list[PlacedDigit]]:
    """One scene: ``uint8 [size, size, 3]`` pixels and its digits (in drawing order).

    Drawn channel-first (``float32 [3, size, size]`` in [0, 1]): background, clutter, digits,
    then pixel noise: uniform, of standard deviation 1% to 5% of the range (half the cost of
    normal noise, and as good a sensor noise to look at)."""
    grey = rng.random() < GREY_SCENES
    canvas = _background(rng, size, grey)
    for _ in range(rng.integers(0, 6)):
        _draw_clutter(rng, canvas, size, grey)
    digits = _place_digits(rng, canvas, pool, size, grey)
    noise = rng.random((1 if grey else 3, size, size), dtype=np.float32)  # grey: grey noise
    noise -= 0.5
    noise *= rng.uniform(0.01, 0.05) * math.sqrt(12.0) * 255.0  # U(-1/2, 1/2): variance 1/12
    canvas *= 255.0
    canvas += noise
    canvas += 0.5  # round to nearest in the cast below
    np.clip(canvas, 0.0, 255.0, out=canvas)
    pixels = np.empty((size, size, 3), dtype=np.uint8)
    pixels[...] = canvas.transpose(1, 2, 0)
    return pixels, digits


def _colour(rng: np.random.Generator, grey: bool, luma: float) -> np.ndarray:
    """A random colour ``float32 [3, 1, 1]`` (grey in a grey scene) of luminance ``luma``: a
    random hue mixed with black (to darken) or white (to lighten), which moves the luminance
    linearly."""
    if grey:
        return np.full((3, 1, 1), luma, dtype=np.float32)
    c = rng.random(3).astype(np.float32)
    own = float(c @ _LUMA)
    if own > luma:
        c *= luma / own
    else:
        c = 1.0 - (1.0 - c) * ((1.0 - luma) / max(1.0 - own, 1e-6))
    return c.reshape(3, 1, 1)


# Background control grid: cells per side, and the texture's amplitude at the coarse (4x4)
# and fine (one per cell) scales.
_BG_CELLS = 16
_BG_TEXTURE = (0.08, 0.04)


def _background(rng: np.random.Generator, size: int, grey: bool) -> np.ndarray:
    """``float32 [3, size, size]``: a linear gradient between two colours of mid luminance
    (digits must contrast with it: MIN_CONTRAST) with smooth texture at two scales, all
    sampled on a 16 x 16 control grid and upsampled bicubically in one go (bicubic
    reproduces the gradient, a linear function, exactly away from the edges)."""
    lo, hi = rng.uniform(0.15, 0.85, size=2)
    c0, c1 = _colour(rng, grey, lo), _colour(rng, grey, hi)
    angle = rng.uniform(0, 2 * np.pi)
    n = _BG_CELLS
    coords = (np.arange(n, dtype=np.float32) + 0.5) / n
    t = np.cos(angle) * coords[None, :] + np.sin(angle) * coords[:, None]
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    channels = 1 if grey else 3
    coarse = rng.standard_normal((channels, 4, 4)).astype(np.float32) * _BG_TEXTURE[0]
    up = _upsample_matrix(n, 4, 0, True)
    fine = rng.standard_normal((channels, n, n)).astype(np.float32) * _BG_TEXTURE[1]
    grid = c0 + (c1 - c0) * t + (up @ coarse @ up.T) + fine  # [3, n, n]
    r = _upsample_matrix(size, n, 0, True)
    return np.ascontiguousarray(r @ grid @ r.T)


def _stamp(canvas: np.ndarray, alpha: np.ndarray, y: int, x: int, colour: np.ndarray) -> None:
    """Blend ``colour [3, 1, 1]`` into ``canvas [3, H, W]`` with opacity ``alpha [h, w]`` at
    row ``y``, column ``x``; the part of ``alpha`` outside the canvas is dropped."""
    h, w = alpha.shape
    size_y, size_x = canvas.shape[1:]
    ya, xa = max(y, 0), max(x, 0)
    yb, xb = min(y + h, size_y), min(x + w, size_x)
    if ya >= yb or xa >= xb:
        return
    a = alpha[ya - y : yb - y, xa - x : xb - x]
    region = canvas[:, ya:yb, xa:xb]
    region += a * (colour - region)


def _draw_clutter(rng: np.random.Generator, canvas: np.ndarray, size: int, grey: bool) -> None:
    """One distractor under the digits: a blob, a long thin line, an arc or a few dots
    (:data:`_CLUTTER`), in a random colour and opacity."""
    shape = _CLUTTER[rng.integers(0, len(_CLUTTER))]
    colour = _colour(rng, grey, rng.uniform(0.0, 1.0))
    opacity = rng.uniform(0.4, 1.0)
    for alpha, top, left in shape(rng, size, size / DEFAULT_SIZE):
        _stamp(canvas, opacity * alpha, top, left, colour)


# Each clutter shape yields antialiased opacity maps ``clip(r + 0.5 - d, 0, 1)`` of the
# distance ``d`` to the shape (of half-width ``r``), over the window of the canvas it covers:
# ``(alpha [h, w], top, left)``. ``s`` scales the 128 px sizes to the image.


def _blob(rng: np.random.Generator, size: int, s: float):
    """A filled, rotated ellipse of radii 3..14 px."""
    ry, rx = rng.uniform(3, 14, size=2) * s
    cy, cx = rng.uniform(0, size, size=2)
    theta = rng.uniform(0, np.pi)
    reach = max(ry, rx) + 2
    window = _window(cy, cx, reach, reach, size)
    if window is None:
        return
    yy, xx, top, left = window
    u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
    v = (yy - cy) * np.cos(theta) - (xx - cx) * np.sin(theta)
    # Distance to the outline, about: the normalized radius' excess in pixels of the minor axis.
    d = (np.sqrt((u / rx) ** 2 + (v / ry) ** 2) - 1.0) * min(rx, ry)
    yield np.clip(0.5 - d, 0.0, 1.0), top, left


def _line(rng: np.random.Generator, size: int, s: float):
    """A thin (0.8..2.2 px) line of half to all of the image's side: thinner and longer than
    any digit's stroke, so that no line is a "1"."""
    half = rng.uniform(0.4, 1.1) * s
    length = rng.uniform(0.5, 1.0) * size
    cy, cx = rng.uniform(0, size, size=2)
    theta = rng.uniform(0, np.pi)
    dy, dx = np.sin(theta) * length / 2, np.cos(theta) * length / 2
    window = _window(cy, cx, abs(dy) + half + 2, abs(dx) + half + 2, size)
    if window is None:
        return
    yy, xx, top, left = window
    # Distance to the segment (cy - dy, cx - dx) .. (cy + dy, cx + dx).
    py, px = yy - (cy - dy), xx - (cx - dx)
    t = np.clip((py * dy + px * dx) * (2.0 / (length * length)), 0.0, 1.0)
    d = np.hypot(py - t * 2 * dy, px - t * 2 * dx)
    yield np.clip(half + 0.5 - d, 0.0, 1.0), top, left


def _arc(rng: np.random.Generator, size: int, s: float):
    """An arc (60 to 270 degrees) of a circle of radius 20..60 px, 1..3 px wide."""
    radius = rng.uniform(20, 60) * s
    half = rng.uniform(0.5, 1.5) * s
    cy, cx = rng.uniform(0, size, size=2)
    start, extent = rng.uniform(0, 2 * np.pi), rng.uniform(np.pi / 3, 1.5 * np.pi)
    reach = radius + half + 2
    window = _window(cy, cx, reach, reach, size)
    if window is None:
        return
    yy, xx, top, left = window
    d = np.abs(np.hypot(yy - cy, xx - cx) - radius)
    phase = np.mod(np.arctan2(yy - cy, xx - cx) - start, 2 * np.pi)
    yield np.clip(half + 0.5 - d, 0.0, 1.0) * (phase <= extent), top, left


def _dots(rng: np.random.Generator, size: int, s: float):
    """2..7 dots of radius 0.7..2.5 px."""
    for _ in range(rng.integers(2, 8)):
        r = rng.uniform(0.7, 2.5) * s
        cy, cx = rng.uniform(0, size, size=2)
        window = _window(cy, cx, r + 2, r + 2, size)
        if window is not None:
            yy, xx, top, left = window
            yield np.clip(r + 0.5 - np.hypot(yy - cy, xx - cx), 0.0, 1.0), top, left


_CLUTTER = (_blob, _line, _arc, _dots)


def _window(cy: float, cx: float, reach_y: float, reach_x: float, size: int):
    """Pixel-centre coordinates ``(y [h, 1], x [1, w], top, left)`` of the pixels within
    ``reach_y`` rows and ``reach_x`` columns of ``(cy, cx)`` on a ``size`` x ``size``
    canvas; None when that is empty."""
    top, bottom = max(int(cy - reach_y), 0), min(int(cy + reach_y) + 1, size)
    left, right = max(int(cx - reach_x), 0), min(int(cx + reach_x) + 1, size)
    if top >= bottom or left >= right:
        return None
    ys = np.arange(top, bottom, dtype=np.float32) + 0.5
    xs = np.arange(left, right, dtype=np.float32) + 0.5
    return ys[:, None], xs[None, :], top, left


def _digit_sizes(size: int) -> tuple[int, int]:
    s = size / DEFAULT_SIZE
    return max(8, round(DIGIT_HEIGHT[0] * s)), max(8, round(DIGIT_HEIGHT[1] * s))


def _overlaps(box: tuple[int, int, int, int], boxes: list[tuple[int, int, int, int]]) -> bool:
    """Whether ``box`` has IoU > MAX_BOX_IOU with any of ``boxes`` (xyxy, pixel edges);
    plain Python: a scene has at most MAX_DIGITS boxes, too few for numpy to pay off."""
    x0, y0, x1, y1 = box
    area = (x1 - x0) * (y1 - y0)
    for a0, b0, a1, b1 in boxes:
        inter = max(0, min(x1, a1) - max(x0, a0)) * max(0, min(y1, b1) - max(y0, b0))
        if inter > MAX_BOX_IOU * (area + (a1 - a0) * (b1 - b0) - inter):
            return True
    return False


def _place_digits(
    rng: np.random.Generator, canvas: np.ndarray, pool: DigitPool, size: int, grey: bool
) -> list[PlacedDigit]:
    """Draw 1..MAX_DIGITS digits (fewer when no free place is found in PLACEMENT_TRIES tries):
    inks never touch, boxes overlap by IoU <= MAX_BOX_IOU."""
    lo, hi = _digit_sizes(size)
    ink = np.zeros((size, size), dtype=bool)  # pixels some digit coloured
    boxes: list[tuple[int, int, int, int]] = []
    placed: list[PlacedDigit] = []
    for _ in range(rng.integers(1, MAX_DIGITS + 1)):
        k = rng.integers(0, pool.labels.size)
        height = int(rng.integers(lo, hi + 1))
        width = max(8, round(height * rng.uniform(*DIGIT_ASPECT)))
        alpha = _digit_ink(pool.images[k], height, width)
        if alpha.shape[0] > size or alpha.shape[1] > size:
            continue
        mask = alpha > 0.5  # intensity > MASK_LEVEL
        if not mask.any():
            continue
        h, w = alpha.shape
        bx0, by0, bx1, by1 = _tight_box(mask)
        inked = alpha > 0
        for _ in range(PLACEMENT_TRIES):
            y, x = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
            box = (bx0 + x, by0 + y, bx1 + x, by1 + y)
            if _overlaps(box, boxes):
                continue
            if (ink[y : y + h, x : x + w] & inked).any():
                continue
            ink[y : y + h, x : x + w] |= inked
            boxes.append(box)
            # Contrast with what lies under the ink (clutter included), on average.
            background = float(_LUMA @ canvas[:, y : y + h, x : x + w][:, inked].mean(axis=1))
            if background > 0.5:
                luma = rng.uniform(0.0, background - MIN_CONTRAST)
            else:
                luma = rng.uniform(background + MIN_CONTRAST, 1.0)
            _stamp(canvas, alpha, y, x, _colour(rng, grey, luma))
            placed.append(PlacedDigit(int(pool.labels[k]), mask, x, y))
            break
    return placed
