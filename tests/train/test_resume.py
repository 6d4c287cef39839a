"""A run killed with SIGKILL and resumed ends with the weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cnnkit.train.checkpoint import load_weights

ARGS = [
    "train", "--data", "digits", "--image-size", "16", "--crop-padding", "2",
    "--model", "resnet20", "--model-arg", "depth=8", "--model-arg", "widths=[4,8,16]",
    "--train-subset", "160", "--batch-size", "32", "--epochs", "3", "--dropout", "0.2",
    "--drop-path", "0.1", "--cutout", "4", "--deterministic", "--threads", "1", "--quiet",
    "--seed", "5",
]  # fmt: skip


def _cnnkit(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "cnnkit", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        **kwargs,
    )


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return out


def _kill_at_first_checkpoint(run_dir: Path, victim: subprocess.Popen) -> None:
    """SIGKILL ``victim`` as soon as ``run_dir/last.ckpt`` exists (it must still be running)."""
    deadline = time.monotonic() + 240
    while not (run_dir / "last.ckpt").exists():
        assert victim.poll() is None, victim.communicate()[0]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=60)


def test_sigkill_then_resume_gives_bit_identical_weights(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    reference = _cnnkit(*ARGS, "--out", str(whole))
    victim = _cnnkit(*ARGS, "--out", str(killed))
    # Kill -9 as soon as the first epoch's checkpoint exists (mid-epoch-2, or mid-write).
    _kill_at_first_checkpoint(killed, victim)
    assert victim.returncode == -signal.SIGKILL
    assert not (killed / "metrics.json").exists()

    out = _finish(_cnnkit("train", "--resume", str(killed)))
    assert "resuming after epoch" in out
    _finish(reference)

    a, b = load_weights(whole), load_weights(killed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    history = [json.loads(line) for line in Path(killed, "history.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in history] == [1, 2, 3]
    ref_hist = [json.loads(line) for line in Path(whole, "history.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in history] == [r["train_loss"] for r in ref_hist]
    metrics = json.loads(Path(killed, "metrics.json").read_text())
    assert metrics["epochs"] == 3


@pytest.mark.parametrize("storage", ["--in-memory", "--stream"])
def test_sigkill_mid_epoch_with_save_every_resumes_bit_identically(tmp_path, storage):
    # 5 steps an epoch; a checkpoint every 2 steps: most of them fall inside an epoch.
    args = [*ARGS, storage, "--workers", "1", "--save-every", "2"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    reference = _cnnkit(*args, "--out", str(whole))
    _kill_at_first_checkpoint(killed, _cnnkit(*args, "--out", str(killed)))
    out = _finish(_cnnkit("train", "--resume", str(killed)))
    assert "resuming after epoch" in out
    _finish(reference)
    a, b = load_weights(whole), load_weights(killed)
    assert all(torch.equal(a[name], b[name]) for name in a)
    lines = Path(killed, "history.jsonl").read_text().splitlines()
    ref_lines = Path(whole, "history.jsonl").read_text().splitlines()
    losses = [json.loads(line)["train_loss"] for line in lines]
    assert losses == [json.loads(line)["train_loss"] for line in ref_lines]
