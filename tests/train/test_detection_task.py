"""The engine's guarantees hold for detection (:class:`cnnkit.train.detection.DetectionTask`).

On tiny scenes (12 train / 5 val images of 64 px) and the tiny Faster R-CNN of
``tests/test_cli_detect.py``, with horizontal flips on (they are off by default for the scenes)
so that every random stream of a detection step is exercised: the flips, the RPN's anchor
sampling and the RoI head's proposal sampling.

* torchrun, 2 CPU processes (gloo): the run finishes, writes metrics.json once, the dev AP is
  that of the results gathered from both ranks (every val image exactly once) and the
  replicas end identical;
* a run killed with SIGKILL mid-epoch, after a ``--save-every`` checkpoint, and resumed ends
  with the weights and history of the uninterrupted run (``--workers 0`` and ``2``);
* the same seed gives the same history and weights with ``--workers 0`` and ``--workers 2``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from cnnkit.cli.main import main
from cnnkit.evaluation import coco_evaluate
from cnnkit.train.checkpoint import load_weights
from cnnkit.train.state import load_state
from test_cli_detect import TINY_MODEL

from .test_distributed import _free_port
from .test_resume import _cnnkit, _finish, _kill_at_first_checkpoint

pytestmark = pytest.mark.slow

TRAIN_IMAGES, VAL_IMAGES = 12, 5  # 5: the two ranks' shares of the val split differ (3 + 2)
PER_IMAGE = 4  # detections kept per image: with a score threshold of 0, exactly this many
BATCH = 2  # 6 steps an epoch: checkpoints after steps 2 and 4 fall inside it
EPOCHS = 2


def _args(scenes: Path, workers: int) -> list[str]:
    return [
        "detect", "train", "--data", f"coco:{scenes}", *TINY_MODEL, "--flip", "on",
        "--epochs", str(EPOCHS), "--batch-size", str(BATCH), "--seed", "3",
        "--deterministic", "--threads", "1", "--precision", "fp32", "--quiet",
        "--workers", str(workers), "--save-every", "2",
    ]  # fmt: skip


def _history(run: Path) -> list[dict]:
    """The run's history without its timings (the only figures that may differ)."""
    records = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if "second" not in k} for r in records]


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_weights(a), load_weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def _kill_mid_epoch(args: list[str], run: Path, tries: int = 3) -> None:
    """Start ``args`` and SIGKILL it as soon as it has a checkpoint, until the checkpoint left
    behind is a mid-epoch one (``--save-every``): a kill that lands after an epoch's end (a
    slow poll on a busy machine) is retried from scratch."""
    for _ in range(tries):
        shutil.rmtree(run, ignore_errors=True)
        victim = _cnnkit(*args, "--out", str(run))
        _kill_at_first_checkpoint(run, victim)
        assert victim.returncode == -signal.SIGKILL
        if load_state(run / "last.ckpt")["partial"] is not None:
            return
    pytest.fail(f"no kill landed inside an epoch in {tries} tries")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scenes") / "tiny"
    argv = ["data", "scenes", str(out), "--images", str(TRAIN_IMAGES), "--val-images",
            str(VAL_IMAGES), "--size", "64"]  # fmt: skip
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def reference(scenes, tmp_path_factory) -> Path:
    """An uninterrupted run with ``--workers 0``."""
    out = tmp_path_factory.mktemp("reference") / "run"
    _finish(_cnnkit(*_args(scenes, 0), "--out", str(out)))
    return out


def test_two_process_torchrun_evaluates_every_val_image_once(scenes, tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "cnnkit",
        *_args(scenes, 0), "--device", "cpu", "--out", str(out),
        # Every val image then has exactly PER_IMAGE results: a missing share or a share
        # gathered twice shows in detections.json.
        "--model-arg", "box_score_thresh=0.0",
        "--model-arg", f"box_detections_per_img={PER_IMAGE}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = proc.stdout + proc.stderr
    # Only rank 0 reports and writes metrics.json.
    assert log.count("val box AP") == 1, log
    assert log.count("(report.md, metrics.json") == 1, log

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["global_batch"] == 2 * BATCH
    assert metrics["epochs"] == EPOCHS
    assert metrics["replica_max_abs_diff"] == 0.0
    config = json.loads((out / "config.json").read_text())
    # Each rank trains half of the 12 images: 3 steps of 2 an epoch.
    assert config["train"]["resolved"]["steps_per_epoch"] == TRAIN_IMAGES // (2 * BATCH)
    assert [r["epoch"] for r in _history(out)] == list(range(1, EPOCHS + 1))

    gt = json.loads((scenes / "annotations" / "instances_val.json").read_text())
    val_ids = sorted(int(im["id"]) for im in gt["images"])
    assert len(val_ids) == VAL_IMAGES
    detections = json.loads((out / "detections.json").read_text())
    per_image = Counter(int(r["image_id"]) for r in detections)
    assert sorted(per_image) == val_ids
    assert set(per_image.values()) == {PER_IMAGE}, per_image

    # The recorded AP is that of the gathered results (not of rank 0's share).
    stats = [max(float(s), 0.0) for s in coco_evaluate(gt, detections, "bbox").stats]
    last = _history(out)[-1]
    assert stats[0] == last["dev_box_ap"] == metrics["final_dev_box_ap"]
    assert stats[1] == last["dev_box_ap50"]
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert [max(s, 0.0) for s in evaluation["bbox"]] == stats


def test_workers_do_not_change_the_run(scenes, reference, tmp_path):
    out = tmp_path / "workers2"
    _finish(_cnnkit(*_args(scenes, 2), "--out", str(out)))
    assert _history(out) == _history(reference)
    _assert_same_weights(out, reference)


@pytest.mark.parametrize("workers", [0, 2])
def test_sigkill_mid_epoch_then_resume_is_bit_identical(scenes, reference, tmp_path, workers):
    killed = tmp_path / "killed"
    _kill_mid_epoch(_args(scenes, workers), killed)
    assert not (killed / "metrics.json").exists()

    out = _finish(_cnnkit("detect", "train", "--resume", str(killed)))
    where = re.search(r"resuming after epoch (\d+), step (\d+)", out)
    assert where is not None, out
    steps_per_epoch = TRAIN_IMAGES // BATCH
    # The checkpoint resumed from was one of --save-every's, inside an epoch.
    assert int(where[2]) % steps_per_epoch != 0, out

    _assert_same_weights(killed, reference)
    assert _history(killed) == _history(reference)
    assert json.loads((killed / "metrics.json").read_text())["epochs"] == EPOCHS
