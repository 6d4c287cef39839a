"""`cnnkit train` on bad input: one line on stderr and exit status 2; divergence: status 1."""

from __future__ import annotations

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


def test_tensorboard_missing_is_a_clear_error(capsys, tmp_path):
    try:
        import tensorboard  # noqa: F401

        pytest.skip("tensorboard is installed here")
    except ImportError:
        pass
    argv = ["train", *TINY, "--tensorboard", "--out", str(tmp_path / "run")]
    _fails(capsys, argv, "--tensorboard needs the tensorboard package")
    assert not (tmp_path / "run").exists()  # refused before anything was written


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
