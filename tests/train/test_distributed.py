"""Data-parallel training: sharding, and a 2-process torchrun run on CPU (gloo)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from cnnkit.data.streaming import shard_order as shard_indices
from cnnkit.train.distributed import eval_shard


def test_shards_are_disjoint_cover_everything_and_change_per_epoch():
    n, world = 103, 4
    shards = [shard_indices(n, epoch=3, seed=7, rank=r, world_size=world) for r in range(world)]
    assert {len(s) for s in shards} == {26}  # ceil(103 / 4), padded by wrapping around
    flat = torch.cat(shards).tolist()
    assert set(flat) == set(range(n))
    assert len(flat) - len(set(flat)) == 26 * 4 - n  # only the padding repeats
    again = [shard_indices(n, epoch=3, seed=7, rank=r, world_size=world) for r in range(world)]
    assert all(torch.equal(a, b) for a, b in zip(shards, again, strict=True))
    other = shard_indices(n, epoch=4, seed=7, rank=0, world_size=world)
    assert not torch.equal(other, shards[0])
    # One process: a permutation of everything.
    assert sorted(shard_indices(n, epoch=0, seed=0).tolist()) == list(range(n))


def test_eval_shards_partition_exactly():
    for n, world in ((10, 3), (2, 4), (9, 3)):
        covered = []
        for r in range(world):
            covered += list(range(n))[eval_shard(n, r, world)]
        assert covered == list(range(n))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("storage", ["--in-memory", "--stream"])
def test_two_process_torchrun_on_cpu(tmp_path, storage):
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        "-m", "cnnkit", "train", "--data", "digits", "--image-size", "16",
        "--crop-padding", "2", "--model", "resnet20", "--model-arg", "depth=8",
        "--model-arg", "widths=[4,8,16]", "--train-subset", "128", "--batch-size", "16",
        "--epochs", "2", "--device", "cpu", "--quiet", "--out", str(out), storage,
        "--workers", "1", "--save-every", "3",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in (
        "config.json",
        "model.safetensors",
        "last.ckpt",
        "history.jsonl",
        "metrics.json",
        "report.md",
        "curves.png",
    ):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["global_batch"] == 32
    # The linear scaling rule uses the global batch: 0.1 * 32 / 128.
    assert abs(metrics["effective_lr"] - 0.1 * 32 / 128) < 1e-12
    # DDP averages gradients, so both replicas take identical steps.
    assert metrics["replica_max_abs_diff"] == 0.0
    # Only rank 0 prints: one summary line.
    assert proc.stdout.count("test accuracy") == 1
    # Each rank trained half of each epoch's 128 images: 4 steps of 16 per rank.
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["resolved"]["steps_per_epoch"] == 4
    assert config["train"]["resolved"]["storage"] == storage.lstrip("-").replace("in-", "")
