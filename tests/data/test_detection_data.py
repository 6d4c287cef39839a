"""Detection data (cnnkit.data.detection and its sources) on tiny hand-written data sets:
COCO JSON and VOC XML parsing, every validation rule's error, skip_invalid, the joint flips
against np.flip, image modes, unreadable images and the COCO ground truth round trip."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from cnnkit.data.detection import (
    DetectionDataset,
    detection_collate,
    detection_loader,
    keypoint_flip_map,
    load_detection,
)
from cnnkit.data.streaming import EvalBatchSampler, Invalid, ShardBatchSampler
from cnnkit.data.transforms import hflip_boxes, hflip_keypoints, hflip_masks
from cnnkit.evaluation import coco_evaluate, voc_evaluate

# Category ids with gaps and out of order: labels follow the ids (1 -> 1, 3 -> 2, 7 -> 3).
CATEGORIES = [
    {"id": 7, "name": "seven", "keypoints": ["top", "left", "right"], "skeleton": [[1, 2]]},
    {"id": 1, "name": "one", "keypoints": ["top", "left", "right"], "skeleton": []},
    {"id": 3, "name": "three", "keypoints": ["top", "left", "right"], "skeleton": [[2, 3]]},
]


def _write_image(path, width, height, mode="RGB", seed=0):
    width, height = max(1, int(width)), max(1, int(height))  # also for malformed entries
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode).save(
        path
    )


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _train_json():
    """Two annotated images, an image with only a crowd region and an image without any."""
    square = np.zeros((8, 10), dtype=np.uint8)
    square[2:5, 3:7] = 1
    images = [
        {"id": 11, "file_name": "a.png", "width": 10, "height": 8},
        {"id": 12, "file_name": "b.png", "width": 12, "height": 6},
        {"id": 13, "file_name": "crowd.png", "width": 10, "height": 8},
        {"id": 14, "file_name": "empty.png", "width": 10, "height": 8},
    ]
    anns = [
        # Listed out of image order: the reader groups them by image, file order inside.
        {"id": 42, "image_id": 11, "category_id": 3, "bbox": [1, 2, 3, 4], "area": 12,
         "iscrowd": 0, "segmentation": [[1, 2, 4, 2, 4, 6, 1, 6]],
         "keypoints": [2, 2, 2, 1, 4, 1, 4, 4, 2], "num_keypoints": 3},
        {"id": 43, "image_id": 12, "category_id": 1, "bbox": [0, 0, 12, 6], "area": 72,
         "iscrowd": 0, "segmentation": [[0, 0, 12, 0, 12, 6, 0, 6]],
         "keypoints": [6, 0, 2, 0, 3, 2, 0, 0, 0], "num_keypoints": 2},
        {"id": 44, "image_id": 11, "category_id": 7, "bbox": [3, 2, 4, 3], "area": 12,
         "iscrowd": 0, "segmentation": _rle(square),
         "keypoints": [5, 2, 2, 3, 3, 2, 6, 3, 1], "num_keypoints": 3},
        {"id": 45, "image_id": 13, "category_id": 1, "bbox": [0, 0, 5, 5], "area": 25,
         "iscrowd": 1, "segmentation": {"size": [8, 10], "counts": [0, 5, 3, 5, 67]},
         "keypoints": [0] * 9, "num_keypoints": 0},
    ]  # fmt: skip
    return {"images": images, "annotations": anns, "categories": copy.deepcopy(CATEGORIES)}


def _val_json():
    images = [{"id": 21, "file_name": "c.png", "width": 9, "height": 7}]
    anns = [
        {"id": 51, "image_id": 21, "category_id": 7, "bbox": [2, 1, 5, 4], "area": 20,
         "iscrowd": 0, "segmentation": [[2, 1, 7, 1, 7, 5, 2, 5]],
         "keypoints": [4, 1, 2, 2, 3, 2, 7, 3, 2], "num_keypoints": 3},
    ]  # fmt: skip
    return {"images": images, "annotations": anns, "categories": copy.deepcopy(CATEGORIES)}


def write_coco(root, train=None, val=None, *, official=False, skip_files=()):
    """A COCO data set in the scenes layout (or the official 2017 names) under ``root``."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, data in (("train", train or _train_json()), ("val", val or _val_json())):
        name = f"{split}2017" if official else split
        (root / name).mkdir(exist_ok=True)
        for k, image in enumerate(data["images"]):
            if image["file_name"] not in skip_files:
                _write_image(
                    root / name / image["file_name"], image["width"], image["height"], seed=k
                )
        with open(root / "annotations" / f"instances_{name}.json", "w") as fh:
            json.dump(data, fh)
    return root


# ----------------------------------------------------------------------------- COCO


@pytest.mark.parametrize("official", [False, True])
def test_coco_parse_boxes_labels_crowd_and_layouts(tmp_path, official):
    data = load_detection(f"coco:{write_coco(tmp_path, official=official)}")
    assert data.kind == "coco" and data.num_classes == 3
    assert data.label_to_category == [-1, 1, 3, 7]
    assert data.category_names == ["__background__", "one", "three", "seven"]
    train = data.train
    assert train.image_ids.tolist() == [11, 12, 13, 14]
    assert train.ann_start.tolist() == [0, 2, 3, 4, 4]  # grouped by image, file order inside
    assert train.ann_ids.tolist() == [42, 44, 43, 45]
    assert train.labels.tolist() == [2, 3, 1, 1]
    assert train.iscrowd.tolist() == [False, False, False, True]
    record = train.record(0)
    assert record.path.endswith("a.png") and (record.width, record.height) == (10, 8)
    np.testing.assert_array_equal(record.boxes, [[1, 2, 4, 6], [3, 2, 7, 5]])  # xywh -> xyxy
    # Evaluation serves every image; training only those with a non-crowd box.
    assert len(DetectionDataset(train, train=False, seed=0)) == 4
    ds = DetectionDataset(train, train=True, seed=0)
    assert ds.indices.tolist() == [0, 1]
    image, target = DetectionDataset(train, train=False, seed=0)[(0, 2)]
    assert image.shape == (3, 8, 10) and target["image_id"] == 13
    assert target["iscrowd"].tolist() == [True] and target["labels"].dtype == torch.int64
    assert data.flip_map == [0, 2, 1]  # top stays; left <-> right


def test_boxes_within_one_pixel_are_clipped(tmp_path):
    train = _train_json()
    train["annotations"][0]["bbox"] = [-0.75, 2, 11.5, 6.9]  # x2 = 10.75, y2 = 8.9 on 10 x 8
    data = load_detection(f"coco:{write_coco(tmp_path, train)}")
    np.testing.assert_allclose(data.train.record(0).boxes[0], [0, 2, 10, 8])
    assert data.train.coco_gt()["annotations"][0]["bbox"] == [-0.75, 2, 11.5, 6.9]  # as given


BAD_ANNOTATIONS = [
    ("bbox", [8, 0, 5, 5], "lies outside the 10 x 8 image"),
    ("bbox", [-1.5, 0, 5, 5], "lies outside the 10 x 8 image"),
    ("bbox", [1, 1, 0, 3], "non-positive size 0 x 3"),
    ("bbox", [1, 2, 3], "bbox must be 4 finite numbers"),
    ("bbox", [1, 2, "3", 4], "bbox must be 4 finite numbers"),
    ("category_id", 99, "category_id 99 is not a category of the file"),
    ("image_id", 77, "image_id 77 is not an image of the file"),
    ("iscrowd", 2, "iscrowd must be 0 or 1"),
    ("area", -3, "area must be a finite number >= 0"),
    ("segmentation", [[1, 1, 2, 2, 3]], r"segmentation\[0\]: a polygon is a list of at least 3"),
    ("segmentation", [[1, 1, 2, 2]], r"segmentation\[0\]: a polygon is a list of at least 3"),
    ("segmentation", [[1, 1, 2, "x", 3, 3]], r"segmentation\[0\]: 'x' is not a finite number"),
    ("segmentation", [], "segmentation must be polygons or an RLE dict"),
    ("segmentation", {"size": [5, 5], "counts": "abc"}, r"RLE size \[5, 5\] differs"),
    ("segmentation", {"size": [8, 10], "counts": [3, 4]}, "RLE counts cover 7 pixels"),
    ("keypoints", [1, 2, 2, 3, 4], "keypoints must be 3 x 3 numbers"),
    ("keypoints", [1, 2, 3, 3, 4, 2, 5, 5, 2], "visibility must be 0, 1 or 2, got 3"),
    ("keypoints", [1, 2, 2, 3, None, 2, 5, 5, 2], "None is not a finite number"),
]


@pytest.mark.parametrize(("field", "value", "message"), BAD_ANNOTATIONS)
def test_each_invalid_annotation_is_an_error_naming_id_and_file(tmp_path, field, value, message):
    train = _train_json()
    train["annotations"][0][field] = value  # annotation id 42, on a.png
    root = write_coco(tmp_path, train)
    with pytest.raises(ValueError, match=message) as err:
        load_detection(f"coco:{root}")
    text = str(err.value)
    assert "instances_train.json: annotation id 42" in text
    if field != "image_id":
        assert str(root / "train" / "a.png") in text


def test_missing_image_file_is_an_error_naming_it(tmp_path):
    root = write_coco(tmp_path, skip_files=("b.png",))
    with pytest.raises(ValueError, match=r"image id 12: image file .*b\.png not found"):
        load_detection(f"coco:{root}")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["annotations"].append(dict(d["annotations"][0])), "annotation id 42 repeats"),
        (lambda d: d["images"].append(dict(d["images"][0])), "image id 11 appears more than once"),
        (lambda d: d["images"][0].update(width=0), "image id 11: 'width' must be a positive"),
        (lambda d: d["categories"][0].update(keypoint_sigmas=[1]), "must be 3 positive numbers"),
    ],
)
def test_malformed_file_entries(tmp_path, edit, message):
    train = _train_json()
    edit(train)
    with pytest.raises(ValueError, match=message):
        load_detection(f"coco:{write_coco(tmp_path, train)}")


def test_skip_invalid_drops_and_counts(tmp_path):
    train = _train_json()
    anns = train["annotations"]
    extra = [
        {**anns[0], "id": 60, "bbox": [50, 0, 5, 5]},
        {**anns[0], "id": 61, "bbox": [60, 0, 5, 5]},
        {**anns[0], "id": 62, "category_id": 99},
        {**anns[0], "id": 63, "keypoints": [1, 1, 5] * 3},
        {**anns[0], "id": 64, "segmentation": [[1, 2, 3]]},
    ]
    train["annotations"] = anns + extra
    root = write_coco(tmp_path, train, skip_files=("b.png",))  # b.png holds annotation 43
    data = load_detection(f"coco:{root}", skip_invalid=True)
    assert data.skipped_by_reason == {
        "train: images": 1,
        "train: annotations of dropped images": 1,
        "train: bbox": 2,
        "train: category": 1,
        "train: keypoints": 1,
        "train: segmentation": 1,
    }
    assert data.skipped == 7
    assert data.train.image_ids.tolist() == [11, 13, 14]
    assert data.train.ann_ids.tolist() == [42, 44, 45]
    gt = data.train.coco_gt()
    assert [a["id"] for a in gt["annotations"]] == [42, 44, 45]
    assert [im["id"] for im in gt["images"]] == [11, 13, 14]


def test_specs(tmp_path, monkeypatch):
    root = write_coco(tmp_path / "scenes")
    import cnnkit.data.scenes as scenes

    seeds = []
    monkeypatch.setattr(scenes, "scenes_root", lambda seed=0: seeds.append(seed) or root)
    assert load_detection("scenes:5").kind == "scenes" and seeds == [5]
    assert load_detection("scenes").train.num_annotations == 4 and seeds == [5, 0]
    for bad, message in [
        ("bogus", "expected scenes"),
        ("coco:", "expected scenes"),
        (f"coco:{tmp_path / 'nope'}", "no such folder"),
        (f"coco:{tmp_path}", "no annotations/instances_train2017.json"),
        ("scenes:x", "seed must be an integer"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_detection(bad)


# ----------------------------------------------------------------------------- VOC


def _voc_xml(filename, size, objects):
    body = "".join(
        f"<object><name>{name}</name><difficult>{diff}</difficult><bndbox><xmin>{b[0]}</xmin>"
        f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for name, diff, b in objects
    )
    size_xml = (
        ""
        if size is None
        else f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>"
    )
    return f"<annotation><filename>{filename}</filename>{size_xml}{body}</annotation>"


def write_voc(root, images, sets):
    """A VOC year folder: ``images`` {name: (size, [(class, difficult, xyxy 1-based)])}."""
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for k, (name, (size, objects)) in enumerate(images.items()):
        w, h = size or (16, 12)
        _write_image(root / "JPEGImages" / f"{name}.jpg", w, h, seed=k)
        (root / "Annotations" / f"{name}.xml").write_text(_voc_xml(f"{name}.jpg", size, objects))
    for set_name, names in sets.items():
        (root / "ImageSets" / "Main" / f"{set_name}.txt").write_text("\n".join(names) + "\n")
    return root


VOC_IMAGES = {
    "000005": ((16, 12), [("chair", 0, (1, 2, 5, 6)), ("person", 1, (3, 3, 16, 12))]),
    "000007": ((16, 12), [("car", 0, (2, 2, 9, 9))]),
    "2008_000123": (None, [("person", 1, (1, 1, 4, 4))]),  # no <size>: read from the image
}


def test_voc_parse_difficult_kept_splits_and_ids(tmp_path):
    root = write_voc(tmp_path, VOC_IMAGES, {"train": ["000005", "2008_000123"], "test": ["000007"]})
    data = load_detection(f"voc:{root}")  # no val.txt: the val split is test
    assert data.kind == "voc" and data.num_classes == 20
    assert data.category_names[1] == "aeroplane" and data.category_names[20] == "tvmonitor"
    train, val = data.train, data.val
    assert train.image_ids.tolist() == [5, 2008000123] and val.image_ids.tolist() == [7]
    assert (train.widths.tolist(), train.heights.tolist()) == ([16, 16], [12, 12])
    chair, person, car = (data.category_names.index(n) for n in ("chair", "person", "car"))
    assert train.labels.tolist() == [chair, person, person] and val.labels.tolist() == [car]
    assert train.difficult.tolist() == [False, True, True]
    assert train.ann_ids.tolist() == [1, 2, 3] and val.ann_ids.tolist() == [4]
    # 1-based inclusive pixels -> continuous: xmin 1 .. xmax 5 is x from 0 to 5.
    np.testing.assert_array_equal(train.record(0).boxes, [[0, 1, 5, 6], [2, 2, 16, 12]])
    gt = train.coco_gt()
    assert [a["difficult"] for a in gt["annotations"]] == [0, 1, 1]
    assert gt["images"][0]["voc_id"] == "000005"
    # Training leaves difficult objects out, and so the image with only a difficult one.
    ds = DetectionDataset(train, train=True, seed=0)
    assert ds.indices.tolist() == [0]
    assert DetectionDataset(train, train=False, seed=0)[(0, 0)][1]["labels"].tolist() == [
        chair,
        person,
    ]
    dets = [{**a, "score": 1.0} for a in gt["annotations"]]
    assert voc_evaluate(gt, dets).map == 1.0


def test_voc_custom_names_sorted_and_explicit_sets(tmp_path):
    images = {
        "a": ((16, 12), [("zebra", 0, (1, 1, 4, 4))]),
        "b": ((16, 12), [("ant", 0, (1, 1, 4, 4)), ("moth", 0, (2, 2, 5, 5))]),
    }
    root = write_voc(tmp_path, images, {"trainval": ["a", "b"], "test": ["b"]})
    data = load_detection(f"voc:{root}", voc_sets=("trainval", "test"))
    assert data.category_names == ["__background__", "ant", "moth", "zebra"]
    assert data.train.image_ids.tolist() == [1, 2]  # names not digits: 1..N, sorted
    with pytest.raises(ValueError, match="no image set .*train.txt"):
        load_detection(f"voc:{root}")


def test_voc_errors_name_the_file_and_object(tmp_path):
    images = {
        "000001": ((16, 12), [("cat", 0, (1, 1, 4, 4)), ("dog", 0, (3, 3, 20, 9))]),
        "000002": ((16, 12), [("cat", 2, (1, 1, 4, 4))]),
        "000003": ((16, 12), [("cat", 0, (1, 1, 4, 4))]),
    }
    root = write_voc(tmp_path, images, {"train": list(images) + ["000009"], "val": ["000003"]})
    with pytest.raises(ValueError, match=r"000009: no annotation file"):
        load_detection(f"voc:{root}")
    (root / "ImageSets/Main/train.txt").write_text("000001\n000002\n")
    with pytest.raises(ValueError) as err:
        load_detection(f"voc:{root}")
    assert "000002.xml: object 0 ('cat', annotation id 3)" in str(err.value)
    assert "<difficult> must be 0 or 1" in str(err.value)
    data = load_detection(f"voc:{root}", skip_invalid=True)
    assert data.skipped_by_reason == {"train: difficult": 1, "train: bbox": 1}
    (root / "Annotations/000002.xml").write_text("<annotation><object>")
    with pytest.raises(ValueError, match=r"000002.xml: not valid XML"):
        load_detection(f"voc:{root}")
    with pytest.raises(ValueError, match="not a VOC year folder"):
        load_detection(f"voc:{tmp_path / 'Annotations'}")


# ----------------------------------------------------------------------------- flips


def _mask_box(mask: np.ndarray) -> np.ndarray:
    """xyxy of a mask's pixels in continuous coordinates (pixel c covers [c, c + 1))."""
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)


def test_hflip_boxes_and_masks_match_np_flip():
    rng = np.random.default_rng(0)
    masks = np.zeros((20, 7, 11), dtype=np.uint8)
    for m in masks:
        x0, y0 = rng.integers(0, 11), rng.integers(0, 7)
        m[y0 : y0 + rng.integers(1, 5), x0 : x0 + rng.integers(1, 6)] = 1
    boxes = torch.from_numpy(np.stack([_mask_box(m) for m in masks]))
    flipped = np.flip(masks, axis=2)
    expected = np.stack([_mask_box(m) for m in flipped])
    np.testing.assert_array_equal(hflip_boxes(boxes, 11).numpy(), expected)
    np.testing.assert_array_equal(hflip_masks(torch.from_numpy(masks)).numpy(), flipped)


def test_flip_map_from_names():
    names = ["nose", "left_eye", "right_eye", "Left_Hand", "Right_Hand", "left", "top", "right"]
    assert keypoint_flip_map(names) == [0, 2, 1, 4, 3, 7, 6, 5]
    assert keypoint_flip_map(["top", "bottom", "left", "right"]) == [0, 1, 3, 2]
    assert keypoint_flip_map(["left_knee", "nose"]) == [0, 1]  # no partner: stays


def test_hflip_keypoints_move_with_the_pixels_and_swap_sides():
    names = ["nose", "left_eye", "right_eye"]
    width, height = 9, 5
    points = np.array([[4, 1], [6, 2], [2, 2]])  # pixel (column, row) of each keypoint
    planes = np.zeros((3, height, width), dtype=np.uint8)
    for k, (c, r) in enumerate(points):
        planes[k, r, c] = 1
    kps = torch.tensor([[[c + 0.5, r + 0.5, 2.0] for c, r in points]])
    kps[0, 0, 2] = 0  # an unlabelled point keeps its coordinates
    out = hflip_keypoints(kps, width, keypoint_flip_map(names))[0]
    mirrored = np.flip(planes, axis=2)
    # After the flip the slot "left_eye" holds where the right eye's pixel went, and so on.
    for slot, source in ((1, 2), (2, 1)):
        r, c = np.argwhere(mirrored[source])[0]
        assert out[slot].tolist() == [c + 0.5, r + 0.5, 2.0]
    assert out[0].tolist() == [4.5, 1.5, 0.0]


def _flip_dataset(tmp_path, seed=0):
    data = load_detection(f"coco:{write_coco(tmp_path)}")
    train = DetectionDataset(
        data.train, train=True, seed=seed, with_masks=True, with_keypoints=True
    )
    plain = DetectionDataset(
        data.train, train=False, seed=seed, with_masks=True, with_keypoints=True
    )
    return train, plain


def test_dataset_flips_image_and_target_together(tmp_path):
    train, plain = _flip_dataset(tmp_path)
    seen = set()
    for epoch in range(12):
        image, target = train[(epoch, 0)]
        ref_image, ref = plain[(0, 0)]  # image 0 of the training set is image 0 of the split
        flipped = torch.equal(image, ref_image.flip(-1))
        assert flipped or torch.equal(image, ref_image)
        seen.add(flipped)
        masks = target["masks"].numpy()
        want = np.flip(ref["masks"].numpy(), axis=2) if flipped else ref["masks"].numpy()
        np.testing.assert_array_equal(masks, want)
        # Each box still frames its mask (both annotations' masks fill their boxes).
        np.testing.assert_array_equal(
            target["boxes"].numpy(), np.stack([_mask_box(m) for m in masks])
        )
        kps = target["keypoints"].numpy()
        if flipped:  # top stays, left and right swap, x -> 10 - x
            r = ref["keypoints"].numpy()[:, [0, 2, 1]]
            np.testing.assert_array_equal(
                kps[..., 0], np.where(r[..., 2] > 0, 10 - r[..., 0], r[..., 0])
            )
            np.testing.assert_array_equal(kps[..., 1:], r[..., 1:])
        else:
            np.testing.assert_array_equal(kps, ref["keypoints"].numpy())
    assert seen == {True, False}


def test_flip_is_a_function_of_seed_epoch_index(tmp_path):
    train, plain = _flip_dataset(tmp_path)
    again = DetectionDataset(train.split, train=True, seed=0)

    def flips(ds, keys):
        return [not torch.equal(ds[k][0], plain[(0, k[1])][0]) for k in keys]

    keys = [(e, i) for e in range(30) for i in range(2)]
    first = flips(train, keys)
    assert first == flips(again, keys) == flips(train, keys)  # same keys, same flips
    assert 0.3 < np.mean(first) < 0.7
    other = DetectionDataset(train.split, train=True, seed=1)
    assert flips(other, keys) != first


# ----------------------------------------------------------------------------- decoding


def _one_image_set(tmp_path, image: Image.Image, width=None, height=None):
    """A COCO set whose val split is one image file (saved as PNG)."""
    val = _val_json()
    w, h = image.size
    val["images"][0].update(width=width or w, height=height or h, file_name="odd.png")
    val["annotations"][0]["bbox"] = [0, 0, 1, 1]
    del val["annotations"][0]["segmentation"]
    root = write_coco(tmp_path, val=val, skip_files=("odd.png",))
    image.save(root / "val" / "odd.png")
    return DetectionDataset(load_detection(f"coco:{root}").val, train=False, seed=0)


@pytest.mark.parametrize(
    ("mode", "pixels", "rgb"),
    [
        ("L", [7, 200], [(7, 7, 7), (200, 200, 200)]),
        ("RGBA", [(1, 2, 3, 0), (250, 5, 9, 255)], [(1, 2, 3), (250, 5, 9)]),
        ("P", [0, 1], [(10, 20, 30), (200, 100, 50)]),
        ("I;16", [257, 65535], [(1, 1, 1), (255, 255, 255)]),
    ],
)
def test_odd_modes_decode_to_rgb_uint8(tmp_path, mode, pixels, rgb):
    if mode == "I;16":
        im = Image.frombytes(mode, (2, 1), np.array(pixels, dtype="<u2").tobytes())
    else:
        im = Image.new(mode, (2, 1))
        if mode == "P":
            im.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
        im.putdata(pixels)
    image, _ = _one_image_set(tmp_path, im)[(0, 0)]
    assert image.dtype == torch.uint8 and image.shape == (3, 1, 2)
    assert image[:, 0].T.tolist() == [list(p) for p in rgb]


def test_corrupt_or_wrong_size_image_is_invalid_and_collate_reports_it(tmp_path):
    ds = _one_image_set(tmp_path, Image.new("RGB", (9, 7)), width=9, height=8)
    bad = ds[(0, 0)]
    assert (
        isinstance(bad, Invalid)
        and "decoded size 9 x 7 differs from the annotation's 9 x 8" in bad.reason
    )
    path = ds.split.path(0)
    with open(path, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n garbage")
    bad = ds[(0, 0)]
    assert isinstance(bad, Invalid) and bad.path == path
    batch = detection_collate([bad])
    assert batch.images == [] and batch.invalid == [f"{path}: {bad.reason}"]


def test_loader_batches(tmp_path):
    train, plain = _flip_dataset(tmp_path)
    sampler = ShardBatchSampler(len(train), 2, seed=0)
    batches = list(detection_loader(train, sampler, workers=0, pin_memory=False))
    assert len(batches) == 1 and len(batches[0]) == 2 and batches[0].invalid == []
    assert sorted(t["image_id"] for t in batches[0].targets) == [11, 12]
    loader = detection_loader(plain, EvalBatchSampler(len(plain), 3), workers=0, pin_memory=False)
    assert [len(b) for b in loader] == [3, 1]


# ----------------------------------------------------------------------------- ground truth


@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
def test_coco_gt_round_trip_evaluates_to_ap_one(tmp_path):
    data = load_detection(f"coco:{write_coco(tmp_path)}")
    gt = data.train.coco_gt()
    original = _train_json()
    by_id = {a["id"]: a for a in original["annotations"]}
    for ann in gt["annotations"]:
        src = by_id[ann["id"]]
        assert ann["category_id"] == src["category_id"] and ann["bbox"] == src["bbox"]
        assert ann["keypoints"] == src["keypoints"] and ann["num_keypoints"] == src["num_keypoints"]
        if isinstance(src["segmentation"], list) or isinstance(src["segmentation"]["counts"], str):
            assert ann["segmentation"] == src["segmentation"]
    crowd = next(a for a in gt["annotations"] if a["iscrowd"])  # uncompressed RLE, compressed
    np.testing.assert_array_equal(
        mask_utils.decode(
            {**crowd["segmentation"], "counts": crowd["segmentation"]["counts"].encode()}
        ),
        mask_utils.decode(mask_utils.frPyObjects(by_id[45]["segmentation"], 8, 10)),
    )
    assert [c["keypoints"] for c in gt["categories"]] == [["top", "left", "right"]] * 3
    dets = [{**copy.deepcopy(a), "score": 1.0} for a in gt["annotations"] if not a["iscrowd"]]
    for iou_type in ("bbox", "segm", "keypoints"):
        sigmas = {"kpt_oks_sigmas": [0.1] * 3} if iou_type == "keypoints" else {}
        stats = coco_evaluate(gt, dets, iou_type, **sigmas).stats
        assert stats[0] == pytest.approx(1.0), iou_type
    # The masks the data set decodes are those of the ground truth.
    _, target = DetectionDataset(data.train, train=False, seed=0, with_masks=True)[(0, 0)]
    want = mask_utils.decode(mask_utils.frPyObjects(gt["annotations"][0]["segmentation"], 8, 10))
    np.testing.assert_array_equal(target["masks"][0].numpy(), want[..., 0])


def test_split_holds_flat_arrays(tmp_path):
    """No per-annotation Python objects: the split is numpy arrays (shared by workers)."""
    split = load_detection(f"coco:{write_coco(tmp_path)}").train
    for name, value in vars(split).items():
        assert not isinstance(value, (list, dict)) or name == "skipped", name
    assert split.nbytes < 4096


# ----------------------------------------------------------------------------- hostile input

# Values a hostile (or careless) file holds: each was accepted silently (a boolean taken for a
# number, a compressed RLE that pycocotools decodes into uninitialized memory, a keypoint that
# float32 turns into inf) or raised a traceback (OverflowError) before.
HOSTILE_ANNOTATIONS = [
    ("bbox", [True, 1, 2, 2], "bbox must be 4 finite numbers"),
    ("bbox", [1, 2, 10**400, 4], "bbox must be 4 finite numbers"),
    ("area", 10**400, "area must be a finite number >= 0"),
    ("segmentation", [[1, 2, 4, 2, 4, 10**400]], r"segmentation\[0\]: 1000.*\.\.\. is not a"),
    # pycocotools took ~30 s to rasterize this one, and crashed (SIGSEGV) at 4e8.
    ("segmentation", [[0, 0, 1e8, 0, 1e8, 1e8]], r"segmentation\[0\]: a point lies far outside"),
    ("segmentation", {"size": [8, 10], "counts": "!!!!"}, "'!' is not a character"),
    ("segmentation", {"size": [8, 10], "counts": "0"}, "compressed RLE counts cover 0 pixels"),
    ("segmentation", {"size": [8, 10], "counts": ""}, "compressed RLE counts cover 0 pixels"),
    ("segmentation", {"size": [8, 10], "counts": "ob"}, "in the middle of a run"),
    ("keypoints", [1, 2, 2, 3, 10**400, 2, 5, 5, 2], "keypoints: 1000.* is not a finite number"),
    ("keypoints", [1, 2, 2, 3, 1e39, 2, 5, 5, 2], "1e\\+39 is beyond float32's range"),
]


@pytest.mark.parametrize(("field", "value", "message"), HOSTILE_ANNOTATIONS)
def test_hostile_annotation_values_are_errors_naming_id_and_file(tmp_path, field, value, message):
    train = _train_json()
    train["annotations"][0][field] = value  # annotation id 42, on a.png
    root = write_coco(tmp_path, train)
    with pytest.raises(ValueError, match=message) as err:
        load_detection(f"coco:{root}")
    assert "instances_train.json: annotation id 42" in str(err.value)
    assert len(str(err.value)) < 400  # a 400-digit number is shortened
    assert load_detection(f"coco:{root}", skip_invalid=True).train.ann_ids.tolist() == [44, 43, 45]


def test_compressed_rle_check_agrees_with_pycocotools():
    from cnnkit.data.annotation_checks import segmentation_problem

    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        rle = _rle(rng.random((h, w)) < rng.random())  # long runs and short ones
        assert segmentation_problem(rle, h, w) is None
        # The same string claimed for a wider image: its runs fall short.
        assert "cover" in segmentation_problem({**rle, "size": [h, w + 1]}, h, w + 1)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["categories"][0].update(id=10**30), r"categories\[0\] needs an integer 'id'"),
        (lambda d: d["categories"][0].update(name=None), "category id 7: 'name' must be a string"),
        (lambda d: d["categories"][0].update(name="one"), "name 'one' belongs to more than one"),
        (lambda d: d["images"][0].update(width=2**40), "image id 11: 'width' must be a positive"),
        (lambda d: d["images"][0].update(height=10**30), "image id 11: 'height' must be a posit"),
    ],
)
def test_hostile_file_entries(tmp_path, edit, message):
    """A category id beyond int64 or two categories of one name made coco_gt raise
    OverflowError / evaluation.json mix two classes up; a width beyond int64 raised
    OverflowError (with --skip-invalid) when the split's arrays were built."""
    root = write_coco(tmp_path)
    for split, data in (("train", _train_json()), ("val", _val_json())):
        edit(data)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        load_detection(f"coco:{root}")


def test_huge_image_size_is_dropped_with_skip_invalid(tmp_path):
    root = write_coco(tmp_path)
    train = _train_json()
    train["images"][1]["width"] = 10**30  # b.png
    (root / "annotations" / "instances_train.json").write_text(json.dumps(train))
    data = load_detection(f"coco:{root}", skip_invalid=True)
    assert data.train.image_ids.tolist() == [11, 13, 14]
    assert data.skipped_by_reason["train: images"] == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"images": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
        ('{"images": [1' + "0" * 5000 + "]}", "integer string conversion"),
    ],
)
def test_unusable_json_is_an_error_naming_the_file(tmp_path, text, message):
    """RecursionError (a traceback) and a ValueError without the file's name before."""
    root = write_coco(tmp_path)
    (root / "annotations" / "instances_train.json").write_text(text)
    with pytest.raises(ValueError, match=f"instances_train.json: not usable JSON: .*{message}"):
        load_detection(f"coco:{root}")


def test_split_without_annotations_evaluates(tmp_path):
    """VOC AP of a split without ground truth raised IndexError; COCO's is -1, VOC's NaN."""
    val = _val_json()
    val["annotations"] = []
    data = load_detection(f"coco:{write_coco(tmp_path, val=val)}")
    gt = data.val.coco_gt()
    dets = [{"image_id": 21, "category_id": 7, "bbox": [1, 1, 3, 3], "score": 0.9}]
    assert np.isnan(voc_evaluate(gt, dets).map)
    assert coco_evaluate(gt, dets, "bbox").stats[0] == -1


def _voc_set(tmp_path):
    images = {"000001": ((16, 12), [("cat", 0, (1, 1, 4, 4))]), "000002": VOC_IMAGES["000007"]}
    return write_voc(tmp_path, images, {"train": ["000001"], "val": ["000002"]})


def test_voc_hostile_files(tmp_path):
    root = _voc_set(tmp_path)
    xml = root / "Annotations" / "000001.xml"
    good = xml.read_text()
    # A <size> no image has (int64 overflow before) is read from the image's header instead.
    xml.write_text(good.replace("<width>16</width>", "<width>1e30</width>"))
    assert load_detection(f"voc:{root}").train.widths.tolist() == [16]
    # Entity declarations (billion laughs) are refused whatever expat does with them.
    laughs = '<!DOCTYPE a [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]>'
    xml.write_text(laughs + good.replace("<name>cat</name>", "<name>&b;</name>"))
    with pytest.raises(ValueError, match=r"000001.xml: declares the XML entity 'a'"):
        load_detection(f"voc:{root}")
    data = load_detection(f"voc:{root}", skip_invalid=True)
    assert data.skipped_by_reason == {"train: images": 1} and len(data.train) == 0
    # A <filename> outside JPEGImages/ (when <name>.jpg is missing): a ValueError from
    # Path.relative_to that named neither the XML nor the image.
    image = root / "JPEGImages" / "000001.jpg"
    image.rename(tmp_path / "elsewhere.jpg")
    xml.write_text(good.replace("000001.jpg", str(tmp_path / "elsewhere.jpg")))
    with pytest.raises(ValueError, match=r"000001.xml: image file .*000001.jpg not found"):
        load_detection(f"voc:{root}")
    (tmp_path / "elsewhere.jpg").rename(image)
    xml.write_text(good)
    # Set files: not UTF-8 (a UnicodeDecodeError without the file's name before), an image
    # listed twice (duplicate image ids: evaluation failed after an epoch of training).
    sets = root / "ImageSets" / "Main"
    (sets / "train.txt").write_bytes(b"00000\xff1\n")
    with pytest.raises(ValueError, match=r"train.txt: not UTF-8"):
        load_detection(f"voc:{root}")
    (sets / "val.txt").write_text("000002\n000002\n")
    (sets / "train.txt").write_text("000001\n")
    with pytest.raises(ValueError, match=r"val.txt: image 000002 is listed more than once"):
        load_detection(f"voc:{root}")


def test_voc_size_from_a_decompression_bomb_header(tmp_path, monkeypatch):
    """Image.open's DecompressionBombError is no OSError: it was a traceback."""
    from PIL import Image as PILImage

    root = write_voc(tmp_path, {"000001": (None, [("cat", 0, (1, 1, 4, 4))])}, {"train": ["000001"], "val": ["000001"]})  # fmt: skip
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 10)  # 16 x 12 > 2 x 10: a "bomb"
    with pytest.raises(ValueError, match="no <size>, and the image .* is unreadable: Image size"):
        load_detection(f"voc:{root}")


def _npz(**arrays):
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _npz_declaring_terabytes():
    import io
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (10**11, 4)}
    )
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("1.npy", header.getvalue() + bytes(64))
    return buffer.getvalue()


def _npy():
    import io

    buffer = io.BytesIO()
    np.save(buffer, np.zeros((1, 4)))
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("p.json", '{"1": [["0", 0, 1, 1]]}', r"image 1: expected a list of .* \(numbers\)"),
        ("p.json", '{"1": [[true, 0, 1, 1]]}', r"image 1: expected a list of .* \(numbers\)"),
        ("p.json", '{"1": [[0, 0, 1%s, 1]]}' % ("0" * 400), "image 1: expected a list of"),
        ("p.json", '{"1": [[0, 0, 1e39, 1]]}', "image 1: boxes must be finite"),
        ("p.json", '{"1": [[0, 0, 1, 1]], "01": []}', "image id 1 has two entries"),
        ("p.json", '{" 7": [[0, 0, 1, 1]]}', "key ' 7' is not an image id"),
        ("p.json", '{"%s": []}' % ("9" * 30), "is not an image id"),
        ("p.json", '{"1": ' + "[" * 100_000 + "]" * 100_000 + "}", "not usable JSON"),
        ("p.json", '{"1": [[0, 0, 1%s, 1]]}' % ("0" * 5000), "not usable JSON"),
        ("p.npz", _npz(**{"1": np.ones((1, 4), bool)}), "image 1: expected a list of"),
        ("p.npz", _npz(**{"1": np.zeros((1, 4), complex)}), "image 1: expected a list of"),
        ("p.npz", _npz(**{"1": np.array([object()] * 4)}), "Object arrays cannot be loaded"),
        ("p.npz", b"PK\x03\x04garbage", "not a readable .npz file"),
        ("p.npz", _npy(), r"not a readable .npz file \(one array"),
        ("p.npz", _npz_declaring_terabytes(), "not a readable .npz file"),
    ],
)
def test_hostile_proposal_files_are_one_error_naming_the_file(tmp_path, name, content, message):
    """Strings and booleans were taken for coordinates, " 7" / "01" for image ids 7 / 1 (one
    entry silently replacing another); deep nesting, a corrupt zip, a header declaring
    terabytes (MemoryError) and an .npy were tracebacks or errors without the file's name."""
    from cnnkit.data.proposals import read_proposals

    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        read_proposals(path)
    assert str(path) in str(err.value)


def test_proposals_npz_suffix_in_any_case_and_non_finite_never_written(tmp_path):
    from cnnkit.data.proposals import read_proposals, write_proposals

    path = tmp_path / "p.NPZ"
    path.write_bytes(_npz(**{"3": np.ones((2, 4), np.int16)}))
    assert read_proposals(path)[3].dtype == np.float32
    for out in (tmp_path / "q.npz", tmp_path / "q.json"):
        with pytest.raises(ValueError, match="image 5 are not finite"):
            write_proposals(out, {5: np.array([[0, 0, np.nan, 1]])})
        assert not out.exists()
