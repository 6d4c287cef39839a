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
