"""Work is never lost or mixed, and no run ends successfully with nonsense: unique default run
directories, no silent overwrite, one process per run directory, resume flags honoured or
refused, ordinary file permissions, non-finite evaluations stop the run, strict JSON history,
compiler failures told apart from the step's own errors."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from cnnkit import atomic
from cnnkit.atomic import atomic_write_text, current_umask
from cnnkit.cli.main import build_parser, main
from cnnkit.cli.train import resume_overrides
from cnnkit.train import outputs as outputs_module
from cnnkit.train.engine import Engine, TrainingDiverged
from cnnkit.train.history import History
from cnnkit.train.rundir import LOCK_NAME, RUN_MARKERS, create_unique
from cnnkit.train.state import load_state

from .test_fake_task import LineFit, _cfg

TINY = ["--model-arg", "depth=8", "--model-arg", "widths=[4,8,16]", "--image-size", "16",
        "--train-subset", "64", "--batch-size", "32", "--quiet", "--threads", "1"]  # fmt: skip


def _quiet(text: str) -> None:
    pass


def _one_line_error(capsys, argv, status, pattern) -> str:
    assert main(argv) == status
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert re.search(pattern, err), err
    return err


def _cnnkit(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "cnnkit", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _listing(path: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime_ns for p in path.iterdir()}


# ---------------------------------------------------------------- 1. unique default names


def test_default_run_dirs_started_in_the_same_second_are_distinct(tmp_path, monkeypatch):
    class Frozen:  # every run starts "at the same second"
        @staticmethod
        def now():
            from datetime import datetime

            return datetime(2026, 1, 2, 3, 4, 5)

    monkeypatch.setattr(outputs_module, "datetime", Frozen)
    monkeypatch.chdir(tmp_path)
    dirs = []
    for lr in (0.1, 0.2):
        engine = Engine(_cfg(epochs=1, lr=lr), LineFit(), log=_quiet)
        engine.fit()
        dirs.append(engine.run_dir)
    assert dirs[0] != dirs[1] and dirs[1].name == dirs[0].name + "-2"
    for d, lr in zip(dirs, (0.1, 0.2), strict=True):
        assert json.loads((d / "config.json").read_text())["train"]["lr"] == lr
        assert (d / "metrics.json").is_file()


def test_create_unique_under_concurrency(tmp_path):
    base = tmp_path / "runs" / "resnet20-digits-20260102-030405"
    got, barrier = [], threading.Barrier(12)

    def claim():
        barrier.wait()
        got.append(create_unique(base))

    threads = [threading.Thread(target=claim) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 12 and all(p.is_dir() for p in got)


# ---------------------------------------------------------------- 2. no silent overwrite


@pytest.mark.parametrize("marker", RUN_MARKERS)
def test_out_holding_a_run_is_refused_before_anything_is_written(capsys, tmp_path, marker):
    out = tmp_path / "run"
    out.mkdir()
    (out / marker).write_text("{}")
    before = _listing(out)
    _one_line_error(
        capsys,
        ["train", *TINY, "--out", str(out)],
        2,
        rf"--out {out} already holds a run.*--overwrite",
    )
    assert _listing(out) == before


def test_empty_out_is_fine_and_files_get_ordinary_permissions(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    old = os.umask(0o022)
    try:
        Engine(_cfg(epochs=1, save_every=2), LineFit(), run_dir=out, log=_quiet).fit()
    finally:
        os.umask(old)
    files = [p for p in out.iterdir() if p.is_file()]
    assert {"config.json", "history.jsonl", "last.ckpt", "metrics.json"} <= {p.name for p in files}
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p.name


def test_overwrite_clears_the_run_files_only(tmp_path):
    out = tmp_path / "run"
    Engine(_cfg(epochs=2), LineFit(), run_dir=out, log=_quiet).fit()
    for name in ("evaluation.json", "confusion_matrix.png", "notes.txt"):
        (out / name).write_text("stale")
    with pytest.raises(ValueError, match=rf"--out {out} already holds a run"):
        Engine(_cfg(epochs=1), LineFit(), run_dir=out, log=_quiet)
    Engine(_cfg(epochs=1), LineFit(), run_dir=out, log=_quiet, overwrite=True).fit()
    assert not (out / "evaluation.json").exists() and not (out / "confusion_matrix.png").exists()
    assert (out / "notes.txt").read_text() == "stale"
    assert [r["epoch"] for r in History.load(out).records] == [1]
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 1


def test_overwrite_and_resume_exclude_each_other(capsys, tmp_path):
    _one_line_error(capsys, ["train", "--resume", str(tmp_path), "--overwrite"], 2, "choose one")


# ---------------------------------------------------------------- 3. one process per run dir


HOLD = (
    "import sys, time; from pathlib import Path; from cnnkit.train.rundir import RunLock; "
    "lock = RunLock(Path(sys.argv[1])); print('locked', flush=True); time.sleep(600)"
)


def _holder(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_run_directory_in_use_is_refused_and_a_killed_owner_does_not_block(capsys, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = _holder(out)
    try:
        err = _one_line_error(
            capsys, ["train", *TINY, "--epochs", "1", "--out", str(out)], 2, "is in use"
        )
        assert f"run directory {out} is in use: pid {holder.pid}" in err
        assert not (out / "config.json").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    # The stale lock file stays; the kernel released the lock with the process.
    assert (out / LOCK_NAME).is_file()
    assert main(["train", *TINY, "--epochs", "1", "--out", str(out)]) == 0
    assert (out / "metrics.json").is_file()


@pytest.mark.slow
def test_second_cnnkit_train_into_a_running_run_is_refused(tmp_path):
    out = tmp_path / "run"
    first = _cnnkit("train", *TINY, "--epochs", "400", "--out", str(out))
    try:
        deadline = time.monotonic() + 240
        while not (out / "last.ckpt").exists():
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        for argv in (["--resume", str(out)], [*TINY, "--out", str(out), "--overwrite"]):
            second = _cnnkit("train", *argv)
            _, err = second.communicate(timeout=240)
            assert second.returncode == 2, err
            assert err.strip() == err.strip().splitlines()[0]
            assert f"run directory {out} is in use: pid {first.pid}" in err
        assert first.poll() is None  # still training, undisturbed
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
    # Killed: its lock is gone with it; resume it to one more epoch than it saved.
    done = load_state(out / "last.ckpt")["epoch"]
    assert main(["train", "--resume", str(out), "--epochs", str(done + 1)]) == 0
    epochs = [r["epoch"] for r in History.load(out).records]
    assert epochs == list(range(1, done + 2))


# ---------------------------------------------------------------- 4. resume flags


def test_resume_refuses_conflicting_flags_and_honours_the_others(capsys, tmp_path):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    before = _listing(out)
    err = _one_line_error(
        capsys,
        ["train", "--resume", str(out), "--epochs", "2", "--lr", "0.01", "--model", "resnet56"],
        2,
        r"--resume .* cannot change --lr \(saved: None, given: 0.01\); --model",
    )
    assert "--epochs" in err.split("except")[1]  # the list of what may change
    _one_line_error(
        capsys, ["train", "--resume", str(out), "--out", str(tmp_path / "x")], 2, "--out"
    )
    assert _listing(out) == before  # refused before anything was written
    # A flag given with its saved value is no conflict; --epochs extends the run.
    argv = ["train", "--resume", str(out), "--epochs", "2", "--batch-size", "32", "--quiet"]
    assert main(argv) == 0
    assert [r["epoch"] for r in History.load(out).records] == [1, 2]
    assert json.loads((out / "config.json").read_text())["train"]["epochs"] == 2
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 2
    capsys.readouterr()
    _one_line_error(capsys, ["train", "--resume", str(out), "--epochs", "1"], 2, "already trained")


def test_explicit_flags_are_known_even_when_they_equal_the_default():
    args = build_parser().parse_args(
        ["train", "--resume", "r", "--seed", "0", "--epochs", "30", "--model-arg", "depth=8"]
    )
    assert resume_overrides(args) == {"seed": 0, "epochs": 30, "model_args": {"depth": 8}}
    assert resume_overrides(build_parser().parse_args(["train", "--resume", "r"])) == {}


# ---------------------------------------------------------------- 5. permissions


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomic_files_get_0666_minus_umask(tmp_path, monkeypatch, mask):
    old = os.umask(mask)
    try:
        assert current_umask() == mask
        atomic_write_text(tmp_path / "a.json", "{}")
        assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o666 & ~mask

        def no_proc(*args, **kwargs):
            raise OSError("no /proc here")

        monkeypatch.setattr(atomic, "open", no_proc, raising=False)
        assert current_umask() == mask  # the os.umask fallback
        assert os.umask(mask) == mask  # and it left the umask as it was
    finally:
        os.umask(old)


# ---------------------------------------------------------------- 6. non-finite results


class NanAt(LineFit):
    """LineFit whose ``split`` evaluation returns NaN for ``key`` from call ``at`` on."""

    def __init__(self, split: str, key: str, at: int) -> None:
        super().__init__()
        self.split, self.key, self.at, self.calls = split, key, at, 0

    def evaluate(self, model, split, reduce):
        figures = super().evaluate(model, split, reduce)
        if split == self.split:
            self.calls += 1
            if self.calls >= self.at:
                figures[self.key] = float("nan")
        return figures


def test_non_finite_dev_loss_stops_the_run_keeping_the_last_checkpoint(tmp_path):
    engine = Engine(_cfg(epochs=3), NanAt("dev", "loss", 2), run_dir=tmp_path, log=_quiet)
    with pytest.raises(
        TrainingDiverged, match=r"non-finite dev loss \(nan\) at epoch 2; .*last.ckpt \(epoch 1\)"
    ):
        engine.fit()
    assert load_state(tmp_path / "last.ckpt")["epoch"] == 1
    assert [r["epoch"] for r in History.load(tmp_path).records] == [1]
    assert not (tmp_path / "metrics.json").exists()


def test_non_finite_test_metric_stops_the_run(tmp_path):
    engine = Engine(_cfg(epochs=2), NanAt("test", "mse", 1), run_dir=tmp_path, log=_quiet)
    with pytest.raises(TrainingDiverged, match=r"non-finite test mse \(nan\) after epoch 2"):
        engine.fit()
    assert not (tmp_path / "metrics.json").exists()


def _strict_loads(text: str):
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_history_is_strict_json_and_reads_null_back_as_nan(tmp_path):
    history = History(tmp_path)
    history.append({"epoch": 1, "train_loss": float("nan"), "dev_loss": float("inf"), "lr": 0.1})
    history.append({"epoch": 2, "train_loss": 1.0, "dev_loss": float("-inf"), "lr": 0.1})
    lines = [_strict_loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert lines[0]["train_loss"] is None and lines[1]["dev_loss"] is None
    history.truncate(2)  # the whole-file rewrite is strict too
    for line in (tmp_path / "history.jsonl").read_text().splitlines():
        _strict_loads(line)
    records = History.load(tmp_path).records
    assert math.isnan(records[0]["train_loss"]) and math.isnan(records[0]["dev_loss"])
    assert records[1]["train_loss"] == 1.0 and records[0]["lr"] == 0.1


# ---------------------------------------------------------------- 7. compiler errors


def _first_compiled_step(tmp_path, error: BaseException):
    """An engine whose first (compiled) step raises ``error``; the eager step works."""
    engine = Engine(_cfg(epochs=1), LineFit(), run_dir=tmp_path, log=_quiet)
    compiled = nn.Identity()
    engine.step_net, engine.use_compile, engine._compile_checked = compiled, True, False

    def step(net, batch):
        if net is compiled:
            raise error
        return "eager step"

    engine._step = step
    return engine


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        torch.OutOfMemoryError("CUDA out of memory"),
        RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)"),
    ],
)
def test_the_steps_own_errors_are_raised_as_themselves(tmp_path, recwarn, error):
    engine = _first_compiled_step(tmp_path, error)
    with pytest.raises(type(error), match=re.escape(str(error))):
        engine.train_step(None)
    assert not [w for w in recwarn if "torch.compile" in str(w.message)]
    assert engine.use_compile


def _backend_failed(inner: Exception):
    from torch._dynamo.exc import BackendCompilerFailed

    def inductor(*args):
        pass

    return BackendCompilerFailed(inductor, inner, None)


def test_compiler_failures_fall_back_to_eager_mode(tmp_path):
    from torch._dynamo.exc import TorchRuntimeError, Unsupported

    engine = _first_compiled_step(tmp_path, _backend_failed(RuntimeError("C++ compile error")))
    with pytest.warns(UserWarning, match="torch.compile is unavailable"):
        assert engine.train_step(None) == "eager step"
    assert not engine.use_compile and engine.train_step(None) == "eager step"

    from cnnkit.train.compiler import is_compiler_error

    assert is_compiler_error(Unsupported("generator"))
    # Out of memory while compiling, and the model's own error found while tracing: not the
    # compiler's fault.
    assert not is_compiler_error(_backend_failed(torch.OutOfMemoryError("out of memory")))
    assert not is_compiler_error(TorchRuntimeError("shapes cannot be multiplied"))


def test_predict_with_non_finite_outputs_is_an_error_not_nan_percent(capsys, tmp_path):
    from PIL import Image
    from safetensors import safe_open
    from safetensors.torch import save_file

    run = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(run)]) == 0
    weights = run / "model.safetensors"
    with safe_open(str(weights), framework="pt") as fh:
        metadata = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    for value in tensors.values():
        if value.is_floating_point():
            value.fill_(float("nan"))
    save_file(tensors, str(weights), metadata=metadata)
    image = tmp_path / "digit.png"
    Image.new("L", (16, 16), 128).save(image)
    capsys.readouterr()
    _one_line_error(capsys, ["predict", str(run), str(image)], 2, "outputs are not finite")
    assert "nan" not in capsys.readouterr().out.lower()


def test_more_epochs_on_resume_keep_the_compile_decision_of_the_saved_run():
    # --compile auto turns on at COMPILE_MIN_STEPS total steps, and compiling drops a ragged
    # last batch: a longer run must not change the steps per epoch the checkpoint counts in.
    from cnnkit.train.run import _keep_compile_plan

    for epochs, expected in ((1, "off"), (2, "on")):
        saved = {"epochs": epochs, "compile": "auto"}
        values = {**saved, "epochs": epochs + 1}
        _keep_compile_plan(values, saved, {"steps_per_epoch": 1500})
        assert values["compile"] == expected
    values = {"epochs": 1, "compile": "auto"}
    _keep_compile_plan(values, dict(values), {"steps_per_epoch": 1500})
    assert values["compile"] == "auto"  # nothing changed, nothing pinned


def test_a_brief_state_probe_does_not_make_a_starting_run_fail(tmp_path):
    # `cnnkit runs` probes a run's state with a shared flock held for an instant; a trainer
    # taking the run lock at that moment waits for it instead of calling the directory in use.
    import fcntl

    from cnnkit.train.rundir import LOCK_NAME, RunLock

    run = tmp_path / "run"
    run.mkdir()
    fd = os.open(run / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    threading.Timer(0.05, os.close, (fd,)).start()  # the probe lets go 50 ms later
    lock = RunLock(run)
    try:
        assert (run / LOCK_NAME).read_text().strip() == str(os.getpid())
    finally:
        lock.release()
    # A real holder is still refused.
    holder = RunLock(run)
    try:
        with pytest.raises(ValueError, match="in use"):
            RunLock(run)
    finally:
        holder.release()
