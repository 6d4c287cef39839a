"""`--tensorboard`: the events rank 0 writes into the run directory hold, for every scalar of
history.jsonl, one value per epoch at step = epoch, equal to the history's (float32); without
the tensorboard package the flag is one clear line naming the ``cnnkit[tensorboard]`` extra.

The event files lie directly in the run directory (``RUN/events.out.tfevents.*``), next to
history.jsonl, where ``tensorboard --logdir RUN`` (or ``--logdir runs``) finds them.
"""

from __future__ import annotations

import json
import sys

import pytest

from cnnkit.cli.main import main
from cnnkit.train.outputs import RunOutputs, summary_writer_class
from cnnkit.train.task import Metric
from test_cli_detect import FAST, TINY_MODEL

TINY = ["--model-arg", "depth=8", "--model-arg", "widths=[4,8,16]", "--image-size", "16",
        "--train-subset", "64", "--batch-size", "32", "--quiet", "--threads", "1"]  # fmt: skip
# The tiny detector of tests/test_cli_detect.py (pytest puts tests/ on the path).
TINY_DETECTOR = [*TINY_MODEL, *FAST]
EVENTS = "events.out.tfevents.*"


def _history(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


def _scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the run directory's event files: [(step, value), ...]."""
    # Not skipped when missing: the test extra installs tensorboard (pyproject.toml).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})  # 0: keep all
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _assert_events_match_history(run_dir) -> None:
    # The events are in the run directory itself, not in a subdirectory.
    assert list(run_dir.glob(EVENTS)), sorted(p.name for p in run_dir.iterdir())
    assert not list(run_dir.glob(f"*/**/{EVENTS}"))
    history = _history(run_dir)
    keys = {k for record in history for k in record if k != "epoch"}
    assert {"train_loss", "lr"} <= keys
    scalars = _scalars(run_dir)
    assert set(scalars) == keys
    for key in sorted(keys):
        want = [(r["epoch"], r[key]) for r in history if r.get(key) is not None]
        got = scalars[key]
        assert [step for step, _ in got] == [epoch for epoch, _ in want], key
        for (epoch, value), (_, logged) in zip(want, got, strict=True):
            assert logged == pytest.approx(value, rel=1e-6, abs=1e-7), (key, epoch)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tb") / "run"
    assert main(["train", *TINY, "--epochs", "2", "--tensorboard", "--out", str(out)]) == 0
    return out


def test_every_history_scalar_is_logged_once_per_epoch(run):
    assert len(_history(run)) == 2
    keys = set(_history(run)[0])
    assert {"train_loss", "train_accuracy", "dev_loss", "dev_accuracy", "lr"} <= keys
    _assert_events_match_history(run)


def test_resume_purges_the_epoch_logged_before_a_kill(tmp_path):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "2", "--tensorboard", "--out", str(out)]) == 0
    # A kill after epoch 3 was logged but before its checkpoint: stale step-3 values remain.
    stale = summary_writer_class()(log_dir=str(out))
    for key in _history(out)[0]:
        if key != "epoch":
            stale.add_scalar(key, 1234.5, 3)
    stale.close()
    assert main(["train", "--resume", str(out), "--epochs", "3"]) == 0
    assert [r["epoch"] for r in _history(out)] == [1, 2, 3]
    _assert_events_match_history(out)  # one value per epoch: the stale step 3 is gone


def test_detection_run_logs_its_history_too(tmp_path):
    scenes = tmp_path / "scenes"
    args = ["data", "scenes", str(scenes), "--images", "4", "--val-images", "2", "--size", "64"]
    assert main(args) == 0
    out = tmp_path / "det"
    argv = ["detect", "train", "--data", f"coco:{scenes}", "--epochs", "2", *TINY_DETECTOR,
            "--tensorboard", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert "dev_box_ap" in _history(out)[0]
    _assert_events_match_history(out)


def test_only_rank_0_writes(tmp_path, monkeypatch):
    # Another rank neither needs the package nor writes anything.
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    other = RunOutputs(tmp_path / "run", is_main=False, tensorboard=True, metric=Metric("accuracy"))
    assert other.tensorboard is False
    other.open(0, lambda: None)
    other.close()
    assert other.writer is None and not (tmp_path / "run").exists()


def test_rank_0_without_the_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ValueError, match=r"pip install 'cnnkit\[tensorboard\]'"):
        RunOutputs(tmp_path / "run", is_main=True, tensorboard=True, metric=Metric("accuracy"))
    # Without --tensorboard the package is not needed.
    RunOutputs(tmp_path / "run", is_main=True, tensorboard=False, metric=Metric("accuracy"))


def test_missing_package_is_one_line_from_the_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    out = tmp_path / "run"
    assert main(["train", *TINY, "--tensorboard", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "--tensorboard needs the tensorboard package" in err
    assert "pip install 'cnnkit[tensorboard]'" in err
    assert not out.exists()  # refused before anything was written
