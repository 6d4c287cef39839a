"""history.jsonl / history.csv: append, load, truncate, and a crash-cut last line."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from cnnkit.train.history import History


def _record(epoch: int, **extra) -> dict:
    return {
        "epoch": epoch,
        "train_loss": 1.0 / epoch,
        "train_accuracy": 1 - 0.5 / epoch,
        "dev_loss": 1.2 / epoch,
        "dev_accuracy": 1 - 0.6 / epoch,
        "lr": 0.1,
        "images_per_second": 1000.0 + epoch,
        "epoch_seconds": 2.5,
        **extra,
    }


def _csv_rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_append_writes_both_files(tmp_path):
    history = History(tmp_path / "run")
    for epoch in (1, 2, 3):
        history.append(_record(epoch))
    lines = (tmp_path / "run" / "history.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [_record(e) for e in (1, 2, 3)]
    rows = _csv_rows(tmp_path / "run" / "history.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert list(rows[0])[:5] == [
        "epoch",
        "train_loss",
        "train_accuracy",
        "dev_loss",
        "dev_accuracy",
    ]
    assert float(rows[1]["train_loss"]) == 0.5
    assert len(history) == 3


def test_load_round_trip_and_tensor_values(tmp_path):
    history = History(tmp_path)
    history.append(_record(1, train_loss=torch.tensor(0.25)))
    history.append(_record(2, note="lr drop"))
    loaded = History.load(tmp_path)
    assert loaded.records == history.records
    assert loaded.records[0]["train_loss"] == 0.25
    # An extra key becomes an extra csv column, empty where absent.
    rows = _csv_rows(tmp_path / "history.csv")
    assert rows[0]["note"] == "" and rows[1]["note"] == "lr drop"
    assert History.load(tmp_path / "history.jsonl").records == history.records


def test_nan_values_survive(tmp_path):
    history = History(tmp_path)
    history.append(_record(1, dev_loss=float("nan")))
    assert math.isnan(History.load(tmp_path).records[0]["dev_loss"])
    assert History.load(tmp_path).column("dev_loss")[0] != 0  # NaN, not a silent 0


def test_truncate_for_resume_then_append(tmp_path):
    history = History(tmp_path)
    for epoch in range(1, 6):
        history.append(_record(epoch))
    resumed = History.load(tmp_path)
    resumed.truncate(3)
    resumed.append(_record(4, lr=0.01))
    final = History.load(tmp_path)
    assert [r["epoch"] for r in final.records] == [1, 2, 3, 4]
    assert final.records[-1]["lr"] == 0.01
    assert [int(r["epoch"]) for r in _csv_rows(tmp_path / "history.csv")] == [1, 2, 3, 4]


def test_crash_cut_last_line_is_dropped_with_a_warning_and_repaired(tmp_path):
    history = History(tmp_path)
    for epoch in (1, 2, 3):
        history.append(_record(epoch))
    file = tmp_path / "history.jsonl"
    text = file.read_text()
    file.write_text(text[: len(text) - 25])  # cut in the middle of epoch 3's line
    with pytest.warns(UserWarning, match="line 3"):
        loaded = History.load(tmp_path)
    assert [r["epoch"] for r in loaded.records] == [1, 2]
    # The next append must not glue its line onto the cut one.
    loaded.append(_record(3))
    assert [r["epoch"] for r in History.load(tmp_path).records] == [1, 2, 3]


def test_malformed_middle_line_is_an_error_naming_the_line(tmp_path):
    history = History(tmp_path)
    for epoch in (1, 2, 3):
        history.append(_record(epoch))
    lines = (tmp_path / "history.jsonl").read_text().splitlines()
    lines[1] = "{not json"
    (tmp_path / "history.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"history\.jsonl: line 2"):
        History.load(tmp_path)


def test_missing_history(tmp_path):
    with pytest.raises(ValueError, match=r"history\.jsonl: no such file"):
        History.load(tmp_path)


def test_bad_records(tmp_path):
    history = History(tmp_path)
    with pytest.raises(ValueError, match="epoch"):
        history.append({"train_loss": 1.0})
    with pytest.raises(TypeError, match="train_loss"):
        history.append({"epoch": 1, "train_loss": [1, 2]})
    history.append(_record(2))
    with pytest.raises(ValueError, match="does not follow"):
        history.append(_record(2))


def test_new_history_replaces_old_files(tmp_path):
    old = History(tmp_path)
    for epoch in (1, 2):
        old.append(_record(epoch))
    new = History(tmp_path)
    new.append(_record(1, lr=0.5))
    assert History.load(tmp_path).records == [_record(1, lr=0.5)]
