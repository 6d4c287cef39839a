"""Streaming data (cnnkit.data.streaming, classification.stream_splits) on tiny data built here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cnnkit.data import streaming as S
from cnnkit.data.classification import (
    choose_data_storage,
    folder_files,
    load_data,
    stream_splits,
)

# ----------------------------------------------------------------------------- order


@pytest.mark.parametrize("n", [1, 2, 7, 10, 33])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_shard_order_deals_one_permutation_padded_by_wrapping(n, world):
    shards = [S.shard_order(n, seed=5, epoch=2, rank=r, world_size=world) for r in range(world)]
    per = -(-n // world)
    assert all(s.dtype == torch.int64 and s.numel() == per for s in shards)
    # Re-interleave the shards: position k of the dealt sequence is shard k % W, entry k // W.
    dealt = [int(shards[k % world][k // world]) for k in range(per * world)]
    assert sorted(dealt[:n]) == list(range(n))  # the first n positions: every sample once
    # Padding repeats the permutation from its start (cyclically).
    assert dealt[n:] == [dealt[k % n] for k in range(n, per * world)]
    # The permutation is the same whatever the world size (it depends on seed + epoch only).
    single = S.shard_order(n, seed=5, epoch=2).tolist()
    assert dealt[:n] == single
    rank0 = S.shard_order(n, seed=5, epoch=2, world_size=world, shuffle=False)
    assert rank0.tolist() == [k % n for k in range(0, per * world, world)]


def test_shard_order_changes_with_epoch_and_seed():
    a = S.shard_order(50, seed=1, epoch=1)
    assert torch.equal(a, S.shard_order(50, seed=1, epoch=1))
    assert not torch.equal(a, S.shard_order(50, seed=1, epoch=2))
    assert not torch.equal(a, S.shard_order(50, seed=2, epoch=1))


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("n,bs,world", [(10, 3, 1), (10, 5, 2), (11, 4, 3), (3, 8, 2), (64, 8, 4)])
def test_sampler_batches_cover_the_shard(n, bs, world, drop_last):
    for rank in range(world):
        sampler = S.ShardBatchSampler(
            n, bs, seed=3, rank=rank, world_size=world, drop_last=drop_last
        )
        sampler.set_epoch(4)
        batches = list(sampler)
        assert len(batches) == len(sampler) == S.steps_per_epoch(n, bs, world, drop_last)
        keys = [k for b in batches for k in b]
        assert all(e == 4 for e, _ in keys)
        shard = S.shard_order(n, seed=3, epoch=4, rank=rank, world_size=world).tolist()
        served = [i for _, i in keys]
        if drop_last:
            assert all(len(b) == bs for b in batches)
            assert served == shard[: len(served)] and len(shard) - len(served) < bs
        else:
            assert served == shard


def test_sampler_resumes_with_the_tail_of_the_epoch():
    sampler = S.ShardBatchSampler(37, 5, seed=9, rank=1, world_size=2)
    sampler.set_epoch(3)
    full = list(sampler)
    assert list(sampler) == full  # same (seed, epoch): same batches
    for k in range(len(full) + 1):
        sampler.set_epoch(3, start=k)
        assert len(sampler) == len(full) - k
        assert list(sampler) == full[k:]
    sampler.set_epoch(4)
    assert [i for b in sampler for _, i in b] != [i for b in full for _, i in b]
    with pytest.raises(ValueError, match="start"):
        sampler.set_epoch(3, start=len(full) + 1)


def test_eval_sampler_partitions_without_padding():
    served = []
    for rank in range(3):
        served += [i for b in S.EvalBatchSampler(10, 3, rank=rank, world_size=3) for _, i in b]
    assert served == list(range(10))


# ----------------------------------------------------------------------------- crops


def _fits_random_rule(w, h, width, height):
    """Some real (w', h') within 0.5 of (w, h) has area in [0.08, 1] of the image and ratio in
    [3/4, 4/3]: the box came from one of the random tries (sides rounded)."""
    area = width * height
    return (
        0 < w <= width
        and 0 < h <= height
        and (w + 0.5) * (h + 0.5) >= 0.08 * area
        and (w + 0.5) / max(h - 0.5, 1e-9) >= 3 / 4
        and (w - 0.5) / (h + 0.5) <= 4 / 3
    )


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 3000), st.integers(1, 3000), st.integers(0, 2**32 - 1))
def test_random_resized_crop_box_is_inside_and_within_ranges(width, height, seed):
    rng = np.random.default_rng(seed)
    left, top, w, h = S.random_resized_crop_box(width, height, rng)
    assert 0 <= left <= left + w <= width and 0 <= top <= top + h <= height and min(w, h) > 0
    if not _fits_random_rule(w, h, width, height):
        # The documented fallback: the centred box of the image's ratio clamped to [3/4, 4/3].
        r = min(max(width / height, 3 / 4), 4 / 3)
        assert abs(w / h - r) <= 1.0 / min(w, h) + 1e-9 or (w, h) == (width, height)
        assert w == width or h == height
        assert (left, top) == ((width - w) // 2, (height - h) // 2)


def test_random_resized_crop_box_spans_its_ranges():
    rng = np.random.default_rng(0)
    boxes = [S.random_resized_crop_box(1000, 1000, rng) for _ in range(2000)]
    areas = np.array([w * h / 1e6 for _, _, w, h in boxes])
    ratios = np.array([w / h for _, _, w, h in boxes])
    assert areas.min() < 0.1 and areas.max() > 0.9
    assert ratios.min() < 0.78 and ratios.max() > 1.28
    lefts = np.array([x for x, _, _, _ in boxes])
    assert lefts.min() == 0 or lefts.max() > 500  # placement varies across the image


def test_padded_crop_is_a_window_of_the_zero_padded_image():
    image = torch.randint(1, 256, (2, 6, 5), dtype=torch.uint8)
    padded = F.pad(image, (3, 3, 3, 3))
    windows = [padded[:, dy : dy + 6, dx : dx + 5] for dy in range(7) for dx in range(7)]
    seen = set()
    for seed in range(60):
        rng = np.random.default_rng(seed)
        flip = seed % 2 == 1
        out = S.padded_crop(image, 3, rng, flip)
        out = out.flip(2) if flip else out
        hits = [k for k, win in enumerate(windows) if torch.equal(out, win)]
        assert len(hits) == 1
        seen.add(hits[0])
    assert len(seen) > 20  # offsets really vary


# ----------------------------------------------------------------------------- folders


def _noise(path, size, seed, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


def _folder(root, classes=3, per_class=8, size=(20, 20)):
    for c in range(classes):
        for i in range(per_class):
            _noise(root / f"c{c}" / f"{i:02d}.png", size, 100 * c + i)
    return root


def _all_batches(dataset, sampler, workers):
    return list(S.stream_loader(dataset, sampler, workers=workers, pin_memory=False))


def test_streamed_folder_has_the_in_memory_splits_and_eval_pixels(tmp_path):
    root = _folder(tmp_path / "imgs", size=(20, 20))
    memory = load_data(f"folder:{root}", image_size=12, seed=4)
    streamed = stream_splits(f"folder:{root}", image_size=12, seed=4)
    assert streamed.classes == memory.classes and streamed.input_size == memory.input_size
    for split in ("train", "dev", "test"):
        mem, src = getattr(memory, split), getattr(streamed, split)
        assert torch.equal(torch.from_numpy(src.labels), mem.labels)
        # Square images, crop_fraction=1: resize shorter side to 12 and crop the centre 12x12 is
        # the in-memory loader's plain resize to 12x12, pixel for pixel.
        data = streamed.dataset(split, train=False, seed=0, crop_fraction=1.0)
        sampler = S.EvalBatchSampler(len(data), 5)
        images = torch.cat([b.images for b in _all_batches(data, sampler, 0)])
        assert torch.equal(images, mem.images)
    # Statistics of the train split, estimated from every image here (fewer than 500).
    assert streamed.stats_images == len(memory.train)
    assert np.allclose(streamed.mean, memory.mean, atol=0.02)


def test_eval_recipe_crops_the_centre_after_resizing_the_shorter_side(tmp_path):
    # S = 14: the shorter side is resized to round(14 * 256 / 224) = 16. A 16x16 image needs
    # no resize: the output is its centre 14x14, exactly.
    path = tmp_path / "x.png"
    _noise(path, (16, 16), 0)
    source = S.FileSource([path], torch.tensor([0]), channels=3)
    out = S.StreamDataset(source, image_size=14, train=False, seed=0)[(0, 0)][0]
    pixels = torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1)
    assert torch.equal(out, pixels[:, 1:15, 1:15])


def test_jpeg_draft_decodes_the_same_crop(tmp_path):
    # A smooth pattern (JPEG keeps it): decoding at 1/8 scale must give the same picture as a
    # lossless PNG of the same pixels decoded in full, if the crop box is rescaled correctly.
    yy, xx = np.mgrid[0:480, 0:640]
    r = 127 + 120 * np.sin(xx / 37.0) * np.cos(yy / 53.0)
    g = 255 * xx / 640
    b = 255 * yy / 480
    pixels = np.stack([r, g, b], axis=2).round().astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.jpg", quality=95)
    Image.open(tmp_path / "a.jpg").convert("RGB").save(tmp_path / "a.png")
    source = S.FileSource([tmp_path / "a.jpg", tmp_path / "a.png"], torch.tensor([0, 0]), 3)
    with Image.open(tmp_path / "a.jpg") as im:
        im.draft("RGB", (80, 60))
        assert im.size == (80, 60)  # libjpeg really scales by 8 here
    for train in (False, True):
        data = S.StreamDataset(source, image_size=32, train=train, seed=1, flip=False)
        jpeg, png = data[(0, 0)][0].float(), data[(0, 1)][0].float()
        if train:  # the same key gives the same box: use one key for both files
            png = S.StreamDataset(source, image_size=32, train=True, seed=1, flip=False)
            png = png[(0, 0)][0].float()
        assert (jpeg - png).abs().mean() < 4.0


def test_training_crops_are_a_function_of_seed_epoch_and_index(tmp_path):
    root = _folder(tmp_path / "imgs", per_class=6, size=(24, 18))
    streamed = stream_splits(f"folder:{root}", image_size=8, seed=0)
    data = streamed.dataset("train", train=True, seed=7)
    sampler = S.ShardBatchSampler(len(data), 4, seed=7)
    sampler.set_epoch(2)
    a = _all_batches(data, sampler, 0)
    b = _all_batches(data, sampler, 2)
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels)
    assert torch.equal(data[(2, 3)][0], data[(2, 3)][0])
    different = sum(not torch.equal(data[(2, i)][0], data[(3, i)][0]) for i in range(len(data)))
    assert different >= len(data) - 1  # another epoch, other crops
    # Rank and world size do not enter: rank 1 of 2 serves the same image for the same key.
    other = S.ShardBatchSampler(len(data), 4, seed=7, rank=1, world_size=2)
    other.set_epoch(2)
    first = next(iter(S.stream_loader(data, other, workers=0, pin_memory=False)))
    key = next(iter(other))[0]
    assert torch.equal(first.images[0], data[key][0])


def test_digits_stream_from_tensors_like_the_in_memory_set():
    memory = load_data("digits", seed=1)
    streamed = stream_splits("digits", seed=1)
    assert streamed.mean == memory.mean and streamed.input_size == (1, 32, 32)
    data = streamed.dataset("test", train=False, seed=0)
    images = torch.cat([b.images for b in _all_batches(data, S.EvalBatchSampler(300, 128), 0)])
    assert torch.equal(images, memory.test.images)
    train = streamed.dataset("train", train=True, seed=0, flip=False, crop_padding=0)
    assert torch.equal(train[(5, 17)][0], memory.train.images[17])


def test_corrupt_files_are_reported_by_name(tmp_path):
    root = _folder(tmp_path / "imgs", classes=2, per_class=5)
    jpeg = root / "c0" / "cut.jpg"
    _noise(jpeg, (40, 40), 1)
    jpeg.write_bytes(jpeg.read_bytes()[:200])  # truncated JPEG
    (root / "c1" / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\ngarbage")
    splits, classes = folder_files(root, seed=0)
    files, labels = (
        splits["train"][0] + splits["test"][0],
        torch.cat([splits["train"][1], splits["test"][1]]),
    )
    source = S.FileSource(files, labels, channels=3)
    for train in (True, False):
        data = S.StreamDataset(source, image_size=8, train=train, seed=0)
        batches = _all_batches(data, S.EvalBatchSampler(len(data), 4), 0)
        invalid = [m for b in batches for m in b.invalid]
        named = {m.split(": ")[0].rsplit("/", 1)[-1] for m in invalid}
        assert named == {"cut.jpg", "junk.png"} & {f.name for f in files}
        assert sum(len(b) for b in batches) == len(files) - len(invalid)
        assert all(b.images.shape[1:] == (3, 8, 8) for b in batches)


def test_all_invalid_batch_is_empty_with_the_right_shape(tmp_path):
    (tmp_path / "a.png").write_bytes(b"nope")
    data = S.StreamDataset(
        S.FileSource([tmp_path / "a.png"], torch.tensor([0]), 1), image_size=6, train=False, seed=0
    )
    (batch,) = _all_batches(data, S.EvalBatchSampler(1, 4), 0)
    assert batch.images.shape == (0, 1, 6, 6) and batch.labels.shape == (0,)
    assert batch.invalid[0].startswith(str(tmp_path / "a.png") + ": ")


def test_imagenet_layout_val_is_the_test_split(tmp_path):
    for split, n in (("train", 10), ("val", 3)):
        for c in ("n01", "n02"):
            for i in range(n):
                _noise(tmp_path / split / c / f"{c}_{i}.JPEG", (12, 10), i)
    splits, classes = folder_files(tmp_path, seed=0)
    assert classes == ["n01", "n02"]
    assert sorted(f.parent.parent.name for f in splits["test"][0]) == ["val"] * 6
    assert len(splits["dev"][0]) == 2 and len(splits["train"][0]) == 18  # 10% held out of train
    assert set(splits["dev"][0]).isdisjoint(splits["train"][0])
    streamed = stream_splits(f"folder:{tmp_path}", image_size=8)
    assert len(streamed.test) == 6 and streamed.channels == 3


def test_layout_errors_name_the_path(tmp_path):
    root = _folder(tmp_path / "imgs", classes=2, per_class=5)
    (root / "empty").mkdir()
    with pytest.raises(ValueError, match=r"imgs/empty holds no images"):
        folder_files(root, seed=0)
    with pytest.raises(ValueError, match="no class subdirectories"):
        (tmp_path / "none").mkdir()
        stream_splits(f"folder:{tmp_path / 'none'}")
    with pytest.raises(ValueError, match="does not exist"):
        stream_splits(f"folder:{tmp_path / 'nowhere'}")
    (tmp_path / "split" / "train" / "a").mkdir(parents=True)
    _noise(tmp_path / "split" / "train" / "a" / "x.png", (4, 4), 0)
    with pytest.raises(ValueError, match=r"no test/ \(or val/\)"):
        folder_files(tmp_path / "split", seed=0)


# ----------------------------------------------------------------------------- policy


def test_choose_streaming_threshold():
    gib = 2**30
    # 8 GiB available: threshold 2 GiB; 1,000 x 3 x 512 x 512 = 0.73 GiB stays in memory.
    stream, why = S.choose_streaming(1000, 3, 512, "auto", available=8 * gib)
    assert not stream and "750.0 MB" in why and "2.0 GB" in why
    stream, why = S.choose_streaming(3000, 3, 512, "auto", available=8 * gib)  # 2.2 GiB
    assert stream and "2.2 GB" in why
    # Plenty of RAM: 4 GiB cap. ImageNet at 224: 1.28M x 150 KB = 179 GiB streams.
    assert S.choose_streaming(1_281_167, 3, 224, "auto", available=1024 * gib)[0]
    assert not S.choose_streaming(5000, 3, 512, "auto", available=1024 * gib)[0]  # 3.7 GiB
    assert S.choose_streaming(10, 1, 8, "stream")[0]
    assert not S.choose_streaming(10**4, 3, 224, "memory", available=8 * gib)[0]
    # Forced into memory, a set larger than the available RAM is refused, naming the size.
    with pytest.raises(ValueError, match=r"--image-size 224 with --in-memory: .*1401.9 GB"):
        S.choose_streaming(10**7, 3, 224, "memory", available=8 * gib)
    with pytest.raises(ValueError, match="force"):
        S.choose_streaming(10, 1, 8, "yes")
    assert choose_data_storage("digits") == (
        False,
        "in memory: digits is always decoded into memory under auto",
    )


def test_default_workers_share_the_affinity_mask(monkeypatch):
    monkeypatch.setattr(S.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert S.default_workers() == 7
    assert S.default_workers(4) == 1
    assert S.default_workers(8) == 0 and S.default_workers(16) == 0
    monkeypatch.setattr(S.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert S.default_workers() == S.MAX_DEFAULT_WORKERS


def test_file_source_round_trips_paths(tmp_path):
    files = [tmp_path / "ä b" / "x.png", tmp_path / "y.JPEG", tmp_path / "z"]
    source = S.FileSource(files, torch.tensor([2, 0, 1]), channels=1)
    assert [source.path(i) for i in range(3)] == [str(f) for f in files]
    assert len(source) == 3 and math.isclose(float(source.labels.sum()), 3)
