"""The training engine: one loop for every task, from a configuration to a finished run.

The task (:mod:`cnnkit.train.task`) gives the data, the model and a step's named losses; the
engine does the rest, once for every task:

* the optimizer and its schedule with warmup, at the rate of the linear scaling rule
  (Goyal et al., 2017, Sec. 2.1; :func:`cnnkit.train.config.effective_lr`);
* precision, memory layout and compilation as resolved for the hardware
  (:mod:`cnnkit.train.device`);
* DistributedDataParallel: each rank trains its shard of a per-epoch permutation, metrics are
  reduced over ranks, rank 0 writes (:mod:`cnnkit.train.distributed`);
* checkpoints at every epoch end and every ``--save-every`` steps, and ``--resume``;
* the run directory, unique, locked, never silently replaced (:mod:`cnnkit.train.rundir`);
* a non-finite loss or metric stops the run, the last good checkpoint kept;
* the history of every named loss and metric, the curves, the diagnosis and the report
  (:mod:`cnnkit.train.outputs`).

Reproducibility: every random choice is a function of ``(seed, epoch, rank, step)``: the global
generators (dropout, stochastic depth) and the task's augmentation are re-seeded at every step
(:func:`cnnkit.train.rng.stream_seed`), and the sample order is a function of
``(seed, epoch)``. A run resumed from a checkpoint taken after any step therefore repeats
exactly what the killed run would have done, with no generator state to save.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnkit.train import distributed as D
from cnnkit.train.compiler import compile_or_eager, is_compiler_error, warn_unavailable
from cnnkit.train.config import TrainConfig, effective_lr, parse_dropblock
from cnnkit.train.describe import describe, train_section
from cnnkit.train.device import (
    autocast,
    resolve_device,
    resolve_numerics,
    set_determinism,
    wants_cuda,
)
from cnnkit.train.divergence import TrainingDiverged, diverged, non_finite, record_divergence
from cnnkit.train.optim import LRSchedule, build_optimizer
from cnnkit.train.outputs import RunOutputs, default_run_dir
from cnnkit.train.plan import StepPlan
from cnnkit.train.progress import EpochTotals, Progress
from cnnkit.train.resume import TrainState
from cnnkit.train.rng import seed_step
from cnnkit.train.rundir import check_target, claim, continue_run
from cnnkit.train.state import CHECKPOINT_NAME
from cnnkit.train.task import Runtime, StepOutput, Task

__all__ = ["CHECKPOINT_NAME", "Engine", "TrainingDiverged"]


class Engine:
    """Trains ``task`` as ``cfg`` says and writes the run directory.

    Args:
        cfg: the training arguments.
        task: what to train (:class:`cnnkit.train.task.Task`).
        run_dir: where to write (default: ``cfg.out`` or a fresh ``runs/...`` name); one
            holding a run is refused (ValueError) unless ``overwrite`` or continued.
        resume: the state read from ``last.ckpt`` to continue from.
        overwrite: replace the run ``run_dir`` holds.
        resuming: ``run_dir`` holds this run, continued (implied by ``resume``).
        log: a function taking one line of text (default: tqdm's ``write`` on rank 0).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        task: Task,
        *,
        run_dir: str | os.PathLike | None = None,
        resume: dict[str, Any] | None = None,
        log=None,
        overwrite: bool = False,
        resuming: bool = False,
    ) -> None:
        self.cfg, self.task = cfg, task
        self.ctx = D.init_from_env(use_cuda=wants_cuda(cfg.device))
        self._fresh_dir = not (run_dir or cfg.out)
        self.run_dir = Path(run_dir or cfg.out or default_run_dir(cfg))
        self._overwrite, self._resuming = overwrite, resuming or resume is not None
        if self.ctx.is_main and not self._fresh_dir and not self._resuming:
            check_target(self.run_dir, overwrite=overwrite)  # before anything is loaded
        self.device = resolve_device(cfg.device, self.ctx.local_rank)
        self._log = log
        set_determinism(cfg, self.device)
        self.precision, self.channels_last = resolve_numerics(cfg, self.device)
        task.setup(Runtime(self.device, self.ctx, self.precision, self.channels_last))

        torch.manual_seed(cfg.seed)  # the initial weights depend on the seed alone
        self.model = task.build_model().to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.drop_block_prob = parse_dropblock(cfg.dropblock)[0]

        self._plan_steps()
        self._setup_optimizer()
        self._wrap_model()
        self.outputs = RunOutputs(self.run_dir, self.ctx.is_main, cfg.tensorboard, task.metric)
        self.state = TrainState()
        if resume is not None:
            self.state.load(resume, self, where=self.run_dir / CHECKPOINT_NAME)

    # ------------------------------------------------------------------ set-up

    def _plan_steps(self) -> None:
        self.world_batch = self.cfg.batch_size * self.ctx.world_size
        plan = StepPlan.make(self.cfg, self.task.train_size(), self.ctx, self.device)
        self.steps_per_epoch, self.total_steps = plan.steps_per_epoch, plan.total_steps
        self.use_compile, self.sampler = plan.use_compile, plan.sampler

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
        compiled = compile_or_eager(self.net) if self.use_compile else None
        self.use_compile = compiled is not None
        self.step_net = compiled if compiled is not None else self.net
        self._compile_checked = not self.use_compile

    def log(self, text: str) -> None:
        if not self.ctx.is_main:
            return
        if self._log is not None:
            self._log(text)
        else:
            from tqdm import tqdm

            tqdm.write(text)

    # ------------------------------------------------------------------ one step

    def train_step(self, batch: Any) -> StepOutput:
        """One optimizer step on a prepared batch; the first call compiles, and a compiler
        failure (:func:`cnnkit.train.compiler.is_compiler_error`) falls back to eager mode once."""
        if self._compile_checked:
            return self._step(self.step_net, batch)
        try:
            out = self._step(self.step_net, batch)
        except Exception as err:
            if not is_compiler_error(err):  # out of memory, a bug in the model: as it is
                raise
            warn_unavailable(err)
            self.use_compile, self.step_net = False, self.net
            out = self._step(self.net, batch)
        self._compile_checked = True
        return out

    def _step(self, net: nn.Module, batch: Any) -> StepOutput:
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.precision):
            out = self.task.train_step(net, batch)
        loss = sum(out.losses.values())
        loss.backward()
        self.optimizer.step()
        return out

    def set_lr(self, step: int) -> float:
        factor = self.schedule.factor(step)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor
        if self.drop_block_prob > 0:
            from cnnkit.layers.regularize import set_drop_block

            # DropBlock (Ghiasi et al., 2018, Sec. 3): keep_prob decreases linearly to target.
            set_drop_block(self.model, self.drop_block_prob * min(1.0, step / self.total_steps))
        return self.base_lrs[0] * factor

    # ------------------------------------------------------------------ one epoch

    def train_epoch(self, epoch: int, progress: Progress | None = None) -> EpochTotals:
        """Train epoch ``epoch`` (1-based) over this rank's shard, from the resumed step on;
        the figures are summed over ranks."""
        state = self.state
        totals = state.take_partial(epoch) or EpochTotals(self.device)
        first = totals.steps
        self.sampler.set_epoch(epoch, start=first)
        self.net.train()
        # Reading the sums waits for the device: on a GPU, only every 10 steps.
        sync_every = 1 if self.device.type == "cpu" else 10
        start = time.perf_counter() - totals.seconds
        lr = self.lr
        for step, batch in enumerate(self.task.train_batches(self.sampler), first):
            seed_step(self.cfg.seed, epoch, self.ctx.rank, step)
            lr = self.set_lr(state.global_step)
            t0 = time.perf_counter()
            out = self.train_step(batch)
            totals.compute += time.perf_counter() - t0
            totals.add(out)
            state.global_step += 1
            totals.seconds = time.perf_counter() - start
            if (step + 1) % sync_every == 0 or step + 1 == self.steps_per_epoch:
                self._check_running(totals, epoch, step + 1, lr, progress)
            if self._save_due(step):
                self.save_checkpoint(partial=(epoch, totals))
        totals.lr = lr
        totals.reduce(self.ctx)
        if not math.isfinite(totals.loss):
            self._diverged(
                f"non-finite training loss at epoch {epoch}, step {self.steps_per_epoch}"
            )
        D.broadcast_buffers(self.model, self.ctx)
        return totals

    def _save_due(self, step: int) -> bool:
        """A mid-epoch checkpoint after this step (``--save-every``; the epoch end saves anyway)."""
        every = self.cfg.save_every
        return (
            bool(every) and self.state.global_step % every == 0 and step + 1 < self.steps_per_epoch
        )

    def _check_running(
        self, totals: EpochTotals, epoch: int, step: int, lr: float, progress: Progress | None
    ) -> None:
        """Stop on a non-finite running loss; show the running figures on ``progress``."""
        figures = totals.means()
        if not math.isfinite(figures["loss"]):
            self._diverged(f"non-finite training loss at epoch {epoch}, step {step}")
        if progress is not None:
            progress.running(
                step, figures, lr, totals.count * self.ctx.world_size / max(totals.seconds, 1e-9)
            )

    def _check_evaluation(self, figures: dict[str, float], split: str, when: str) -> None:
        """Stop when ``split``'s loss or primary metric is not finite."""
        bad = non_finite(figures, ("loss", self.task.metric.name))
        if bad is not None:
            self._diverged(f"non-finite {split} {bad[0]} ({bad[1]}) {when}")

    def _diverged(self, what: str) -> None:
        error = diverged(what, self.run_dir / CHECKPOINT_NAME, self.state.epoch)
        if self.ctx.is_main:
            record_divergence(self.run_dir, error, self.state.epoch, self.state.global_step)
        raise error

    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, float]:
        """The task's metrics of the model on ``split``, each rank taking a share."""
        self.model.eval()
        try:
            with autocast(self.device, self.precision):
                return self.task.evaluate(self.model, split, D.Reduce(self.ctx))
        finally:
            self.model.train()

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, partial: tuple[int, EpochTotals] | None = None) -> None:
        """``last.ckpt`` (atomic), with the model files at an epoch's end; ``partial`` is the
        epoch in progress and its totals so far (a ``--save-every`` checkpoint)."""
        from cnnkit.train.state import save_state

        state = self.state.to_dict(self, partial)
        if self.ctx.is_main:
            if partial is None:
                self.save_model_files()
            save_state(self.run_dir / CHECKPOINT_NAME, state)

    def save_model_files(self) -> None:
        from cnnkit.train.checkpoint import save_model

        save_model(self.model, self.run_dir, data=self.task.facts(), train=self.train_section())

    def train_section(self) -> dict[str, Any]:
        return train_section(self)

    # ------------------------------------------------------------------ the run

    def describe(self) -> str:
        return describe(self)

    @property
    def history(self):
        return self.outputs.history

    def fit(self) -> dict[str, Any]:
        """Train the remaining epochs, then test, save and report; returns metrics.json's dict."""
        cfg, state = self.cfg, self.state
        lock = None
        if self.ctx.is_main:  # rank 0 owns the run directory for the run's life
            self.run_dir, lock = claim(
                self.run_dir,
                fresh=self._fresh_dir,
                overwrite=self._overwrite,
                resuming=self._resuming,
            )
            self.outputs.run_dir = self.run_dir
        try:
            if self._resuming and lock is not None:
                continue_run(self.run_dir, self.train_section(), state.epoch < cfg.epochs)
            self.outputs.open(state.epoch, self.save_model_files)
            self.log(self.describe())
            self.log(f"run directory: {self.run_dir}")
            if state.epoch or state.partial:
                self.log(f"resuming after epoch {state.epoch}, step {state.global_step}")
            first = state.epoch + 1
            for epoch in range(first, cfg.epochs + 1):
                self._run_epoch(epoch)
            # Each epoch ends by saving the model files; only a resumed, already finished run
            # has none from this process.
            return self._finish(model_saved=state.epoch >= first)
        finally:
            self.outputs.close()
            if lock is not None:
                lock.release()

    def _run_epoch(self, epoch: int) -> None:
        progress = Progress.open(self, epoch)
        try:
            totals = self.train_epoch(epoch, progress)
            dev = self.evaluate("dev")
            if progress is not None:
                progress.done(totals, dev)
        finally:
            if progress is not None:
                progress.close()
        self._check_evaluation(dev, "dev", f"at epoch {epoch}")
        self.state.epoch = epoch
        self.state.train_seconds += totals.seconds
        record = totals.record(epoch, dev)
        if self.cfg.quiet:
            self.log(Progress.line(epoch, self.cfg.epochs, record))
        if self.ctx.is_main:
            # Order matters for a kill at any moment: history and curves first, then the model
            # and last.ckpt (each atomic). A resume truncates the history to the checkpoint.
            self.outputs.append(record)
        self.save_checkpoint()
        D.barrier(self.ctx)

    def _finish(self, model_saved: bool) -> dict[str, Any]:
        test = self.evaluate("test")
        self._check_evaluation(test, "test", f"after epoch {self.state.epoch}")
        spread = D.max_replica_difference(self.model, self.ctx)
        if not self.ctx.is_main:
            return {}
        metrics = self.outputs.metrics(
            test,
            epochs=self.state.epoch,
            train_seconds=self.state.train_seconds,
            effective_lr=self.lr,
            global_batch=self.world_batch,
            world_size=self.ctx.world_size,
            replica_max_abs_diff=spread,
        )
        if not model_saved:
            self.save_model_files()
        self.task.finish(self.run_dir, metrics)
        diagnosis = self.outputs.report(metrics)
        self.log(
            f"{self.task.summary(test)} after {self.state.epoch} epochs, "
            f"{self.state.train_seconds:.1f} s of training"
        )
        self.log(str(diagnosis))
        self.log(f"run directory: {self.run_dir} (report.md, metrics.json, model.safetensors)")
        return metrics

    def close(self, *, failed: bool = False) -> None:
        """Leave the process group, after releasing the DDP wrapper.

        DDP's reducer holds the process group and Gloo work objects with tensors in them; freed
        only at interpreter exit, their teardown takes the GIL from a dying interpreter and
        aborts the process ("terminate called without an active exception").
        """
        if self.ctx.enabled:
            import gc

            self.net = self.step_net = self.model = self.optimizer = None
            gc.collect()
        D.shutdown(self.ctx, synchronize=not failed)
