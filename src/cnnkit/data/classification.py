"""Image classification data held in memory as uint8 tensors: digits, CIFAR-10/100, folders.

Every loader returns :class:`DataSplits`: train / dev / test :class:`ImageDataset` s of
``uint8 [N, C, H, W]`` images and ``int64 [N]`` labels, with the training split's per-channel
mean and std (in [0, 1] units) for normalization. Data sets of this size (CIFAR-10 is 180 MB as
uint8) fit in memory, so a batch is one indexing operation and the input pipeline costs nothing.

``spec`` strings (the ``--data`` option):

* ``digits``: scikit-learn's bundled handwritten digits (1,797 8x8 images, values 0..16,
  10 classes; no download), upsampled to ``image_size`` x ``image_size`` (1 channel) so the
  CIFAR-style networks apply unchanged; split 1,197 / 300 / 300 (train / dev / test).
* ``cifar10:PATH``, ``cifar100:PATH``: the official "python version" directories
  (``data_batch_1..5`` + ``test_batch`` + ``batches.meta``; ``train`` + ``test`` + ``meta``
  with fine labels). The last 5,000 training images (stratified) are the dev split (45k/5k as
  in He et al., 2016). The batches are pickles, but nothing is unpickled freely: see
  :class:`RestrictedUnpickler`.
* ``folder:PATH``: ``PATH/<class>/*.png|jpg|...`` split 80/10/10, or
  ``PATH/train/<class>/...`` with ``PATH/test`` (or ``PATH/val`` when there is no test: the
  ImageNet layout) and optionally ``PATH/dev`` (else ``PATH/val`` beside a ``PATH/test``, else
  10% of train is held out): see :func:`folder_files`. Images are resized to ``image_size`` x
  ``image_size``; 1 channel when every image is grayscale, else RGB.

Data sets too large for memory stream instead (:func:`choose_data_storage`,
:func:`stream_splits`, :mod:`cnnkit.data.streaming`): the same files, labels and order per split.

Splits are deterministic (seeded) and stratified: each class contributes in proportion.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cnnkit.data.streaming import (
    SIXTEEN_BIT_MODES,
    FileSource,
    Invalid,
    StreamDataset,
    TensorSource,
    _read_errors,
    available_memory,
    center_crop_box,
    choose_streaming,
    format_bytes,
    read_resized_crop,
    to_uint8_mode,
)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif")
SPLITS = ("train", "dev", "test")
# Digits: 300 test and 300 dev images, the rest (1,197) for training.
DIGITS_HELD_OUT = 300
# CIFAR dev split held out of the 50k training images (He et al., 2016, Sec. 4.2).
CIFAR_DEV = 5000
# Flat image folders: fraction of each class for dev and for test.
FOLDER_HOLDOUT = 0.1
DEFAULT_IMAGE_SIZE = 32
# channel_stats: pixels per int64 chunk (64 MB), and the floor of a constant channel's std.
_STATS_CHUNK_ELEMENTS = 1 << 23
_MIN_STD = 1e-3


@dataclass
class ImageDataset:
    """Images ``uint8 [N, C, H, W]``, labels ``int64 [N]`` in ``0..len(classes)-1``."""

    images: Tensor
    labels: Tensor
    classes: list[str]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: Tensor) -> ImageDataset:
        return ImageDataset(self.images[index], self.labels[index], self.classes)


@dataclass
class DataSplits:
    """The three splits and the training split's per-channel statistics (in [0, 1] units)."""

    train: ImageDataset
    dev: ImageDataset
    test: ImageDataset
    mean: list[float]
    std: list[float]
    spec: str

    @property
    def classes(self) -> list[str]:
        return self.train.classes

    @property
    def input_size(self) -> tuple[int, int, int]:
        c, h, w = self.train.images.shape[1:]
        return int(c), int(h), int(w)


# --------------------------------------------------------------------------- entry point


def load_data(spec: str, *, seed: int = 0, image_size: int = DEFAULT_IMAGE_SIZE) -> DataSplits:
    """Load the data set named by ``spec`` (see the module docstring) into memory.

    Args:
        spec: ``"digits" | "cifar10:PATH" | "cifar100:PATH" | "folder:PATH"``.
        seed: seed of the train/dev(/test) split (fixed per data set, so evaluation of a run
            sees the same test split the run did).
        image_size: side of the square images served for ``digits`` and ``folder`` data.

    Raises:
        ValueError: unknown spec, missing or malformed data (naming the path or file).
    """
    kind, path = _parse_spec(spec)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 4:
        raise ValueError(f"image_size={image_size!r} must be an integer >= 4")
    if kind == "digits":
        train, dev, test = _load_digits(seed, image_size)
    elif kind == "folder":
        train, dev, test = _load_folder(Path(path).expanduser(), seed, image_size)
    else:
        train, dev, test = _load_cifar(Path(path).expanduser(), kind == "cifar100", seed)
    _check_splits(spec, [len(train), len(dev), len(test)], train.classes, train.labels)
    mean, std = channel_stats(train.images)
    return DataSplits(train, dev, test, mean, std, spec)


def _parse_spec(spec: str) -> tuple[str, str]:
    """``(kind, path)`` of a ``--data`` spec (``path`` empty for digits)."""
    kind, _, path = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if (kind == "digits" and not path) or (kind in ("cifar10", "cifar100", "folder") and path):
        return kind, path
    raise ValueError(
        f"--data {spec!r}: expected digits, cifar10:PATH, cifar100:PATH or folder:PATH"
    )


def _check_splits(spec: str, sizes: list[int], classes: list[str], train_labels: Tensor) -> None:
    """No split empty (``sizes``: train, dev, test) and :func:`check_training_classes`."""
    for name, size in zip(SPLITS, sizes, strict=True):
        if size == 0:
            raise ValueError(f"--data {spec!r}: the {name} split is empty")
    check_training_classes(spec, classes, train_labels)


def check_training_classes(spec: str, classes: list[str], labels: Tensor) -> None:
    """A classification data set needs at least 2 classes, each with a training image: one
    class "trains" to 100% accuracy, and a class never seen in training is never predicted.

    Raises:
        ValueError: naming the data set and the classes at fault.
    """
    if len(classes) < 2:
        raise ValueError(
            f"--data {spec}: {len(classes)} class ({', '.join(map(str, classes)) or 'none'}): "
            "classification needs at least 2"
        )
    counts = torch.bincount(labels, minlength=len(classes)).tolist()
    empty = [str(c) for c, n in zip(classes, counts, strict=False) if n == 0]
    if empty:
        raise ValueError(
            f"--data {spec}: class(es) {empty[:5]}{'...' if len(empty) > 5 else ''} have no "
            f"training image ({len(empty)} of {len(classes)} classes)"
        )


def channel_stats(images: Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and (unbiased) std of ``uint8 [N, C, H, W]`` images, in [0, 1] units.

    Exact integer moments, a chunk of images at a time: a float64 copy of CIFAR's training set
    would take 1.2 GB.
    """
    n, channels = images.shape[0], images.shape[1]
    s1 = torch.zeros(channels, dtype=torch.int64)
    s2 = torch.zeros(channels, dtype=torch.int64)
    step = max(1, _STATS_CHUNK_ELEMENTS // max(1, images[:1].numel()))
    for start in range(0, n, step):
        chunk = images[start : start + step].to(torch.int64)
        s1 += chunk.sum(dim=(0, 2, 3))
        s2 += chunk.square_().sum(dim=(0, 2, 3))
    count = n * images.shape[2] * images.shape[3]
    mean, std = [], []
    for a, b in zip(s1.tolist(), s2.tolist(), strict=True):
        mean.append(a / count / 255.0)
        # Python integers: sum of squared deviations = b - a^2 / count, exactly (times count).
        var = (count * b - a * a) / (count * max(count - 1, 1)) / 255.0**2
        std.append(max(math.sqrt(var), _MIN_STD))  # a constant channel must not divide by 0
    return mean, std


def stratified_order(labels: Tensor, seed: int) -> Tensor:
    """A permutation of ``range(N)`` whose every prefix holds each class in proportion.

    Each sample of class ``c`` (``n_c`` samples, shuffled) at rank ``r`` gets the key
    ``(r + u) / n_c`` with ``u ~ U[0, 1)``; sorting by key interleaves the classes, so the
    first ``k`` samples contain ``k * n_c / N`` (+-1) of class ``c``: a stratified split of any
    size is a slice.
    """
    g = torch.Generator().manual_seed(seed)
    keys = torch.empty(labels.shape[0], dtype=torch.float64)
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        ranks = torch.arange(idx.numel(), dtype=torch.float64)
        keys[idx] = (
            ranks + torch.rand(idx.numel(), generator=g, dtype=torch.float64)
        ) / idx.numel()
    return torch.argsort(keys, stable=True)


def hold_out_index(labels: Tensor, sizes: list[int], seed: int) -> list[Tensor]:
    """Sorted ``int64`` indices of a stratified split of ``labels`` ``[N]`` into parts of
    ``sizes`` (the first parts) and the rest (the last part)."""
    order = stratified_order(labels, seed)
    parts, start = [], 0
    for size in sizes:
        parts.append(order[start : start + size].sort().values)
        start += size
    parts.append(order[start:].sort().values)
    return parts


def _hold_out(data: ImageDataset, sizes: list[int], seed: int) -> list[ImageDataset]:
    """Split ``data`` stratified into parts of ``sizes`` (the first parts) and the rest (last)."""
    return [data.subset(index) for index in hold_out_index(data.labels, sizes, seed)]


# --------------------------------------------------------------------------- digits


def _load_digits(seed: int, image_size: int) -> tuple[ImageDataset, ImageDataset, ImageDataset]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    bunch = load_digits()
    n = len(bunch.images)
    decoded, available = n * image_size * image_size, available_memory()
    if decoded > available:
        raise ValueError(
            f"--image-size {image_size}: the digits decoded at 1x{image_size}x{image_size} take "
            f"{n:,} x {image_size * image_size:,} bytes = {format_bytes(decoded)}, more than "
            f"the {format_bytes(available)} of available memory"
        )
    x = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32)).unsqueeze(1) / 16.0
    images = torch.empty((n, 1, image_size, image_size), dtype=torch.uint8)
    # Bilinear upsampling (align_corners=False): 8x8 strokes become smooth 32x32 ones. A chunk
    # at a time: the float32 copy of the whole set would take 4x the uint8 one.
    step = max(1, _STATS_CHUNK_ELEMENTS // (image_size * image_size))
    for start in range(0, n, step):
        chunk = F.interpolate(
            x[start : start + step],
            size=(image_size, image_size),
            mode="bilinear",
            align_corners=False,
        )
        images[start : start + step] = chunk.clamp_(0, 1).mul_(255).round_().to(torch.uint8)
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    data = ImageDataset(images, labels, [str(int(c)) for c in bunch.target_names])
    test, dev, train = _hold_out(data, [DIGITS_HELD_OUT, DIGITS_HELD_OUT], seed)
    return train, dev, test


# --------------------------------------------------------------------------- CIFAR


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The globals a pickled numpy array refers to, found from numpy itself.

    Asking an array how it pickles gives the reconstructor objects whatever numpy's internal
    module layout (``numpy.core`` in 1.x, ``numpy._core`` in 2.x); both names are accepted.
    """
    a = np.zeros(1, dtype=np.uint8)
    reconstruct = a.__reduce__()[0]  # numpy.(_)core.multiarray._reconstruct
    frombuffer = a.__reduce_ex__(5)[0]  # numpy.(_)core.numeric._frombuffer (protocol 5)
    allowed: dict[tuple[str, str], Any] = {}
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{package}.numeric", "_frombuffer")] = frombuffer
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds dicts, lists, strings, bytes, numbers and numpy arrays only.

    A pickle runs code by naming a callable (GLOBAL / STACK_GLOBAL, resolved by
    :meth:`find_class`) and calling it (REDUCE / NEWOBJ / INST / OBJ). Containers, strings and
    numbers need no global at all, so the only globals allowed are those numpy's own array
    pickling uses: ``numpy.(_)core.multiarray._reconstruct``, ``numpy.ndarray``,
    ``numpy.dtype``, ``numpy.(_)core.numeric._frombuffer``; and ``_codecs.encode``, which
    Python 3 uses to pickle ``bytes`` at protocol 2. Anything else (``os.system``,
    ``builtins.eval``, ...) is refused before it is called.
    """

    _allowed: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if RestrictedUnpickler._allowed is None:
            import codecs

            RestrictedUnpickler._allowed = {
                **_numpy_globals(),
                ("_codecs", "encode"): codecs.encode,
            }
        try:
            return RestrictedUnpickler._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed") from None


def read_cifar_pickle(path: Path) -> dict[str, Any]:
    """Read one CIFAR batch file (a pickled dict) without running code from it.

    Keys come back as ``str`` whether the file was written by Python 2 (``str`` keys, read as
    latin-1) or Python 3 (``bytes`` keys).

    Raises:
        ValueError: missing file, a pickle that asks for anything but plain data and numpy
            arrays, or not a dict; the message names the file.
    """
    if not path.is_file():
        raise ValueError(f"CIFAR file {path} does not exist")
    try:
        with open(path, "rb") as fh:
            obj = RestrictedUnpickler(fh, encoding="latin1").load()
    except pickle.UnpicklingError as err:
        raise ValueError(f"refusing to unpickle CIFAR file {path}: {err}") from None
    except Exception as err:  # truncated or garbage: EOFError, ValueError, ...
        raise ValueError(f"CIFAR file {path} is not a readable pickle ({err})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"CIFAR file {path} holds a {type(obj).__name__}, expected a dict")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


def _cifar_field(batch: dict[str, Any], key: str, path: Path) -> Any:
    if key not in batch:
        raise ValueError(f"CIFAR file {path} has no {key!r} entry (keys: {sorted(batch)})")
    return batch[key]


def _cifar_batch(path: Path, label_key: str) -> tuple[Tensor, Tensor]:
    """``uint8 [N, 3, 32, 32]`` images and ``int64 [N]`` labels of one batch file."""
    batch = read_cifar_pickle(path)
    data = np.asarray(_cifar_field(batch, "data", path))
    labels = np.asarray(_cifar_field(batch, label_key, path))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f"CIFAR file {path}: 'data' must be uint8 [N, 3072], found {data.dtype} {list(data.shape)}"
        )
    if labels.ndim != 1 or labels.shape[0] != data.shape[0] or labels.dtype.kind not in "iu":
        raise ValueError(
            f"CIFAR file {path}: {label_key!r} must hold {data.shape[0]} integer labels"
        )
    images = torch.from_numpy(data.copy()).view(-1, 3, 32, 32)
    return images, torch.from_numpy(labels.astype(np.int64))


def _cifar_classes(path: Path, key: str) -> list[str]:
    names = _cifar_field(read_cifar_pickle(path), key, path)
    if not isinstance(names, list) or not names:
        raise ValueError(f"CIFAR file {path}: {key!r} must be a non-empty list of class names")
    return [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]


def _load_cifar(
    root: Path, hundred: bool, seed: int
) -> tuple[ImageDataset, ImageDataset, ImageDataset]:
    if not root.is_dir():
        raise ValueError(f"CIFAR directory {root} does not exist")
    if hundred:
        train_files, test_file, label_key = ["train"], "test", "fine_labels"
        classes = _cifar_classes(root / "meta", "fine_label_names")
    else:
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        test_file, label_key = "test_batch", "labels"
        classes = _cifar_classes(root / "batches.meta", "label_names")
    parts = [_cifar_batch(root / name, label_key) for name in train_files]
    train_x = torch.cat([p[0] for p in parts])
    train_y = torch.cat([p[1] for p in parts])
    test_x, test_y = _cifar_batch(root / test_file, label_key)
    for y, where in ((train_y, train_files[0]), (test_y, test_file)):
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= len(classes)):
            raise ValueError(
                f"CIFAR file {root / where}: labels outside 0..{len(classes) - 1} "
                f"({len(classes)} class names)"
            )
    full = ImageDataset(train_x, train_y, classes)
    # 5k of 50k for dev; a smaller (test-sized) data set keeps the same 10% proportion.
    dev_size = min(CIFAR_DEV, len(full) // 10)
    dev, train = _hold_out(full, [dev_size], seed)
    return train, dev, ImageDataset(test_x, test_y, classes)


# --------------------------------------------------------------------------- image folders


def _image_files(directory: Path) -> list[Path]:
    # scandir's entries know their type without a stat per file (ImageNet: 1.28M files).
    try:
        with os.scandir(directory) as entries:
            names = sorted(
                e.name
                for e in entries
                if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS
            )
    except OSError as err:  # a symlink loop (ELOOP), a permission, ...
        raise ValueError(f"image folder {directory} cannot be listed: {err.strerror}") from None
    return [directory / name for name in names]


def _class_dirs(root: Path) -> list[Path]:
    """The class subdirectories of ``root`` (hidden ones skipped). A symlink that resolves to
    nothing (broken, or a loop: ``is_dir()`` says False for both) is an error naming it,
    not a silently missing class."""
    dirs = []
    for p in sorted(root.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_symlink() and not p.exists():
            raise ValueError(f"image folder {root}: {p.name} is a broken or looping symbolic link")
        if p.is_dir():
            dirs.append(p)
    return dirs


@contextlib.contextmanager
def _opened_image(path: Path):
    """The PIL image at ``path``, open for the ``with`` block; a failure to read or decode it
    (in the block as well), PIL's decompression-bomb guard included, is a ValueError naming
    the file (the errors of :func:`cnnkit.data.streaming._read_errors`)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            yield im
    except _read_errors() as err:
        raise ValueError(f"cannot read image {path}: {err}") from None


def _is_gray(path: Path) -> bool:
    """Whether the image at ``path`` is single-channel, from its header alone (no decoding)."""
    with _opened_image(path) as im:
        return im.mode in ("1", "L", "LA", "La", "I", "F", *SIXTEEN_BIT_MODES)


def _decode(path: Path, channels: int, size: tuple[int, int]) -> Tensor:
    """The image at ``path`` as ``uint8 [channels, h, w]`` (bilinear resize to ``size = (h, w)``);
    any PIL mode mapped onto 0..255 by :func:`cnnkit.data.streaming.to_uint8_mode`."""
    from PIL import Image

    with _opened_image(path) as im:
        image = to_uint8_mode(im, channels)
        image.load()  # decoded while the file is open
    h, w = size
    if image.size != (w, h):
        image = image.resize((w, h), Image.BILINEAR)
    array = np.asarray(image, dtype=np.uint8).reshape(h, w, channels)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def _class_tree(root: Path, classes: list[str] | None) -> tuple[list[Path], Tensor, list[str]]:
    """Image files and labels of ``root/<class>/*``; ``classes`` fixes the label order.

    With ``classes=None`` (the training tree) the classes are the subdirectories, and each must
    hold an image: a class never seen in training is a mistake in the layout. An evaluation
    tree may lack classes.
    """
    found = [d.name for d in _class_dirs(root)]
    if not found:
        raise ValueError(f"image folder {root} has no class subdirectories (root/<class>/*.png)")
    training = classes is None
    if classes is None:
        if len(found) < 2:
            raise ValueError(
                f"image folder {root} has 1 class directory ({found[0]}): classification "
                "needs at least 2 (root/<class>/*.png)"
            )
        classes = found
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise ValueError(f"image folder {root}: classes {unknown} are not in the train split")
    files, labels = [], []
    for label, name in enumerate(classes):
        directory = root / name
        if directory.is_dir():
            found_files = _image_files(directory)
            if training and not found_files:
                raise ValueError(
                    f"image folder {directory} holds no images ({', '.join(IMAGE_EXTENSIONS)})"
                )
            files += found_files
            labels += [label] * len(found_files)
    if not files:
        raise ValueError(f"image folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files, torch.tensor(labels, dtype=torch.int64), classes


def _decode_all(files: list[Path], channels: int, image_size: int) -> Tensor:
    """``uint8 [N, channels, S, S]``, one image decoded and resized at a time (full-resolution
    images are never held together)."""
    out = torch.empty((len(files), channels, image_size, image_size), dtype=torch.uint8)
    for i, file in enumerate(files):
        out[i] = _decode(file, channels, (image_size, image_size))
    return out


FolderSplit = tuple[list[Path], Tensor]  # image files, int64 [N] labels


def _take(split: FolderSplit, index: Tensor) -> FolderSplit:
    files, labels = split
    return [files[i] for i in index.tolist()], labels[index]


def folder_files(root: Path, seed: int) -> tuple[dict[str, FolderSplit], list[str]]:
    """The files and labels of each split of an image folder, without decoding anything.

    Layouts:

    * ``root/<class>/*``: 10% of each class for test, 10% for dev (stratified, seeded);
    * ``root/train/<class>/*`` with ``root/test/...``, or ``root/val/...`` as the test split
      when there is no ``test/`` (the ImageNet layout); the dev split is ``root/dev/...``, else
      ``root/val/...`` when ``test/`` is the test split, else 10% of train (stratified, seeded).

    Returns:
        ``({"train" | "dev" | "test": (files, labels)}, classes)``; each split's files in sorted
        class-then-name order (held-out splits: that order, subset).

    Raises:
        ValueError: missing folder, no class directories, a training class with no image, no
            test split, or too few images to split (naming the path).
    """
    if not root.is_dir():
        raise ValueError(f"image folder {root} does not exist")
    if not (root / "train").is_dir():
        files, labels, classes = _class_tree(root, None)
        held = max(1, round(len(files) * FOLDER_HOLDOUT))
        if len(files) < 2 * held + 1:
            raise ValueError(f"image folder {root} holds {len(files)} images: too few to split")
        test, dev, train = hold_out_index(labels, [held, held], seed)
        full = (files, labels)
        return {
            "train": _take(full, train),
            "dev": _take(full, dev),
            "test": _take(full, test),
        }, classes
    names = {d for d in ("test", "val", "dev") if (root / d).is_dir()}
    test_name = "test" if "test" in names else "val" if "val" in names else None
    if test_name is None:
        raise ValueError(f"image folder {root} has train/ but no test/ (or val/) subfolder")
    dev_name = (
        "dev" if "dev" in names else "val" if test_name == "test" and "val" in names else None
    )
    train_files, train_labels, classes = _class_tree(root / "train", None)
    splits = {"train": (train_files, train_labels)}
    files, labels, _ = _class_tree(root / test_name, classes)
    splits["test"] = (files, labels)
    if dev_name is not None:
        files, labels, _ = _class_tree(root / dev_name, classes)
        splits["dev"] = (files, labels)
    else:
        held = max(1, round(len(train_files) * FOLDER_HOLDOUT))
        dev, train = hold_out_index(train_labels, [held], seed)
        splits["dev"], splits["train"] = _take(splits["train"], dev), _take(splits["train"], train)
    return splits, classes


def _load_folder(
    root: Path, seed: int, image_size: int
) -> tuple[ImageDataset, ImageDataset, ImageDataset]:
    splits, classes = folder_files(root, seed)
    # In memory, every header is read: the channel count is exact.
    channels = 1 if all(_is_gray(f) for files, _ in splits.values() for f in files) else 3
    sets = {
        s: ImageDataset(_decode_all(files, channels, image_size), labels, classes)
        for s, (files, labels) in splits.items()
    }
    return sets["train"], sets["dev"], sets["test"]


def load_image(
    path: str | os.PathLike, input_size: tuple[int, int, int], crop_fraction: float | None = None
) -> Tensor:
    """One image file as ``float [C, H, W]`` in [0, 1], converted to ``C`` channels and resized.

    Without ``crop_fraction``, squashed to ``H x W`` (the in-memory loader's recipe). With it,
    the evaluation recipe of streamed files (``H == W == S``): the shorter side resized to
    ``round(S / crop_fraction)`` and the centre ``S x S`` cropped
    (:func:`cnnkit.data.streaming.center_crop_box`).

    Raises:
        ValueError: the file is missing or not a readable image (naming it), ``C`` is not
            1 or 3, or ``crop_fraction`` is outside (0, 1] or given for a non-square size.
    """
    c, h, w = (int(v) for v in input_size)
    if c not in (1, 3):
        raise ValueError(f"input_size={tuple(input_size)}: only 1 or 3 channels are supported")
    if crop_fraction is not None and not (0 < crop_fraction <= 1 and h == w):
        raise ValueError(
            f"crop_fraction={crop_fraction!r} with input_size={tuple(input_size)}: "
            "needs a fraction in (0, 1] and a square size"
        )
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"image {file} does not exist")
    if crop_fraction is None:
        return _decode(file, c, (h, w)).float().div_(255.0)
    try:
        image = read_resized_crop(
            str(file), c, h, lambda cw, ch: center_crop_box(cw, ch, h, crop_fraction), False
        )
    except _read_errors() as err:
        raise ValueError(f"cannot read image {file}: {err}") from None
    return image.float().div_(255.0)


# --------------------------------------------------------------------------- streamed data sets

# Streamed folders: the channel count comes from the headers of at most this many files (all of
# them in a smaller folder, so it then agrees with the in-memory loader), and the mean/std from
# at most this many decoded training images. Both seeded samples: seconds, not the hours that
# reading every ImageNet header or pixel would take.
STREAM_HEADER_SAMPLE = 2000
STREAM_STATS_SAMPLE = 500


@dataclass
class StreamSplits:
    """What the engine needs to stream a data set: one source per split, and its facts.

    Attributes:
        train, dev, test: :class:`cnnkit.data.streaming.FileSource` (folders) or
            :class:`~cnnkit.data.streaming.TensorSource` (digits, CIFAR: decoded in memory).
        channels: 1 or 3.
        image_size: side of the served images.
        mean, std: per-channel training statistics in [0, 1] units (folders: estimated from
            ``stats_images`` training images, see :func:`stream_splits`).
    """

    train: FileSource | TensorSource
    dev: FileSource | TensorSource
    test: FileSource | TensorSource
    classes: list[str]
    channels: int
    image_size: int
    mean: list[float]
    std: list[float]
    spec: str
    stats_images: int

    @property
    def input_size(self) -> tuple[int, int, int]:
        return self.channels, self.image_size, self.image_size

    def dataset(self, split: str, *, train: bool, seed: int, **recipe: Any) -> StreamDataset:
        """A :class:`~cnnkit.data.streaming.StreamDataset` of ``split`` (``recipe``: its
        ``flip``, ``crop_padding``, ... arguments)."""
        if split not in SPLITS:
            raise ValueError(f"split={split!r}: expected one of {SPLITS}")
        return StreamDataset(
            getattr(self, split), image_size=self.image_size, train=train, seed=seed, **recipe
        )


def _sample(n: int, k: int, seed: int) -> list[int]:
    """``min(n, k)`` distinct indices of ``range(n)``, seeded, in increasing order."""
    if n <= k:
        return list(range(n))
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=g)[:k].tolist())


def _sampled_channels(splits: dict[str, FolderSplit], seed: int) -> int:
    """1 when every header of a seeded sample of the folder's files is single-channel, else 3.

    A folder of at most :data:`STREAM_HEADER_SAMPLE` files has all its headers read (the same
    answer as the in-memory loader). In a larger one, a few colour images among many grey ones
    could be missed: they would then be served grey (never an error).
    """
    files = [f for split in SPLITS for f in splits[split][0]]
    picked = _sample(len(files), STREAM_HEADER_SAMPLE, seed)
    return 1 if all(_is_gray(files[i]) for i in picked) else 3


def _sampled_stats(
    source: FileSource, image_size: int, seed: int
) -> tuple[list[float], list[float], int]:
    """Mean/std of at most :data:`STREAM_STATS_SAMPLE` seeded training images, decoded with
    the evaluation recipe (what the network sees, minus the crop jitter); unreadable ones are
    skipped here (training reports them)."""
    data = StreamDataset(source, image_size=image_size, train=False, seed=seed)
    images = []
    for i in _sample(len(source), STREAM_STATS_SAMPLE, seed):
        sample = data[(0, i)]
        if not isinstance(sample, Invalid):
            images.append(sample[0])
    if not images:
        raise ValueError(
            f"none of the sampled training images could be read ({source.path(0)}, ...)"
        )
    mean, std = channel_stats(torch.stack(images))
    return mean, std, len(images)


@dataclass(frozen=True)
class FolderListing:
    """An image folder listed once (:func:`list_folder`): what :func:`choose_data_storage` and
    :func:`stream_splits` both need, so that a run lists (ImageNet: 1.28M files) only once."""

    splits: dict[str, FolderSplit]
    classes: list[str]
    channels: int  # from a header sample (:func:`_sampled_channels`)


def list_folder(spec: str, *, seed: int = 0) -> FolderListing | None:
    """The :class:`FolderListing` of a ``folder:PATH`` spec (:func:`folder_files` and the
    channel count of a header sample); ``None`` for digits and CIFAR."""
    kind, path = _parse_spec(spec)
    if kind != "folder":
        return None
    splits, classes = folder_files(Path(path).expanduser(), seed)
    return FolderListing(splits, classes, _sampled_channels(splits, seed))


def choose_data_storage(
    spec: str,
    *,
    seed: int = 0,
    image_size: int = DEFAULT_IMAGE_SIZE,
    force: str = "auto",
    listing: FolderListing | None = None,
) -> tuple[bool, str]:
    """Stream ``spec`` or decode it into memory, and why (one line).

    Digits and CIFAR are always in memory under ``"auto"`` (CIFAR-10 is 180 MB decoded, and
    batch augmentation on the device is fastest); folders are listed (no decoding; ``listing``:
    :func:`list_folder` of the same spec and seed, already done) and judged by
    :func:`cnnkit.data.streaming.choose_streaming`.
    """
    kind, _ = _parse_spec(spec)
    if kind == "folder":
        listing = listing or list_folder(spec, seed=seed)
        n = sum(len(files) for files, _ in listing.splits.values())
        return choose_streaming(n, listing.channels, image_size, force)
    if force not in ("auto", "stream", "memory"):
        raise ValueError(f"force={force!r}: expected auto, stream or memory")
    if force == "auto":
        return False, f"in memory: {kind} is always decoded into memory under auto"
    return force == "stream", f"{force} (forced): {kind}"


def stream_splits(
    spec: str,
    *,
    seed: int = 0,
    image_size: int = DEFAULT_IMAGE_SIZE,
    listing: FolderListing | None = None,
) -> StreamSplits:
    """The splits of ``spec`` ready for :class:`cnnkit.data.streaming.StreamDataset`.

    Folders: the same files, labels and order per split as :func:`load_data` (one listing,
    :func:`folder_files`; ``listing``: :func:`list_folder` of the same spec and seed, already
    done), served as files; channels from a header sample; mean/std estimated
    from a seeded sample of at most 500 training images decoded with the evaluation recipe
    (so they differ slightly from the in-memory loader's exact ones). Digits and CIFAR: decoded
    in memory by :func:`load_data` and served from the tensors (exact statistics).

    Raises:
        ValueError: as :func:`load_data`.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 4:
        raise ValueError(f"image_size={image_size!r} must be an integer >= 4")
    if _parse_spec(spec)[0] != "folder":
        d = load_data(spec, seed=seed, image_size=image_size)
        sources = [TensorSource(s.images, s.labels) for s in (d.train, d.dev, d.test)]
        c, h, _ = d.input_size
        return StreamSplits(*sources, d.classes, c, h, d.mean, d.std, spec, len(d.train))
    listing = listing or list_folder(spec, seed=seed)
    splits, classes, channels = listing.splits, listing.classes, listing.channels
    _check_splits(spec, [len(splits[s][0]) for s in SPLITS], classes, splits["train"][1])
    sources = {s: FileSource(*splits[s], channels) for s in SPLITS}
    mean, std, counted = _sampled_stats(sources["train"], image_size, seed)
    return StreamSplits(
        sources["train"],
        sources["dev"],
        sources["test"],
        classes,
        channels,
        image_size,
        mean,
        std,
        spec,
        counted,
    )
