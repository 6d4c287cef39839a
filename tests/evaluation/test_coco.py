"""COCO evaluation against pycocotools' COCOeval, the test-time oracle, on generated cases."""

from __future__ import annotations

import contextlib
import copy
import io
import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from cnnkit.evaluation import coco_evaluate
from cnnkit.evaluation.coco_params import COCO_KEYPOINT_SIGMAS
from cnnkit.evaluation.oks import oks_pairs

# ----------------------------------------------------------------------------- generators


def _box(rng, w_img, h_img, tiny=False):
    scale = rng.choice([3.0, 20.0, 60.0, 150.0]) if not tiny else 3.0
    w, h = np.minimum(rng.uniform(0.3, 1.0, 2) * scale + 1.0, [w_img - 1, h_img - 1])
    x, y = rng.uniform(0, w_img - w), rng.uniform(0, h_img - h)
    return [float(x), float(y), float(w), float(h)]


def _polygon(rng, box, n=None):
    x, y, w, h = box
    n = n or int(rng.integers(3, 9))
    a = np.sort(rng.uniform(0, 2 * np.pi, n))
    r = rng.uniform(0.5, 1.0, n)
    px = x + w / 2 + np.cos(a) * r * w / 2
    py = y + h / 2 + np.sin(a) * r * h / 2
    return [float(v) for pair in zip(px, py, strict=True) for v in pair]


def _uncompressed_rle(mask):
    """COCO uncompressed RLE (column-major run lengths, starting with zeros) of a 0/1 mask."""
    flat = np.asarray(mask, dtype=np.uint8).ravel(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    edges = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(edges).tolist()
    if flat[0] == 1:
        counts = [0, *counts]
    return {"size": list(mask.shape), "counts": counts}


def make_case(seed, iou_type="bbox", n_img=12, n_cat=4, crowd=0.1, many=False, ties=True):
    """Ground truth + results with crowds, empty images, a class without ground truth (the
    last), a class without detections (the first, where its gts exist), tiny boxes,
    score ties, and optionally > 100 detections in one image."""
    rng = np.random.default_rng(seed)
    k = len(COCO_KEYPOINT_SIGMAS)
    images, anns, dets = [], [], []
    for i in range(1, n_img + 1):
        w_img, h_img = int(rng.integers(60, 200)), int(rng.integers(60, 200))
        images.append({"id": i * 3, "width": w_img, "height": h_img, "file_name": f"{i}.png"})
        n_gt = 0 if i % 5 == 0 else int(rng.integers(0, 7))
        for _ in range(n_gt):
            c = int(rng.integers(1, n_cat))  # the last category never has ground truth
            box = _box(rng, w_img, h_img, tiny=rng.random() < 0.2)
            is_crowd = int(rng.random() < crowd)
            ann = {
                "id": len(anns) + 1,
                "image_id": i * 3,
                "category_id": c,
                "bbox": box,
                "area": box[2] * box[3] * float(rng.uniform(0.5, 1.0)),
                "iscrowd": is_crowd,
            }
            if iou_type == "segm":
                poly = _polygon(rng, box)
                if is_crowd:
                    rle = mask_utils.frPyObjects([poly], h_img, w_img)
                    ann["segmentation"] = _uncompressed_rle(mask_utils.decode(rle)[:, :, 0])
                elif rng.random() < 0.3:
                    ann["segmentation"] = [poly, _polygon(rng, _box(rng, w_img, h_img))]
                else:
                    ann["segmentation"] = [poly]
            if iou_type == "keypoints":
                v = rng.choice([0, 1, 2], size=k, p=[0.3, 0.3, 0.4])
                if rng.random() < 0.2:
                    v[:] = 0  # no labelled keypoint: OKS by distance to the enlarged box
                xs = rng.uniform(box[0], box[0] + box[2], k)
                ys = rng.uniform(box[1], box[1] + box[3], k)
                kp = np.stack([np.where(v > 0, xs, 0), np.where(v > 0, ys, 0), v], 1)
                ann["keypoints"] = kp.ravel().tolist()
                ann["num_keypoints"] = int(np.count_nonzero(v))
                ann["area"] = float(rng.choice([500.0, 3000.0, 20000.0]) * rng.uniform(0.5, 2))
            anns.append(ann)
            for _ in range(int(rng.integers(0, 4))):
                cat = c if rng.random() < 0.8 else int(rng.integers(1, n_cat + 1))
                if cat == 1:
                    continue  # category 1: ground truth but no detections
                j = rng.normal(0, 0.1, 4) * [box[2], box[3], box[2], box[3]]
                dbox = [
                    box[0] + j[0],
                    box[1] + j[1],
                    max(0.5, box[2] + j[2]),
                    max(0.5, box[3] + j[3]),
                ]
                dets.append(_det(rng, i * 3, cat, dbox, iou_type, w_img, h_img, ann, ties))
        n_clutter = int(rng.integers(0, 6)) + (130 if many and i == 2 else 0)
        for _ in range(n_clutter):
            cat = 2 if many and i == 2 else int(rng.integers(2, n_cat + 1))
            dbox = _box(rng, w_img, h_img, tiny=rng.random() < 0.2)
            dets.append(_det(rng, i * 3, cat, dbox, iou_type, w_img, h_img, None, ties))
    gt = {
        "images": images,
        "annotations": anns,
        "categories": [{"id": c, "name": f"c{c}"} for c in range(1, n_cat + 1)],
    }
    return gt, dets


def _det(rng, image_id, cat, box, iou_type, w_img, h_img, ann, ties):
    score = round(float(rng.random()), 1) if ties else float(rng.random())
    d = {"image_id": image_id, "category_id": cat, "score": score}
    if iou_type == "bbox":
        d["bbox"] = box
    elif iou_type == "segm":
        poly = _polygon(rng, box)
        if rng.random() < 0.5:
            rle = mask_utils.merge(mask_utils.frPyObjects([poly], h_img, w_img))
            d["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
        else:
            d["segmentation"] = [poly]
        if rng.random() < 0.5 or "counts" not in str(d["segmentation"]):
            d["bbox"] = box  # pycocotools' loadRes needs bbox for polygon results
    else:
        k = len(COCO_KEYPOINT_SIGMAS)
        if ann is not None and rng.random() < 0.7:
            kp = np.asarray(ann["keypoints"], dtype=float).reshape(k, 3)
            base = np.where(kp[:, 2:3] > 0, kp[:, :2], rng.uniform(0, 50, (k, 2)))
            xy = base + rng.normal(0, 3, (k, 2))
        else:
            xy = np.stack(
                [rng.uniform(box[0], box[0] + box[2], k), rng.uniform(box[1], box[1] + box[3], k)],
                1,
            )
        d["keypoints"] = np.concatenate([xy, np.ones((k, 1))], 1).ravel().tolist()
    return d


# ----------------------------------------------------------------------------- the oracle


def oracle(gt, results, iou_type, cls=COCOeval, **params):
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        if results:
            res = coco.loadRes(copy.deepcopy(results))
        else:
            res = COCO()
            res.dataset = {
                "images": gt["images"],
                "categories": gt["categories"],
                "annotations": [],
            }
            res.createIndex()
        ev = cls(coco, res, iou_type)
        for key, value in params.items():
            setattr(ev.params, key, value)
        ev.evaluate()
        ev.accumulate()
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            ev.summarize()
    return ev, out.getvalue()


def assert_same(ours, ev, printed=None):
    ref = np.asarray(ev.stats, dtype=np.float64)
    assert len(ours.stats) == len(ref)
    np.testing.assert_allclose(ours.stats, ref, rtol=0, atol=1e-9)
    assert ours.precision.shape == ev.eval["precision"].shape
    np.testing.assert_array_equal(ours.precision, ev.eval["precision"])
    np.testing.assert_array_equal(ours.recall, ev.eval["recall"])
    if printed is not None:
        assert ours.summary() == printed.rstrip("\n")


# ----------------------------------------------------------------------------- bbox


@pytest.mark.parametrize("seed", range(8))
def test_bbox_matches_cocoeval(seed):
    gt, dt = make_case(seed, "bbox", crowd=0.15, many=seed % 2 == 0, ties=seed % 3 != 2)
    ev, printed = oracle(gt, dt, "bbox")
    ours = coco_evaluate(gt, dt, "bbox")
    assert_same(ours, ev, printed)
    # per-category AP = mean of COCOeval's precision of that category (area all, maxDets 100)
    for k, (name, ap) in enumerate(ours.per_class.items()):
        s = ev.eval["precision"][:, :, k, 0, -1]
        expected = float(np.mean(s[s > -1])) if (s > -1).any() else -1.0
        assert ap == pytest.approx(expected, abs=1e-12), name
    assert ours.per_class["c4"] == -1.0  # the category without ground truth


def test_bbox_many_ties_and_identical_boxes():
    # Every detection a copy of one box with equal scores: order decides everything.
    rng = np.random.default_rng(7)
    gt, dt = make_case(11, "bbox", n_img=6)
    for d in dt:
        d["score"] = 0.5
    dt += [dict(d) for d in dt[: len(dt) // 2]]
    del rng
    ev, printed = oracle(gt, dt, "bbox")
    assert_same(coco_evaluate(gt, dt, "bbox"), ev, printed)


def test_equal_iou_goes_to_the_later_ground_truth():
    # det1 [1,0,10,10] overlaps gt A [0,0,10,10] and gt B [2,0,10,10] equally: IoU 90/110 both.
    # COCOeval replaces its candidate on equal IoU, so det1 takes B (the later one); det2
    # [-3,0,10,10] (IoU 70/130 = 0.54 with A, 50/150 with B) can then take A at IoU 0.5:
    # two true positives at IoU .50, recall 1, AP@.50 = 1. Taking A first would leave det2 a
    # false positive (precision 1/2 at recall 1/2 only: AP@.50 ~ 0.5).
    gt = {
        "images": [{"id": 1, "width": 50, "height": 50}],
        "categories": [{"id": 1, "name": "a"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "bbox": [0, 0, 10, 10],
                "area": 100,
                "iscrowd": 0,
            },
            {
                "id": 2,
                "image_id": 1,
                "category_id": 1,
                "bbox": [2, 0, 10, 10],
                "area": 100,
                "iscrowd": 0,
            },
        ],
    }
    dt = [
        {"image_id": 1, "category_id": 1, "bbox": [1, 0, 10, 10], "score": 0.9},
        {"image_id": 1, "category_id": 1, "bbox": [-3, 0, 10, 10], "score": 0.8},
    ]
    ours = coco_evaluate(gt, dt)
    assert ours.stats[1] == pytest.approx(1.0)
    ev, printed = oracle(gt, dt, "bbox")
    assert_same(ours, ev, printed)


@pytest.mark.parametrize(
    "params",
    [
        {"maxDets": [1, 5, 20]},
        {"iouThrs": np.array([0.3, 0.5, 0.75]), "recThrs": np.linspace(0, 1, 11)},
        {"useCats": 0},
        {"catIds": [2, 3], "imgIds": [3, 6, 9, 12, 15, 18]},
        {"areaRng": [[0, 1e10], [0, 400], [400, 1e10], [1e3, 1e4]]},
    ],
)
def test_bbox_custom_params(params):
    gt, dt = make_case(3, "bbox", many=True)
    ev, _ = oracle(gt, dt, "bbox", **params)
    ours = coco_evaluate(gt, dt, "bbox", **params)
    assert_same(ours, ev)


def test_snake_case_params_equal_camel_case():
    gt, dt = make_case(4, "bbox")
    a = coco_evaluate(gt, dt, "bbox", max_dets=[1, 5, 20], use_cats=False)
    b = coco_evaluate(gt, dt, "bbox", maxDets=[1, 5, 20], useCats=0)
    assert a.stats == b.stats
    with pytest.raises(TypeError, match="maxdets"):
        coco_evaluate(gt, dt, "bbox", maxdets=[1])


def test_gt_with_id_zero_behaves_like_cocoeval():
    gt, dt = make_case(5, "bbox", crowd=0.0)
    for a in gt["annotations"]:
        a["id"] -= 1  # the first annotation gets id 0
    ev, _ = oracle(gt, dt, "bbox")
    assert_same(coco_evaluate(gt, dt, "bbox"), ev)


def test_ignore_field_is_overwritten_by_iscrowd_unless_asked():
    gt, dt = make_case(6, "bbox", crowd=0.0)
    flagged = {a["id"] for a in gt["annotations"][::3]}
    for a in gt["annotations"]:
        a["ignore"] = int(a["id"] in flagged)
    ev, _ = oracle(gt, dt, "bbox")
    assert_same(coco_evaluate(gt, dt, "bbox"), ev)

    class HonourIgnore(COCOeval):
        def _prepare(self):
            super()._prepare()
            for gts in self._gts.values():
                for g in gts:
                    g["ignore"] = bool(g["iscrowd"]) or g["id"] in flagged

    ev2, _ = oracle(gt, dt, "bbox", cls=HonourIgnore)
    ours = coco_evaluate(gt, dt, "bbox", use_ignore_flag=True)
    assert_same(ours, ev2)
    assert ours.stats != coco_evaluate(gt, dt, "bbox").stats


def test_empty_results_equal_cocoeval_with_no_detections():
    gt, _ = make_case(2, "bbox")
    ev, printed = oracle(gt, [], "bbox")
    ours = coco_evaluate(gt, [], "bbox")
    assert_same(ours, ev, printed)
    assert set(ours.stats) <= {0.0, -1.0}


def test_results_from_json_files_and_predictions(tmp_path):
    gt, dt = make_case(8, "bbox", ties=False)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dt.json").write_text(json.dumps(dt))
    ev, _ = oracle(gt, dt, "bbox")
    assert_same(coco_evaluate(tmp_path / "gt.json", str(tmp_path / "dt.json")), ev)

    # The same detections as per-image model predictions (xyxy boxes, tensors).
    torch = pytest.importorskip("torch")
    preds = {}
    for d in dt:
        p = preds.setdefault(d["image_id"], {"boxes": [], "scores": [], "labels": []})
        x, y, w, h = d["bbox"]
        p["boxes"].append([x, y, x + w, y + h])
        p["scores"].append(d["score"])
        p["labels"].append(d["category_id"])
    preds = {
        k: {
            "boxes": torch.tensor(v["boxes"], dtype=torch.float64),
            "scores": torch.tensor(v["scores"], dtype=torch.float64),
            "labels": torch.tensor(v["labels"]),
        }
        for k, v in preds.items()
    }
    ours = coco_evaluate(gt, preds, "bbox")
    # xyxy -> xywh round trips change boxes by an ulp at most: the summary is unchanged.
    np.testing.assert_allclose(ours.stats, ev.stats, atol=1e-9)


# ----------------------------------------------------------------------------- segm


@pytest.mark.parametrize("seed", range(4))
def test_segm_matches_cocoeval(seed):
    gt, dt = make_case(100 + seed, "segm", n_img=8, crowd=0.2, many=seed == 0)
    # Keep pycocotools' loadRes happy: results either all with bbox or all RLE (area from mask).
    if seed % 2:
        for d in dt:
            d.pop("bbox", None)
            if isinstance(d["segmentation"], list):
                h = next(i["height"] for i in gt["images"] if i["id"] == d["image_id"])
                w = next(i["width"] for i in gt["images"] if i["id"] == d["image_id"])
                rle = mask_utils.merge(mask_utils.frPyObjects(d["segmentation"], h, w))
                d["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
    else:
        for d in dt:
            if "bbox" not in d:
                d["bbox"] = list(mask_utils.toBbox(d["segmentation"]))
    ev, printed = oracle(gt, dt, "segm")
    assert_same(coco_evaluate(gt, dt, "segm"), ev, printed)


def test_segm_predictions_with_masks():
    torch = pytest.importorskip("torch")
    gt, _ = make_case(120, "segm", n_img=4, crowd=0.0)
    rng = np.random.default_rng(0)
    preds, results = {}, []
    for img in gt["images"]:
        h, w = img["height"], img["width"]
        probs = rng.random((3, 1, h, w)).astype(np.float32)
        probs[:, :, : h // 2] *= 0.4  # structure: the top half is below threshold
        scores = rng.random(3)
        preds[img["id"]] = {
            "masks": torch.from_numpy(probs),
            "scores": torch.from_numpy(scores),
            "labels": torch.tensor([1, 2, 3]),
        }
        for j in range(3):
            rle = mask_utils.encode(np.asfortranarray((probs[j, 0] > 0.5).astype(np.uint8)))
            results.append(
                {
                    "image_id": img["id"],
                    "category_id": j + 1,
                    "score": float(scores[j]),
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                }
            )
    ev, _ = oracle(gt, results, "segm")
    assert_same(coco_evaluate(gt, preds, "segm"), ev)


# ----------------------------------------------------------------------------- keypoints


@pytest.mark.parametrize("seed", range(4))
def test_keypoints_match_cocoeval(seed):
    gt, dt = make_case(200 + seed, "keypoints", n_img=10, n_cat=2, crowd=0.1)
    if seed == 3:
        for d in dt:  # with "bbox", loadRes takes areas from the boxes
            xs, ys = d["keypoints"][0::3], d["keypoints"][1::3]
            d["bbox"] = [min(xs), min(ys), max(xs) - min(xs) + 5, max(ys) - min(ys) + 5]
    ev, printed = oracle(gt, dt, "keypoints")
    ours = coco_evaluate(gt, dt, "keypoints")
    assert len(ours.stats) == 10
    assert_same(ours, ev, printed)


def test_oks_is_bit_identical_to_cocoeval():
    gt, dt = make_case(300, "keypoints", n_img=6, n_cat=2)
    ev, _ = oracle(gt, dt, "keypoints")
    for (img, cat), ious in ev.ious.items():
        if len(ious) == 0:
            continue
        gts, dts = ev._gts[img, cat], ev._dts[img, cat]
        order = np.argsort([-d["score"] for d in dts], kind="mergesort")[:20]
        dk = np.array([dts[i]["keypoints"] for i in order], dtype=float)
        gk = np.array([g["keypoints"] for g in gts], dtype=float)
        di, gi = np.meshgrid(np.arange(len(dk)), np.arange(len(gk)), indexing="ij")
        got = oks_pairs(
            dk[di.ravel()],
            gk[gi.ravel()],
            np.array([g["bbox"] for g in gts], dtype=float)[gi.ravel()],
            np.array([g["area"] for g in gts], dtype=float)[gi.ravel()],
            COCO_KEYPOINT_SIGMAS,
        )
        np.testing.assert_array_equal(got.reshape(ious.shape), ious)


def test_custom_skeleton_sigmas():
    gt, dt = make_case(210, "keypoints", n_img=6, n_cat=2)
    keep = [0, 5, 6, 11, 12]  # a 5-point skeleton
    sigmas = COCO_KEYPOINT_SIGMAS[keep]
    for a in gt["annotations"] + dt:
        kp = np.asarray(a["keypoints"]).reshape(-1, 3)[keep]
        a["keypoints"] = kp.ravel().tolist()
        if "num_keypoints" in a:
            a["num_keypoints"] = int(np.count_nonzero(kp[:, 2] > 0))
    ev, _ = oracle(gt, dt, "keypoints", kpt_oks_sigmas=sigmas)
    assert_same(coco_evaluate(gt, dt, "keypoints", kpt_oks_sigmas=sigmas), ev)
    with pytest.raises(ValueError, match="kpt_oks_sigmas"):
        coco_evaluate(gt, dt, "keypoints")


# ----------------------------------------------------------------------------- bad input


def _small():
    gt, dt = make_case(1, "bbox", n_img=4)
    return gt, dt


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(image_id=999), r"results\[2\]\.image_id=999"),
        (lambda d: d.update(category_id=77), r"results\[2\]\.category_id=77"),
        (lambda d: d.update(bbox=[1, 2, -3, 4]), r"results\[2\]\.bbox.*negative"),
        (lambda d: d.update(bbox=[1, 2, 3]), r"results\[2\]\.bbox: expected 4 numbers"),
        (lambda d: d.pop("score"), r"results\[2\]: missing field 'score'"),
        (lambda d: d.update(score=float("nan")), r"results\[2\]\.score: not finite"),
        (lambda d: d.update(score=float("inf")), r"results\[2\]\.score: not finite"),
        (lambda d: d.update(score="high"), r"results\[2\]\.score: not a number"),
    ],
)
def test_bad_results_name_the_entry(edit, message):
    gt, dt = _small()
    edit(dt[2])
    with pytest.raises(ValueError, match=message):
        coco_evaluate(gt, dt, "bbox")


def test_bad_files_and_ground_truth(tmp_path):
    gt, dt = _small()
    bad = tmp_path / "dt.json"
    bad.write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        coco_evaluate(gt, bad)
    gt2 = copy.deepcopy(gt)
    gt2["annotations"][1]["category_id"] = 42
    with pytest.raises(ValueError, match=r"annotations\[1\]\.category_id=42"):
        coco_evaluate(gt2, dt)
    with pytest.raises(ValueError, match="iou_type"):
        coco_evaluate(gt, dt, "boxes")
    with pytest.raises(ValueError, match="expected a list"):
        coco_evaluate(gt, 5)


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_ground_truth_without_annotations(iou_type):
    gt = {
        "images": [{"id": 1, "width": 20, "height": 20}],
        "categories": [{"id": 1}],
        "annotations": [],
    }
    dt = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}]
    if iou_type == "segm":
        dt[0]["segmentation"] = [[0, 0, 5, 0, 5, 5, 0, 5]]
    ev, printed = oracle(gt, dt, iou_type)
    assert_same(coco_evaluate(gt, dt, iou_type), ev, printed)


# ----------------------------------------------------------------------------- field types


def _gt_file(tmp_path, gt):
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    return path


@pytest.mark.parametrize("value", ["0", "no", "1", 2, -1, 0.5, None, [0]])
def test_iscrowd_of_the_wrong_type_names_the_annotation(tmp_path, value):
    # pycocotools reads "0" as set (ignored) and as not crowd (IoU) at once: refused here.
    gt, dt = _small()
    gt["annotations"][1]["iscrowd"] = value
    ann_id = gt["annotations"][1]["id"]
    with pytest.raises(
        ValueError, match=rf"gt\.json: annotations\[1\]\.iscrowd: .*\(id {ann_id}\)"
    ):
        coco_evaluate(_gt_file(tmp_path, gt), dt)


def test_iscrowd_as_booleans_or_floats_equals_cocoeval():
    gt, dt = make_case(3, "bbox", crowd=0.3)
    assert any(a["iscrowd"] for a in gt["annotations"])
    ev, printed = oracle(gt, dt, "bbox")
    for convert in (bool, float):
        gt2 = copy.deepcopy(gt)
        for a in gt2["annotations"]:
            a["iscrowd"] = convert(a["iscrowd"])
        assert_same(coco_evaluate(gt2, dt, "bbox"), ev, printed)


def _set(path, value):
    def edit(gt, dt):
        target = {"gt": gt, "dt": dt}[path[0]]
        for key in path[1:-1]:
            target = target[key]
        target[path[-1]] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_set(("gt", "annotations", 1, "area"), "100"), r"annotations\[1\]\.area: not a number"),
        (_set(("gt", "annotations", 1, "area"), -5.0), r"annotations\[1\]\.area: negative"),
        (_set(("gt", "annotations", 1, "area"), True), r"annotations\[1\]\.area: not a number"),
        (_set(("gt", "annotations", 1, "bbox"), ["1", 2, 3, 4]), r"\[1\]\.bbox: expected 4"),
        (_set(("gt", "annotations", 1, "bbox"), [1, 2, True, 4]), r"\[1\]\.bbox: expected 4"),
        (_set(("gt", "annotations", 1, "bbox"), [1, 2, 1e308, 1e308]), r"\[1\]\.bbox.*too large"),
        (_set(("gt", "annotations", 1, "bbox"), [1, 2, 10**400, 4]), r"\[1\]\.bbox: number too"),
        (_set(("gt", "annotations", 1, "bbox"), [1, 2, float("nan"), 4]), r"bbox: not finite"),
        (_set(("gt", "annotations", 1, "bbox"), [1, 2, -3, 4]), r"\[1\]\.bbox.*negative"),
        (_set(("gt", "categories", 1, "id"), 10**30), r"categories\[1\]\.id=1000.*out of range"),
        (_set(("gt", "categories", 1, "id"), 1e300), r"categories\[1\]\.id=1e\+300: a float id"),
        (_set(("gt", "categories", 1, "id"), 1), r"categories: duplicate id 1"),
        (_set(("gt", "images", 1, "id"), "6"), r"images: field 'id' mixes integer and string"),
        (_set(("gt", "images", 1, "id"), 3), r"images: duplicate id 3"),
        (_set(("gt", "annotations", 1, "image_id"), True), r"\[1\]\.image_id: expected an int"),
        (_set(("gt", "annotations", 1, "category_id"), 1.5), r"category_id: expected an int"),
        (_set(("gt", "annotations", 1, "id"), 1), r"annotations: duplicate id 1"),
        (_set(("gt", "annotations", 1, "difficult"), "yes"), r"\[1\]\.difficult: expected 0, 1"),
        (_set(("dt", 2, "score"), "0.9"), r"results\[2\]\.score: not a number"),
        (_set(("dt", 2, "score"), True), r"results\[2\]\.score: not a number"),
        (_set(("dt", 2, "score"), 10**400), r"results\[2\]\.score: number too large"),
        (_set(("dt", 2, "image_id"), 10**30), r"results\[2\]\.image_id=1000.*out of range"),
    ],
)
def test_fields_of_the_wrong_type_name_the_entry_and_file(tmp_path, edit, message):
    gt, dt = _small()
    edit(gt, dt)
    with pytest.raises(ValueError, match=message) as err:
        coco_evaluate(_gt_file(tmp_path, gt), dt)
    if "gt.json" not in message and "results" not in message:
        assert "gt.json" in str(err.value)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("num_keypoints", "3", r"num_keypoints: expected an integer"),
        ("num_keypoints", -1, r"num_keypoints: expected an integer"),
        ("num_keypoints", 10**30, r"num_keypoints: expected an integer"),
        ("keypoints", "x", r"keypoints: expected 3K numbers"),
        ("keypoints", [1, 2], r"keypoints: expected 3K numbers"),
        ("keypoints", ["1"] * 51, r"keypoints: expected 51 numbers"),
    ],
)
def test_keypoint_fields_of_the_wrong_type(tmp_path, field, value, message):
    gt, dt = make_case(2, "keypoints", n_img=4)
    gt["annotations"][0][field] = value
    with pytest.raises(ValueError, match=rf"gt\.json: annotations\[0\]\.{message}.*\(id 1\)"):
        coco_evaluate(_gt_file(tmp_path, gt), dt, "keypoints")


@pytest.mark.parametrize(
    ("segm", "message"),
    [
        ([[0, 0, 10, 0, 10, 10, 0]], r"segmentation\[0\]: a polygon is a list of x, y pairs"),
        ([[0, 0, 10, "0", 10, 10]], r"segmentation\[0\]: not a finite number: '0'"),
        ([[0, 0, 10, float("inf"), 10, 10]], r"segmentation\[0\]: not a finite number: inf"),
        ("polygon", r"segmentation: expected polygons or an RLE dict"),
        (
            {"size": [10, 10], "counts": [0, 100]},
            r"segmentation: RLE size \[10, 10\] differs from image",
        ),
        (
            {"size": ["h", "w"], "counts": [0, 100]},
            r"segmentation: RLE size must be \[height, width\]",
        ),
        ({"size": None, "counts": [0, 5]}, r"segmentation: an RLE needs 'counts' and 'size'"),
        ("rle-overrun", r"segmentation: RLE counts add up to"),
        ({"counts": 5}, r"segmentation: an RLE needs"),
    ],
)
def test_segmentations_of_the_wrong_shape(tmp_path, segm, message):
    gt, dt = make_case(4, "segm", n_img=4, crowd=0.0)
    img = {i["id"]: i for i in gt["images"]}[gt["annotations"][0]["image_id"]]
    if segm == "rle-overrun":  # would make pycocotools' decoder write past the mask
        h, w = img["height"], img["width"]
        segm = {"size": [h, w], "counts": [0, h * w + 7]}
    gt["annotations"][0]["segmentation"] = segm
    with pytest.raises(ValueError, match=rf"gt\.json: annotations\[0\] \(id 1\)\.{message}"):
        coco_evaluate(_gt_file(tmp_path, gt), dt, "segm")


@pytest.mark.parametrize("key", ["height", "width"])
@pytest.mark.parametrize("value", ["100", 0, -4, 10**12, 12.5, True])
def test_segm_image_sizes_are_positive_integers(tmp_path, key, value):
    gt, dt = make_case(4, "segm", n_img=4)
    gt["images"][2][key] = value
    with pytest.raises(ValueError, match=rf"gt\.json: images\[2\]\.{key}: expected an integer"):
        coco_evaluate(_gt_file(tmp_path, gt), dt, "segm")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[" * 200_000 + "]" * 200_000, "nested too deeply"),
        ("", "is empty"),
        ("  \n", "is empty"),
        ('{"image_id": 1}', "expected a list of result objects"),
        ("{}", "expected a list of result objects"),
        ('"results"', "expected a list of result objects"),
        ("[" + "1" * 5000 + "]", "not valid JSON"),
        ('[{"score": NaN}', "not valid JSON"),
        (b'[{"image_id": "\xe9"}]', "not UTF-8"),
    ],
)
def test_bad_results_files_name_the_file(tmp_path, text, message):
    gt, _ = _small()
    path = tmp_path / "dt.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError, match=message) as err:
        coco_evaluate(gt, path)
    assert "dt.json" in str(err.value)


# ----------------------------------------------------------------------------- per-class AP


@pytest.mark.parametrize(
    ("area_rng", "labels"),
    [
        (
            [[0, 32**2], [32**2, 96**2], [0, 1e10], [96**2, 1e10]],
            ["small", "medium", "all", "large"],
        ),
        ([[96**2, 1e10], [0, 1e10]], ["large", "all"]),
    ],
)
def test_per_class_ap_uses_the_range_labelled_all(area_rng, labels):
    gt, dt = make_case(5, "bbox")
    ev, printed = oracle(gt, dt, "bbox", areaRng=area_rng, areaRngLbl=labels)
    ours = coco_evaluate(gt, dt, "bbox", area_rng=area_rng, area_rng_lbl=labels)
    assert_same(ours, ev, printed)
    a = labels.index("all")
    assert ours.per_class_area == "all" and ours.per_class_area_index == a
    default = coco_evaluate(gt, dt, "bbox").per_class
    for k, (name, ap) in enumerate(ours.per_class.items()):
        s = ev.eval["precision"][:, :, k, a, -1]
        assert ap == (float(np.mean(s[s > -1])) if (s > -1).any() else -1.0)
        assert ap == default[name]


def test_per_class_ap_without_an_all_label_uses_the_widest_range():
    gt, dt = make_case(5, "bbox")
    ours = coco_evaluate(
        gt, dt, "bbox", area_rng=[[32**2, 1e10], [0, 1e10]], area_rng_lbl=["big", "any"]
    )
    assert ours.per_class_area == "any"
    assert ours.per_class == coco_evaluate(gt, dt, "bbox").per_class


def test_a_bad_area_is_named_by_its_entry_when_others_lack_one(tmp_path):
    gt, dt = make_case(5, "bbox", n_img=4)
    del gt["annotations"][0]["area"]
    gt["annotations"][1]["area"] = "x"
    ann_id = gt["annotations"][1]["id"]
    with pytest.raises(
        ValueError, match=rf"annotations\[1\]\.area: not a number: 'x' \(id {ann_id}\)"
    ):
        coco_evaluate(_gt_file(tmp_path, gt), dt, "bbox")
