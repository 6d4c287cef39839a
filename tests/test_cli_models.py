"""`cnnkit models`: the zoo as a table (called through the command's run function)."""

from __future__ import annotations

import argparse

import pytest

from cnnkit.cli.models import register, run


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_table_lists_names_counts_sizes_and_papers(capsys):
    assert run(parse(["models", "--family", "resnet"])) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:5] == ["model", "family", "params", "input", "paper"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert len(rows) == 11
    # DESIGN.md's published counts, formatted with thousands separators.
    assert "269,722" in rows["resnet20"] and "3x32x32" in rows["resnet20"]
    assert "8.75%" in rows["resnet20"]
    assert "25,557,032" in rows["resnet50"] and "3x224x224" in rows["resnet50"]


def test_wide_resnet_family_and_num_classes_override(capsys):
    assert run(parse(["models", "--family", "wide_resnet", "--num-classes", "10"])) == 0
    out = capsys.readouterr().out
    assert "36,479,194" in out  # wrn28_10 with 10 classes
    # wide_resnet50_2 with a 10-way classifier: 68,883,240 - 2048 * 990 - 990.
    assert f"{68_883_240 - 2048 * 990 - 990:,}" in out


def test_unknown_family_is_an_error():
    with pytest.raises(ValueError, match="family"):
        run(parse(["models", "--family", "transformers"]))
