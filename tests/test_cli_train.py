"""`cnnkit train` on bad input: one line on stderr and exit status 2; divergence: status 1."""

from __future__ import annotations

import json
import pickle
import re

import pytest

from cnnkit.cli.main import main

TINY = ["--model-arg", "depth=8", "--model-arg", "widths=[4,8,16]", "--image-size", "16",
        "--train-subset", "64", "--batch-size", "32", "--quiet", "--threads", "1"]  # fmt: skip


def _fails(capsys, argv, pattern, status=2):
    assert main(argv) == status
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert re.search(pattern, err), err
    return err


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        (["train", "--model", "resnet21"], "unknown model 'resnet21'"),
        (["train", "--epochs", "0"], "--epochs must be a positive integer"),
        (["train", "--epochs", "-2"], "--epochs"),
        (["train", "--batch-size", "0"], "--batch-size must be a positive integer"),
        (["train", "--data", "imagenet"], "--data 'imagenet'"),
        (["train", "--data", "cifar10:/nonexistent/cifar"], "/nonexistent/cifar does not exist"),
        (["train", "--data", "folder:/nonexistent/imgs"], "/nonexistent/imgs does not exist"),
        (["train", "--dropblock", "half"], "--dropblock 'half'"),
        (["train", "--resume", "/nonexistent/run"], "no such run directory"),
        (["train", "--optimizer", "adamw", "--momentum", "1.5"], "--momentum"),
    ],
)
def test_bad_input_is_one_line_and_status_2(capsys, argv, pattern):
    _fails(capsys, argv, pattern)


def test_malformed_cifar_names_the_file(capsys, tmp_path):
    (tmp_path / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a", b"b"]}))
    for i in range(1, 6):
        (tmp_path / f"data_batch_{i}").write_bytes(b"not a pickle at all")
    _fails(capsys, ["train", "--data", f"cifar10:{tmp_path}"], r"data_batch_1")


def test_wrong_channel_count_names_the_data(capsys):
    # RGB input asked for, 1-channel digits given: the message names both.
    _fails(capsys, ["train", "--in-chans", "3", *TINY], "1 channel")


def test_divergence_is_status_1_naming_epoch_and_step(capsys, tmp_path):
    argv = ["train", *TINY, "--lr", "1e30", "--warmup-epochs", "0", "--epochs", "2",
            "--out", str(tmp_path / "run")]  # fmt: skip
    err = _fails(
        capsys, argv, r"training diverged: non-finite training loss at epoch 1, step \d", 1
    )
    assert "no checkpoint was written yet" in err


def test_tiny_training_run_through_the_cli(capsys, tmp_path):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "effective lr 0.025 = 0.1 x 32 / 128" in printed
    assert "test accuracy" in printed
    assert (out / "metrics.json").is_file() and (out / "report.md").is_file()


def test_usage_errors_are_one_line(capsys):
    from cnnkit.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(["train", "--lr", "abc"])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.count("\n") == 1 and "--lr" in err and "cnnkit train --help" in err


def _folder_with_a_corrupt_jpeg(root):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(2):
        (root / str(c)).mkdir(parents=True)
        for i in range(12):
            pixels = (rng.random((20, 24, 3)) * 100 + 100 * c).astype(np.uint8)
            Image.fromarray(pixels).save(root / str(c) / f"{i}.jpg", quality=90)
    bad = root / "1" / "5.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # cut short: the header reads, the pixels do not
    return bad


def test_corrupt_jpeg_in_a_streamed_folder_names_it_or_is_skipped(capsys, tmp_path):
    bad = _folder_with_a_corrupt_jpeg(tmp_path / "data")
    argv = ["train", "--data", f"folder:{tmp_path / 'data'}", "--stream", "--workers", "1",
            "--epochs", "2", "--model-arg", "depth=8", "--model-arg", "widths=[4,8,16]",
            "--image-size", "16", "--batch-size", "8", "--quiet", "--threads", "1", "--out"]  # fmt: skip
    _fails(capsys, [*argv, str(tmp_path / "a")], re.escape(str(bad)))
    assert main([*argv, str(tmp_path / "b"), "--skip-invalid"]) == 0
    assert "1 unreadable image(s) skipped" in capsys.readouterr().out


def test_non_finite_dev_loss_is_status_1_not_a_finished_run(capsys, tmp_path):
    # One step at lr 1e6 leaves a finite training loss (taken before the update) and a model
    # whose dev loss is NaN: before, the run ended with status 0 and NaN results.
    out = tmp_path / "run"
    argv = ["train", *TINY[:-5], "--batch-size", "64", "--lr", "1e6", "--warmup-epochs", "0",
            "--epochs", "1", "--quiet", "--threads", "1", "--out", str(out)]  # fmt: skip
    _fails(capsys, argv, r"training diverged: non-finite dev loss \(nan\) at epoch 1", 1)
    assert not (out / "metrics.json").exists()


# Flags that cannot be honoured on this data: one line naming the flag, status 2, and no run
# directory (the task checks them in setup / build_model, before the engine creates it).
PLAIN = ["--quiet", "--threads", "1", "--epochs", "1"]


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        ([*TINY, "--weight-decay", "inf"], r"--weight-decay must be a finite number, got inf"),
        ([*TINY, "--lr", "nan"], r"--lr must be a finite number, got nan"),
        ([*TINY, "--seed", str(10**20)], r"--seed must be an integer in 0\.\.2\*\*63-1"),
        ([*TINY, "--image-size", "20000"], r"--image-size must be at most 8192, got 20000"),
        (
            [*TINY, "--crop-padding", "3000"],
            r"--crop-padding 3000 must be smaller than the image side \(16\)",
        ),
        ([*TINY, "--cutout", "100000"], r"--cutout 100000 is larger than the image side \(16\)"),
        (
            [*PLAIN, "--batch-size", "100000"],
            r"--batch-size 100000 is larger than the training split: 1197 images",
        ),
        (
            [*TINY, "--train-subset", "1"],
            r"--batch-size 32 is larger than the training split \(--train-subset 1\): 1 images",
        ),
        (
            [*TINY, "--model-arg", "num_classes=3"],
            r"--model-arg num_classes=3 conflicts with --data digits, which has 10 classes",
        ),
        (
            [*TINY, "--model-arg", "in_chans=3"],
            r"--model-arg in_chans=3 conflicts with --data digits",
        ),
        (
            [*PLAIN, "--model", "densenet121", "--image-size", "4"],
            r"--image-size 4: model 'densenet121' cannot take 1x4x4 images",
        ),
    ],
)
def test_flags_that_cannot_be_honoured_leave_no_run_directory(capsys, tmp_path, argv, pattern):
    out = tmp_path / "run"
    _fails(capsys, ["train", *argv, "--out", str(out)], pattern)
    assert not out.exists()


def test_seed_that_is_not_an_integer_names_the_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--seed", "1e20"])
    assert exc.value.code == 2 and "--seed" in capsys.readouterr().err


def test_decompression_bomb_in_memory_names_the_file(capsys, tmp_path):
    import struct
    import zlib

    from PIL import Image

    root = tmp_path / "data"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(6):
            Image.new("L", (8, 8), 40 * i).save(root / c / f"{i}.png")

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)  # 20000 x 20000, 8-bit gray
    bomb = root / "b" / "bomb.png"
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    out = tmp_path / "run"
    argv = ["train", "--data", f"folder:{root}", "--in-memory", *TINY, "--batch-size", "4",
            "--out", str(out)]  # fmt: skip
    _fails(capsys, argv, rf"cannot read image {re.escape(str(bomb))}: .*decompression bomb")
    assert not out.exists()


def test_streamed_folder_ignores_the_padded_crop_it_does_not_use(tmp_path):
    # Files are cropped by RandomResizedCrop: the default --crop-padding 4 must not refuse
    # 4-pixel images, and the run records no padding.
    _folder_with_a_corrupt_jpeg(tmp_path / "data")
    out = tmp_path / "run"
    argv = ["train", "--data", f"folder:{tmp_path / 'data'}", "--stream", "--workers", "0",
            "--image-size", "4", "--model-arg", "depth=8", "--model-arg", "widths=[4,8,16]",
            "--batch-size", "4", "--epochs", "1", "--quiet", "--threads", "1", "--skip-invalid",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["resolved"]["crop_padding"] == 0
