"""The classification task's two data paths visit the same samples in the same order."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from cnnkit.train.classification import ClassificationTask
from cnnkit.train.config import TrainConfig
from cnnkit.train.distributed import DistContext
from cnnkit.train.plan import StepPlan
from cnnkit.train.task import Runtime

CPU = Runtime(torch.device("cpu"), DistContext(), "fp32", False)


def _labels_per_step(task: ClassificationTask, cfg: TrainConfig, epoch: int, rank=0, world=1):
    """The labels of every training batch of ``epoch`` for ``rank`` of ``world``, in order."""
    task.setup(Runtime(CPU.device, DistContext(rank, world), "fp32", False))
    plan = StepPlan.make(cfg, task.train_size(), DistContext(rank, world), CPU.device)
    plan.sampler.set_epoch(epoch)
    return [y.tolist() for _, y in task.train_batches(plan.sampler)]


def _folder(root, per_class=9):
    rng = np.random.default_rng(1)
    for c in range(3):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = (rng.random((14, 18)) * 60 + 80 * c).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"c{c}" / f"{i}.png")


def test_in_memory_and_streamed_folders_give_the_same_batches_in_order(tmp_path):
    _folder(tmp_path / "data")
    common = dict(data=f"folder:{tmp_path / 'data'}", image_size=16, batch_size=4, workers=0)
    memory = TrainConfig(**common, storage="memory")
    stream = TrainConfig(**common, storage="stream")
    for epoch in (1, 2):
        a = _labels_per_step(ClassificationTask(memory), memory, epoch)
        b = _labels_per_step(ClassificationTask(stream), stream, epoch)
        # 27 images: 21 train = 5 steps of 4 (a last batch of one cannot train BatchNorm)
        assert a == b and len(a) == 5
    # Different epochs, different orders; two ranks split each epoch between them.
    first = _labels_per_step(ClassificationTask(memory), memory, 1)
    assert first != _labels_per_step(ClassificationTask(memory), memory, 2)
    halves = [_labels_per_step(ClassificationTask(stream), stream, 1, r, 2) for r in (0, 1)]
    assert [len(sum(h, [])) for h in halves] == [11, 11]  # ceil(21 / 2) each, padded by one


def test_streamed_digits_give_the_in_memory_batches(tmp_path):
    memory = TrainConfig(image_size=16, batch_size=64, train_subset=300, storage="memory")
    stream = TrainConfig(
        image_size=16, batch_size=64, train_subset=300, storage="stream", workers=0
    )
    a = _labels_per_step(ClassificationTask(memory), memory, 3)
    b = _labels_per_step(ClassificationTask(stream), stream, 3)
    assert a == b and sum(len(s) for s in a) == 300
