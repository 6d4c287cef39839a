"""The training loop: one :class:`Trainer` from the data in memory to a finished run directory.

What a run does (He et al., 2016; Goyal et al., 2017; the lecture's design-and-train cycle):

* The optimizer, its schedule (:mod:`cnnkit.train.optim`) and the learning rate by the linear
  scaling rule (Goyal et al., 2017, Sec. 2.1; :func:`cnnkit.train.config.effective_lr`).
* Augmentation on whole batches on the training device (:mod:`cnnkit.data.transforms`).
* Precision, memory layout and compilation as resolved for the hardware
  (:mod:`cnnkit.train.device`).
* Every epoch: a history record, the curves, the model and an atomic resume checkpoint; at the
  end the test figures, metrics.json, the diagnosis and report.md.
* Resuming re-creates every random stream (:mod:`cnnkit.train.rng`): the streams are seeded
  from ``(seed, epoch, rank)`` at each epoch start, so a resumed run repeats exactly what the
  killed one would have done; the RNG states are saved in the checkpoint as well.
"""

from __future__ import annotations

import dataclasses
import gc
import inspect
import json
import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnnkit.data.classification import DataSplits, ImageDataset, load_data, stratified_order
from cnnkit.data.transforms import BatchAugment
from cnnkit.train import distributed as D
from cnnkit.train.config import (
    TrainConfig,
    effective_lr,
    parse_dropblock,
    resolve_crop_padding,
    resolve_flip,
    resolve_label_smoothing,
)
from cnnkit.train.device import (
    autocast,
    cpu_has_fast_bf16,
    resolve_channels_last,
    resolve_compile,
    resolve_device,
    resolve_precision,
    wants_cuda,
)
from cnnkit.train.optim import LRSchedule, build_optimizer
from cnnkit.train.report import CURVES_NAME
from cnnkit.train.rng import rng_state, seed_everything, set_rng_state, stream_seed

CHECKPOINT_NAME = "last.ckpt"
METRICS_NAME = "metrics.json"
STATE_FORMAT = 1


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


# --------------------------------------------------------------------------- inference


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


# --------------------------------------------------------------------------- model


def model_overrides(cfg: TrainConfig, data: DataSplits) -> dict[str, Any]:
    """Constructor arguments for ``cfg.model`` from the data and the regularizer flags.

    A flag the architecture does not take is a ValueError naming both.
    """
    from cnnkit.models.registry import model_info

    info = model_info(cfg.model)
    channels = data.input_size[0]
    if cfg.in_chans is not None and cfg.in_chans != channels:
        raise ValueError(
            f"--in-chans {cfg.in_chans} does not match --data {data.spec}, whose images have "
            f"{channels} channel(s)"
        )
    kwargs: dict[str, Any] = {"num_classes": len(data.classes), "in_chans": channels}
    drop_block, drop_block_size = parse_dropblock(cfg.dropblock)
    flags = {
        "--norm": ("norm", cfg.norm),
        "--norm-groups": ("norm_groups", cfg.norm_groups),
        "--drop-path": ("drop_path_rate", cfg.drop_path or None),
        "--dropout": ("dropout", cfg.dropout or None),
        "--dropblock": ("drop_block", drop_block or None),
        "--dropblock SIZE": ("drop_block_size", drop_block_size),
    }
    accepted = inspect.signature(info.builder).parameters
    for flag, (name, value) in flags.items():
        if value is None:
            continue
        if name not in accepted:
            raise ValueError(f"{flag} is not supported by model {cfg.model!r}")
        kwargs[name] = value
    for name, value in cfg.model_args.items():
        if name not in accepted:
            raise ValueError(f"--model-arg {name}: model {cfg.model!r} has no such argument")
        kwargs[name] = value
    return kwargs


def build_model(cfg: TrainConfig, data: DataSplits) -> nn.Module:
    from cnnkit.models.registry import create_model

    return create_model(cfg.model, **model_overrides(cfg, data))


# --------------------------------------------------------------------------- the trainer


@dataclass
class EpochStats:
    """One epoch's training figures, summed over ranks: mean loss, accuracy in [0, 1], images
    seen, wall seconds, seconds inside the optimizer steps, and the last step's rate."""

    loss: float
    accuracy: float
    images: int
    seconds: float
    compute_seconds: float
    lr: float


def epoch_record(epoch: int, stats: EpochStats, dev_loss: float, dev_acc: float) -> dict[str, Any]:
    """One history record (keys as :class:`cnnkit.train.history.History` documents them)."""
    return {
        "epoch": epoch,
        "train_loss": stats.loss,
        "train_accuracy": stats.accuracy,
        "dev_loss": dev_loss,
        "dev_accuracy": dev_acc,
        "lr": stats.lr,
        "images_per_second": stats.images / stats.seconds,
        "epoch_seconds": stats.seconds,
    }


def default_run_dir(cfg: TrainConfig) -> Path:
    """``runs/<model>-<data kind>[-<data dir name>]-<YYYYmmdd-HHMMSS>``."""
    kind = cfg.data.partition(":")[0]
    if kind != "digits":
        kind += "-" + Path(cfg.data.partition(":")[2].rstrip("/")).name
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.model}-{kind}-{stamp}"


class Trainer:
    """Trains ``cfg.model`` on ``cfg.data`` and writes the run directory.

    Args:
        cfg: the training arguments.
        data: data already in memory (default: ``load_data(cfg.data)``).
        run_dir: where to write (default: ``cfg.out`` or ``runs/<model>-<data>-<time>``).
        resume: the state read from ``last.ckpt`` to continue from.
        log: a function taking one line of text (default: ``print`` on rank 0).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        data: DataSplits | None = None,
        run_dir: str | os.PathLike | None = None,
        resume: dict[str, Any] | None = None,
        log=None,
    ) -> None:
        self.cfg = cfg
        self.ctx = D.init_from_env(use_cuda=wants_cuda(cfg.device))
        self.device = resolve_device(cfg.device, self.ctx.local_rank)
        self._log = log
        self._setup_determinism()
        if cfg.tensorboard and self.ctx.is_main:
            summary_writer_class()  # fail now, not after the first epoch
        self.data = self._training_data(data)
        self._resolve_numerics()

        seed_everything(cfg.seed)  # the initial weights depend on the seed alone
        self.model = build_model(cfg, self.data).to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.drop_block_prob = parse_dropblock(cfg.dropblock)[0]

        self._plan_steps()
        self._setup_optimizer()
        self._wrap_model()
        self._setup_augment()

        self.run_dir = Path(run_dir or cfg.out or default_run_dir(cfg))
        self.epoch = 0
        self.global_step = 0
        self.train_seconds = 0.0
        self.history = None
        self.writer = None
        if resume is not None:
            self._load_state(resume)

    # ------------------------------------------------------------------ set-up helpers

    def _training_data(self, data: DataSplits | None) -> DataSplits:
        """``data`` (default: ``load_data(cfg.data)``), its training split cut to
        ``--train-subset`` images by a stratified order."""
        cfg = self.cfg
        data = data if data is not None else load_data(cfg.data, image_size=cfg.image_size)
        if cfg.train_subset is not None and cfg.train_subset < len(data.train):
            order = stratified_order(data.train.labels, cfg.seed)
            keep = order[: cfg.train_subset].sort().values
            data = dataclasses.replace(data, train=data.train.subset(keep))
        return data

    def _resolve_numerics(self) -> None:
        """The precision and memory layout for this device."""
        self.precision = resolve_precision(self.cfg.precision, self.device)
        if self.precision == "bf16" and self.device.type == "cpu" and not cpu_has_fast_bf16():
            warnings.warn(
                "--precision bf16 on a CPU without AMX/AVX512-BF16: bf16 is emulated and slow",
                stacklevel=3,  # the line that called Trainer(...)
            )
        self.channels_last = resolve_channels_last(
            self.cfg.channels_last, self.device, self.precision
        )

    def _plan_steps(self) -> None:
        """Steps per epoch over this rank's shard, and whether the model is compiled."""
        cfg = self.cfg
        self.world_batch = cfg.batch_size * self.ctx.world_size
        shard = -(-len(self.data.train) // self.ctx.world_size)
        full, rest = divmod(shard, cfg.batch_size)
        all_steps = max(1, full + (rest > 0))
        self.use_compile = resolve_compile(cfg, self.device, all_steps * cfg.epochs)
        # Compiled graphs are specialized to the batch shape: a ragged last batch would
        # compile a second graph. A last batch of one sample cannot train BatchNorm.
        drop_last = full > 0 and (rest == 1 or (self.use_compile and rest > 0))
        self.steps_per_epoch = full if drop_last else all_steps
        self.total_steps = self.steps_per_epoch * cfg.epochs

    def _setup_optimizer(self) -> None:
        """The optimizer at the linearly scaled rate, and its warmup + decay schedule."""
        cfg = self.cfg
        self.lr = effective_lr(cfg.base_lr, self.world_batch, cfg.lr_batch)
        self.optimizer = build_optimizer(self.model, cfg, self.lr)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        warmup = round(cfg.warmup_epochs * self.steps_per_epoch)
        self.schedule = LRSchedule(cfg.schedule, self.total_steps, min(warmup, self.total_steps))

    def _wrap_model(self) -> None:
        """``self.net``: the model as DistributedDataParallel sees it (itself on one process);
        ``self.step_net``: the same, compiled where ``self.use_compile``."""
        cfg = self.cfg
        if cfg.sync_bn and self.ctx.enabled and self.device.type != "cuda":
            raise ValueError(
                "--sync-bn needs CUDA devices (PyTorch's SyncBatchNorm has no CPU kernel)"
            )
        self.net = D.wrap_model(self.model, self.ctx, self.device, cfg.sync_bn)
        if cfg.sync_bn and self.ctx.enabled:
            self.model = self.net.module
        self.step_net = self._compiled(self.net) if self.use_compile else self.net
        self._compile_checked = not self.use_compile

    def _setup_augment(self) -> None:
        """The batch augmentation, and the whole training set on the device."""
        self.flip = resolve_flip(self.cfg)
        self.crop_padding = resolve_crop_padding(self.cfg)
        self.label_smoothing = resolve_label_smoothing(self.cfg)
        self.augment = BatchAugment(
            self.data.mean,
            self.data.std,
            crop_padding=self.crop_padding,
            flip=self.flip,
            cutout_size=self.cfg.cutout,
            channels_last=self.channels_last,
        )
        # The whole (uint8) training set lives on the device: a batch is one gather.
        self.train_x = self.data.train.images.to(self.device)
        self.train_y = self.data.train.labels.to(self.device)

    def log(self, text: str) -> None:
        if not self.ctx.is_main:
            return
        if self._log is not None:
            self._log(text)
        else:
            from tqdm import tqdm

            tqdm.write(text)

    def _setup_determinism(self) -> None:
        cfg = self.cfg
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        if cfg.deterministic:
            # cuBLAS needs a fixed workspace to be deterministic.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=self.device.type == "cuda")
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    def _compiled(self, net: nn.Module) -> nn.Module:
        try:
            return torch.compile(net)
        except Exception as err:  # no compiler, unsupported platform: train eagerly
            self._compile_failed(err)
            return net

    def _compile_failed(self, err: BaseException) -> None:
        warnings.warn(
            f"torch.compile is unavailable ({type(err).__name__}: {str(err)[:200]}); "
            "training without it",
            stacklevel=3,
        )
        self.use_compile = False
        self.step_net = self.net

    # ------------------------------------------------------------------ one step

    def train_step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """One optimizer step on a prepared batch; returns (summed loss, correct) as tensors."""
        if not self._compile_checked:
            # The first call compiles; a compiler failure falls back to eager mode once.
            try:
                out = self._step(self.step_net, x, y)
            except Exception as err:
                if isinstance(err, TrainingDiverged):
                    raise
                self._compile_failed(err)
                out = self._step(self.net, x, y)
            self._compile_checked = True
            return out
        return self._step(self.step_net, x, y)

    def _step(self, net: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.precision):
            logits = net(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            n = y.shape[0]
            return loss.detach() * n, (logits.argmax(1) == y).sum()

    def set_lr(self, step: int) -> float:
        factor = self.schedule.factor(step)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor
        if self.drop_block_prob > 0:
            from cnnkit.layers.regularize import set_drop_block

            # DropBlock (Ghiasi et al., 2018, Sec. 3): keep_prob decreases linearly to target.
            set_drop_block(self.model, self.drop_block_prob * min(1.0, step / self.total_steps))
        return self.base_lrs[0] * factor

    # ------------------------------------------------------------------ epochs

    def _epoch_streams(self, epoch: int) -> torch.Generator:
        cfg, rank = self.cfg, self.ctx.rank
        seed_everything(stream_seed(cfg.seed, epoch, rank, 0))
        if self.device.type == "cuda":
            torch.cuda.manual_seed(stream_seed(cfg.seed, epoch, rank, 0))
        gen = torch.Generator(device=self.device)
        gen.manual_seed(stream_seed(cfg.seed, epoch, rank, 1))
        return gen

    def _epoch_order(self, epoch: int) -> Tensor:
        """This rank's shard of epoch ``epoch``'s permutation of the training set, on the device."""
        return D.shard_indices(
            len(self.train_y),
            epoch=epoch,
            seed=self.cfg.seed,
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
        ).to(self.device)

    def train_epoch(self, epoch: int, progress=None) -> EpochStats:
        """Train epoch ``epoch`` (1-based) over this rank's shard; figures summed over ranks."""
        batch = self.cfg.batch_size
        gen = self._epoch_streams(epoch)
        index = self._epoch_order(epoch)
        self.net.train()
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss, correct, count
        # Reading the sums waits for the device: on a GPU, only every 10 steps.
        sync_every = 1 if self.device.type == "cpu" else 10
        start = time.perf_counter()
        compute = 0.0
        lr = self.lr
        for b in range(self.steps_per_epoch):
            idx = index[b * batch : (b + 1) * batch]
            lr = self.set_lr(self.global_step)
            x = self.augment(self.train_x[idx], train=True, generator=gen)
            y = self.train_y[idx]
            t0 = time.perf_counter()
            loss_sum, correct = self.train_step(x, y)
            compute += time.perf_counter() - t0
            sums[0] += loss_sum
            sums[1] += correct
            sums[2] += y.shape[0]
            self.global_step += 1
            if (b + 1) % sync_every == 0 or b + 1 == self.steps_per_epoch:
                self._check_running(sums, epoch, b + 1, lr, start, progress)
        D.all_reduce_sum(sums, self.ctx)
        seconds = time.perf_counter() - start
        loss, correct, count = sums.tolist()
        if not math.isfinite(loss):
            self._diverged(epoch, self.steps_per_epoch)
        D.broadcast_buffers(self.model, self.ctx)
        return EpochStats(loss / count, correct / count, int(count), seconds, compute, lr)

    def _check_running(
        self, sums: Tensor, epoch: int, step: int, lr: float, start: float, progress
    ) -> None:
        """Stop on a non-finite running loss; show this rank's running figures on ``progress``.

        ``sums`` is ``float64 [3]``: summed loss, correct predictions, images so far.
        """
        total = sums.tolist()
        if not math.isfinite(total[0]):
            self._diverged(epoch, step)
        if progress is None:
            return
        elapsed = time.perf_counter() - start
        progress.update(step - progress.n)
        progress.set_postfix(
            loss=f"{total[0] / total[2]:.4f}",
            acc=f"{total[1] / total[2]:.2%}",
            lr=f"{lr:.4g}",
            img_s=f"{total[2] * self.ctx.world_size / max(elapsed, 1e-9):.0f}",
            refresh=False,
        )

    def _diverged(self, epoch: int, step: int) -> None:
        ckpt = self.run_dir / CHECKPOINT_NAME
        last = (
            f"the last good checkpoint is {ckpt} (epoch {self.epoch}), left intact"
            if ckpt.is_file()
            else "no checkpoint was written yet"
        )
        raise TrainingDiverged(
            f"non-finite training loss at epoch {epoch}, step {step}; {last}. Try a lower --lr, "
            "a longer --warmup-epochs or --precision fp32"
        )

    @torch.no_grad()
    def evaluate(self, split: ImageDataset) -> tuple[float, float]:
        """(mean loss, accuracy) of the model on ``split``, each rank taking a share."""
        share = D.eval_shard(len(split), self.ctx.rank, self.ctx.world_size)
        images, labels = split.images[share], split.labels[share]
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        self.model.eval()
        for start in range(0, len(labels), 512):
            x = self.augment(images[start : start + 512].to(self.device), train=False)
            y = labels[start : start + 512].to(self.device)
            with autocast(self.device, self.precision):
                logits = self.model(x).float()
            sums[0] += F.cross_entropy(logits, y, reduction="sum")
            sums[1] += (logits.argmax(1) == y).sum()
            sums[2] += y.shape[0]
        self.model.train()
        D.all_reduce_sum(sums, self.ctx)
        loss, correct, count = sums.tolist()
        return loss / max(count, 1), correct / max(count, 1)

    # ------------------------------------------------------------------ state

    def state(self) -> dict[str, Any]:
        """The resume state: plain data only (``torch.load(weights_only=True)`` reads it)."""
        return {
            "format": STATE_FORMAT,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": {"kind": self.schedule.kind, "step": self.global_step},
            "sampler": {"epoch": self.epoch, "position": 0, "seed": self.cfg.seed},
            "rng": rng_state(),
            "train_seconds": self.train_seconds,
            "world_size": self.ctx.world_size,
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        where = str(self.run_dir / CHECKPOINT_NAME)
        try:
            if state.get("format") != STATE_FORMAT:
                raise ValueError(f"format {state.get('format')!r}, expected {STATE_FORMAT}")
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.epoch = int(state["epoch"])
            self.global_step = int(state["global_step"])
            self.train_seconds = float(state.get("train_seconds", 0.0))
            set_rng_state(state["rng"])
        except (KeyError, RuntimeError, TypeError, ValueError) as err:
            raise ValueError(f"resume state {where} does not fit this run: {err}") from None
        if int(state.get("world_size", 1)) != self.ctx.world_size:
            self.log(
                f"note: resuming a run of {state.get('world_size')} process(es) with "
                f"{self.ctx.world_size}; the batch order changes from here on"
            )

    def save_checkpoint(self) -> None:
        from cnnkit.train.checkpoint import save_state

        self.save_model_files()
        save_state(self.run_dir / CHECKPOINT_NAME, self.state())

    def save_model_files(self) -> None:
        from cnnkit.train.checkpoint import save_model

        save_model(self.model, self.run_dir, data=self.data.facts(), train=self.train_section())

    def train_section(self) -> dict[str, Any]:
        values = self.cfg.to_dict()
        values["out"] = str(self.run_dir)
        values["threads"] = torch.get_num_threads() if self.cfg.deterministic else values["threads"]
        values["resolved"] = {
            "device": str(self.device),
            "precision": self.precision,
            "channels_last": self.channels_last,
            "compile": self.use_compile,
            "lr": self.lr,
            "global_batch": self.world_batch,
            "world_size": self.ctx.world_size,
            "weight_decay": self.cfg.decay,
            "steps_per_epoch": self.steps_per_epoch,
            "crop_padding": self.crop_padding,
            "label_smoothing": self.label_smoothing,
            "flip": self.flip,
        }
        return values

    # ------------------------------------------------------------------ the run

    def describe(self) -> str:
        from cnnkit.models.registry import count_parameters

        cfg = self.cfg
        n = count_parameters(self.model)
        d = self.data
        lines = [
            f"model {cfg.model} ({n:,} parameters) on {d.spec}: {len(d.train)} train / "
            f"{len(d.dev)} dev / {len(d.test)} test images {'x'.join(map(str, d.input_size))}, "
            f"{len(d.classes)} classes",
            f"device {self.device}, precision {self.precision}, "
            f"{'channels_last' if self.channels_last else 'NCHW'}, "
            f"{'compiled' if self.use_compile else 'eager'}"
            + (
                f", {self.ctx.world_size} processes ({self.ctx.backend})"
                if self.ctx.enabled
                else ""
            )
            + f", {torch.get_num_threads()} thread(s)",
            f"{cfg.optimizer} {cfg.schedule} schedule, {cfg.epochs} epochs x "
            f"{self.steps_per_epoch} steps, batch {self.world_batch}; effective lr "
            f"{self.lr:.4g} = {cfg.base_lr:g} x {self.world_batch} / {cfg.lr_batch} "
            f"(linear scaling rule), warmup {cfg.warmup_epochs:g} epoch(s)",
        ]
        return "\n".join(lines)

    def fit(self) -> dict[str, Any]:
        """Train the remaining epochs, then test, save and report; returns metrics.json's dict."""
        from cnnkit.train.history import History

        cfg = self.cfg
        if self.ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if self.epoch == 0:
                self.history = History(self.run_dir)
                self.save_model_files()  # config.json (with the train section) from the start
            else:
                self.history = History.load(self.run_dir)
                self.history.truncate(self.epoch)
            self._open_tensorboard()
        self.log(self.describe())
        self.log(f"run directory: {self.run_dir}")
        if self.epoch:
            self.log(f"resuming after epoch {self.epoch}")
        first = self.epoch + 1
        try:
            for epoch in range(first, cfg.epochs + 1):
                self._run_epoch(epoch)
            # Each epoch ends by saving the model files; only a resumed, already finished run
            # has none from this process.
            return self._finish(model_saved=self.epoch >= first)
        finally:
            if self.writer is not None:
                self.writer.close()

    def _progress(self, epoch: int):
        if not self.ctx.is_main or self.cfg.quiet:
            return None
        from tqdm import tqdm

        return tqdm(
            total=self.steps_per_epoch,
            desc=f"epoch {epoch}/{self.cfg.epochs}",
            unit="step",
            dynamic_ncols=True,
            leave=True,
        )

    def _run_epoch(self, epoch: int) -> None:
        stats, dev_loss, dev_acc = self._train_and_evaluate(epoch)
        self.epoch = epoch
        self.train_seconds += stats.seconds
        record = epoch_record(epoch, stats, dev_loss, dev_acc)
        if self.cfg.quiet:
            self.log(
                f"epoch {epoch}/{self.cfg.epochs}: train loss {stats.loss:.4f} acc "
                f"{stats.accuracy:.2%}, dev loss {dev_loss:.4f} acc {dev_acc:.2%}, lr "
                f"{stats.lr:.4g}, {record['images_per_second']:.0f} img/s, {stats.seconds:.1f} s"
            )
        if self.ctx.is_main:
            self._write_epoch(record)
        D.barrier(self.ctx)

    def _train_and_evaluate(self, epoch: int) -> tuple[EpochStats, float, float]:
        """Train epoch ``epoch`` under a progress bar; (its stats, dev loss, dev accuracy)."""
        progress = self._progress(epoch)
        try:
            stats = self.train_epoch(epoch, progress)
            dev_loss, dev_acc = self.evaluate(self.data.dev)
            if progress is not None:
                progress.set_postfix(
                    loss=f"{stats.loss:.4f}",
                    acc=f"{stats.accuracy:.2%}",
                    dev_acc=f"{dev_acc:.2%}",
                    lr=f"{stats.lr:.4g}",
                    img_s=f"{stats.images / stats.seconds:.0f}",
                )
        finally:
            if progress is not None:
                progress.close()
        return stats, dev_loss, dev_acc

    def _write_epoch(self, record: dict[str, Any]) -> None:
        from cnnkit.viz import plot_curves

        # Order matters for a kill at any moment: history and curves first, then the model
        # and last.ckpt (each atomic). A resume truncates the history to the checkpoint.
        self.history.append(record)
        plot_curves(self.history.records, self.run_dir / CURVES_NAME)
        if self.writer is not None:
            for key, value in record.items():
                if key != "epoch":
                    self.writer.add_scalar(key, value, record["epoch"])
            self.writer.flush()
        self.save_checkpoint()

    def _open_tensorboard(self) -> None:
        if not self.cfg.tensorboard:
            return
        self.writer = open_tensorboard(self.run_dir)

    def _finish(self, model_saved: bool) -> dict[str, Any]:
        from cnnkit.train.checkpoint import atomic_write_text, read_config
        from cnnkit.train.diagnose import diagnose
        from cnnkit.train.report import write_report

        test_loss, test_acc = self.evaluate(self.data.test)
        spread = D.max_replica_difference(self.model, self.ctx)
        if not self.ctx.is_main:
            return {}
        records = self.history.records
        metrics = self._metrics(test_loss, test_acc, spread)
        atomic_write_text(self.run_dir / METRICS_NAME, json.dumps(metrics, indent=2) + "\n")
        if not model_saved:
            self.save_model_files()
        config = read_config(self.run_dir)
        diagnosis = diagnose(records, config)
        write_report(self.run_dir, config=config, metrics=metrics, diagnosis=diagnosis)
        self.log(
            f"test accuracy {test_acc:.2%} (loss {test_loss:.4f}) after {self.epoch} epochs, "
            f"{self.train_seconds:.1f} s of training"
        )
        self.log(str(diagnosis))
        self.log(f"run directory: {self.run_dir} (report.md, metrics.json, model.safetensors)")
        return metrics

    def _metrics(self, test_loss: float, test_acc: float, spread: float) -> dict[str, Any]:
        """metrics.json's figures; ``spread`` is the largest weight difference between ranks."""
        records = self.history.records
        return {
            "test_accuracy": test_acc,
            "test_loss": test_loss,
            "best_dev_accuracy": max((r["dev_accuracy"] for r in records), default=float("nan")),
            "final_dev_accuracy": records[-1]["dev_accuracy"] if records else float("nan"),
            "epochs": self.epoch,
            "train_seconds": self.train_seconds,
            "effective_lr": self.lr,
            "global_batch": self.world_batch,
            "world_size": self.ctx.world_size,
            "replica_max_abs_diff": spread,
        }

    def close(self, *, failed: bool = False) -> None:
        """Leave the process group, after releasing the DDP wrapper.

        DDP's reducer holds the process group and Gloo work objects with tensors in them; freed
        only at interpreter exit, their teardown takes the GIL from a dying interpreter and
        aborts the process ("terminate called without an active exception").
        """
        if self.ctx.enabled:
            self.net = self.step_net = self.model = self.optimizer = None
            gc.collect()
        D.shutdown(self.ctx, synchronize=not failed)


def summary_writer_class():
    """TensorBoard's SummaryWriter; ValueError when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError(
            "--tensorboard needs the tensorboard package (pip install tensorboard)"
        ) from None
    return SummaryWriter


def open_tensorboard(run_dir: Path):
    """A TensorBoard SummaryWriter writing event files into ``run_dir``."""
    return summary_writer_class()(log_dir=str(run_dir))


# --------------------------------------------------------------------------- entry points


def train(cfg: TrainConfig, **kwargs: Any) -> dict[str, Any]:
    """Build a :class:`Trainer` for ``cfg``, run it, release the process group."""
    trainer = Trainer(cfg, **kwargs)
    try:
        metrics = trainer.fit()
    except BaseException:
        trainer.close(failed=True)
        raise
    trainer.close()
    return metrics


def resume(run_dir: str | os.PathLike, **kwargs: Any) -> dict[str, Any]:
    """Continue the run in ``run_dir`` with its saved training arguments."""
    from cnnkit.train.checkpoint import load_state, read_config

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"--resume {run_dir}: no such run directory")
    config = read_config(run_dir)
    if "train" not in config or not isinstance(config["train"], dict):
        raise ValueError(f"--resume {run_dir}: config.json has no 'train' section")
    values = {k: v for k, v in config["train"].items() if k != "resolved"}
    cfg = TrainConfig.from_dict(values, where=f"{run_dir / 'config.json'} 'train'")
    ckpt = run_dir / CHECKPOINT_NAME
    # Stopped before its first checkpoint: start over with the same arguments (same result).
    state = load_state(ckpt) if ckpt.is_file() else None
    return train(cfg, run_dir=run_dir, resume=state, **kwargs)
