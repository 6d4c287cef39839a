"""Image classification data streamed through ``torch.utils.data.DataLoader`` workers.

Data sets too large to decode into memory (ImageNet: 1.28M JPEGs, ~190 GB as uint8 at 224²)
are read a batch at a time. The pieces:

* :func:`shard_order` / :class:`ShardBatchSampler`: this rank's shard of the epoch's permutation,
  cut into batches, in the main process. A batch is a list of ``(epoch, index)`` keys: the epoch
  travels with every sample, so persistent workers need no epoch state and every random choice
  can be a function of ``(seed, epoch, index)`` alone.
* :class:`StreamDataset`: one key -> one ``uint8 [C, S, S]`` image and its label, decoded and
  augmented in a worker, its randomness drawn from ``numpy.random.default_rng([seed, epoch,
  index])``: the same image gets the same crop whatever the rank, the worker, the number of
  workers or the world size, and a resumed run sees exactly the crops it would have seen.
  Two sources: image files (:class:`FileSource`, decoded with PIL) and in-memory uint8 tensors
  (:class:`TensorSource`: digits, CIFAR, so ``--stream`` works for every data set).
* :func:`stream_loader`: the DataLoader, yielding :class:`Batch` es. A file that cannot be read
  becomes an :class:`Invalid` marker in the worker, and the collate drops it and records
  ``"PATH: reason"`` in :attr:`Batch.invalid`: the consumer decides whether that is an error.

Normalization and Cutout are not done here: batches stay uint8 (4x less to move between
processes and to the device) and the engine normalizes them on the device
(:class:`cnnkit.data.transforms.BatchAugment` with ``crop_padding=0, flip=False``).

Recipes (:class:`StreamDataset`):

* files, training: RandomResizedCrop to ``S x S`` (area fraction ``U(0.08, 1)``, log-uniform
  aspect ratio in ``[3/4, 4/3]``, 10 tries then a centre crop of the clamped ratio: the Inception
  / torchvision recipe) + horizontal flip with probability 1/2 (``flip``);
* files, evaluation: resize the shorter side to ``round(S / crop_fraction)`` (``S * 256 / 224``
  by default), centre crop ``S x S``;
* both in one PIL call, ``Image.resize(size, BILINEAR, box=crop)`` (PIL's bilinear filter widens
  with the downscale factor: antialiased), after ``Image.draft``, which lets libjpeg decode a JPEG
  at 1/2, 1/4 or 1/8 scale (DCT scaling: much less work) whenever the crop keeps at least ``S``
  pixels on each side at that scale;
* tensors, training: random crop with ``crop_padding`` zero pixels on each side (He et al., 2016)
  + optional flip; evaluation: the image as it is.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

SampleKey = tuple[int, int]  # (epoch, index into the data set)

# RandomResizedCrop (Szegedy et al., 2015; torchvision's defaults).
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_TRIES = 10
# Evaluation: the S x S centre crop covers this fraction of the resized shorter side (224/256).
EVAL_CROP_FRACTION = 224.0 / 256.0
# choose_streaming: a decoded data set above min(4 GiB, a quarter of available RAM) streams.
STREAM_MAX_BYTES = 4 << 30
STREAM_RAM_FRACTION = 0.25
# default_workers never starts more than this many workers per process (beyond it, the main
# process and the host-to-device copies are the bottleneck, and each worker costs memory).
MAX_DEFAULT_WORKERS = 16


# --------------------------------------------------------------------------- order and shards


def shard_order(
    n: int, *, seed: int, epoch: int, rank: int = 0, world_size: int = 1, shuffle: bool = True
) -> Tensor:
    """``int64 [ceil(n / world_size)]``: this rank's sample indices for ``epoch``.

    As ``torch.utils.data.DistributedSampler`` (``drop_last=False``): the permutation of
    ``range(n)`` is seeded by ``seed + epoch`` (identical on every rank, reproducible after a
    resume), padded by wrapping around to a multiple of ``world_size``, and dealt out: rank
    ``r`` takes positions ``r, r + W, r + 2W, ...``. Shards are disjoint (except the at most
    ``W - 1`` padding repeats) and together cover every sample.
    """
    if n < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"shard_order: need n >= 1 and 0 <= rank={rank} < world_size={world_size}")
    if shuffle:
        g = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(n, generator=g)
    else:
        order = torch.arange(n)
    total = -(-n // world_size) * world_size
    if total > n:
        # Wrap around (possibly several times when n < world_size - 1).
        order = order.repeat(-(-total // n))[:total]
    return order[rank::world_size]


def steps_per_epoch(n: int, batch_size: int, world_size: int, drop_last: bool) -> int:
    """Batches in one epoch of one rank's shard (``ceil(n / world_size)`` samples).

    ``drop_last`` drops a ragged last batch (a shard smaller than a batch gives 0 steps).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    shard = -(-n // world_size)
    return shard // batch_size if drop_last else -(-shard // batch_size)


class ShardBatchSampler(Sampler[list[SampleKey]]):
    """Batches of ``(epoch, index)`` keys over this rank's shard of each epoch's permutation.

    Batch ``b`` of epoch ``e`` is ``shard_order(n, seed, e, rank, world_size)[b*B : (b+1)*B]``.
    Call :meth:`set_epoch` before each epoch; ``start`` skips the batches a resumed run already
    trained on (mid-epoch resume), so the rest of the epoch is exactly what it would have been.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        shuffle: bool = True,
    ) -> None:
        if n < 1:
            raise ValueError(f"ShardBatchSampler: n={n} must be >= 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"ShardBatchSampler: rank={rank} outside world_size={world_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.drop_last, self.shuffle = drop_last, shuffle
        self.steps = steps_per_epoch(n, batch_size, world_size, drop_last)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Serve epoch ``epoch`` from its batch ``start`` (0-based) on."""
        if not 0 <= start <= self.steps:
            raise ValueError(f"set_epoch: start={start} outside 0..{self.steps} batches")
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.steps - self.start

    def __iter__(self) -> Iterator[list[SampleKey]]:
        order = shard_order(
            self.n,
            seed=self.seed,
            epoch=self.epoch,
            rank=self.rank,
            world_size=self.world_size,
            shuffle=self.shuffle,
        ).tolist()
        bs, epoch = self.batch_size, self.epoch
        for b in range(self.start, self.steps):
            yield [(epoch, i) for i in order[b * bs : (b + 1) * bs]]


class EvalBatchSampler(Sampler[list[SampleKey]]):
    """Evaluation batches: a contiguous, disjoint share of ``range(n)`` per rank, no padding
    (so metrics summed over ranks are exact), keys ``(0, index)`` (evaluation is deterministic)."""

    def __init__(self, n: int, batch_size: int, *, rank: int = 0, world_size: int = 1) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"EvalBatchSampler: batch_size={batch_size}, rank={rank}, world_size={world_size}"
            )
        per = -(-n // world_size)
        self.lo, self.hi = min(rank * per, n), min((rank + 1) * per, n)
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-(self.hi - self.lo) // self.batch_size)

    def __iter__(self) -> Iterator[list[SampleKey]]:
        for b in range(self.lo, self.hi, self.batch_size):
            yield [(0, i) for i in range(b, min(b + self.batch_size, self.hi))]


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Invalid:
    """A sample whose file could not be read: the collate drops it and reports it."""

    path: str
    reason: str


@dataclass
class Batch:
    """What :func:`stream_loader` yields.

    Attributes:
        images: ``uint8 [B, C, S, S]``.
        labels: ``int64 [B]``.
        invalid: ``"PATH: reason"`` of the samples that could not be read (not in ``images``).
    """

    images: Tensor
    labels: Tensor
    invalid: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def pin_memory(self) -> Batch:
        """Called by the DataLoader's pin-memory thread (``pin_memory=True``)."""
        return Batch(self.images.pin_memory(), self.labels.pin_memory(), self.invalid)


class FileSource:
    """Image files and their labels, held compactly.

    The paths live in one byte buffer plus offsets, not a list of ``str``: forked DataLoader
    workers would touch (and so copy, page by page) the reference counts of 1.28M Python
    objects, the classic "DataLoader memory leak" that grows with the data set.

    Args:
        files: the image paths.
        labels: ``int64 [N]``.
        channels: 1 (decode to ``"L"``) or 3 (``"RGB"``).
    """

    def __init__(self, files: Sequence[str | os.PathLike], labels: Tensor, channels: int) -> None:
        if len(files) != int(labels.shape[0]):
            raise ValueError(f"FileSource: {len(files)} files but {labels.shape[0]} labels")
        if channels not in (1, 3):
            raise ValueError(f"FileSource: channels={channels} must be 1 or 3")
        encoded = [os.fsencode(f) for f in files]
        self._bytes = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self._ends = np.cumsum([len(e) for e in encoded], dtype=np.int64)
        self.labels = labels.to(torch.int64).numpy().copy()
        self.channels = channels

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def path(self, i: int) -> str:
        start = int(self._ends[i - 1]) if i > 0 else 0
        return os.fsdecode(self._bytes[start : int(self._ends[i])].tobytes())


class TensorSource:
    """In-memory images ``uint8 [N, C, H, W]`` and labels ``int64 [N]`` (digits, CIFAR)."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"TensorSource: images must be uint8 [N, C, H, W], got {images.dtype} {list(images.shape)}"
            )
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"TensorSource: {images.shape[0]} images but {labels.shape[0]} labels")
        self.images = images
        self.labels = labels.to(torch.int64).numpy().copy()
        self.channels = int(images.shape[1])

    def __len__(self) -> int:
        return int(self.labels.shape[0])


# --------------------------------------------------------------------------- crops


def random_resized_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
) -> tuple[int, int, int, int]:
    """``(left, top, w, h)`` of a RandomResizedCrop box inside a ``width x height`` image.

    Up to 10 tries: area ``U(scale) * width * height``, aspect ratio ``w / h`` log-uniform in
    ``ratio``, sides rounded; the first box that fits is placed uniformly. If none fits (a very
    elongated or tiny image), the fallback is the largest centred box whose ratio is clamped
    into ``ratio``.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(CROP_TRIES):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    image_ratio = width / height
    if image_ratio < ratio[0]:  # too tall: full width, height of the narrowest allowed box
        w, h = width, round(width / ratio[0])
    elif image_ratio > ratio[1]:  # too wide
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def center_crop_box(
    width: int, height: int, size: int, crop_fraction: float = EVAL_CROP_FRACTION
) -> tuple[float, float, float, float]:
    """``(x0, y0, x1, y1)`` in source pixels whose resize to ``size x size`` equals resizing the
    shorter side to ``round(size / crop_fraction)`` and cropping the centre ``size x size``."""
    resized_short = round(size / crop_fraction)
    scale = min(width, height) / resized_short  # source pixels per output pixel
    side = size * scale
    x0, y0 = (width - side) / 2, (height - side) / 2
    return x0, y0, x0 + side, y0 + side


# PIL's errors for unreadable files: OSError (truncated, unidentified), SyntaxError and
# struct.error (malformed headers in some plugins), EOFError, ValueError, and the decompression
# bomb guard. Anything else is our bug and must surface.
def _read_errors() -> tuple[type[BaseException], ...]:
    from PIL import Image

    return (OSError, SyntaxError, EOFError, ValueError, struct.error, Image.DecompressionBombError)


# PIL modes whose pixels are not 8-bit: PIL's own convert("L") clips them to 0..255 (a 16-bit
# grayscale PNG comes out nearly all white), so :func:`to_uint8_mode` scales them instead.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
WIDE_MODES = (*SIXTEEN_BIT_MODES, "I", "F")


def to_uint8_mode(image, channels: int):
    """``image`` (a PIL image of any mode) as an 8-bit ``"L"`` (``channels == 1``) or ``"RGB"``
    image, every mode's values mapped onto 0..255 by what they mean:

    * ``"L"``, ``"RGB"``: as they are; ``"1"`` (0 / 255), ``"P"`` (through its palette),
      ``"CMYK"``, ``"YCbCr"``: PIL's conversion; ``"LA"``, ``"RGBA"``, ``"PA"``: the colour,
      alpha dropped (as torchvision's ``ImageFolder`` does: ``convert("RGB")``).
    * ``"I;16"`` (16-bit PNG / TIFF, any byte order): 0..65535 -> ``round(v * 255 / 65535)``.
    * ``"I"`` (32-bit signed): PIL decodes 16-bit grayscale files to it, so its values are
      taken as 0..65535 too (scaled the same way); values outside are clipped.
    * ``"F"`` (32-bit float): an image whose maximum is <= 1 is taken as [0, 1] (scaled by
      255), any other as 0..255; either way clipped, NaN read as 0.

    Grayscale wide modes become ``"L"`` first, then ``"RGB"`` when 3 channels are asked for.
    A mode PIL cannot convert raises ValueError (an unreadable image, see :func:`_read_errors`).
    """
    from PIL import Image

    mode = "L" if channels == 1 else "RGB"
    if image.mode == mode:
        return image
    if image.mode in WIDE_MODES:
        values = np.asarray(image)
        if image.mode == "F":
            values = np.nan_to_num(values.astype(np.float64), nan=0.0)
            if values.size and values.max() <= 1:
                values = values * 255.0
            gray = np.rint(np.clip(values, 0, 255)).astype(np.uint8)
        else:  # integers taken as 0..65535: exact integer rounding of v * 255 / 65535
            values = np.clip(values.astype(np.int64), 0, 65535)
            gray = ((values * 255 + 32767) // 65535).astype(np.uint8)
        image = Image.fromarray(gray)  # uint8 [H, W]: "L"
        return image if mode == "L" else image.convert(mode)
    return image.convert(mode)


def read_resized_crop(path: str, channels: int, size: int, box_of, flip: bool) -> Tensor:
    """Decode the crop ``box_of(width, height) -> (x0, y0, x1, y1)`` of the image at ``path``,
    resized to ``size x size``, as ``uint8 [channels, size, size]`` (mirrored when ``flip``).

    Raises whatever PIL raises for an unreadable file (see :func:`_read_errors`).
    """
    from PIL import Image

    mode = "L" if channels == 1 else "RGB"
    with Image.open(path) as im:
        x0, y0, x1, y1 = box_of(*im.size)
        if im.format == "JPEG":
            # Ask libjpeg for the smallest 1/k scale that keeps >= size pixels across the crop:
            # draft picks k = min(W // req_w, H // req_h) rounded down to 1, 2, 4 or 8.
            req = (
                max(1, math.ceil(im.size[0] * size / max(x1 - x0, 1e-6))),
                max(1, math.ceil(im.size[1] * size / max(y1 - y0, 1e-6))),
            )
            full = im.size
            im.draft(mode, req)
            sx, sy = im.size[0] / full[0], im.size[1] / full[1]
            x0, x1, y0, y1 = x0 * sx, x1 * sx, y0 * sy, y1 * sy
        image = to_uint8_mode(im, channels)
        out = image.resize((size, size), Image.BILINEAR, box=(x0, y0, x1, y1))
    if flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    # np.array, not asarray: PIL's array view is read-only, and torch wants a writable one.
    array = np.array(out, dtype=np.uint8).reshape(size, size, channels)
    return torch.from_numpy(array).permute(2, 0, 1)


def padded_crop(image: Tensor, padding: int, rng: np.random.Generator, flip: bool) -> Tensor:
    """``uint8 [C, H, W]``: the ``H x W`` window at a random offset of ``image`` zero-padded by
    ``padding`` on each side (output pixel ``(i, j)`` = input ``(i + dy - p, j + dx - p)`` or 0),
    mirrored when ``flip``."""
    c, h, w = image.shape
    out = image
    if padding > 0:
        dy, dx = (int(v) - padding for v in rng.integers(0, 2 * padding + 1, size=2))
        out = torch.zeros_like(image)
        # Destination rows/cols that read inside the image.
        r0, r1 = max(0, -dy), min(h, h - dy)
        c0, c1 = max(0, -dx), min(w, w - dx)
        if r0 < r1 and c0 < c1:
            out[:, r0:r1, c0:c1] = image[:, r0 + dy : r1 + dy, c0 + dx : c1 + dx]
    return out.flip(2) if flip else out


# --------------------------------------------------------------------------- the data set


class StreamDataset(Dataset):
    """``(epoch, index) -> (uint8 [C, S, S], label)``, or :class:`Invalid` for an unreadable file.

    Every random choice comes from ``numpy.random.default_rng([seed, epoch, index])``: a
    function of the sample's key only, never of the rank, worker or world size. Evaluation
    (``train=False``) draws nothing and ignores the epoch.

    Args:
        source: :class:`FileSource` or :class:`TensorSource`.
        image_size: output side ``S`` of file sources (tensor sources keep their own size).
        train: training recipe (random crop, flip) or evaluation recipe (see the module doc).
        seed: the run's seed.
        flip: random horizontal flips in training.
        crop_padding: tensor sources: zero padding of the random crop (0: none).
        crop_scale, crop_ratio: file sources: RandomResizedCrop's area and aspect ranges.
        crop_fraction: file sources: evaluation centre crop / resized shorter side.
    """

    def __init__(
        self,
        source: FileSource | TensorSource,
        *,
        image_size: int,
        train: bool,
        seed: int,
        flip: bool = True,
        crop_padding: int = 0,
        crop_scale: tuple[float, float] = CROP_SCALE,
        crop_ratio: tuple[float, float] = CROP_RATIO,
        crop_fraction: float = EVAL_CROP_FRACTION,
    ) -> None:
        if not isinstance(source, (FileSource, TensorSource)):
            raise TypeError(
                f"source must be a FileSource or TensorSource, got {type(source).__name__}"
            )
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size={image_size!r} must be a positive integer")
        if not (0 < crop_scale[0] <= crop_scale[1] <= 1 and 0 < crop_ratio[0] <= crop_ratio[1]):
            raise ValueError(f"crop_scale={crop_scale} / crop_ratio={crop_ratio} out of range")
        if not 0 < crop_fraction <= 1:
            raise ValueError(f"crop_fraction={crop_fraction} must be in (0, 1]")
        self.source, self.train, self.seed = source, train, seed
        self.flip, self.crop_padding = flip, crop_padding
        self.crop_scale, self.crop_ratio = crop_scale, crop_ratio
        self.crop_fraction = crop_fraction
        if isinstance(source, TensorSource):
            self.image_size = int(source.images.shape[2])
            self.sample_shape = tuple(int(v) for v in source.images.shape[1:])
        else:
            self.image_size = image_size
            self.sample_shape = (source.channels, image_size, image_size)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: SampleKey) -> tuple[Tensor, int] | Invalid:
        epoch, i = key
        label = int(self.source.labels[i])
        rng = np.random.default_rng([self.seed, epoch, i]) if self.train else None
        if isinstance(self.source, TensorSource):
            image = self.source.images[i]
            if rng is not None:
                flip = self.flip and bool(rng.random() < 0.5)
                image = padded_crop(image, self.crop_padding, rng, flip)
            return image, label
        path = self.source.path(i)
        try:
            return self._read(path, rng), label
        except _read_errors() as err:
            return Invalid(path, f"{type(err).__name__}: {err}")

    def _read(self, path: str, rng: np.random.Generator | None) -> Tensor:
        size, channels = self.image_size, self.source.channels
        if rng is None:
            return read_resized_crop(
                path,
                channels,
                size,
                lambda w, h: center_crop_box(w, h, size, self.crop_fraction),
                False,
            )
        flip = self.flip and bool(rng.random() < 0.5)

        def box_of(w: int, h: int) -> tuple[float, float, float, float]:
            left, top, cw, ch = random_resized_crop_box(w, h, rng, self.crop_scale, self.crop_ratio)
            return left, top, left + cw, top + ch

        return read_resized_crop(path, channels, size, box_of, flip)


@dataclass(frozen=True)
class StreamCollate:
    """Samples -> :class:`Batch`: the :class:`Invalid` ones dropped and reported.

    In a worker, the images are stacked straight into shared memory (``default_collate``
    does that), so the batch crosses to the main process without another copy.
    """

    sample_shape: tuple[int, ...]

    def __call__(self, samples: list[tuple[Tensor, int] | Invalid]) -> Batch:
        good = [s for s in samples if not isinstance(s, Invalid)]
        invalid = [f"{s.path}: {s.reason}" for s in samples if isinstance(s, Invalid)]
        if good:
            images = default_collate([s[0] for s in good])
        else:
            images = torch.empty((0, *self.sample_shape), dtype=torch.uint8)
        labels = torch.tensor([s[1] for s in good], dtype=torch.int64)
        return Batch(images, labels, invalid)


def stream_loader(
    dataset: Dataset,
    sampler: Sampler[list[SampleKey]],
    *,
    workers: int,
    pin_memory: bool,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> DataLoader:
    """A DataLoader yielding :class:`Batch` es of ``dataset`` in ``sampler``'s batches (or what
    ``collate_fn`` makes of them: the detection data's batches of lists).

    Workers persist across epochs (no re-fork per epoch; the sampler runs in the main process,
    so :meth:`ShardBatchSampler.set_epoch` still takes effect) and each keeps 2 batches in
    flight. ``workers=0`` decodes in the calling process (same batches, bit for bit).
    """
    if workers < 0:
        raise ValueError(f"workers={workers} must be >= 0")
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=collate_fn or StreamCollate(dataset.sample_shape),
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=2 if workers > 0 else None,
    )


def check_invalid(invalid: list[str], skip_invalid: bool, skipped: set[str]) -> None:
    """A batch's unreadable images (``"PATH: reason"``) stop the run with the first one named,
    unless ``skip_invalid``: then they are added to ``skipped`` (each file counted once)."""
    if not invalid:
        return
    if not skip_invalid:
        raise ValueError(
            f"cannot read image {invalid[0]} (--skip-invalid drops unreadable images and "
            "reports how many)"
        )
    skipped.update(invalid)


def default_workers(local_world_size: int = 1) -> int:
    """DataLoader workers per process: the CPUs this process may use (its affinity mask),
    shared among the ``local_world_size`` processes of this machine, less one for the process
    itself, at most 16. 0 (decode in the main process) when a process has a single CPU."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    per_process = cpus // max(1, local_world_size)
    return max(0, min(per_process - 1, MAX_DEFAULT_WORKERS))


# --------------------------------------------------------------------------- memory or stream


def available_memory() -> int:
    """Bytes of RAM available to new allocations (``MemAvailable``; total RAM elsewhere)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def format_bytes(n: float) -> str:
    """``1.5 GB`` / ``97.7 MB`` (powers of 1024)."""
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.1f} MB"


def choose_streaming(
    n_images: int, channels: int, image_size: int, force: str, *, available: int | None = None
) -> tuple[bool, str]:
    """Whether to stream a data set of ``n_images`` ``channels x S x S`` images, and why.

    ``force="auto"`` streams when the decoded uint8 set exceeds ``min(4 GiB, available RAM /
    4)``: every process (rank, and each forked worker that touches it) may hold a copy, and the
    model and activations need the rest. ``"stream"`` / ``"memory"`` decide outright.

    Returns:
        ``(stream, reason)``: the reason is one line naming the decoded size and the threshold.

    Raises:
        ValueError: ``force="memory"`` and the decoded set exceeds the available RAM.
    """
    if force not in ("auto", "stream", "memory"):
        raise ValueError(f"force={force!r}: expected auto, stream or memory")
    decoded = n_images * channels * image_size * image_size
    ram = available_memory() if available is None else available
    threshold = min(STREAM_MAX_BYTES, int(ram * STREAM_RAM_FRACTION))
    what = f"{n_images:,} images decoded at {channels}x{image_size}x{image_size} = {format_bytes(decoded)}"
    limit = f"threshold {format_bytes(threshold)} = min(4 GiB, 1/4 of {format_bytes(ram)} available RAM)"
    if force == "memory" and decoded > ram:
        raise ValueError(
            f"--image-size {image_size} with --in-memory: {what}, more than the "
            f"{format_bytes(ram)} of available RAM (stream it, or a smaller --image-size)"
        )
    if force != "auto":
        return force == "stream", f"{force} (forced): {what}; {limit}"
    if decoded > threshold:
        return True, f"streaming from disk: {what} > {limit}"
    return False, f"in memory: {what} <= {limit}"
