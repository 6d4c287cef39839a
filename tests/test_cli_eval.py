"""`cnnkit eval coco|voc` through its own parser (and through the main CLI when complete)."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re

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


def _edit_gt(fn):
    def apply(gt, dt):
        fn(gt)
        return gt, dt

    return apply


def _edit_dt(fn):
    def apply(gt, dt):
        fn(dt)
        return gt, dt

    return apply


def _text_dt(text):
    return lambda gt, dt: (gt, text)


def _voc_xml(tmp_path, **fields):
    f = {"width": "100", "xmin": "1", "difficult": "0", **fields}
    ann = tmp_path / "voc" / "Annotations"
    ann.mkdir(parents=True)
    (ann / "a.xml").write_text(
        f"<annotation><size><width>{f['width']}</width><height>80</height></size><object>"
        f"<name>dog</name><difficult>{f['difficult']}</difficult><bndbox><xmin>{f['xmin']}"
        f"</xmin><ymin>1</ymin><xmax>10</xmax><ymax>10</ymax></bndbox></object></annotation>"
    )
    return ann.parent


_BAD = {
    "iscrowd string": (
        "coco",
        _edit_gt(lambda g: g["annotations"][4].update(iscrowd="0")),
        r"gt\.json: annotations\[4\]\.iscrowd: expected 0, 1, true or false, got '0' \(id 5\)",
    ),
    "iscrowd no": ("coco", _edit_gt(lambda g: g["annotations"][0].update(iscrowd="no")), "iscrowd"),
    "area string": (
        "coco",
        _edit_gt(lambda g: g["annotations"][2].update(area="9")),
        r"\[2\]\.area.*\(id 3\)",
    ),
    "category id 10**30": (
        "coco",
        _edit_gt(lambda g: g["categories"][1].update(id=10**30)),
        r"id=1000+: out of range",
    ),
    "duplicate image ids": (
        "coco",
        _edit_gt(lambda g: g["images"][1].update(id=1)),
        "images: duplicate id 1",
    ),
    "bbox overflow": (
        "coco",
        _edit_dt(lambda d: d[3].update(bbox=[1, 1, 1e308, 1e308])),
        r"\[3\]\.bbox.*large",
    ),
    "score string": ("coco", _edit_dt(lambda d: d[0].update(score="0.5")), r"\[0\]\.score: not a"),
    "results nested 200000 deep": (
        "coco",
        _text_dt("[" * 200_000 + "]" * 200_000),
        r"dt\.json.*nested too deeply",
    ),
    "results an object": ("coco", _text_dt('{"image_id": 1}'), "expected a list"),
    "results empty file": ("coco", _text_dt(""), r"dt\.json' is empty"),
    "voc results nested 200000 deep": (
        "voc",
        _text_dt("[" * 200_000 + "]" * 200_000),
        r"dt\.json.*nested too deeply",
    ),
    "voc width 1e400": ("voc-xml", {"width": "1e400"}, r"a\.xml: .*<size/width> is not a finite"),
    "voc xmin nan": ("voc-xml", {"xmin": "nan"}, r"a\.xml: object 0 <xmin> is not a finite"),
    "voc difficult 1e400": ("voc-xml", {"difficult": "1e400"}, r"a\.xml: .*<difficult> must be"),
}


@pytest.mark.parametrize("case", list(_BAD))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, case):
    from cnnkit.cli.main import main

    metric, edit, message = _BAD[case]
    gt, dt = _files(tmp_path)
    if metric == "voc-xml":
        gt = _voc_xml(tmp_path, **edit)
        dt.write_text(
            json.dumps(
                [{"image_id": "a", "category_id": "dog", "bbox": [0, 0, 9, 9], "score": 0.5}]
            )
        )
        metric = "voc"
    else:
        g, d = edit(json.loads(gt.read_text()), json.loads(dt.read_text()))
        gt.write_text(json.dumps(g))
        dt.write_text(d if isinstance(d, str) else json.dumps(d))
    out = tmp_path / "out"
    argv = ["eval", metric, str(gt), str(dt), "--json", str(out / "r.json")]
    status = main([*argv, "--plot", str(out / "pr.png")])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert status == 2 and captured.out == ""
    assert len(err) == 1 and "Traceback" not in captured.err, captured.err
    assert re.search(message, err[0]), err[0]
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--json", "--plot"])
@pytest.mark.parametrize("metric", ["coco", "voc"])
def test_an_output_that_is_a_directory_is_named_and_nothing_is_written(
    tmp_path, capsys, metric, flag
):
    from cnnkit.cli.main import main

    gt, dt = _files(tmp_path)
    target = tmp_path / "results"
    target.mkdir()
    other = "--plot" if flag == "--json" else "--json"
    argv = ["eval", metric, str(gt), str(dt), flag, str(target), other, str(tmp_path / "o" / "x")]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert (
        captured.err.strip() == f"cnnkit: error: {flag} {target}: is a directory; give a file name"
    )
    assert ".tmp" not in captured.err
    assert list(target.iterdir()) == [] and not (tmp_path / "o").exists()


def test_coco_plot_and_per_class_json_agree_with_cocoeval(tmp_path):
    gt, dt = _files(tmp_path)
    out_json = tmp_path / "r.json"
    status, _ = _run(["eval", "coco", str(gt), str(dt), "--json", str(out_json)])
    assert status == 0
    data = json.loads(out_json.read_text())
    assert data["per_class_area"] == "all"
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(gt))
        ev = COCOeval(coco, coco.loadRes(str(dt)), "bbox")
        ev.evaluate()
        ev.accumulate()
    for k, name in enumerate(["cat", "dog"]):
        s = ev.eval["precision"][:, :, k, 0, -1]
        assert data["per_class"][name] == pytest.approx(float(np.mean(s[s > -1])), abs=1e-12)
