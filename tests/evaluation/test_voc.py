"""PASCAL VOC AP: hand-computed cases, a brute-force devkit-style loop, the XML loader."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cnnkit.evaluation import load_voc_annotations, voc_evaluate
from cnnkit.evaluation.voc import ap_11_point, ap_all_point


def _ann(i, img, cat, box, difficult=0):
    return {
        "id": i,
        "image_id": img,
        "category_id": cat,
        "bbox": box,
        "area": box[2] * box[3],
        "iscrowd": 0,
        "difficult": difficult,
    }


def _hand_case():
    # Class a (id 1): image 1 has A1 [0,0,10,10] and A2 [20,20,10,10]; image 2 has A3
    # [0,0,10,10] and a difficult D [30,30,10,10]. npos = 3 (D does not count).
    # Detections of class a, by score:
    #   d1 0.9 img1 [0,0,10,10]  IoU 1 with A1            -> TP
    #   d2 0.8 img1 [0,0,10,10]  best gt A1, already taken -> FP
    #   d3 0.7 img2 [30,30,10,10] best gt D (difficult)    -> neither
    #   d4 0.6 img2 [1,0,10,10]  IoU 90/110 with A3        -> TP
    #   d5 0.5 img1 [50,50,5,5]  no overlap                -> FP
    # Ranked without d3: TP, FP, TP, FP -> recall 1/3, 1/3, 2/3, 2/3; precision 1, 1/2, 2/3, 1/2.
    # 11-point: r in {0,.1,.2,.3}: max precision at recall >= r is 1 (recall 1/3 >= .3);
    #   r in {.4,.5,.6}: 2/3; r in {.7,...,1}: no point -> 0. AP = (4 + 3 * 2/3) / 11 = 6/11.
    # All-point: envelope 1 on (0, 1/3], 2/3 on (1/3, 2/3], 0 beyond -> 1/3 + 2/9 = 5/9.
    # Class b (id 2): a detection but no ground truth -> AP NaN, left out of the mAP.
    # Class c (id 3): one gt, no detection -> AP 0. mAP = (6/11 + 0) / 2 (11-point).
    gt = {
        "images": [{"id": 1}, {"id": 2}],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}],
        "annotations": [
            _ann(1, 1, 1, [0, 0, 10, 10]),
            _ann(2, 1, 1, [20, 20, 10, 10]),
            _ann(3, 2, 1, [0, 0, 10, 10]),
            _ann(4, 2, 1, [30, 30, 10, 10], difficult=1),
            _ann(5, 2, 3, [5, 5, 10, 10]),
        ],
    }
    dt = [
        {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9},
        {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.8},
        {"image_id": 2, "category_id": 1, "bbox": [30, 30, 10, 10], "score": 0.7},
        {"image_id": 2, "category_id": 1, "bbox": [1, 0, 10, 10], "score": 0.6},
        {"image_id": 1, "category_id": 1, "bbox": [50, 50, 5, 5], "score": 0.5},
        {"image_id": 1, "category_id": 2, "bbox": [50, 50, 5, 5], "score": 0.5},
    ]
    return gt, dt


def test_hand_computed_11_point_and_all_point():
    gt, dt = _hand_case()
    r = voc_evaluate(gt, dt)
    assert r.ap["a"] == pytest.approx(6 / 11)
    assert r.ap["c"] == 0.0
    assert math.isnan(r.ap["b"]) and r.excluded == ["b"]
    assert r.map == pytest.approx(3 / 11)
    np.testing.assert_allclose(r.recall["a"], [1 / 3, 1 / 3, 2 / 3, 2 / 3])
    np.testing.assert_allclose(r.precision["a"], [1, 1 / 2, 2 / 3, 1 / 2])
    assert r.npos == {"a": 3, "b": 0, "c": 1}
    r2 = voc_evaluate(gt, dt, use_07_metric=False)
    assert r2.ap["a"] == pytest.approx(5 / 9)
    assert "left out of the mAP" in r.summary()


def test_iou_exactly_at_threshold_counts():
    # det [0,0,10,5] vs gt [0,0,10,10]: IoU 50/100 = 0.5 exactly, a hit under ">= 0.5".
    gt = {
        "images": [{"id": 1}],
        "categories": [{"id": 1, "name": "a"}],
        "annotations": [_ann(1, 1, 1, [0, 0, 10, 10])],
    }
    dt = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 5], "score": 1.0}]
    assert voc_evaluate(gt, dt).ap["a"] == pytest.approx(1.0)
    assert voc_evaluate(gt, dt, iou_threshold=0.51).ap["a"] == 0.0


def test_ap_formulas_on_a_known_curve():
    # Points (recall, precision): (0.2, 1), (0.4, 0.5), (0.8, 2/3). Envelope: 1 up to 0.2,
    # 2/3 up to 0.8, 0 after. All-point: 0.2 * 1 + 0.6 * 2/3 = 0.6.
    # 11-point: r=0,.1,.2 -> 1; r=.3..(.8) -> 2/3 (6 levels); r=.9, 1 -> 0: (3 + 4) / 11.
    rec, prec = np.array([0.2, 0.4, 0.8]), np.array([1.0, 0.5, 2 / 3])
    assert ap_all_point(rec, prec) == pytest.approx(0.6)
    assert ap_11_point(rec, prec) == pytest.approx(7 / 11)


def _devkit_reference(gt, dt, thr, use_07):
    """A direct loop, as the VOC devkit writes it (>= thr, stable ranking)."""
    aps = {}
    for cat in gt["categories"]:
        c = cat["id"]
        recs = {}
        for a in gt["annotations"]:
            if a["category_id"] == c:
                recs.setdefault(a["image_id"], []).append(a)
        npos = sum(1 for v in recs.values() for a in v if not a["difficult"])
        taken = {id(a): False for v in recs.values() for a in v}
        dets = sorted([d for d in dt if d["category_id"] == c], key=lambda d: -d["score"])
        tp, fp = [], []
        for d in dets:
            x, y, w, h = d["bbox"]
            best, arg = -1.0, None
            for a in recs.get(d["image_id"], []):
                gx, gy, gw, gh = a["bbox"]
                iw = max(min(x + w, gx + gw) - max(x, gx), 0.0)
                ih = max(min(y + h, gy + gh) - max(y, gy), 0.0)
                inter = iw * ih
                union = w * h + gw * gh - inter
                o = inter / union if union > 0 else 0.0
                if o > best:
                    best, arg = o, a
            if arg is not None and best >= thr:
                if arg["difficult"]:
                    continue
                if not taken[id(arg)]:
                    taken[id(arg)] = True
                    tp.append(1)
                    fp.append(0)
                else:
                    tp.append(0)
                    fp.append(1)
            else:
                tp.append(0)
                fp.append(1)
        if npos == 0:
            continue
        tpc, fpc = np.cumsum(tp), np.cumsum(fp)
        rec = tpc / npos
        prec = tpc / np.maximum(tpc + fpc, np.finfo(float).eps)
        if use_07:
            ap = (
                sum((prec[rec >= t / 10].max() if (rec >= t / 10).any() else 0) for t in range(11))
                / 11
            )
        else:
            mrec = np.r_[0, rec, 1]
            mpre = np.r_[0, prec, 0]
            for i in range(len(mpre) - 2, -1, -1):
                mpre[i] = max(mpre[i], mpre[i + 1])
            i = np.flatnonzero(mrec[1:] != mrec[:-1])
            ap = float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))
        aps[cat["name"]] = ap
    return aps


@pytest.mark.parametrize("seed", range(4))
def test_random_cases_equal_devkit_loop(seed):
    rng = np.random.default_rng(seed)
    anns, dets = [], []
    for img in range(1, 16):
        for _ in range(int(rng.integers(0, 5))):
            c = int(rng.integers(1, 4))
            box = [float(v) for v in rng.uniform(0, 50, 2)] + [
                float(v) for v in rng.uniform(5, 30, 2)
            ]
            anns.append(_ann(len(anns) + 1, img, c, box, difficult=int(rng.random() < 0.15)))
            for _ in range(int(rng.integers(0, 3))):
                j = rng.normal(0, 3, 4)
                dets.append(
                    {
                        "image_id": img,
                        "category_id": c,
                        "score": round(float(rng.random()), 1),
                        "bbox": [
                            box[0] + j[0],
                            box[1] + j[1],
                            max(1, box[2] + j[2]),
                            max(1, box[3] + j[3]),
                        ],
                    }
                )
        for _ in range(int(rng.integers(0, 4))):
            dets.append(
                {
                    "image_id": img,
                    "category_id": int(rng.integers(1, 4)),
                    "score": float(rng.random()),
                    "bbox": [float(v) for v in rng.uniform(0, 60, 2)] + [10.0, 10.0],
                }
            )
    gt = {
        "images": [{"id": i} for i in range(1, 16)],
        "annotations": anns,
        "categories": [{"id": c, "name": f"k{c}"} for c in range(1, 4)],
    }
    for use_07 in (True, False):
        ref = _devkit_reference(gt, dets, 0.5, use_07)
        got = voc_evaluate(gt, dets, use_07_metric=use_07)
        for name, ap in ref.items():
            assert got.ap[name] == pytest.approx(ap, abs=1e-12), name


def _write_xml(path, stem, objects):
    body = "".join(
        f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin>"
        f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for n, b, d in objects
    )
    (path / f"{stem}.xml").write_text(
        f"<annotation><filename>{stem}.jpg</filename><size><width>100</width>"
        f"<height>80</height><depth>3</depth></size>{body}</annotation>"
    )


def test_voc_xml_directory(tmp_path):
    ann_dir = tmp_path / "Annotations"
    ann_dir.mkdir()
    # 1-based inclusive pixels 1..10 -> continuous [0, 10): width 10 like the devkit's x2-x1+1.
    _write_xml(ann_dir, "000001", [("dog", (1, 1, 10, 10), 0), ("cat", (21, 21, 40, 30), 1)])
    _write_xml(ann_dir, "000002", [("dog", (11, 11, 20, 20), 0)])
    data = load_voc_annotations(tmp_path)
    assert [c["name"] for c in data["categories"]] == ["cat", "dog"]
    dog = [a for a in data["annotations"] if a["category_id"] == 2]
    assert dog[0]["bbox"] == [0, 0, 10, 10] and dog[1]["bbox"] == [10, 10, 10, 10]
    assert [a["difficult"] for a in data["annotations"]] == [0, 1, 0]
    dt = [
        {"image_id": "000001", "category_id": "dog", "bbox": [0, 0, 10, 10], "score": 0.9},
        {"image_id": "000002", "category_id": "dog", "bbox": [30, 30, 5, 5], "score": 0.8},
    ]
    r = voc_evaluate(tmp_path, dt)
    # dog: TP then FP, npos 2 -> recall 0.5 at precision 1: 11-point = 6/11. cat: only a
    # difficult gt -> excluded.
    assert r.ap["dog"] == pytest.approx(6 / 11)
    assert r.excluded == ["cat"]


def test_voc_bad_input(tmp_path):
    gt, dt = _hand_case()
    dt[1]["bbox"] = [0, 0, -1, 5]
    with pytest.raises(ValueError, match=r"results\[1\]\.bbox"):
        voc_evaluate(gt, dt)
    (tmp_path / "x.xml").write_text("<annotation><object><name>a</name></object></annotation>")
    with pytest.raises(ValueError, match="bndbox"):
        load_voc_annotations(tmp_path)
    with pytest.raises(ValueError, match="no VOC annotation"):
        load_voc_annotations(tmp_path / "missing")


def test_ragged_ranges_against_a_loop():
    from cnnkit.evaluation.coco import ragged_ranges

    counts = np.array([3, 0, 2, 1, 0, 4])
    owner, local, offset = ragged_ranges(counts)
    pairs = [(i, j) for i, c in enumerate(counts) for j in range(c)]
    assert list(zip(owner.tolist(), local.tolist(), strict=True)) == pairs
    assert offset.tolist() == [0, 3, 3, 5, 6, 6]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"width": "1e400"}, r"<size/width> is not a finite number: '1e400'"),
        ({"width": "abc"}, r"<size/width> is not a number"),
        ({"width": "-3"}, r"<size><width> must be a positive integer"),
        ({"width": "12.5"}, r"<size><width> must be a positive integer"),
        ({"xmin": "nan"}, r"object 0 <xmin> is not a finite number"),
        ({"xmax": "1e400"}, r"object 0 <xmax> is not a finite number"),
        ({"difficult": "yes"}, r"object 0 <difficult> must be 0 or 1"),
        ({"difficult": "1e400"}, r"object 0 <difficult> must be 0 or 1"),
    ],
)
def test_voc_xml_numbers_of_the_wrong_kind_name_the_file(tmp_path, edit, message):
    fields = {"width": "100", "xmin": "1", "xmax": "10", "difficult": "0", **edit}
    (tmp_path / "000001.xml").write_text(
        f"<annotation><size><width>{fields['width']}</width><height>80</height></size>"
        f"<object><name>dog</name><difficult>{fields['difficult']}</difficult><bndbox>"
        f"<xmin>{fields['xmin']}</xmin><ymin>1</ymin><xmax>{fields['xmax']}</xmax>"
        f"<ymax>10</ymax></bndbox></object></annotation>"
    )
    with pytest.raises(ValueError, match=rf"000001\.xml: .*{message}"):
        load_voc_annotations(tmp_path)


def test_voc_ground_truth_is_validated_before_names_are_resolved(tmp_path):
    gt, dt = _hand_case()
    gt["images"] = 5
    path = tmp_path / "gt.json"
    path.write_text(__import__("json").dumps(gt))
    with pytest.raises(ValueError, match=r"gt\.json: missing list 'images'"):
        voc_evaluate(path, dt)
    gt, dt = _hand_case()
    del gt["categories"]
    with pytest.raises(ValueError, match=r"missing list 'categories'"):
        voc_evaluate(gt, dt)
    gt, dt = _hand_case()
    gt["images"][0]["id"] = [1]
    with pytest.raises(ValueError, match=r"images\[0\]\.id: expected an integer or string id"):
        voc_evaluate(gt, dt)


def test_voc_deeply_nested_results_and_empty_map(tmp_path):
    gt, _ = _hand_case()
    path = tmp_path / "dt.json"
    path.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(ValueError, match=r"dt\.json.*nested too deeply"):
        voc_evaluate(gt, path)
    # No class with ground truth: mAP NaN, written as null (strict JSON), not NaN.
    gt = {"images": [{"id": 1}], "categories": [{"id": 1, "name": "a"}], "annotations": []}
    r = voc_evaluate(gt, [])
    assert math.isnan(r.map) and r.to_dict()["map"] is None
