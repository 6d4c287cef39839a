"""`cnnkit` entry point: which errors are "bad input" (one line, exit 2) and which are ours
(traceback), and ``--debug`` on either side of the command."""

from __future__ import annotations

import json

import pytest

import cnnkit.cli.models
from cnnkit.cli.main import main


def _internal_key_error(args):
    return {}["an internal lookup"]


def test_internal_key_error_is_not_bad_input(monkeypatch, capsys):
    monkeypatch.setattr(cnnkit.cli.models, "run", _internal_key_error)
    with pytest.raises(KeyError, match="an internal lookup"):
        main(["models"])
    assert "error" not in capsys.readouterr().err  # not turned into a one-line "bad input"


def test_missing_config_field_is_exit_2_naming_it(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"name": "resnet20", "kwargs": {}}))
    assert main(["train", "--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'train'" in err[0] and "config.json" in err[0]

    (run_dir / "config.json").write_text(json.dumps({"kwargs": {}, "train": {}}))
    assert main(["train", "--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert "'name'" in err and "config.json" in err


@pytest.mark.parametrize("argv", [["--debug", "train"], ["train", "--debug"]])
def test_debug_before_or_after_the_command_shows_the_traceback(argv):
    with pytest.raises(ValueError, match="--epochs"):
        main([*argv, "--epochs", "0"])


def test_without_debug_bad_input_is_one_line(capsys):
    assert main(["train", "--epochs", "0"]) == 2
    assert capsys.readouterr().err.strip() == (
        "cnnkit: error: --epochs must be a positive integer, got 0"
    )
