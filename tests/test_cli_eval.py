"""`cnnkit eval coco|voc` through its own parser (and through the main CLI when complete)."""

from __future__ import annotations

import argparse
import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from cnnkit.cli.eval import register


def _parse(argv):
    parser = argparse.ArgumentParser(prog="cnnkit")
    register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def _files(tmp_path):
    rng = np.random.default_rng(0)
    images, anns, dets = [], [], []
    for i in range(1, 9):
        images.append({"id": i, "width": 100, "height": 100})
        for _ in range(3):
            c = int(rng.integers(1, 3))
            x, y, w, h = (float(v) for v in (*rng.uniform(0, 50, 2), *rng.uniform(5, 45, 2)))
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i,
                    "category_id": c,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
            j = rng.normal(0, 2, 4)
            dets.append(
                {
                    "image_id": i,
                    "category_id": c,
                    "score": float(rng.random()),
                    "bbox": [x + j[0], y + j[1], w + j[2], h + j[3]],
                }
            )
    gt = {
        "images": images,
        "annotations": anns,
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dt.json").write_text(json.dumps(dets))
    return tmp_path / "gt.json", tmp_path / "dt.json"


def _run(argv):
    args = _parse(argv)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = args.func(args)
    return status, out.getvalue()


def test_eval_coco_prints_pycocotools_summary(tmp_path):
    gt, dt = _files(tmp_path)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(gt))
        ev = COCOeval(coco, coco.loadRes(str(dt)), "bbox")
        ev.evaluate()
        ev.accumulate()
    ref = io.StringIO()
    with contextlib.redirect_stdout(ref):
        ev.summarize()
    out_json, png = tmp_path / "r.json", tmp_path / "pr.png"
    status, text = _run(
        [
            "eval",
            "coco",
            str(gt),
            str(dt),
            "--per-class",
            "--json",
            str(out_json),
            "--plot",
            str(png),
        ]
    )
    assert status == 0
    assert text.startswith(ref.getvalue())
    assert "cat" in text.split(ref.getvalue())[1] and "dog" in text
    data = json.loads(out_json.read_text())
    np.testing.assert_allclose(data["stats"], ev.stats, atol=1e-9)
    assert set(data["per_class"]) == {"cat", "dog"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_voc(tmp_path):
    gt, dt = _files(tmp_path)
    out_json, png = tmp_path / "v.json", tmp_path / "v.png"
    status, text = _run(
        [
            "eval",
            "voc",
            str(gt),
            str(dt),
            "--all-point",
            "--json",
            str(out_json),
            "--plot",
            str(png),
        ]
    )
    assert status == 0
    assert "mAP@0.5 (all-point)" in text
    data = json.loads(out_json.read_text())
    assert set(data["per_class"]) == {"cat", "dog"} and 0 <= data["map"] <= 1
    assert png.exists()


def test_bad_input_is_a_value_error_naming_the_entry(tmp_path):
    gt, dt = _files(tmp_path)
    dets = json.loads(dt.read_text())
    dets[3]["image_id"] = 1234
    dt.write_text(json.dumps(dets))
    args = _parse(["eval", "coco", str(gt), str(dt)])
    with pytest.raises(ValueError, match=r"results .*\[3\]\.image_id=1234"):
        args.func(args)
    args = _parse(["eval", "voc", str(tmp_path / "missing.json"), str(dt)])
    with pytest.raises(ValueError, match="missing.json"):
        args.func(args)


def test_main_maps_errors_to_exit_status_2(tmp_path, capsys):
    from cnnkit.cli.main import build_parser, main

    try:
        build_parser()
    except ImportError:
        pytest.skip("the other CLI command modules are not there yet")
    gt, dt = _files(tmp_path)
    dt.write_text("[{")
    assert main(["eval", "coco", str(gt), str(dt)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not valid JSON" in err[0]
