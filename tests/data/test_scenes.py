"""Synthetic digit scenes: determinism, COCO validity, overlap limits, CLI, atomic cache."""

from __future__ import annotations

import io
import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from cnnkit.cli.main import main
from cnnkit.data import scenes
from cnnkit.data.scenes import extreme_points, generate_scenes, png_bytes, scenes_root

SMALL = {"images": 20, "val_images": 6, "size": 64}
# pycocotools' decode under numpy 2 (its own code, not ours).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy")


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return generate_scenes(tmp_path_factory.mktemp("scenes") / "set", seed=5, **SMALL)


def _load(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"instances_{split}.json").read_text())


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _iou(a: list[float], b: list[float]) -> float:
    """IoU of two COCO xywh boxes, brute force over pixel edges."""
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


# --------------------------------------------------------------------------- determinism


def test_same_seed_same_files_and_any_worker_count(small, tmp_path, monkeypatch):
    # Two worker processes with chunks of 8 scenes: the same bytes as one process did.
    monkeypatch.setattr(scenes, "_CHUNK", 8)
    again = generate_scenes(tmp_path / "again", seed=5, workers=2, **SMALL)
    assert _files(again) == _files(small)


def test_other_seed_other_scenes_and_splits_differ(small, tmp_path):
    other = generate_scenes(tmp_path / "other", seed=6, **SMALL)
    a, b = _files(small), _files(other)
    assert a.keys() == b.keys()
    assert all(a[name] != b[name] for name in a if name.endswith(".png"))
    assert _load(small, "train")["annotations"] != _load(other, "train")["annotations"]
    # train and val are different streams: the first scenes of each differ.
    assert a["train/000000.png"] != a["val/000000.png"]


# --------------------------------------------------------------------------- COCO validity


@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_layout_and_annotations_are_consistent(small, split):
    coco = _load(small, split)
    count = SMALL["images"] if split == "train" else SMALL["val_images"]
    size = SMALL["size"]
    first = 1 if split == "train" else scenes.SPLIT_ID_STRIDE + 1  # unique across splits
    assert [im["id"] for im in coco["images"]] == list(range(first, first + count))
    for im in coco["images"]:
        assert im["file_name"] == f"{im['id'] - first:06d}.png"
        assert (im["width"], im["height"]) == (size, size)
        with Image.open(small / split / im["file_name"]) as picture:
            assert picture.mode == "RGB" and picture.size == (size, size)
    anns = coco["annotations"]
    assert [a["id"] for a in anns] == list(range(1, len(anns) + 1))
    for a in anns:
        assert isinstance(a["segmentation"]["counts"], str)
        assert a["segmentation"]["size"] == [size, size]
        mask = mask_utils.decode(a["segmentation"])
        rows, cols = np.nonzero(mask)
        # The tight box of the mask, in continuous coordinates (pixel i spans [i, i + 1]).
        x0, y0, x1, y1 = cols.min(), rows.min(), cols.max() + 1, rows.max() + 1
        assert a["bbox"] == [x0, y0, x1 - x0, y1 - y0]
        assert a["bbox"] == mask_utils.toBbox(a["segmentation"]).tolist()
        assert a["area"] == mask.sum() == mask_utils.area(a["segmentation"])
        assert a["iscrowd"] == 0 and a["num_keypoints"] == 4
        assert 1 <= a["category_id"] <= 10
        kp = np.asarray(a["keypoints"]).reshape(4, 3)
        assert (kp[:, 2] == 2).all()
        assert all(mask[y, x] for x, y, _ in kp)  # every keypoint is a digit pixel
        top, bottom, left, right = kp
        assert (top[1], bottom[1], left[0], right[0]) == (y0, y1 - 1, x0, x1 - 1)


def test_categories_name_the_digits_with_keypoints():
    cats = scenes.categories()
    assert [c["id"] for c in cats] == list(range(1, 11))
    assert [c["name"] for c in cats] == [str(d) for d in range(10)]
    for c in cats:
        assert c["keypoints"] == ["top", "bottom", "left", "right"]
        assert c["skeleton"] == [[1, 3], [3, 2], [2, 4], [4, 1]]
        assert len(c["keypoint_sigmas"]) == 4 and all(0 < s < 0.5 for s in c["keypoint_sigmas"])


def test_every_class_appears_and_digit_counts_are_in_range(small):
    coco = _load(small, "train")
    labels = {a["category_id"] for a in coco["annotations"]}
    assert labels == set(range(1, 11))
    per_image = np.bincount([a["image_id"] for a in coco["annotations"]], minlength=21)[1:]
    assert per_image.min() >= 1 and per_image.max() <= scenes.MAX_DIGITS
    assert per_image.mean() > 2  # 1..6 drawn, most placed


def test_grey_and_coloured_scenes(small):
    grey = 0
    for path in sorted((small / "train").glob("*.png")):
        with Image.open(path) as picture:
            rgb = np.asarray(picture)
        grey += bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
    assert 0 < grey < SMALL["images"] / 2  # GREY_SCENES = 0.3 of them, noise included


def test_digits_read_from_the_bundled_file_equal_load_digits(monkeypatch):
    import importlib.util

    from sklearn.datasets import load_digits

    bunch = load_digits()
    images, labels = scenes._bundled_digits()
    np.testing.assert_array_equal(images * 16, bunch.images)
    np.testing.assert_array_equal(labels, bunch.target)
    # Without the file where we look for it, load_digits reads it.
    scenes._bundled_digits.cache_clear()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    try:
        fallback, fallback_labels = scenes._bundled_digits()
    finally:
        scenes._bundled_digits.cache_clear()
    np.testing.assert_array_equal(fallback, images)
    np.testing.assert_array_equal(fallback_labels, labels)
    # The val scenes' digits are held out of the training scenes': 20% of each class.
    train, val = scenes._digit_pool(0), scenes._digit_pool(1)
    assert train.labels.size + val.labels.size == labels.size
    np.testing.assert_allclose(np.bincount(val.labels) / np.bincount(labels), 0.2, atol=0.01)


def test_extreme_points_tie_rule_on_a_hand_made_mask():
    # Row 1 (top) has pixels at columns 1, 2, 4 -> the middle one is column 2;
    # row 4 (bottom) has columns 0 and 3 -> the first of the two middles, column 0;
    # column 0 (left) has rows 2, 3, 4 -> row 3; column 4 (right) has rows 1 and 3 -> row 1.
    mask = np.zeros((6, 6), dtype=bool)
    mask[1, [1, 2, 4]] = True
    mask[2, [0, 2]] = True
    mask[3, [0, 4]] = True
    mask[4, [0, 3]] = True
    assert extreme_points(mask) == [(2, 1), (0, 4), (0, 3), (4, 1)]
    with pytest.raises(ValueError, match="empty"):
        extreme_points(np.zeros((3, 3), dtype=bool))


def test_keypoint_sigmas_are_the_measured_spread_of_the_tied_extreme_pixels(tmp_path):
    # COCO's definition, sigma_i^2 = E[d_i^2 / area], with every mask pixel of the extreme row
    # (column) an equally valid placement of keypoint i, measured on freshly generated scenes.
    root = generate_scenes(tmp_path / "s", images=8, val_images=60, size=128, seed=11)
    data = _load(root, "val")
    total, count = np.zeros(4), 0
    for a in data["annotations"]:
        mask = mask_utils.decode(a["segmentation"]).astype(bool)
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        ties = [
            [(x, rows[0]) for x in np.flatnonzero(mask[rows[0]])],
            [(x, rows[-1]) for x in np.flatnonzero(mask[rows[-1]])],
            [(cols[0], y) for y in np.flatnonzero(mask[:, cols[0]])],
            [(cols[-1], y) for y in np.flatnonzero(mask[:, cols[-1]])],
        ]
        points = np.array(a["keypoints"], float).reshape(4, 3)[:, :2]
        for i, tied in enumerate(ties):
            total[i] += ((np.array(tied, float) - points[i]) ** 2).sum(1).mean() / a["area"]
        count += 1
    assert count > 150
    measured = np.sqrt(total / count)
    written = np.array(data["categories"][0]["keypoint_sigmas"])
    np.testing.assert_allclose(written, scenes.KEYPOINT_SIGMAS)
    # A sample of a few hundred digits: within 30% of the constants (measured on 1,662).
    np.testing.assert_allclose(measured, written, rtol=0.3)


def test_masks_are_the_pixels_drawn_in_the_digit_colour(small):
    # A mask shifted or thresholded wrongly would mix digit and background pixels: the
    # mask's core (the pixels whose 4 neighbours are in it too) has one colour up to noise,
    # and it differs from the ring 2 pixels outside the mask by the digit's contrast.
    coco = _load(small, "val")
    files = {im["id"]: im["file_name"] for im in coco["images"]}
    spread, contrast = [], []
    for a in coco["annotations"]:
        with Image.open(small / "val" / files[a["image_id"]]) as picture:
            luma = np.asarray(picture.convert("L"), dtype=np.float64)
        mask = np.pad(mask_utils.decode(a["segmentation"]).astype(bool), 2)
        luma = np.pad(luma, 2, mode="edge")
        core = mask.copy()
        ring = np.zeros_like(mask)
        for axis in (0, 1):
            for step in (-1, 1):
                core &= np.roll(mask, step, axis)
                ring |= np.roll(mask, 2 * step, axis)
        ring &= ~mask
        if core.sum() < 10:
            continue
        spread.append(np.percentile(luma[core], 90) - np.percentile(luma[core], 10))
        contrast.append(abs(np.median(luma[core]) - np.median(luma[ring])))
    assert len(spread) > 5
    assert np.median(spread) < 25  # noise (sd up to 5% of 255) and the odd clutter
    assert np.median(contrast) > 60  # MIN_CONTRAST 0.35 of 255 = 89 on a plain background


# --------------------------------------------------------------------------- overlap


@pytest.mark.parametrize("split", ["train", "val"])
def test_overlap_limit_boxes_and_disjoint_masks(small, split):
    coco = _load(small, split)
    by_image: dict[int, list[dict]] = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    pairs = 0
    for anns in by_image.values():
        masks = [mask_utils.decode(a["segmentation"]).astype(bool) for a in anns]
        for i in range(len(anns)):
            for j in range(i + 1, len(anns)):
                pairs += 1
                assert _iou(anns[i]["bbox"], anns[j]["bbox"]) <= scenes.MAX_BOX_IOU
                assert not (masks[i] & masks[j]).any()
    assert pairs > 0


def test_smallest_size_places_whole_digits(tmp_path):
    root = generate_scenes(tmp_path / "s", images=8, val_images=1, size=32, seed=1)
    coco = _load(root, "train")
    assert coco["annotations"]
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        assert x >= 0 and y >= 0 and x + w <= 32 and y + h <= 32
        assert h <= scenes._digit_sizes(32)[1]


# --------------------------------------------------------------------------- PNG writer


def test_png_bytes_round_trip_through_pillow():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
    pixels[0, :] = 255  # the Sub filter wraps modulo 256 both ways
    pixels[1, :] = 0
    with Image.open(io.BytesIO(png_bytes(pixels))) as picture:
        assert picture.format == "PNG" and picture.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(picture), pixels)
    with pytest.raises(ValueError, match="uint8"):
        png_bytes(pixels.astype(np.float32))


# --------------------------------------------------------------------------- arguments, CLI


def test_cli_writes_the_coco_layout(tmp_path, capsys):
    out = tmp_path / "deep" / "out"
    argv = ["data", "scenes", str(out), "--images", "3", "--val-images", "2", "--size", "32"]
    assert main([*argv, "--seed", "4"]) == 0
    assert "3 train + 2 val" in capsys.readouterr().out
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert names == [
        "annotations/instances_train.json",
        "annotations/instances_val.json",
        "train/000000.png",
        "train/000001.png",
        "train/000002.png",
        "val/000000.png",
        "val/000001.png",
    ]
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]  # no temporary left
    assert _load(out, "val")["info"]["seed"] == 4


@pytest.mark.parametrize(
    "args, message",
    [
        (["--images", "0"], "--images 0: must be at least 1"),
        (["--val-images", "0"], "--val-images 0"),
        (["--size", "31"], "--size 31: must be between 32 and 4096"),
        (["--size", "4097"], "--size 4097"),
        (["--seed", "-1"], "--seed -1"),
    ],
)
def test_cli_bad_arguments_exit_2_with_one_line(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert main(["data", "scenes", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_cli_usage_errors_exit_2(tmp_path, capsys):
    for argv in (["data", "scenes"], ["data", "scenes", str(tmp_path / "o"), "--images", "x"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.count("\n") == 1


def test_output_must_be_new_or_empty(tmp_path, capsys):
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("mine")
    assert main(["data", "scenes", str(full), "--images", "1", "--val-images", "1"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in full.iterdir()] == ["x"]  # untouched
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(ValueError, match="not a directory"):
        generate_scenes(a_file, images=1, val_images=1, size=32)
    empty = tmp_path / "empty"
    empty.mkdir()
    generate_scenes(empty, images=1, val_images=1, size=32)
    assert scenes._is_complete(empty)


def test_library_argument_types():
    with pytest.raises(TypeError, match="images"):
        generate_scenes("unused", images=2.0)
    with pytest.raises(TypeError, match="seed"):
        generate_scenes("unused", seed=True)


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    def broken(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(scenes, "_write_scenes", broken)
    with pytest.raises(KeyboardInterrupt):
        generate_scenes(tmp_path / "out", images=2, val_images=1, size=32)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- the cache


@pytest.fixture
def tiny_cache(tmp_path, monkeypatch) -> Path:
    """$CNNKIT_CACHE in tmp_path, default data sets of 3 + 1 scenes of 32 px."""
    monkeypatch.setenv("CNNKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(scenes, "DEFAULT_IMAGES", 3)
    monkeypatch.setattr(scenes, "DEFAULT_VAL_IMAGES", 1)
    monkeypatch.setattr(scenes, "DEFAULT_SIZE", 32)
    return tmp_path / "cache"


def _count_writes(monkeypatch, delay: float = 0.0) -> list[int]:
    calls: list[int] = []
    write = scenes._write_dataset

    def counted(*args):
        calls.append(1)
        time.sleep(delay)  # hold the lock a while: the other thread must wait for it
        write(*args)

    monkeypatch.setattr(scenes, "_write_dataset", counted)
    return calls


def test_cache_generated_once_and_stale_temporaries_removed(tiny_cache, monkeypatch):
    stale = tiny_cache / f".scenes-v{scenes.FORMAT_VERSION}-seed3.dead.tmp"
    (stale / "annotations").mkdir(parents=True)
    (stale / "annotations" / "instances_train.json").write_text("{half")
    calls = _count_writes(monkeypatch)
    root = scenes_root(3)
    assert root == tiny_cache / f"scenes-v{scenes.FORMAT_VERSION}-seed3" and scenes._is_complete(
        root
    )
    assert sorted(p.name for p in tiny_cache.iterdir()) == [
        f"scenes-v{scenes.FORMAT_VERSION}-seed3",
        f"scenes-v{scenes.FORMAT_VERSION}-seed3.lock",
    ]
    assert scenes_root(3) == root and len(calls) == 1  # the second call reads the cache
    assert len(_load(root, "train")["images"]) == 3


def test_cache_of_earlier_format_versions_is_removed(tiny_cache):
    """Each format bump left ~93 MB behind: generating the current version removes the older
    ones (every seed, with their locks), not a newer cnnkit's nor anything else."""
    v = scenes.FORMAT_VERSION
    keep = [f"scenes-v{v + 1}-seed0", "other", f"scenes-v{v}-seed9"]
    gone = [f"scenes-v{v - 1}-seed0", f"scenes-v{v - 1}-seed7"]
    for name in keep + gone:
        (tiny_cache / name / "train").mkdir(parents=True)
    (tiny_cache / f"scenes-v{v - 1}-seed0.lock").touch()
    scenes_root(3)
    expected = sorted([*keep, f"scenes-v{v}-seed3", f"scenes-v{v}-seed3.lock"])
    assert sorted(p.name for p in tiny_cache.iterdir()) == expected
    (tiny_cache / gone[0]).mkdir()  # also when the current version is already there
    scenes_root(3)
    assert sorted(p.name for p in tiny_cache.iterdir()) == expected


def test_cache_interrupted_then_regenerated(tiny_cache, monkeypatch):
    write = scenes._write_split

    def dies_on_val(folder, split_id, *args):
        if split_id == 1:
            raise KeyboardInterrupt
        return write(folder, split_id, *args)

    monkeypatch.setattr(scenes, "_write_split", dies_on_val)
    with pytest.raises(KeyboardInterrupt):
        scenes_root(0)
    assert [p.name for p in tiny_cache.iterdir()] == [f"scenes-v{scenes.FORMAT_VERSION}-seed0.lock"]
    monkeypatch.setattr(scenes, "_write_split", write)
    assert scenes._is_complete(scenes_root(0))


def test_cache_two_at_once_generate_once(tiny_cache, monkeypatch):
    calls = _count_writes(monkeypatch, delay=0.2)
    roots: list[Path] = []
    threads = [threading.Thread(target=lambda: roots.append(scenes_root(1))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and roots[0] == roots[1] and scenes._is_complete(roots[0])


def test_cache_finished_by_another_generator_is_used(tiny_cache, monkeypatch, tmp_path):
    # A generator that took no lock (a file system without flock) renames its data set into
    # place while ours is being written: ours is dropped, theirs used.
    theirs = generate_scenes(tmp_path / "theirs", images=2, val_images=1, size=32, seed=2)
    write = scenes._write_dataset

    def race(root, *args):
        write(root, *args)
        theirs.rename(tiny_cache / f"scenes-v{scenes.FORMAT_VERSION}-seed2")

    monkeypatch.setattr(scenes, "_write_dataset", race)
    root = scenes_root(2)
    assert len(_load(root, "train")["images"]) == 2  # theirs, not our 3
    assert sorted(p.name for p in tiny_cache.iterdir()) == [
        f"scenes-v{scenes.FORMAT_VERSION}-seed2",
        f"scenes-v{scenes.FORMAT_VERSION}-seed2.lock",
    ]


def test_cache_incomplete_directory_is_an_error(tiny_cache):
    (tiny_cache / f"scenes-v{scenes.FORMAT_VERSION}-seed0" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match="delete it"):
        scenes_root(0)


# --------------------------------------------------------------------------- hostile use


def test_cli_counts_beyond_the_limit_exit_2_before_anything(tmp_path, capsys):
    """--images 100000000000 built a list of 10^9 chunks and was killed by the OOM killer."""
    out = tmp_path / "out"
    for flag in ("--images", "--val-images"):
        assert main(["data", "scenes", str(out), flag, str(scenes.MAX_IMAGES + 1)]) == 2
        err = capsys.readouterr().err
        assert f"{flag} {scenes.MAX_IMAGES + 1}: must be at most {scenes.MAX_IMAGES}" in err
        assert err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_output_through_a_symbolic_link_is_refused_before_generating(tmp_path, capsys):
    """The final rename failed ("Not a directory") after the whole data set was rendered."""
    target = tmp_path / "target"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    assert (
        main(["data", "scenes", str(tmp_path / "link"), "--images", "1", "--val-images", "1"]) == 2
    )
    assert "is a symbolic link" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "target"]


def test_two_writers_of_one_out_one_wins_the_other_says_so(tmp_path, monkeypatch):
    """The loser's error was "[Errno 39] Directory not empty"; the winner's data set stays."""
    out = tmp_path / "out"
    write = scenes._write_dataset

    def other_process_finishes_first(root, *args):
        write(root, *args)
        monkeypatch.setattr(scenes, "_write_dataset", write)
        generate_scenes(out, images=1, val_images=1, size=32)  # the other writer

    monkeypatch.setattr(scenes, "_write_dataset", other_process_finishes_first)
    theirs = None
    for kind in ("missing", "empty"):
        if kind == "empty":
            out.mkdir()
            monkeypatch.setattr(scenes, "_write_dataset", other_process_finishes_first)
        with pytest.raises(ValueError, match="another process wrote a data set there"):
            generate_scenes(out, images=2, val_images=1, size=32)
        assert len(list((out / "train").iterdir())) == 1  # theirs, whole
        assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary left
        theirs = _files(out) if theirs is None else theirs
        assert _files(out) == theirs
        shutil.rmtree(out)


def test_out_gets_the_permissions_of_a_new_directory(tmp_path):
    """mkdtemp's 0o700 was renamed into place: a data set no one else could read."""
    import os

    old = os.umask(0o027)
    try:
        out = generate_scenes(tmp_path / "out", images=1, val_images=1, size=32)
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o750
