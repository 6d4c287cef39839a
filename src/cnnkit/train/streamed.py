"""The classification task's streamed data: DataLoader workers that decode and augment, batches
moved to the training device, unreadable files reported or skipped.

Each rank reads only its shard: the batch sampler (:class:`cnnkit.data.streaming.
ShardBatchSampler`) runs in the main process and hands the workers the keys of this rank's
batches; evaluation reads a contiguous share of the split.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import Dataset

from cnnkit.data.classification import (
    FolderListing,
    choose_data_storage,
    hold_out_index,
    list_folder,
    stream_splits,
)
from cnnkit.data.streaming import (
    EVAL_CROP_FRACTION,
    Batch,
    EvalBatchSampler,
    FileSource,
    ShardBatchSampler,
    check_invalid,
    default_workers,
    stream_loader,
)
from cnnkit.train.config import TrainConfig
from cnnkit.train.task import Runtime


def wants_stream(cfg: TrainConfig) -> tuple[bool, str, FolderListing | None]:
    """Whether ``cfg.data`` streams (``--stream`` / ``--in-memory`` / by its decoded size), the
    one-line reason the run prints, and the folder's listing for :class:`StreamedData` (a
    folder is listed once; ``None`` for digits and CIFAR)."""
    listing = list_folder(cfg.data)
    stream, why = choose_data_storage(
        cfg.data, image_size=cfg.image_size, force=cfg.storage, listing=listing
    )
    return stream, why, listing


class _Keep(Dataset):
    """The samples ``keep`` of ``dataset`` (``--train-subset``), renumbered ``0..len(keep)-1``."""

    def __init__(self, dataset: Dataset, keep: list[int]) -> None:
        self.dataset, self.keep = dataset, keep
        self.sample_shape = dataset.sample_shape

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        return self.dataset[(epoch, self.keep[i])]


class StreamedData:
    """The three splits of ``cfg.data`` as DataLoaders (see the module docstring).

    Args:
        cfg: the training arguments (data, image size, workers, ``--skip-invalid``, subset).
        runtime: the device (pinned host memory on CUDA) and the process group.
        crop_padding, flip: the training augmentation of in-memory sources (digits, CIFAR);
            files get the ImageNet recipe (:mod:`cnnkit.data.streaming`).
        listing: the folder's listing from :func:`wants_stream` (else listed here).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        runtime: Runtime,
        crop_padding: int,
        flip: bool,
        listing: FolderListing | None = None,
    ) -> None:
        self.cfg, self.runtime = cfg, runtime
        splits = stream_splits(cfg.data, image_size=cfg.image_size, listing=listing)
        self.classes, self.input_size = splits.classes, splits.input_size
        self.mean, self.std = splits.mean, splits.std
        # Files are evaluated resized and centre-cropped; in-memory tensors as they are.
        self.crop_fraction = EVAL_CROP_FRACTION if isinstance(splits.train, FileSource) else None
        recipe = {"flip": flip, "crop_padding": crop_padding}
        train = splits.dataset("train", train=True, seed=cfg.seed, **recipe)
        # int64 [N]: the training labels, --train-subset applied (the task counts classes).
        self.train_labels = torch.as_tensor(splits.train.labels, dtype=torch.int64)
        if cfg.train_subset is not None and cfg.train_subset < len(train):
            keep = hold_out_index(self.train_labels, [cfg.train_subset], cfg.seed)[0]
            train = _Keep(train, keep.tolist())
            self.train_labels = self.train_labels[keep]
        self.train = train
        self.eval = {s: splits.dataset(s, train=False, seed=cfg.seed) for s in ("dev", "test")}
        self.sizes = {"train": len(train), **{s: len(d) for s, d in self.eval.items()}}
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        self.workers = cfg.workers if cfg.workers is not None else default_workers(local)
        self.pin = runtime.device.type == "cuda"
        self.skipped: set[str] = set()  # each unreadable file once, whatever the epochs
        self._train_loader = None

    def describe(self) -> str:
        return f"streamed by {self.workers} DataLoader worker(s) per process"

    def _to_device(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """The batch on the device; unreadable files stop the run unless ``--skip-invalid``."""
        check_invalid(batch.invalid, self.cfg.skip_invalid, self.skipped)
        if len(batch) == 0:
            raise ValueError(f"no image of a batch could be read: {batch.invalid[0]}, ...")
        device = self.runtime.device
        images = batch.images.to(device, non_blocking=self.pin)
        return images, batch.labels.to(device, non_blocking=self.pin)

    def train_loader(self, sampler: ShardBatchSampler) -> Iterator[tuple[Tensor, Tensor]]:
        """This rank's training batches (uint8 images, labels) on the device, in order.

        The loader is built on the first call around ``sampler`` and kept (its workers persist
        across epochs); the engine passes its one sampler every epoch, re-aimed by ``set_epoch``.
        """
        if self._train_loader is None:
            # Persistent workers: the sampler is read at each epoch's iter(), after set_epoch.
            self._train_loader = stream_loader(
                self.train, sampler, workers=self.workers, pin_memory=self.pin
            )
        for batch in self._train_loader:
            yield self._to_device(batch)

    def eval_loader(
        self, split: str, rank: int, world: int, batch_size: int
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """This rank's contiguous share of ``split`` (uint8 images, labels) on the device."""
        data = self.eval[split]
        sampler = EvalBatchSampler(len(data), batch_size, rank=rank, world_size=world)
        loader = stream_loader(data, sampler, workers=min(self.workers, 2), pin_memory=self.pin)
        for batch in loader:
            yield self._to_device(batch)
