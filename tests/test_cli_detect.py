"""`cnnkit detect train | evaluate | predict | proposals` end to end on tiny scenes.

One module-scoped tiny data set and one tiny Faster R-CNN run serve every test; each checks a
file or a behaviour a user relies on (the run directory, evaluation files that pycocotools-like
readers accept, predictions drawn, proposals that feed a Fast R-CNN, bad input as one line).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from cnnkit.cli.main import main

# A detector small enough to train a step in well under a second on one core.
TINY_MODEL = [
    "--model-arg", "backbone_widths=[8,16,32,64]",
    "--model-arg", "fpn_channels=16",
    "--model-arg", "representation_size=32",
    "--model-arg", "min_size=64",
    "--model-arg", "max_size=64",
    "--model-arg", "anchor_sizes=[8,16,32,64,128]",
]  # fmt: skip
FAST = ["--batch-size", "4", "--quiet", "--threads", "1", "--workers", "0", "--precision", "fp32"]


def _fails(capsys, argv, pattern, status=2):
    assert main(argv) == status
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert re.search(pattern, err), err
    return err


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    out = root / "tiny"
    args = ["data", "scenes", str(out), "--images", "12", "--val-images", "6", "--size", "64"]
    assert main(args) == 0
    return out


@pytest.fixture(scope="module")
def run(scenes, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "faster"
    argv = ["detect", "train", "--data", f"coco:{scenes}", "--epochs", "2", *TINY_MODEL, *FAST,
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    return out


def test_train_writes_the_engine_run_directory(run):
    for name in ("config.json", "model.safetensors", "history.jsonl", "metrics.json", "report.md",
                 "curves.png", "detections.json", "evaluation.json"):  # fmt: skip
        assert (run / name).is_file(), name
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in history] == [1, 2]
    for key in ("train_loss", "train_loss_objectness", "train_loss_classifier", "dev_box_ap",
                "dev_box_ap50"):  # fmt: skip
        assert key in history[-1], key
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train_seconds"] > 0
    assert 0.0 <= metrics["final_dev_box_ap"] <= 1.0
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["classes"] == [str(d) for d in range(10)]
    assert config["train"]["task"] == "detection"


def test_evaluate_writes_results_that_score_as_printed(run, tmp_path, capsys):
    from cnnkit.evaluation import coco_evaluate

    out = tmp_path / "eval"
    assert main(["detect", "evaluate", str(run), "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "Average Precision  (AP) @[ IoU=0.50:0.95" in printed
    record = json.loads((out / "evaluation.json").read_text())
    assert len(record["bbox"]) == 12
    assert set(record) >= {"bbox", "voc_map50", "per_class"}
    config = json.loads((run / "config.json").read_text())
    gt = json.loads((_gt_file(config)).read_text())
    detections = json.loads((out / "detections.json").read_text())
    if detections:
        again = coco_evaluate(gt, detections, "bbox")
        assert np.allclose(again.stats, record["bbox"])
    assert (out / "pr_curves.png").is_file() or not detections


def _gt_file(config):
    from pathlib import Path

    root = Path(config["data"]["spec"].partition(":")[2])
    return root / "annotations" / "instances_val.json"


def test_predict_draws_each_image_and_writes_results(run, scenes, tmp_path, capsys):
    images = sorted((scenes / "val").glob("*.png"))[:2]
    out = tmp_path / "pred"
    argv = ["detect", "predict", str(run), *map(str, images), "--out", str(out),
            "--score-threshold", "0.0", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    for image in images:
        assert (out / f"{image.stem}.png").is_file()
    results = json.loads((out / "detections.json").read_text())
    assert all({"bbox", "score", "category_id", "file_name"} <= set(r) for r in results)


def test_predict_unreadable_image_is_one_line(run, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    _fails(capsys, ["detect", "predict", str(run), str(bad), "--out", str(tmp_path)], "bad.png")


def test_fast_rcnn_trains_on_proposals_of_the_run(run, scenes, tmp_path, capsys):
    props = tmp_path / "proposals.json"
    argv = ["detect", "proposals", str(run), "--out", str(props), "--device", "cpu"]
    assert main(argv) == 0
    table = json.loads(props.read_text())
    assert len(table) == 12 + 6  # every image of both splits
    boxes = np.array(next(iter(table.values())))
    assert boxes.ndim == 2 and boxes.shape[1] == 4
    out = tmp_path / "fast"
    argv = ["detect", "train", "--model", "fast_rcnn_r18_fpn", "--data", f"coco:{scenes}",
            "--proposals", str(props), "--epochs", "1", *TINY_MODEL, *FAST,
            "--model-arg", "norm=batch", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    history = json.loads((out / "history.jsonl").read_text().splitlines()[0])
    assert "train_loss_classifier" in history and "train_loss_objectness" not in history


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [  # fmt: skip
        (["detect", "train", "--model", "resnet20"], "not a detector"),
        (["detect", "train", "--model", "faster_rcnn_r18"], "unknown model"),
        (["detect", "train", "--data", "coco:/nonexistent/coco"], "/nonexistent/coco"),
        (["detect", "train", "--data", "pascal"], "pascal"),
        (["detect", "train", "--epochs", "0"], "--epochs"),
        (["detect", "evaluate", "/nonexistent/run"], "no such run directory"),
        (
            ["detect", "train", "--model", "fast_rcnn_r18_fpn", "--data", "coco:{scenes}"],
            "--proposals",
        ),
        (
            ["detect", "train", "--proposals", "/nonexistent/p.json", "--data", "coco:{scenes}"],
            "/nonexistent/p.json",
        ),
        (
            [
                "detect",
                "train",
                "--backbone-weights",
                "/nonexistent/w.pth",
                "--data",
                "coco:{scenes}",
            ],
            "/nonexistent/w.pth",
        ),
    ],
)
def test_bad_input_is_one_line_and_status_2(capsys, scenes, tmp_path, argv, pattern):
    argv = [a.replace("{scenes}", str(scenes)) for a in argv]
    _fails(capsys, [*argv, "--out", str(tmp_path / "never")], pattern)
    assert not (tmp_path / "never").exists()


def test_classification_run_is_not_a_detection_run(capsys, tmp_path):
    argv = ["train", "--model-arg", "depth=8", "--model-arg", "widths=[4,8,16]", "--image-size",
            "16", "--train-subset", "64", "--batch-size", "32", "--epochs", "1", "--quiet", "--out",
            str(tmp_path / "cls")]  # fmt: skip
    assert main(argv) == 0
    _fails(capsys, ["detect", "evaluate", str(tmp_path / "cls")], "not a detection run")


def test_classification_commands_point_a_detection_run_to_detect(run, capsys):
    _fails(capsys, ["evaluate", str(run)], "detect evaluate")


def test_resume_continues_a_detection_run(scenes, tmp_path):
    out = tmp_path / "resumed"
    argv = ["detect", "train", "--data", f"coco:{scenes}", "--epochs", "1", *TINY_MODEL, *FAST,
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert main(["detect", "train", "--resume", str(out), "--epochs", "2", "--quiet"]) == 0
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in history] == [1, 2]
    assert json.loads((out / "config.json").read_text())["train"]["epochs"] == 2


def test_backbone_weights_from_a_file_are_loaded(scenes, tmp_path):
    import torch
    from safetensors.torch import save_file

    from cnnkit.models.registry import create_model
    from cnnkit.train.checkpoint import load_weights

    source = create_model("resnet18", widths=[8, 16, 32, 64], num_classes=7)
    file = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(file))
    out = tmp_path / "pretrained"
    argv = ["detect", "train", "--data", f"coco:{scenes}", "--epochs", "1", *TINY_MODEL, *FAST,
            "--backbone-weights", str(file), "--lr", "1e-9", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    saved = load_weights(out)
    # A rate of 1e-9 leaves the loaded weights where they were (fc.* is not a backbone tensor).
    stem = saved["backbone.body.conv1.weight"]
    assert torch.allclose(stem, source.conv1.weight, atol=1e-6)


def test_backbone_weights_of_another_shape_name_the_tensor(scenes, tmp_path, capsys):
    argv = ["train", "--model", "resnet18", "--model-arg", "widths=[8,16,32,64]", "--image-size",
            "32", "--train-subset", "64", "--batch-size", "32", "--epochs", "1", "--quiet",
            "--out", str(tmp_path / "cls")]  # fmt: skip
    assert main(argv) == 0
    # The digits are grayscale: the classifier's stem takes 1 channel, the detector's 3.
    argv = ["detect", "train", "--data", f"coco:{scenes}", *TINY_MODEL, *FAST,
            "--backbone-weights", str(tmp_path / "cls"), "--out", str(tmp_path / "never")]  # fmt: skip
    _fails(capsys, argv, r"conv1\.weight")
    assert not (tmp_path / "never").exists()


def test_pictures_of_images_with_the_same_stem_do_not_overwrite_each_other():
    from cnnkit.cli.detect import picture_names

    assert picture_names(["a/x.jpg", "b/x.png", "c/y.png"]) == ["x-0.png", "x-1.png", "y.png"]


def test_explain_writes_every_stage_with_annotations(run, scenes, tmp_path, capsys):
    image = scenes / "val" / "000001.png"
    out = tmp_path / "explain"
    annotations = scenes / "annotations" / "instances_val.json"
    argv = ["detect", "explain", str(run), str(image), "--out", str(out), "--annotations",
            str(annotations), "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    names = {p.name for p in out.iterdir()}
    for stage in ("01_anchors.png", "02_proposals_before_nms.png", "03_proposals_after_nms.png",
                  "04_sampled_rois.png", "05_boxes_before_nms.png", "06_detections.png",
                  "index.md"):  # fmt: skip
        assert stage in names, stage
    # The same file name in the train split's annotations is another image: refused.
    train = scenes / "annotations" / "instances_train.json"
    argv = ["detect", "explain", str(run), str(image), "--out", str(out), "--annotations",
            str(train)]  # fmt: skip
    _fails(capsys, argv, "not one of them")


# --------------------------------------------------------------------------- hostile use


def _copy(path, tmp_path, name):
    import shutil

    return shutil.copytree(path, tmp_path / name)


def _files(root):
    return {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()}


def test_predict_into_a_run_directory_is_refused(run, scenes, tmp_path, capsys):
    """--out RUN_DIR replaced the run's detections.json (and an input named curves.png its
    curves) with predict's."""
    mine = _copy(run, tmp_path, "run")
    before = _files(mine)
    image = scenes / "val" / "000000.png"
    _fails(capsys, ["detect", "predict", str(mine), str(image), "--out", str(mine)], "holds a run")
    a_file = tmp_path / "file"
    a_file.write_text("mine")
    _fails(capsys, ["detect", "predict", str(run), str(image), "--out", str(a_file / "x")],
           "is not a directory")  # fmt: skip
    assert _files(mine) == before and a_file.read_text() == "mine"


def test_proposals_out_is_checked_before_the_inference(run, tmp_path, capsys):
    """A directory as --out failed after the whole inference, naming a temporary file; a run's
    config.json was replaced by proposals."""
    mine = _copy(run, tmp_path, "run")
    before = _files(mine)
    for out, pattern in ((mine, "is a directory"), (mine / "config.json", "a file of the run")):
        _fails(capsys, ["detect", "proposals", str(mine), "--out", str(out)], pattern)
    assert _files(mine) == before


@pytest.mark.parametrize(
    ("field", "value", "pattern"),
    [
        ("classes", list(range(10)), r"field 'data.classes' must be class names"),
        ("label_to_category", [-1, 1], r"field 'data.label_to_category' must be 11 integers"),
        ("label_to_category", ["a"] * 11, r"field 'data.label_to_category'"),
        ("label_to_category", [10**30] * 11, r"field 'data.label_to_category'"),
        ("classes", ["0"], r"field 'data.label_to_category' must be 2 integers"),
    ],
)
def test_damaged_config_fields_are_one_line(run, scenes, tmp_path, capsys, field, value, pattern):
    """A short list was an IndexError traceback in predict; strings or huge ids a message
    without the file, or category ids written as they were."""
    mine = _copy(run, tmp_path, "run")
    config = json.loads((mine / "config.json").read_text())
    config["data"][field] = value
    (mine / "config.json").write_text(json.dumps(config))
    image = str(scenes / "val" / "000000.png")
    out = tmp_path / "pred"
    _fails(capsys, ["detect", "predict", str(mine), image, "--out", str(out)], pattern)
    _fails(capsys, ["detect", "evaluate", str(mine), "--out", str(out)], pattern)
    assert not out.exists()


@pytest.mark.parametrize(
    ("value", "pattern"),
    [(None, r"field 'data.spec' is missing"), (5, r"field 'data.spec' must be a --data spec")],
)
def test_export_names_a_damaged_data_spec(run, tmp_path, capsys, value, pattern):
    """A number where the spec should be was reported as a missing field."""
    mine = _copy(run, tmp_path, "run")
    config = json.loads((mine / "config.json").read_text())
    config["data"]["spec"] = value
    (mine / "config.json").write_text(json.dumps(config))
    out = tmp_path / "m.ts.pt"
    _fails(capsys, ["export", str(mine), "--format", "torchscript", "--out", str(out)], pattern)
    assert not out.exists()


def _edited_scenes(scenes, tmp_path, edit):
    root = _copy(scenes, tmp_path, "data")
    splits = {}
    for split in ("train", "val"):
        file = root / "annotations" / f"instances_{split}.json"
        splits[split] = json.loads(file.read_text())
    edit(splits)
    for split, data in splits.items():
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return root


def test_a_val_split_without_boxes_to_evaluate_is_refused(run, scenes, tmp_path, capsys):
    """Crowd boxes only: the run trained and reported a dev AP of 0.0 (COCO's -1 clamped); no
    annotation at all: an IndexError traceback (VOC AP), after the run's files were written."""

    def crowd(splits):
        for ann in splits["val"]["annotations"]:
            ann["iscrowd"] = 1

    def empty(splits):
        splits["val"]["annotations"] = []

    for edit in (crowd, empty):
        root = _edited_scenes(scenes, tmp_path / edit.__name__, edit)
        out = tmp_path / edit.__name__ / "out"
        argv = ["detect", "train", "--data", f"coco:{root}", "--epochs", "1", *TINY_MODEL, *FAST,
                "--out", str(out)]  # fmt: skip
        _fails(capsys, argv, "the val split has no box to evaluate against")
        argv = ["detect", "evaluate", str(run), "--data", f"coco:{root}", "--out", str(out)]
        _fails(capsys, argv, "the val split has no box to evaluate against")
        assert not out.exists()


def test_proposals_cannot_tell_images_of_both_splits_apart(scenes, tmp_path, capsys):
    """Train and val image ids 1..N: Fast R-CNN got a train image's proposals for a val image."""

    def renumber(splits):
        val = splits["val"]
        new = {im["id"]: k for k, im in enumerate(val["images"], start=1)}
        for im in val["images"]:
            im["id"] = new[im["id"]]
        for ann in val["annotations"]:
            ann["image_id"] = new[ann["image_id"]]

    root = _edited_scenes(scenes, tmp_path, renumber)
    props = tmp_path / "proposals.json"
    props.write_text(json.dumps({str(i): [[0, 0, 16, 16]] for i in range(1, 13)}))
    argv = ["detect", "train", "--model", "fast_rcnn_r18_fpn", "--data", f"coco:{root}",
            "--proposals", str(props), "--epochs", "1", *TINY_MODEL, *FAST,
            "--out", str(tmp_path / "never")]  # fmt: skip
    _fails(capsys, argv, r"image id\(s\) in both splits, e.g. 1")
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (
            ["{image}", "--score-threshold", "nan"],
            r"--score-threshold must be in \[0, 1\], got nan",
        ),
        (["{val}"], "is a directory; give image files"),
        (["{image}", "{config}"], r"config.json: cannot read the image"),
    ],
)
def test_predict_bad_input_is_one_line_before_output(run, scenes, tmp_path, capsys, args, pattern):
    image, val = scenes / "val" / "000000.png", scenes / "val"
    names = {"{image}": str(image), "{val}": str(val), "{config}": str(run / "config.json")}
    args = [names.get(a, a) for a in args]
    out = tmp_path / "pred"
    _fails(capsys, ["detect", "predict", str(run), *args, "--out", str(out)], pattern)
    assert not out.exists()


@pytest.mark.parametrize(
    ("model", "iou_type", "key"),
    [
        ("mask_rcnn_r18_fpn", "segm", "mask_ap"),
        ("keypoint_rcnn_r18_fpn", "keypoints", "keypoint_ap"),
    ],
)
def test_instance_models_evaluate_their_outputs(
    scenes, tmp_path, monkeypatch, capsys, model, iou_type, key
):
    import cnnkit.detection.rcnn as rcnn

    out = tmp_path / model
    argv = ["detect", "train", "--model", model, "--data", f"coco:{scenes}", "--epochs", "1",
            *TINY_MODEL, *FAST, "--out", str(out)]  # fmt: skip
    # The evaluation path encodes RLE from the box-local masks: dense pasting is never called.
    monkeypatch.setattr(rcnn, "paste_into_image", None)
    assert main(argv) == 0
    record = json.loads((out / "evaluation.json").read_text())
    assert set(record) >= {"bbox", iou_type}
    history = json.loads((out / "history.jsonl").read_text().splitlines()[0])
    assert f"dev_{key}50" in history
    detections = json.loads((out / "detections.json").read_text())
    field = "segmentation" if iou_type == "segm" else "keypoints"
    assert all(field in d for d in detections)
    # --kpt-sigmas that do not fit the model: refused before the val split is predicted.
    monkeypatch.setattr("cnnkit.train.detection.DetectionTask.predict_split", None)
    wrong = ["detect", "evaluate", str(out), "--kpt-sigmas", "0.1,0.1,0.1", "--out",
             str(tmp_path / "eval")]  # fmt: skip
    reason = "model predicts 4 keypoints" if iou_type == "keypoints" else "predicts no keypoints"
    _fails(capsys, wrong, reason)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_writes_a_detector_that_runs_alone(run, scenes, tmp_path, capsys, fmt):
    """`cnnkit export` of a detection run: the file, run by torch.jit.load or onnxruntime
    alone, gives the run's model's detections on a val image."""
    import torch

    from cnnkit.cli.detect import _load_run, _read_rgb

    out = tmp_path / f"det.{fmt}"
    assert main(["export", str(run), "--format", fmt, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "input 'image': one image uint8 [3, 64, 64]" in printed, printed
    image = _read_rgb(str(sorted((scenes / "val").glob("*.png"))[-1]))
    model, _ = _load_run(str(run))
    with torch.no_grad():
        expected = model([image.float() / 255])[0]
    if fmt == "torchscript":
        got = torch.jit.load(str(out))(image)
    else:
        ort = pytest.importorskip("onnxruntime")
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        got = dict(zip(names, session.run(names, {"image": image.numpy()}), strict=True))
    assert sorted(got) == ["boxes", "labels", "scores"]
    for key, value in got.items():
        tol = 0 if fmt == "torchscript" else 1e-4
        torch.testing.assert_close(torch.as_tensor(value), expected[key], rtol=tol, atol=tol)
    _fails(capsys, ["export", str(run), "--format", fmt, "--out", str(out)],
           "already exists; pass --overwrite")  # fmt: skip
    if fmt == "onnx":
        _fails(capsys, ["export", str(run), "--format", "onnx", "--opset", "15",
                        "--out", str(tmp_path / "old.onnx")], "--opset 16 or later")  # fmt: skip
