"""`cnnkit evaluate | predict | diagnose` on a run directory built in the test."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import re
import sys

import pytest
import torch
from torch import nn

import cnnkit
from cnnkit.models import registry
from cnnkit.train.checkpoint import save_model
from cnnkit.train.history import History

classification = pytest.importorskip("cnnkit.data.classification")


TINY = "_test_cli_runs_tiny"


class TinyNet(nn.Module):
    """Average-pool to 8x8, one linear layer: learns the digits in a few hundred steps."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(8)
        self.fc = nn.Linear(in_chans * 64, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(x), 1))


def _all_cli_modules() -> bool:
    from cnnkit.cli.main import COMMAND_MODULES

    return all(importlib.util.find_spec(f"cnnkit.cli.{m}") for m in COMMAND_MODULES)


def cli(argv: list[str]) -> int:
    """`cnnkit ARGV` through cnnkit.cli.main once every command module exists."""
    if _all_cli_modules():
        from cnnkit.cli.main import main

        return main(argv)
    # Until then: the same parser wiring and error handling, with only this module's commands.
    from cnnkit.cli import runs
    from cnnkit.cli.main import _one_line

    parser = argparse.ArgumentParser(prog="cnnkit")
    parser.add_argument("--debug", action="store_true")
    runs.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, OSError, KeyError) as err:
        print(_one_line(err), file=sys.stderr)
        return 2


def _one_error_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("cnnkit: error:") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def _normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    return (x - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)


@pytest.fixture(scope="module")
def digits():
    return classification.load_data("digits", seed=0)


@pytest.fixture
def tiny_name():
    registry.register_model(TINY, TinyNet, family="test", input_size=(1, 32, 32))
    yield TINY
    registry._REGISTRY.pop(TINY, None)


def _overfitting_history(run_dir) -> None:
    history = History(run_dir)
    for t in range(1, 31):
        history.append(
            {
                "epoch": t,
                "train_loss": 0.01 + 2.3 * math.exp(-t / 4),
                "train_accuracy": 1 - 0.9 * math.exp(-t / 4),
                "dev_loss": 0.4 + 2 * math.exp(-t / 3) + 0.03 * max(0, t - 8),
                "dev_accuracy": 0.8 - 0.7 * math.exp(-t / 4),
                "lr": 0.1,
            }
        )


@pytest.fixture(scope="module")
def trained_fc(digits):
    """Weights of TinyNet's linear layer, fitted once (the pooling has no parameters)."""
    torch.manual_seed(0)
    with torch.no_grad():
        features = torch.flatten(
            TinyNet().pool(_normalize(digits.train.images, digits.mean, digits.std)), 1
        )
    fc = nn.Linear(features.shape[1], 10)
    opt = torch.optim.SGD(fc.parameters(), lr=0.5)
    for _ in range(60):  # full-batch steps: good but imperfect accuracy, a non-trivial matrix
        opt.zero_grad()
        nn.functional.cross_entropy(fc(features), digits.train.labels).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in fc.state_dict().items()}


@pytest.fixture
def run_dir(tmp_path, tiny_name, digits, trained_fc):
    """A run directory as `cnnkit train` leaves it: a fitted tiny model, config, history."""
    model = cnnkit.create_model(tiny_name)
    model.fc.load_state_dict(trained_fc)
    data = {
        "spec": "digits",
        "classes": list(digits.train.classes),
        "mean": list(digits.mean),
        "std": list(digits.std),
        "input_size": list(digits.train.images.shape[1:]),
    }
    run = tmp_path / "run"
    save_model(model, run, data=data, train={"epochs": 30, "seed": 0})
    _overfitting_history(run)
    return run


def _reference(run_dir, dataset, mean, std):
    model = cnnkit.load_model(run_dir)
    with torch.no_grad():
        logits = model(_normalize(dataset.images, mean, std))
    return logits.argmax(1)


def test_evaluate_matches_a_direct_computation(run_dir, digits, capsys):
    assert cli(["evaluate", str(run_dir)]) == 0
    out = capsys.readouterr().out
    preds = _reference(run_dir, digits.test, digits.mean, digits.std)
    labels = digits.test.labels
    k = len(digits.test.classes)
    expected = [[0] * k for _ in range(k)]
    for p, t in zip(preds.tolist(), labels.tolist(), strict=True):
        expected[t][p] += 1
    acc = (preds == labels).float().mean().item()
    assert 0.3 < acc < 1.0  # trained, but not perfectly: the check below is not trivial
    result = json.loads((run_dir / "evaluation.json").read_text())
    assert result["confusion_matrix"] == expected
    assert result["accuracy"] == pytest.approx(acc)
    assert result["images"] == len(labels) and result["split"] == "test"
    assert f"accuracy {100 * acc:.2f}%" in out
    for c in range(k):
        row_total = sum(expected[c])
        assert result["per_class_accuracy"][c] == pytest.approx(expected[c][c] / row_total)
        assert re.search(
            rf"^{digits.test.classes[c]}\s+{row_total}\s+{expected[c][c]}\s", out, re.M
        )
    assert (run_dir / "confusion_matrix.png").stat().st_size > 1000


def test_evaluate_other_split_and_out_dir(run_dir, digits, tmp_path, capsys):
    out = tmp_path / "elsewhere"
    assert cli(["evaluate", str(run_dir), "--split", "dev", "--out", str(out)]) == 0
    result = json.loads((out / "evaluation.json").read_text())
    assert result["images"] == len(digits.dev.labels) and result["split"] == "dev"
    assert (out / "confusion_matrix.png").is_file()
    assert not (run_dir / "evaluation.json").exists()


def _fake_splits(digits, channels=1, classes=None):
    def split(n):
        return classification.ImageDataset(
            images=torch.zeros(n, channels, 32, 32, dtype=torch.uint8),
            labels=torch.zeros(n, dtype=torch.long),
            classes=classes or list(digits.train.classes),
        )

    return classification.DataSplits(
        train=split(4),
        dev=split(2),
        test=split(2),
        mean=[0.5] * channels,
        std=[0.2] * channels,
        spec="x",
    )


@pytest.mark.parametrize(
    ("channels", "classes", "needle"),
    [
        (3, None, "3 channel(s)"),
        (1, ["a", "b", "c"], "3 classes"),
        (1, list("abcdefghij"), "differ"),
    ],
)
def test_evaluate_refuses_data_that_does_not_fit_the_model(
    run_dir, digits, monkeypatch, capsys, channels, classes, needle
):
    fake = _fake_splits(digits, channels, classes)
    monkeypatch.setattr(classification, "load_data", lambda spec, **options: fake)
    assert cli(["evaluate", str(run_dir), "--data", "folder:/x"]) == 2
    _one_error_line(capsys, needle)


def _write_pngs(tmp_path, digits, indices):
    from PIL import Image

    paths = []
    for i in indices:
        path = tmp_path / f"digit{i}.png"
        Image.fromarray(digits.test.images[i, 0].numpy(), mode="L").save(path)
        paths.append(str(path))
    return paths


def test_predict_top_k(run_dir, digits, tmp_path, capsys):
    paths = _write_pngs(tmp_path, digits, [0, 1, 2])
    assert cli(["predict", str(run_dir), *paths, "--top-k", "3"]) == 0
    out = capsys.readouterr().out
    model = cnnkit.load_model(run_dir)
    blocks = out.strip().split("\n")
    assert len(blocks) == 3 * 4
    for j, path in enumerate(paths):
        assert blocks[4 * j] == path
        rows = [
            re.match(r"\s+(\d)\. (\S+)\s+([\d.]+)%", line) for line in blocks[4 * j + 1 : 4 * j + 4]
        ]
        assert [int(r.group(1)) for r in rows] == [1, 2, 3]
        shown = [float(r.group(3)) for r in rows]
        assert shown == sorted(shown, reverse=True)
        image = classification.load_image(path, (1, 32, 32))
        with torch.no_grad():
            probs = torch.softmax(model(_normalize(image[None], digits.mean, digits.std)), 1)[0]
        best = probs.argmax().item()
        assert rows[0].group(2) == digits.train.classes[best]
        assert shown[0] == pytest.approx(100 * probs[best].item(), abs=0.01)


def test_predict_top_k_larger_than_the_classes(run_dir, digits, tmp_path, capsys):
    paths = _write_pngs(tmp_path, digits, [5])
    assert cli(["predict", str(run_dir), *paths, "--top-k", "50"]) == 0
    assert len(capsys.readouterr().out.strip().split("\n")) == 1 + 10


def test_predict_unreadable_or_missing_image(run_dir, digits, tmp_path, capsys):
    good = _write_pngs(tmp_path, digits, [0])
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    assert cli(["predict", str(run_dir), *good, str(bad)]) == 2
    _one_error_line(capsys, "notes.png")
    assert cli(["predict", str(run_dir), str(tmp_path / "absent.jpg")]) == 2
    _one_error_line(capsys, "absent.jpg")
    assert cli(["predict", str(run_dir), *good, "--top-k", "0"]) == 2
    _one_error_line(capsys, "--top-k")


def test_diagnose_prints_the_verdict(run_dir, capsys):
    assert cli(["diagnose", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Diagnosis: overfitting:")
    assert "--weight-decay" in out and "Advice:" in out


@pytest.mark.parametrize("command", ["evaluate", "predict", "diagnose"])
def test_missing_run_dir(tmp_path, capsys, command):
    extra = [str(tmp_path / "x.png")] if command == "predict" else []
    assert cli([command, str(tmp_path / "no-such-run"), *extra]) == 2
    _one_error_line(capsys, "no-such-run")


def test_truncated_weights(run_dir, digits, tmp_path, capsys):
    weights = run_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert cli(["evaluate", str(run_dir)]) == 2
    _one_error_line(capsys, "model.safetensors")
    assert cli(["predict", str(run_dir), *_write_pngs(tmp_path, digits, [0])]) == 2
    _one_error_line(capsys, "model.safetensors")


def test_corrupt_config_and_history(run_dir, capsys):
    (run_dir / "history.jsonl").write_text('{"epoch": 1}\n{broken\n{"epoch": 3}\n')
    assert cli(["diagnose", str(run_dir)]) == 2
    _one_error_line(capsys, "history.jsonl", "line 2")
    (run_dir / "history.jsonl").unlink()
    assert cli(["diagnose", str(run_dir)]) == 2
    _one_error_line(capsys, "history.jsonl")
    (run_dir / "config.json").write_text("{not json")
    assert cli(["evaluate", str(run_dir)]) == 2
    _one_error_line(capsys, "config.json", "malformed JSON")


def test_bad_numbers(run_dir, capsys):
    assert cli(["evaluate", str(run_dir), "--batch-size", "0"]) == 2
    _one_error_line(capsys, "--batch-size")
    assert cli(["evaluate", str(run_dir), "--device", "tpu"]) == 2
    _one_error_line(capsys, "--device")


def test_train_then_evaluate_predict_diagnose(tmp_path, tiny_name, digits, capsys):
    # The real `cnnkit train` (T1's command) on a tiny model, then this module's commands on
    # the run directory it leaves.
    run = tmp_path / "trained"
    argv = ["train", "--model", tiny_name, "--epochs", "3", "--train-subset", "100"]
    argv += ["--batch-size", "25", "--out", str(run), "--quiet", "--compile", "off"]
    argv += ["--precision", "fp32", "--device", "cpu"]
    assert cli(argv) == 0, capsys.readouterr().err
    capsys.readouterr()
    for name in ("config.json", "model.safetensors", "history.jsonl", "report.md", "curves.png"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())

    assert cli(["evaluate", str(run)]) == 0
    result = json.loads((run / "evaluation.json").read_text())
    # The same model on the same test split: evaluate reproduces train's test accuracy.
    assert result["accuracy"] == pytest.approx(metrics["test_accuracy"], abs=1e-6)
    assert result["images"] == len(digits.test.labels)

    paths = _write_pngs(tmp_path, digits, [0, 1])
    assert cli(["predict", str(run), *paths, "--top-k", "2"]) == 0
    assert cli(["diagnose", str(run)]) == 0
    out = capsys.readouterr().out
    assert out.count("  1. ") == 2 and "Diagnosis:" in out


# --------------------------------------------------------------------------- streamed folder runs


def _wide_folder(root):
    """2 classes x 12 noise images, 30 wide x 20 high, whose class shows only in the 5 outer
    columns on each side (red or blue): the streamed evaluation crop (columns 6.1..23.9 at
    image size 16) cuts them off, the squash to 16 x 16 keeps them."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, edge in enumerate([(255, 0, 0), (0, 0, 255)]):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(12):
            pixels = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
            pixels[:, :5] = pixels[:, 25:] = edge
            Image.fromarray(pixels).save(root / f"c{c}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def streamed_run(tmp_path_factory):
    """`cnnkit train --stream` on a folder of non-square images: (run dir, data root)."""
    from cnnkit.cli.main import main

    base = tmp_path_factory.mktemp("streamed")
    root = _wide_folder(base / "data")
    argv = ["train", "--data", f"folder:{root}", "--stream", "--workers", "0", "--epochs", "1",
            "--model-arg", "depth=8", "--model-arg", "widths=[4,8,16]", "--image-size", "16",
            "--batch-size", "8", "--quiet", "--threads", "1", "--device", "cpu",
            "--precision", "fp32", "--compile", "off", "--out", str(base / "run")]  # fmt: skip
    assert main(argv) == 0
    data = json.loads((base / "run" / "config.json").read_text())["data"]
    assert data["storage"] == "stream" and data["eval_crop_fraction"] == 0.875
    return base / "run", root


def _hand_logits(run_dir, files, crop_fraction):
    data = json.loads((run_dir / "config.json").read_text())["data"]
    images = torch.stack([classification.load_image(f, (3, 16, 16), crop_fraction) for f in files])
    with torch.no_grad():
        return cnnkit.load_model(run_dir).eval()(_normalize(images, data["mean"], data["std"]))


def test_evaluate_streamed_run_reproduces_its_test_figures(streamed_run, monkeypatch, capsys):
    run, root = streamed_run
    metrics = json.loads((run / "metrics.json").read_text())

    def no_load_data(spec, **options):  # would decode every split into memory
        raise AssertionError("evaluate of a streamed folder run called load_data")

    monkeypatch.setattr(classification, "load_data", no_load_data)
    assert cli(["evaluate", str(run), "--batch-size", "1"]) == 0, capsys.readouterr().err
    result = json.loads((run / "evaluation.json").read_text())
    assert result["images"] == 2 and result["classes"] == ["c0", "c1"]
    assert result["accuracy"] == pytest.approx(metrics["test_accuracy"], abs=1e-6)
    assert result["loss"] == pytest.approx(metrics["test_loss"], abs=1e-6)
    # The squash to 16 x 16 (the in-memory recipe) would not have reproduced the loss.
    test_files, labels = classification.folder_files(root, 0)[0]["test"]
    squashed = _hand_logits(run, test_files, None)
    squashed_loss = nn.functional.cross_entropy(squashed, labels).item()
    assert abs(squashed_loss - metrics["test_loss"]) > 1e-3

    assert cli(["evaluate", str(run), "--split", "train"]) == 0
    assert json.loads((run / "evaluation.json").read_text())["images"] == 20


def test_predict_streamed_run_uses_the_evaluation_crop(streamed_run, capsys):
    run, root = streamed_run
    path = root / "c1" / "3.png"
    capsys.readouterr()
    assert cli(["predict", str(run), str(path), "--top-k", "2"]) == 0
    rows = re.findall(r"^\s+\d\. (\S+)\s+([\d.]+)%", capsys.readouterr().out, re.M)
    probs = torch.softmax(_hand_logits(run, [path], 0.875)[0], 0)
    squashed = torch.softmax(_hand_logits(run, [path], None)[0], 0)
    best = int(probs.argmax())
    assert rows[0][0] == ["c0", "c1"][best]
    assert float(rows[0][1]) == pytest.approx(100 * probs[best].item(), abs=0.01)
    assert abs(probs[best] - squashed[best]).item() > 1e-3  # the check above tells them apart


@pytest.mark.parametrize("bad", ["big", 3, 0, True, None])
def test_bad_eval_crop_fraction_is_named(streamed_run, tmp_path, capsys, bad):
    import shutil

    run, root = streamed_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    config = json.loads((copy / "config.json").read_text())
    config["data"]["eval_crop_fraction"] = bad
    (copy / "config.json").write_text(json.dumps(config))
    assert cli(["predict", str(copy), str(root / "c0" / "0.png")]) == 2
    _one_error_line(capsys, "config.json", "data.eval_crop_fraction")
    assert cli(["evaluate", str(copy)]) == 2
    _one_error_line(capsys, "config.json", "data.eval_crop_fraction")


# Every field of a loaded data section is checked: a NaN or boolean std evaluated to 0% / nan%
# with status 0, a 100000^2 input size crashed evaluate and exhausted predict's memory.
@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("std", [math.nan], "data.std"),
        ("std", [True], "data.std"),
        ("std", [0.0], "data.std"),
        ("std", [math.inf], "data.std"),
        ("std", [], "data.std"),
        ("mean", [math.nan], "data.mean"),
        ("mean", [0.1, 0.2, 0.3], "data.mean"),  # 3 values for 1 channel
        ("mean", "0.5", "data.mean"),
        ("classes", [str(i) for i in range(9)] + [7], "data.classes"),
        ("classes", "0123456789", "data.classes"),
        ("classes", ["0"] * 10, "data.classes"),
        ("classes", [str(i) for i in range(11)], "kwargs.num_classes"),
        ("input_size", [1, 100000, 100000], "data.input_size"),
        ("input_size", [1, 0, 32], "data.input_size"),
        ("input_size", [2, 32, 32], "data.input_size"),
        ("input_size", [1, 32.0, 32], "data.input_size"),
        ("input_size", [1, 32], "data.input_size"),
        ("spec", 5, "data.spec"),
        ("split_seed", "0", "data.split_seed"),
        ("split_seed", -1, "data.split_seed"),
    ],
)
def test_every_data_field_of_a_loaded_config_is_checked(
    run_dir, digits, tmp_path, capsys, field, value, needle
):
    file = run_dir / "config.json"
    config = json.loads(file.read_text())
    config["data"][field] = value
    file.write_text(json.dumps(config))  # NaN and Infinity as Python's json writes them
    out = tmp_path / "out"
    assert cli(["evaluate", str(run_dir), "--out", str(out)]) == 2
    _one_error_line(capsys, "config.json", needle)
    assert not out.exists()
    assert cli(["predict", str(run_dir), *_write_pngs(tmp_path, digits, [0])]) == 2
    _one_error_line(capsys, "config.json", needle)


def test_kwargs_too_large_to_build_are_a_mismatch_not_an_allocation(run_dir):
    # num_classes=10**12 would allocate 256 TB before the weights were compared.
    from cnnkit.train.checkpoint import load_model

    file = run_dir / "config.json"
    config = json.loads(file.read_text())
    config["kwargs"]["num_classes"] = 10**12
    file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model\.safetensors: does not match .*fc\.weight"):
        load_model(run_dir)
    config["kwargs"]["num_classes"] = "ten"  # the builders check their arguments' types
    file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"field 'kwargs' is rejected"):
        load_model(run_dir)
