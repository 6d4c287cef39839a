"""report.md: configuration, final figures, embedded curves, diagnosis."""

from __future__ import annotations

import pytest

import cnnkit
from cnnkit.train.checkpoint import read_config, save_model
from cnnkit.train.diagnose import diagnose
from cnnkit.train.report import write_report
from cnnkit.viz import plot_curves


def _records(n=12):
    return [
        {
            "epoch": t,
            "train_loss": 2.0 / t,
            "train_accuracy": 1 - 0.5 / t,
            "dev_loss": 2.1 / t,
            "dev_accuracy": 1 - 0.55 / t,
            "lr": 0.1,
        }
        for t in range(1, n + 1)
    ]


@pytest.fixture
def run(tmp_path):
    if "resnet20" not in cnnkit.list_models():
        pytest.skip("resnet20 not registered yet")
    model = cnnkit.create_model("resnet20")
    data = {"spec": "digits", "classes": [str(i) for i in range(10)], "input_size": [3, 32, 32]}
    train = {"epochs": 12, "batch_size": 64, "lr": 0.1, "weight_decay": 5e-4, "seed": 3}
    save_model(model, tmp_path, data=data, train=train)
    return tmp_path


def test_report_has_every_section(run):
    config = read_config(run)
    records = _records()
    plot_curves(records, run / "curves.png")
    metrics = {"test_accuracy": 0.9733, "test_loss": 0.09, "best_dev_accuracy": 0.98, "epochs": 12}
    diagnosis = diagnose(records, config)
    path = write_report(run, config=config, metrics=metrics, diagnosis=diagnosis)
    assert path == run / "report.md"
    text = path.read_text()
    # He et al. 2016, Table 6: ResNet-20 on CIFAR-10 has 0.27M parameters (269,722 exactly).
    assert "| parameters | 269,722 |" in text
    assert "| model | resnet20 |" in text and "| data | digits |" in text
    assert "| batch_size | 64 |" in text and "| weight_decay | 0.0005 |" in text
    assert "| test_accuracy | 0.9733 (97.33%) |" in text
    assert "![loss and accuracy, train vs dev](curves.png)" in text
    assert f"**{diagnosis.verdict.replace('_', ' ')}**" in text
    assert diagnosis.advice[0] in text
    assert '"seed": 3' in text  # the full argument listing


def test_report_without_curves_or_metrics(run):
    config = read_config(run)
    text = write_report(run, config=config, metrics={}, diagnosis=diagnose(_records(2))).read_text()
    assert "curves.png is missing" in text and "did not finish" in text
    assert "too short" in text


def test_parameter_count_for_an_unknown_model(tmp_path):
    config = {"name": "not_a_model", "kwargs": {}}
    path = write_report(tmp_path, config=config, metrics={}, diagnosis=diagnose(_records()))
    assert "| parameters | unknown |" in path.read_text()


def test_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="config"):
        write_report(tmp_path, config=None, metrics={}, diagnosis=diagnose(_records()))


def test_defaults_are_shown_as_the_values_used(tmp_path):
    # --lr, --norm, --dropblock left at their defaults: the report says what the run used.
    train = {
        "epochs": 2,
        "lr": None,
        "lr_batch": 128,
        "optimizer": "sgd",
        "norm": None,
        "dropblock": None,
        "weight_decay": None,
        "precision": "auto",
        "resolved": {"lr": 0.2, "global_batch": 256, "weight_decay": 5e-4, "precision": "fp32"},
    }
    config = {"name": "not_a_model", "kwargs": {"norm": "group", "norm_groups": 32}, "train": train}
    text = write_report(tmp_path, config=config, metrics={}, diagnosis=diagnose(_records()))
    text = text.read_text()
    assert "| lr | 0.1 (default) |" in text  # 0.2 = lr x 256 / 128 (linear scaling rule)
    assert "| effective lr (linear scaling rule) | 0.2 |" in text
    assert "| norm | group (default) |" in text  # from the model's arguments
    assert "| dropblock | off |" in text
    assert "| weight_decay | 0.0005 (default) |" in text
    assert "| precision | auto (fp32) |" in text
    assert "| default |" not in text
