"""`cnnkit compare RUN_DIR...` and `cnnkit runs [DIR]` on tiny runs trained in the test.

Two classification runs that differ in a known set of flags, one tiny detection run, and copies
of them made interrupted, running, diverged, cut mid-write or damaged.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import warnings

import pytest

from cnnkit.cli.main import main
from cnnkit.train.rundir import RunLock

# The fastest classification settings of tests/test_cli_train.py.
TINY = ["--model-arg", "depth=8", "--model-arg", "widths=[4,8,16]", "--image-size", "16",
        "--train-subset", "64", "--batch-size", "32", "--quiet", "--threads", "1",
        "--device", "cpu", "--compile", "off", "--precision", "fp32"]  # fmt: skip
# The tiny detector of tests/test_cli_detect.py.
TINY_DETECTOR = [
    "--model-arg", "backbone_widths=[8,16,32,64]", "--model-arg", "fpn_channels=16",
    "--model-arg", "representation_size=32", "--model-arg", "min_size=64",
    "--model-arg", "max_size=64", "--model-arg", "anchor_sizes=[8,16,32,64,128]",
    "--batch-size", "4", "--quiet", "--threads", "1", "--workers", "0", "--precision", "fp32",
]  # fmt: skip
# What `other` changes against `base`: these flags and what they resolve to, nothing else
# (not `out`, which differs between any two runs and says nothing).
DIFFERING = {"epochs", "lr", "weight_decay", "resolved.lr", "resolved.weight_decay"}
OLD = time.time() - 3600  # an hour ago: long past "running"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    base, other = root / "base", root / "sub" / "other"
    assert main(["train", *TINY, "--epochs", "3", "--out", str(base)]) == 0
    argv = ["train", *TINY, "--epochs", "2", "--lr", "0.05", "--weight-decay", "0"]
    assert main([*argv, "--out", str(other)]) == 0
    return root, base, other


@pytest.fixture(scope="module")
def detection_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("detection")
    scenes = root / "scenes"
    args = ["data", "scenes", str(scenes), "--images", "8", "--val-images", "4", "--size", "64"]
    assert main(args) == 0
    out = root / "det"
    argv = ["detect", "train", "--data", f"coco:{scenes}", "--epochs", "2", *TINY_DETECTOR]
    assert main([*argv, "--out", str(out)]) == 0
    return out


def _history(run) -> list[dict]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


def _table(out: str) -> dict[str, list[str]]:
    """The rows of compare's table, by their first cell."""
    rows = {}
    for line in out.splitlines():
        if line.startswith("verdicts:"):
            break
        cells = re.split(r"\s{2,}", line.strip())
        if line.startswith(" "):  # the header: an empty first cell, then the run names
            rows[""] = cells
        elif len(cells) > 1:
            rows[cells[0]] = cells[1:]
    return rows


def _verdicts(out: str) -> dict[str, str]:
    lines = out.split("verdicts:\n", 1)[1].splitlines()
    return dict(re.match(r"  (\S+): (.+?):", line).groups() for line in lines if line[:2] == "  ")


def _runs_rows(out: str) -> list[list[str]]:
    lines = out.strip().splitlines()
    assert lines[0].split()[:2] == ["run", "model"], out
    return [re.split(r"\s{2,}", line.strip()) for line in lines[1:] if "  " in line]


def _diagnosis(run, capsys) -> str:
    """The verdict `cnnkit diagnose` prints for the run."""
    capsys.readouterr()
    assert main(["diagnose", str(run)]) == 0
    return re.match(r"Diagnosis: (.+?):", capsys.readouterr().out).group(1)


def _fails(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cnnkit: error:") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err


def _interrupted_copy(run, dest, epochs_planned=None):
    """``run`` as a killed run leaves it: no results, its lock free, its files an hour old."""
    shutil.copytree(run, dest)
    (dest / "metrics.json").unlink()
    (dest / "report.md").unlink()
    if epochs_planned is not None:
        config = json.loads((dest / "config.json").read_text())
        config["train"]["epochs"] = epochs_planned
        (dest / "config.json").write_text(json.dumps(config))
    for file in dest.iterdir():
        os.utime(file, (OLD, OLD))
    return dest


# --------------------------------------------------------------------------- compare


def test_compare_lists_exactly_the_differing_settings(trained, tmp_path, capsys):
    _, base, other = trained
    out = tmp_path / "cmp.png"
    assert main(["compare", str(base), str(other), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    rows = _table(text)
    assert rows[""] == ["base", "other"]
    settings = set(rows) - {"", "epochs done/planned", "metric", "final", "best", "state"}
    assert settings == DIFFERING, text
    assert rows["epochs"] == ["3", "2"] and rows["lr"][1] == "0.05"
    assert text.startswith(f"{len(DIFFERING)} setting(s) differ:")
    # Runs of different lengths: epochs, final and best dev accuracy read from each history.
    assert rows["epochs done/planned"] == ["3/3", "2/2"]
    assert rows["metric"] == ["dev_accuracy", "dev_accuracy"]
    for i, run in enumerate((base, other)):
        dev = [r["dev_accuracy"] for r in _history(run)]
        assert rows["final"][i] == f"{dev[-1]:.4f}"
        best = max(dev)
        assert rows["best"][i] == f"{best:.4f} (epoch {dev.index(best) + 1})"
    assert rows["state"] == ["finished", "finished"]
    verdicts = _verdicts(text)
    assert verdicts == {"base": _diagnosis(base, capsys), "other": _diagnosis(other, capsys)}
    assert f"wrote {out}" in text
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_one_run_and_the_default_out(trained, tmp_path, monkeypatch, capsys):
    _, base, _ = trained
    monkeypatch.chdir(tmp_path)
    assert main(["compare", str(base)]) == 0
    text = capsys.readouterr().out
    assert "setting(s) differ" not in text and "wrote compare.png" in text
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_another_metric(trained, tmp_path, capsys):
    _, base, other = trained
    out = str(tmp_path / "loss.png")
    assert main(["compare", str(base), str(other), "--metric", "loss", "--out", out]) == 0
    rows = _table(capsys.readouterr().out)
    assert rows["metric"] == ["dev_loss", "dev_loss"]
    # A loss is best at its minimum.
    dev = [r["dev_loss"] for r in _history(base)]
    assert rows["best"][0].startswith(f"{min(dev):.4f} (epoch {dev.index(min(dev)) + 1})")
    assert main(["compare", str(base), "--metric", "train_accuracy", "--out", out]) == 0
    assert _table(capsys.readouterr().out)["metric"] == ["train_accuracy"]
    assert main(["compare", str(base), "--metric", "lr", "--out", out]) == 0
    rows = _table(capsys.readouterr().out)
    assert rows["final"] == [f"{_history(base)[-1]['lr']:.4f}"]


def test_compare_a_run_cut_mid_write(trained, tmp_path, capsys):
    _, base, other = trained
    cut = _interrupted_copy(base, tmp_path / "cut", epochs_planned=10)
    with open(cut / "history.jsonl", "a") as fh:
        fh.write('{"epoch": 4, "train_loss": 1.2')  # what a reader sees mid-append
    out = str(tmp_path / "cut.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the cut line is expected, not worth a warning
        assert main(["compare", str(cut), str(other), "--out", out]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    rows = _table(captured.out)
    assert rows["epochs done/planned"] == ["3/10", "2/2"]
    assert rows["state"] == ["interrupted", "finished"]
    assert rows["epochs"] == ["10", "2"]


def test_compare_a_detection_run(trained, detection_run, tmp_path, capsys):
    _, base, _ = trained
    out = str(tmp_path / "det.png")
    assert main(["compare", str(base), str(detection_run), "--out", out]) == 0
    text = capsys.readouterr().out
    rows = _table(text)
    assert rows["metric"] == ["dev_accuracy", "dev_box_ap"]
    ap = [r["dev_box_ap"] for r in _history(detection_run)]
    assert rows["final"][1] == f"{ap[-1]:.4f}"
    assert rows["task"] == ["classification", "detection"]
    assert rows["model"][1].startswith("faster_rcnn")
    # Arguments only one of the two models has are no difference: the model row says it.
    assert not any(name.startswith("kwargs.") for name in rows), text
    assert _verdicts(text)["det"] == _diagnosis(detection_run, capsys)
    # The detector records a training loss only: --metric loss still compares both.
    assert main(["compare", str(base), str(detection_run), "--metric", "loss", "--out", out]) == 0
    assert _table(capsys.readouterr().out)["metric"] == ["dev_loss", "train_loss"]


def test_compare_bad_input_is_one_line(trained, tmp_path, capsys):
    _, base, _ = trained
    out = str(tmp_path / "x.png")
    _fails(capsys, ["compare", str(tmp_path / "nope"), "--out", out], "nope", "no such")
    (tmp_path / "empty").mkdir()
    _fails(capsys, ["compare", str(tmp_path / "empty"), "--out", out], "empty", "not a run")
    _fails(capsys, ["compare", str(base), "--metric", "nope", "--out", out], "--metric nope")
    again = str(base) + "/."
    _fails(capsys, ["compare", str(base), again, "--out", out], again, "the same run as")
    _fails(capsys, ["compare", str(base), "--out", str(tmp_path)], "--out", "directory")
    before = (base / "curves.png").read_bytes()
    _fails(capsys, ["compare", str(base), "--out", str(base / "curves.png")], "curves.png")
    assert (base / "curves.png").read_bytes() == before
    with pytest.raises(SystemExit) as exit_:
        main(["compare"])
    assert exit_.value.code == 2


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (lambda d: (d / "config.json").write_text("{not json"), "config.json"),
        (lambda d: _edit_config(d, epochs="three"), "train.epochs"),
        (lambda d: _edit_config(d, higher="yes"), "higher_is_better"),
        (lambda d: _edit_history(d, 0, "[1, 2]"), "history.jsonl: line 1"),
        (lambda d: _edit_history(d, 1, '{"epoch": "two"}'), "history.jsonl: line 2"),
    ],
)
def test_compare_damaged_files_are_named(trained, tmp_path, capsys, damage, needle):
    _, base, _ = trained
    run = shutil.copytree(base, tmp_path / "damaged")
    damage(run)
    _fails(capsys, ["compare", str(run), "--out", str(tmp_path / "x.png")], needle)


def _edit_config(run, epochs=None, higher=None):
    config = json.loads((run / "config.json").read_text())
    if epochs is not None:
        config["train"]["epochs"] = epochs
    if higher is not None:
        config["train"]["resolved"]["higher_is_better"] = higher
    (run / "config.json").write_text(json.dumps(config))


def _edit_history(run, index, line):
    lines = (run / "history.jsonl").read_text().splitlines()
    lines[index] = line
    (run / "history.jsonl").write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------- runs


def test_runs_lists_every_run_once(trained, tmp_path, capsys):
    root, base, other = trained
    # A run inside a run directory's sub-folder is part of that run, not another run.
    nested = base / "extra"
    nested.mkdir(exist_ok=True)
    (nested / "config.json").write_text("{}")
    assert main(["runs", str(root)]) == 0
    text = capsys.readouterr().out
    assert "best dev" in text.splitlines()[0]
    rows = {row[0]: row for row in _runs_rows(text)}
    assert set(rows) == {"base", "sub/other"}
    best = max(r["dev_accuracy"] for r in _history(base))
    assert rows["base"][1:] == [
        "resnet20", "digits", "3/3", "dev_accuracy", f"{best:.4f}",
        _diagnosis(base, capsys), "finished",
    ]  # fmt: skip
    assert rows["sub/other"][3] == "2/2"
    shutil.rmtree(nested)


def test_runs_states_and_sort(trained, tmp_path, capsys):
    _, base, other = trained
    root = tmp_path / "runs"
    shutil.copytree(base, root / "a-finished")
    _interrupted_copy(other, root / "b-interrupted", epochs_planned=5)
    running = _interrupted_copy(base, root / "c-running", epochs_planned=8)
    diverged = shutil.copytree(other, root / "d-diverged")
    (diverged / "metrics.json").unlink()
    (diverged / "diverged.json").write_text('{"reason": "loss nan", "epochs_done": 2}')
    damaged = shutil.copytree(other, root / "e-damaged")
    (damaged / "config.json").write_text("[]")
    lock = RunLock(running)  # a live trainer holds the run
    try:
        assert main(["runs", str(root), "--sort", "epochs"]) == 0
        text = capsys.readouterr().out
    finally:
        lock.release()
    rows = _runs_rows(text)
    states = {row[0]: row[-1] for row in rows}
    assert states == {
        "a-finished": "finished",
        "b-interrupted": "interrupted",
        "c-running": "running",
        "d-diverged": "diverged",
        "e-damaged": "damaged",
    }
    assert [row[0] for row in rows if row[3] == "3/8"] == ["c-running"]
    # Numerically by epochs done (2 < 3), the damaged run (no value) last.
    assert [row[0] for row in rows] == [
        "b-interrupted", "d-diverged", "a-finished", "c-running", "e-damaged",
    ]  # fmt: skip
    assert "e-damaged:" in text and "config.json" in text  # why it is damaged
    assert [r for r in rows if r[0] == "d-diverged"][0][-2] == "diverged"  # the verdict too

    # Its lock released, the killed run is interrupted however fresh its files are.
    os.utime(running / "history.jsonl")
    assert main(["runs", str(root), "--sort", "state"]) == 0
    rows = _runs_rows(capsys.readouterr().out)
    assert dict((r[0], r[-1]) for r in rows)["c-running"] == "interrupted"
    assert [r[-1] for r in rows] == sorted(r[-1] for r in rows)
    # Without a lock file (an older run) fresh files mean running.
    (running / ".lock").unlink()
    assert main(["runs", str(root), "--sort", "best", "--reverse"]) == 0
    rows = _runs_rows(capsys.readouterr().out)
    assert dict((r[0], r[-1]) for r in rows)["c-running"] == "running"
    values = [float(r[5]) for r in rows if r[-1] != "damaged"]
    assert values == sorted(values, reverse=True) and rows[-1][0] == "e-damaged"


def test_runs_empty_missing_and_bad_sort(tmp_path, capsys):
    assert main(["runs", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == f"no runs under {tmp_path}"
    _fails(capsys, ["runs", str(tmp_path / "nope")], "nope", "no such directory")
    with pytest.raises(SystemExit) as exit_:
        main(["runs", str(tmp_path), "--sort", "colour"])
    assert exit_.value.code == 2
    assert "--sort" in capsys.readouterr().err


def test_runs_default_dir_is_runs(trained, tmp_path, monkeypatch, capsys):
    _, base, _ = trained
    monkeypatch.chdir(tmp_path)
    shutil.copytree(base, tmp_path / "runs" / "only")
    assert main(["runs"]) == 0
    assert [row[0] for row in _runs_rows(capsys.readouterr().out)] == ["only"]
