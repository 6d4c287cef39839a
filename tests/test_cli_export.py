"""`cnnkit export`: a tiny trained ResNet exported, reloaded independently, compared with eager.

The reference is computed here from `cnnkit.load_model` and the normalization written out by
hand (``(x / 255 - mean) / std``), not from the wrapper the exporter uses.
"""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch

import cnnkit
from cnnkit.cli.main import main

ort = pytest.importorskip("onnxruntime")
classification = pytest.importorskip("cnnkit.data.classification")

TINY_RUN = ["--model-arg", "depth=8", "--model-arg", "widths=[4,8,16]", "--image-size", "16",
            "--train-subset", "64", "--batch-size", "32", "--epochs", "1", "--quiet"]  # fmt: skip


def _fails(capsys, argv, pattern):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert re.search(pattern, err), err
    return err


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["train", *TINY_RUN, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def reference(run):
    """Test images (uint8) and their logits: eager model, normalization done by hand."""
    config = json.loads((run / "config.json").read_text())
    data = config["data"]
    images = classification.load_data("digits", seed=data.get("split_seed", 0), image_size=16)
    images = images.test.images[:5]
    assert images.dtype == torch.uint8 and images.shape[1:] == (1, 16, 16)
    mean = torch.tensor(data["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(data["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        logits = cnnkit.load_model(str(run))((images.float() / 255 - mean) / std)
    return images, logits


def _onnx(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    return inp, torch.from_numpy(session.run(None, {inp.name: x.numpy()})[0])


def _export(run, fmt, kind, out, capsys):
    """`cnnkit export` of ``run`` to ``out``: (out, what it printed)."""
    argv = ["export", str(run), "--format", fmt, "--input", kind, "--out", str(out)]
    assert main(argv) == 0
    return out, capsys.readouterr().out


@pytest.mark.parametrize("kind", ["uint8", "float"])
def test_onnx_matches_eager_model(run, reference, kind, tmp_path, capsys):
    images, expected = reference
    out, printed = _export(run, "onnx", kind, tmp_path / f"m-{kind}.onnx", capsys)
    shape = "[1, 1, 16, 16]"
    assert f"wrote {out}" in printed and shape in printed, printed
    assert re.search(r"max \|logit difference\| [0-9.e+-]+", printed), printed
    x = images if kind == "uint8" else images.float() / 255
    for i in range(len(images)):  # batch 1: the exported shape is fixed
        inp, got = _onnx(out, x[i : i + 1])
        assert inp.shape == [1, 1, 16, 16]
        assert inp.type == ("tensor(uint8)" if kind == "uint8" else "tensor(float)")
        torch.testing.assert_close(got, expected[i : i + 1], atol=1e-4, rtol=0)
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        _onnx(out, x[:3])


@pytest.mark.parametrize("kind", ["uint8", "float"])
def test_torchscript_matches_eager_model(run, reference, kind, tmp_path, capsys):
    images, expected = reference
    out, printed = _export(run, "torchscript", kind, tmp_path / f"m-{kind}.ts.pt", capsys)
    dtype = "uint8" if kind == "uint8" else "float32"
    assert f"{dtype} [N, 1, 16, 16]" in printed
    module = torch.jit.load(str(out))
    x = images if kind == "uint8" else images.float() / 255
    with torch.no_grad():
        torch.testing.assert_close(module(x), expected, atol=1e-4, rtol=0)


def test_dynamic_batch_runs_batch_three(run, reference, capsys):
    images, expected = reference
    assert main(["export", str(run), "--format", "onnx", "--dynamic-batch"]) == 0
    assert "[N, 1, 16, 16]" in capsys.readouterr().out
    inp, got = _onnx(run / "model.onnx", images[:3])  # the default out: inside the run
    assert inp.shape[0] != 1 and inp.shape[1:] == [1, 16, 16]
    torch.testing.assert_close(got, expected[:3], atol=1e-4, rtol=0)
    # An existing export is kept unless --overwrite.
    before = (run / "model.onnx").read_bytes()
    _fails(capsys, ["export", str(run), "--format", "onnx"], "already exists.*--overwrite")
    assert (run / "model.onnx").read_bytes() == before
    assert main(["export", str(run), "--format", "onnx", "--overwrite"]) == 0
    assert _onnx(run / "model.onnx", images[:1])[0].shape == [1, 1, 16, 16]


def test_missing_onnxruntime_names_the_extra(run, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` fails
    out = tmp_path / "m.onnx"
    _fails(capsys, ["export", str(run), "--format", "onnx", "--out", str(out)],
           r"pip install 'cnnkit\[export\]'")  # fmt: skip
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "history.jsonl"])
def test_refuses_a_runs_own_file(run, name, capsys):
    before = (run / name).read_bytes()
    argv = ["export", str(run), "--format", "onnx", "--out", str(run / name), "--overwrite"]
    _fails(capsys, argv, "file of the run directory")
    assert (run / name).read_bytes() == before


def test_refuses_a_directory_and_an_unknown_opset(run, tmp_path, capsys):
    out = str(tmp_path / "m.onnx")
    _fails(capsys, ["export", str(run), "--format", "onnx", "--opset", "99", "--out", out], "7..20")
    _fails(capsys, ["export", str(run), "--format", "torchscript", "--out", str(tmp_path)],
           "is a directory")  # fmt: skip


def test_mismatch_writes_nothing(run, tmp_path, capsys, monkeypatch):
    """An exporter that drops the normalization must be caught before anything is written."""
    from cnnkit import export as library

    exported = []
    real = library._traced_bytes

    def patched(wrapper, example):  # exports the model behind mean 0, std 1: no normalization
        exported.append(example)
        return real(library.Normalized(wrapper.model, [0.0], [1.0], "uint8"), example)

    monkeypatch.setattr(library, "_traced_bytes", patched)
    out = tmp_path / "m.ts.pt"
    err = _fails(capsys, ["export", str(run), "--format", "torchscript", "--out", str(out)],
                 r"max \|logit difference\| [0-9.e+]+ > 0.0001.*nothing written")  # fmt: skip
    assert exported and float(re.search(r"difference\| ([0-9.e+-]+)", err)[1]) > 1e-4
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_detection_run_refuses_a_dynamic_batch(tmp_path, capsys):
    from cnnkit.train.checkpoint import save_model

    model = cnnkit.create_model(
        "faster_rcnn_r18_fpn", backbone_widths=[8, 16, 32, 64], fpn_channels=16,
        representation_size=32, min_size=64, max_size=64, num_classes=3,
    )  # fmt: skip
    run = tmp_path / "det"
    save_model(model, run, data={"task": "detection"}, train={"task": "detection"})
    _fails(capsys, ["export", str(run), "--format", "onnx", "--dynamic-batch"],
           "--dynamic-batch: an exported detector takes one image per call")  # fmt: skip
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "model.safetensors"]
