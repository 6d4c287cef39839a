"""`cnnkit models`: the zoo as a table (called through the command's run function)."""

from __future__ import annotations

import argparse
import subprocess
import sys

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


def test_listing_models_imports_nothing_heavy():
    # The table needs the model classes and torch, not plotting, data sets or torch's compiler
    # (initializing weights on the meta device used to import torch._dynamo: 8 s in all).
    code = (
        "import sys, io, contextlib\n"
        "from cnnkit.cli.main import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    assert main(['models', '--family', 'densenet']) == 0\n"
        "assert '7,978,856' in out.getvalue()\n"
        "heavy = ('matplotlib', 'sklearn', 'torch._dynamo', 'cnnkit.train.engine')\n"
        "print(' '.join(m for m in heavy if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert done.stdout.strip() == ""


def test_counts_skip_initialization_but_not_shapes(capsys):
    # The same counts as a model built and initialized for real (DESIGN.md's figures above
    # check the formula; this checks the shortcut changes nothing).
    from cnnkit.models.registry import count_parameters, create_model

    assert run(parse(["models", "--family", "pyramidnet"])) == 0
    rows = {line.split()[0]: line.split()[2] for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["pyramidnet110_a48"] == f"{count_parameters(create_model('pyramidnet110_a48')):,}"


def test_task_detection_lists_the_detectors_only(capsys):
    from cnnkit.models.registry import list_models

    assert run(parse(["models", "--task", "detection"])) == 0
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]}
    assert "faster_rcnn_r50_fpn" in listed and "fast_rcnn_r50_c4" in listed
    assert "resnet50" not in listed
    detectors = {n for n in list_models() if "rcnn" in n}
    assert listed == detectors
