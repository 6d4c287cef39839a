"""Image classification as a task of the training engine (:mod:`cnnkit.train.task`).

The data either lives on the training device as uint8 tensors, augmented a whole batch at a time
(:class:`cnnkit.data.transforms.BatchAugment`: the fastest path for digits, CIFAR and small
folders), or streams from disk through DataLoader workers that decode and augment each image
(:mod:`cnnkit.data.streaming`: folders too large to decode up front, ImageNet's layout). Which
one is chosen from the decoded size (``--stream`` / ``--in-memory`` force either). Both visit
the same samples in the same order: batch ``b`` of rank ``r`` in epoch ``e`` is slice ``b`` of
:func:`cnnkit.data.streaming.shard_order` either way.

The loss is the cross-entropy (with label smoothing where configured); the primary metric is
the accuracy, the history also records the loss of each split.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnnkit.data.classification import DataSplits, ImageDataset, hold_out_index, load_data
from cnnkit.data.streaming import ShardBatchSampler
from cnnkit.data.transforms import BatchAugment
from cnnkit.train.config import (
    TrainConfig,
    resolve_crop_padding,
    resolve_flip,
    resolve_label_smoothing,
)
from cnnkit.train.device import autocast
from cnnkit.train.distributed import eval_shard
from cnnkit.train.model_args import check_input_size, model_overrides
from cnnkit.train.rng import stream_seed
from cnnkit.train.task import Metric, Reducer, Runtime, StepOutput

# Evaluation batches: twice the training batch (no activations are kept), at most this many.
MAX_EVAL_BATCH = 512
# The augmentation stream of a step, apart from the global generators' stream of the same step.
_AUGMENT_STREAM = 1
# A training split below either figure is too small to mean anything: a warning, not an error.
SMALL_TRAIN_IMAGES = 10
SMALL_TRAIN_PER_CLASS = 2


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: Tensor,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
) -> Tensor:
    """Logits ``float32 [N, K]`` of ``images`` (``uint8 [N, C, H, W]`` or float in [0, 1]).

    The model runs in eval mode without gradients, normalized by the training statistics.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    device = torch.device(device)
    prep = BatchAugment(mean, std, crop_padding=0, flip=False)
    was_training = model.training
    model.eval()
    try:
        outs = []
        for start in range(0, images.shape[0], batch_size):
            x = prep(images[start : start + batch_size].to(device), train=False)
            with autocast(device, precision):
                outs.append(model(x).float().cpu())
        k = getattr(model, "num_classes", None)
        return torch.cat(outs) if outs else torch.empty(0, k or 0)
    finally:
        model.train(was_training)


def _subset(data: DataSplits, cfg: TrainConfig) -> DataSplits:
    """``data`` with its training split cut to ``--train-subset`` images (stratified)."""
    if cfg.train_subset is None or cfg.train_subset >= len(data.train):
        return data
    keep = hold_out_index(data.train.labels, [cfg.train_subset], cfg.seed)[0]
    return dataclasses.replace(data, train=data.train.subset(keep))


class ClassificationTask:
    """Classify images into ``classes``: cross-entropy, accuracy (see the module docstring).

    Args:
        cfg: the training arguments (data, model, augmentation, regularization).
        data: data already in memory (default: read ``cfg.data`` in :meth:`setup`).
    """

    metric = Metric("accuracy", higher_is_better=True)

    def __init__(self, cfg: TrainConfig, data: DataSplits | None = None) -> None:
        self.cfg = cfg
        self.data = data
        self.stream = None
        self.flip = resolve_flip(cfg)
        self.crop_padding = resolve_crop_padding(cfg)
        self.label_smoothing = resolve_label_smoothing(cfg)
        self.storage_note = ""
        self.eval_batch = min(MAX_EVAL_BATCH, 2 * cfg.batch_size)

    # ------------------------------------------------------------------ data

    def setup(self, runtime: Runtime) -> None:
        cfg = self.cfg
        self.runtime = runtime
        if self.data is None:
            from cnnkit.train.streamed import StreamedData, wants_stream

            stream, self.storage_note, listing = wants_stream(cfg)
            if stream:
                self.stream = StreamedData(cfg, runtime, self.crop_padding, self.flip, listing)
                self.storage_note += f"; {self.stream.describe()}"
                if self.stream.crop_fraction is not None:
                    self.crop_padding = 0  # files get RandomResizedCrop, not a padded crop
            else:
                self.data = load_data(cfg.data, image_size=cfg.image_size)
        if self.data is not None:
            self.data = _subset(self.data, cfg)
            self.mean, self.std = self.data.mean, self.data.std
            self.classes, self.input_size = self.data.classes, self.data.input_size
            self.sizes = {s: len(getattr(self.data, s)) for s in ("train", "dev", "test")}
        else:
            s = self.stream
            self.mean, self.std = s.mean, s.std
            self.classes, self.input_size, self.sizes = s.classes, s.input_size, s.sizes
        self._check_sizes(runtime)
        # Streamed images come augmented from the workers: the batch step only normalizes
        # (and applies Cutout, which needs the normalized values).
        streamed = self.stream is not None
        self.augment = BatchAugment(
            self.mean,
            self.std,
            crop_padding=0 if streamed else self.crop_padding,
            flip=self.flip and not streamed,
            cutout_size=cfg.cutout,
            channels_last=runtime.channels_last,
        )
        if not streamed:
            # The whole (uint8) training set lives on the device: a batch is one gather.
            self.train_x = self.data.train.images.to(runtime.device)
            self.train_y = self.data.train.labels.to(runtime.device)

    def _check_sizes(self, runtime: Runtime) -> None:
        """The flags that must fit the data, checked before any run directory exists: crop
        padding and Cutout within the image, a batch no larger than this process's shard of the
        training split; a training split too small to mean anything is a warning."""
        cfg, side = self.cfg, min(self.input_size[1:])
        if self.crop_padding >= side:
            raise ValueError(
                f"--crop-padding {self.crop_padding} must be smaller than the image side ({side}): "
                "a crop would hold nothing but padding"
            )
        if cfg.cutout > side:
            raise ValueError(f"--cutout {cfg.cutout} is larger than the image side ({side})")
        n, world = self.sizes["train"], runtime.dist.world_size
        shard = -(-n // world)
        subset = f" (--train-subset {cfg.train_subset})" if cfg.train_subset else ""
        if cfg.batch_size > shard:
            where = f", {shard} per process of {world}" if world > 1 else ""
            raise ValueError(
                f"--batch-size {cfg.batch_size} is larger than the training split{subset}: "
                f"{n} images{where}"
            )
        self._check_memory(runtime)
        labels = self.data.train.labels if self.data is not None else self.stream.train_labels
        counts = torch.bincount(labels, minlength=len(self.classes))
        fewest = int(counts.min())
        if runtime.dist.is_main and (n < SMALL_TRAIN_IMAGES or fewest < SMALL_TRAIN_PER_CLASS):
            warnings.warn(
                f"--data {cfg.data}: the training split{subset} holds {n} images, "
                f"{fewest} of class {self.classes[int(counts.argmin())]!r}: too few to learn "
                "from or to measure anything",
                stacklevel=2,
            )

    def _check_memory(self, runtime: Runtime) -> None:
        """What must fit on the training device before the first step: the in-memory training
        set (uint8, copied to the device whole) and one normalized batch (float32), a lower
        bound of a step's memory; the device's free memory (CUDA) or the available RAM."""
        from cnnkit.data.streaming import available_memory, format_bytes

        cfg, device = self.cfg, runtime.device
        c, h, w = self.input_size
        if device.type == "cuda":
            free = torch.cuda.mem_get_info(device)[0]
        elif device.type == "cpu":
            free = available_memory()
        else:
            return
        where = f"the {format_bytes(free)} free on {device}"
        if self.data is not None and self.data.train.images.nbytes > free and device.type != "cpu":
            raise ValueError(
                f"--image-size {h}: the training split decoded at {c}x{h}x{w} takes "
                f"{format_bytes(self.data.train.images.nbytes)}, more than {where} "
                "(--stream reads it from disk instead)"
            )
        batch = cfg.batch_size * c * h * w * 4
        if batch > free:
            raise ValueError(
                f"--batch-size {cfg.batch_size} at --image-size {h}: one float32 batch of "
                f"{c}x{h}x{w} images takes {format_bytes(batch)}, more than {where}"
            )

    def build_model(self) -> nn.Module:
        from cnnkit.models.registry import create_model

        channels, classes = self.input_size[0], len(self.classes)
        kwargs = model_overrides(self.cfg, channels, classes, self.cfg.data)
        check_input_size(self.cfg.model, kwargs, self.input_size)
        return create_model(self.cfg.model, **kwargs)

    def train_size(self) -> int:
        return self.sizes["train"]

    def train_batches(self, sampler: ShardBatchSampler) -> Iterator[tuple[Tensor, Tensor]]:
        """Normalized, augmented ``float [B, C, H, W]`` batches and their ``int64 [B]`` labels."""
        if self.stream is not None:
            yield from self._streamed_batches(sampler)
            return
        device, gen = self.runtime.device, torch.Generator(device=self.runtime.device)
        for step, batch in enumerate(sampler, sampler.start):
            index = torch.tensor([i for _, i in batch], device=device)
            gen.manual_seed(stream_seed(self.cfg.seed, sampler.epoch, sampler.rank, step, 1))
            yield self.augment(self.train_x[index], train=True, generator=gen), self.train_y[index]

    def _streamed_batches(self, sampler: ShardBatchSampler) -> Iterator[tuple[Tensor, Tensor]]:
        gen = torch.Generator(device=self.runtime.device)
        for step, (images, labels) in enumerate(self.stream.train_loader(sampler), sampler.start):
            gen.manual_seed(stream_seed(self.cfg.seed, sampler.epoch, sampler.rank, step, 1))
            yield self.augment(images, train=True, generator=gen), labels

    # ------------------------------------------------------------------ steps and metrics

    def train_step(self, net: nn.Module, batch: tuple[Tensor, Tensor]) -> StepOutput:
        """Backpropagate the (label-smoothed) cross-entropy; log the plain cross-entropy, the
        quantity the dev loss measures, so the two curves compare like with like."""
        x, y = batch
        logits = net(x).float()
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        logged = None
        if self.label_smoothing:
            with torch.no_grad():
                logged = {"loss": F.cross_entropy(logits.detach(), y)}
        return StepOutput(
            {"loss": loss},
            int(y.shape[0]),
            {"accuracy": (logits.argmax(1) == y).sum()},
            logged=logged,
        )

    def _eval_batches(self, split: str, rank: int, world: int) -> Iterator[tuple[Tensor, Tensor]]:
        """This rank's contiguous share of ``split``, as ``(uint8 images, labels)`` batches."""
        if self.stream is not None:
            yield from self.stream.eval_loader(split, rank, world, self.eval_batch)
            return
        data: ImageDataset = getattr(self.data, split)
        share = eval_shard(len(data), rank, world)
        images, labels = data.images[share], data.labels[share]
        for start in range(0, len(labels), self.eval_batch):
            end = start + self.eval_batch
            yield (
                images[start:end].to(self.runtime.device),
                labels[start:end].to(self.runtime.device),
            )

    def evaluate(self, model: nn.Module, split: str, reduce: Reducer) -> dict[str, float]:
        """Mean cross-entropy (without smoothing) and accuracy on ``split``."""
        ctx = self.runtime.dist
        sums = torch.zeros(3, dtype=torch.float64, device=self.runtime.device)
        for images, y in self._eval_batches(split, ctx.rank, ctx.world_size):
            logits = model(self.augment(images, train=False)).float()
            sums[0] += F.cross_entropy(logits, y, reduction="sum")
            sums[1] += (logits.argmax(1) == y).sum()
            sums[2] += y.shape[0]
        loss, correct, count = reduce.sum(sums).tolist()
        return {"loss": loss / max(count, 1), "accuracy": correct / max(count, 1)}

    # ------------------------------------------------------------------ the run's words and files

    def describe(self) -> str:
        c, h, w = self.input_size
        sizes = self.sizes
        line = (
            f"{self.cfg.data}: {sizes['train']} train / {sizes['dev']} dev / {sizes['test']} test "
            f"images {c}x{h}x{w}, {len(self.classes)} classes"
        )
        return f"{line}\n{self.storage_note}" if self.storage_note else line

    def facts(self) -> dict[str, Any]:
        """config.json's ``data`` section; a streamed folder adds ``eval_crop_fraction``: its
        images are evaluated resized (shorter side ``S / fraction``) and centre-cropped, not
        squashed to ``S x S``, and ``cnnkit evaluate`` / ``predict`` must do the same."""
        facts = {
            "spec": self.data.spec if self.data is not None else self.cfg.data,
            "classes": list(self.classes),
            "mean": list(self.mean),
            "std": list(self.std),
            "input_size": list(self.input_size),
            "sizes": dict(self.sizes),
            "storage": "stream" if self.stream is not None else "memory",
        }
        if self.stream is not None and self.stream.crop_fraction is not None:
            facts["eval_crop_fraction"] = self.stream.crop_fraction
        return facts

    def settings(self) -> dict[str, Any]:
        return {
            "crop_padding": self.crop_padding,
            "label_smoothing": self.label_smoothing,
            "flip": self.flip,
            "storage": "stream" if self.stream is not None else "memory",
        }

    def summary(self, test: dict[str, float]) -> str:
        line = f"test accuracy {test['accuracy']:.2%} (loss {test['loss']:.4f})"
        if self.stream is not None and self.stream.skipped:
            line += f"; {len(self.stream.skipped)} unreadable image(s) skipped (--skip-invalid)"
        return line

    def finish(self, run_dir: Path, metrics: dict[str, Any]) -> None:
        """Classification writes nothing beyond the engine's files."""
