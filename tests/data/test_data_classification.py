"""Loaders of cnnkit.data.classification on data built in the test: digits, CIFAR, folders."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from cnnkit.data.classification import (
    RestrictedUnpickler,
    channel_stats,
    hold_out_index,
    load_data,
    load_image,
    read_cifar_pickle,
    stratified_order,
)

# ----------------------------------------------------------------------------- digits


def test_digits_splits_are_stratified_disjoint_and_complete():
    from sklearn.datasets import load_digits

    d = load_data("digits")
    assert (len(d.train), len(d.dev), len(d.test)) == (1197, 300, 300)
    assert d.input_size == (1, 32, 32)
    assert d.train.images.dtype == torch.uint8 and d.train.labels.dtype == torch.int64
    assert d.classes == [str(i) for i in range(10)]
    # Stratified: each class is in the 300-image test split in proportion (+-1).
    counts = torch.bincount(d.test.labels, minlength=10)
    total = np.bincount(load_digits().target, minlength=10)
    expected = total * 300 / total.sum()
    assert np.all(np.abs(counts.numpy() - expected) <= 1.0)
    all_labels = torch.cat([d.train.labels, d.dev.labels, d.test.labels])
    assert np.array_equal(torch.bincount(all_labels).numpy(), total)


def test_digits_are_deterministic_and_stats_are_of_the_train_split():
    a, b = load_data("digits"), load_data("digits")
    assert torch.equal(a.test.labels, b.test.labels) and torch.equal(a.test.images, b.test.images)
    x = a.train.images.double() / 255
    assert a.mean[0] == pytest.approx(float(x.mean()), abs=1e-9)
    assert a.std[0] == pytest.approx(float(x.std()), abs=1e-9)


def test_digits_splits_partition_the_originals():
    from sklearn.datasets import load_digits

    d = load_data("digits", image_size=8)  # no resampling at the native size: exact pixels
    bunch = load_digits()
    originals = sorted(
        (np.round(im / 16 * 255).astype(np.uint8).tobytes(), int(t))
        for im, t in zip(bunch.images, bunch.target, strict=True)
    )
    served = sorted(
        (im[0].numpy().tobytes(), int(t))
        for split in (d.train, d.dev, d.test)
        for im, t in zip(split.images, split.labels, strict=True)
    )
    assert served == originals  # every image in exactly one split, with its label


def test_stratified_order_prefixes_are_proportional():
    labels = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)
    order = stratified_order(labels, seed=3)
    assert sorted(order.tolist()) == list(range(100))
    for k in (10, 20, 50):
        counts = torch.bincount(labels[order[:k]], minlength=3).double()
        assert torch.all((counts - torch.tensor([0.6, 0.3, 0.1]) * k).abs() <= 1.0)


def test_bad_specs_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="expected digits"):
        load_data("mnist")
    with pytest.raises(ValueError, match="does not exist"):
        load_data(f"cifar10:{tmp_path / 'nowhere'}")
    with pytest.raises(ValueError, match="does not exist"):
        load_data(f"folder:{tmp_path / 'nowhere'}")


# ----------------------------------------------------------------------------- CIFAR


def _write_batch(path, n, num_classes, rng, label_key="labels", protocol=pickle.DEFAULT_PROTOCOL):
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in np.arange(n) % num_classes]
    batch = {
        b"batch_label": b"fake batch",
        label_key.encode(): labels,
        b"data": data,
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }
    if label_key == "fine_labels":
        batch[b"coarse_labels"] = [v // 2 for v in labels]
    with open(path, "wb") as fh:
        pickle.dump(batch, fh, protocol=protocol)
    return data, labels


def make_fake_cifar10(root, per_batch=20, test=30, protocol=pickle.DEFAULT_PROTOCOL):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    train = [
        _write_batch(root / f"data_batch_{i}", per_batch, 10, rng, protocol=protocol)
        for i in range(1, 6)
    ]
    test_data = _write_batch(root / "test_batch", test, 10, rng, protocol=protocol)
    names = [f"class{i}".encode() for i in range(10)]
    with open(root / "batches.meta", "wb") as fh:
        pickle.dump(
            {b"label_names": names, b"num_cases_per_batch": per_batch}, fh, protocol=protocol
        )
    return train, test_data


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL, 5])
def test_cifar10_loads_every_image_once(tmp_path, protocol):
    train, (test_x, test_y) = make_fake_cifar10(tmp_path / "c10", protocol=protocol)
    d = load_data(f"cifar10:{tmp_path / 'c10'}")
    assert d.classes == [f"class{i}" for i in range(10)]
    assert (len(d.train), len(d.dev), len(d.test)) == (90, 10, 30)  # dev: 10% of 100
    # The test split is the test batch, in order, reshaped to [N, 3, 32, 32] row-major.
    expected = torch.from_numpy(test_x).view(-1, 3, 32, 32)
    assert torch.equal(d.test.images, expected)
    assert d.test.labels.tolist() == test_y
    # Train + dev hold every training image exactly once, with its label.
    all_x = np.concatenate([t[0] for t in train])
    all_y = sum((t[1] for t in train), [])
    got = torch.cat([d.train.images, d.dev.images]).view(-1, 3072).numpy()
    got_y = torch.cat([d.train.labels, d.dev.labels]).tolist()
    pairs = sorted(zip(map(bytes, got), got_y, strict=True))
    assert pairs == sorted(zip(map(bytes, all_x), all_y, strict=True))
    assert torch.bincount(d.dev.labels, minlength=10).tolist() == [1] * 10  # stratified


def test_cifar100_uses_fine_labels(tmp_path):
    root = tmp_path / "c100"
    root.mkdir()
    rng = np.random.default_rng(1)
    _, labels = _write_batch(root / "train", 200, 100, rng, label_key="fine_labels")
    _write_batch(root / "test", 50, 100, rng, label_key="fine_labels")
    names = [f"fine{i}".encode() for i in range(100)]
    with open(root / "meta", "wb") as fh:
        pickle.dump({b"fine_label_names": names, b"coarse_label_names": [b"c"] * 20}, fh)
    d = load_data(f"cifar100:{root}")
    assert len(d.classes) == 100 and d.classes[7] == "fine7"
    assert (len(d.train), len(d.dev), len(d.test)) == (180, 20, 50)
    assert sorted(torch.cat([d.train.labels, d.dev.labels]).tolist()) == sorted(labels)


def test_cifar_missing_and_malformed_files_are_named(tmp_path):
    root = tmp_path / "c10"
    make_fake_cifar10(root)
    (root / "data_batch_3").unlink()
    with pytest.raises(ValueError, match="data_batch_3"):
        load_data(f"cifar10:{root}")
    make_fake_cifar10(root)
    (root / "test_batch").write_bytes(b"\x80\x04garbage")
    with pytest.raises(ValueError, match="test_batch"):
        load_data(f"cifar10:{root}")
    make_fake_cifar10(root)
    with open(root / "data_batch_2", "wb") as fh:
        pickle.dump({b"labels": [0, 1], b"data": np.zeros((2, 100), np.uint8)}, fh)
    with pytest.raises(ValueError, match=r"data_batch_2.*uint8 \[N, 3072\]"):
        load_data(f"cifar10:{root}")


class _Payload:
    """Unpickling this would create a file: the classic pickle exploit."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_malicious_cifar_pickle_is_refused_and_payload_does_not_run(tmp_path):
    root = tmp_path / "c10"
    make_fake_cifar10(root)
    marker = tmp_path / "pwned"
    with open(root / "data_batch_1", "wb") as fh:
        pickle.dump(
            {b"data": np.zeros((1, 3072), np.uint8), b"labels": [_Payload(str(marker))]}, fh
        )
    with pytest.raises(
        ValueError, match=r"refusing to unpickle CIFAR file .*data_batch_1.*io\.open is not allowed"
    ):
        load_data(f"cifar10:{root}")
    assert not marker.exists()
    # Another common payload: os.system through a protocol-2 REDUCE.
    evil = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    (root / "test_batch").write_bytes(evil)
    with pytest.raises(ValueError, match=r"test_batch.*os\.system"):
        read_cifar_pickle(root / "test_batch")
    assert not marker.exists()


def test_restricted_unpickler_still_reads_plain_data(tmp_path):
    value = {
        "a": [1, 2.5, "x", b"y", None, True],
        "arr": np.arange(6, dtype=np.uint8).reshape(2, 3),
    }
    path = tmp_path / "ok.pkl"
    path.write_bytes(pickle.dumps(value, protocol=2))
    with open(path, "rb") as fh:
        got = RestrictedUnpickler(fh, encoding="latin1").load()
    assert got["a"] == value["a"] and np.array_equal(got["arr"], value["arr"])


# ----------------------------------------------------------------------------- folders


def _save(path, color, size=(10, 7), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def test_flat_image_folder_is_split_and_resized(tmp_path):
    colors = {"cat": (255, 0, 0), "dog": (0, 0, 255)}
    for name, color in colors.items():
        for i in range(10):
            _save(tmp_path / "imgs" / name / f"{i}.png", color)
    (tmp_path / "imgs" / "cat" / "notes.txt").write_text("not an image")
    d = load_data(f"folder:{tmp_path / 'imgs'}", image_size=12)
    assert d.classes == ["cat", "dog"]
    assert d.input_size == (3, 12, 12)
    assert (len(d.train), len(d.dev), len(d.test)) == (16, 2, 2)
    for split in (d.train, d.dev, d.test):
        for img, label in zip(split.images, split.labels, strict=True):
            expected = torch.tensor(colors[d.classes[label]], dtype=torch.uint8)
            assert torch.equal(img[:, 5, 5], expected)


def test_split_image_folder_grayscale(tmp_path):
    for split, n in (("train", 6), ("test", 2), ("dev", 2)):
        for c, shade in (("a", 20), ("b", 200)):
            for i in range(n):
                _save(tmp_path / split / c / f"{i}.jpg", shade, mode="L")
    d = load_data(f"folder:{tmp_path}", image_size=8)
    assert d.input_size == (1, 8, 8)
    assert (len(d.train), len(d.dev), len(d.test)) == (12, 4, 4)
    assert abs(int(d.test.images[d.test.labels == 1].float().mean()) - 200) <= 2


def test_folder_errors_name_the_file(tmp_path):
    root = tmp_path / "imgs"
    for i in range(10):
        _save(root / "a" / f"{i}.png", (1, 2, 3))
    (root / "b").mkdir()
    (root / "b" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        load_data(f"folder:{root}")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no class subdirectories"):
        load_data(f"folder:{empty}")


def test_load_image_converts_and_resizes(tmp_path):
    _save(tmp_path / "x.png", (255, 255, 255), size=(5, 9))
    x = load_image(tmp_path / "x.png", (1, 16, 16))
    assert x.shape == (1, 16, 16) and x.dtype == torch.float32
    assert torch.allclose(x, torch.ones_like(x))
    with pytest.raises(ValueError, match="nope.png"):
        load_image(tmp_path / "nope.png", (3, 32, 32))


def test_load_image_with_crop_fraction_is_the_streamed_evaluation_crop(tmp_path):
    from cnnkit.data.streaming import center_crop_box, read_resized_crop

    # 30 wide x 20 high: blue, but the 5 outer columns on each side red. Resized to a shorter
    # side of round(16 / 0.875) = 18, the centre 16 x 16 crop spans source columns 6.1..23.9:
    # the crop sees only blue, the squash to 16 x 16 keeps red at the edges.
    pixels = np.zeros((20, 30, 3), dtype=np.uint8)
    pixels[:, :, 2] = 255
    pixels[:, :5] = pixels[:, 25:] = (255, 0, 0)
    path = tmp_path / "wide.png"
    Image.fromarray(pixels).save(path)
    x = load_image(path, (3, 16, 16), crop_fraction=0.875)
    direct = read_resized_crop(str(path), 3, 16, lambda w, h: center_crop_box(w, h, 16), False)
    assert x.dtype == torch.float32 and torch.equal(x, direct.float() / 255)
    blue = torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1).expand(3, 16, 16)
    assert torch.equal(x, blue)
    squashed = load_image(path, (3, 16, 16))
    assert squashed[0, :, 0].min() > 0.5  # red edge column
    gray = load_image(path, (1, 16, 16), crop_fraction=0.875)
    assert gray.shape == (1, 16, 16) and torch.allclose(gray, torch.full_like(gray, 29 / 255))


def test_load_image_with_crop_fraction_errors_name_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ValueError, match="broken.png"):
        load_image(bad, (3, 16, 16), crop_fraction=0.875)
    with pytest.raises(ValueError, match="nope.png"):
        load_image(tmp_path / "nope.png", (3, 16, 16), crop_fraction=0.875)
    _save(tmp_path / "x.png", (1, 2, 3))
    for fraction, size in ((0.0, (3, 16, 16)), (1.5, (3, 16, 16)), (0.875, (3, 16, 12))):
        with pytest.raises(ValueError, match="crop_fraction"):
            load_image(tmp_path / "x.png", size, crop_fraction=fraction)


def test_channel_stats_against_numpy():
    x = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8)
    mean, std = channel_stats(x)
    a = x.numpy().astype(np.float64) / 255
    assert np.allclose(mean, a.mean(axis=(0, 2, 3)))
    assert np.allclose(std, a.std(axis=(0, 2, 3), ddof=1))


def test_channel_stats_chunked_and_constant_channel(monkeypatch):
    import cnnkit.data.classification as C

    x = torch.randint(0, 256, (7, 2, 3, 5), dtype=torch.uint8)
    x[:, 1] = 200  # constant channel: std floored, never 0
    monkeypatch.setattr(C, "_STATS_CHUNK_ELEMENTS", 2 * 3 * 5 * 2)  # chunks of 2 images
    mean, std = channel_stats(x)
    a = x.numpy().astype(np.float64) / 255
    assert np.allclose(mean, a.mean(axis=(0, 2, 3)), rtol=0, atol=1e-12)
    assert np.isclose(std[0], a[:, 0].std(ddof=1), rtol=0, atol=1e-12)
    assert mean[1] == pytest.approx(200 / 255) and std[1] == C._MIN_STD


def test_image_folder_errors_name_the_file_and_mixed_modes_become_rgb(tmp_path):
    for i in range(5):
        _save(tmp_path / "imgs" / "a" / f"{i}.png", 40, mode="L")
        _save(tmp_path / "imgs" / "b" / f"{i}.png", (0, 200, 0))
    d = load_data(f"folder:{tmp_path / 'imgs'}", image_size=8)
    assert d.input_size == (3, 8, 8)  # one color image makes the whole set RGB
    gray = d.train.images[d.train.labels == 0]
    assert torch.equal(gray[:, :, 4, 4], torch.full((len(gray), 3), 40, dtype=torch.uint8))
    (tmp_path / "imgs" / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ValueError, match="broken.png"):
        load_data(f"folder:{tmp_path / 'imgs'}", image_size=8)


# ----------------------------------------------------------------------------- classes


def _two_class_folder(root, n=5):
    for name in ("a", "b"):
        for i in range(n):
            _save(root / name / f"{i}.png", 60, mode="L")


def test_folder_with_one_class_is_refused(tmp_path):
    for i in range(10):
        _save(tmp_path / "one" / "cat" / f"{i}.png", 60, mode="L")
    with pytest.raises(ValueError, match=r"1 class directory \(cat\).*at least 2"):
        load_data(f"folder:{tmp_path / 'one'}")
    for split in ("train", "test"):  # the train/ layout: the same rule
        _save(tmp_path / "split" / split / "cat" / "0.png", 60, mode="L")
    with pytest.raises(ValueError, match=r"1 class directory \(cat\)"):
        load_data(f"folder:{tmp_path / 'split'}")


def test_empty_or_looping_class_directories_are_named(tmp_path):
    root = tmp_path / "imgs"
    _two_class_folder(root)
    (root / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty holds no images"):
        load_data(f"folder:{root}")
    (root / "empty").rmdir()
    # A symlink to itself: is_dir() is False (ELOOP) and the class vanished without a word.
    (root / "loop").symlink_to(root / "loop")
    with pytest.raises(ValueError, match=r"loop is a broken or looping symbolic link"):
        load_data(f"folder:{root}")
    (root / "loop").unlink()
    (root / "gone").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"gone is a broken or looping symbolic link"):
        load_data(f"folder:{root}")
    (root / "gone").unlink()
    # A link back to the root: a class whose directory holds the class directories, no image.
    (root / "up").symlink_to(root)
    with pytest.raises(ValueError, match=r"up holds no images"):
        load_data(f"folder:{root}")


def test_cifar_class_without_training_image_is_named(tmp_path):
    make_fake_cifar10(tmp_path)
    names = [f"class{i}".encode() for i in range(11)]  # class10 has no image
    with open(tmp_path / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": names}, fh)
    with pytest.raises(ValueError, match=r"\['class10'\] have no training image"):
        load_data(f"cifar10:{tmp_path}")


def test_check_training_classes():
    from cnnkit.data.classification import check_training_classes

    check_training_classes("x", ["a", "b"], torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match=r"--data x: 1 class \(a\)"):
        check_training_classes("x", ["a"], torch.tensor([0, 0]))
    with pytest.raises(ValueError, match=r"\['b'\] have no training image \(1 of 3"):
        check_training_classes("x", ["a", "b", "c"], torch.tensor([0, 2]))


# ----------------------------------------------------------------------------- decoded size


def test_digits_larger_than_the_memory_are_refused(monkeypatch):
    import cnnkit.data.classification as C

    monkeypatch.setattr(C, "available_memory", lambda: 1_000_000)
    # 1,797 x 24 x 24 = 1.0 MB > 1.0 MB - (the check runs before any resize)
    with pytest.raises(ValueError, match=r"--image-size 24: .*1,797 x 576 bytes = 1\.0 MB"):
        load_data("digits", image_size=24)
    load_data("digits", image_size=23)  # 950 KB: fits


def test_digits_resized_a_chunk_at_a_time_as_a_whole(monkeypatch):
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    import cnnkit.data.classification as C

    monkeypatch.setattr(C, "_STATS_CHUNK_ELEMENTS", 100 * 16 * 16)  # 18 chunks of 100
    d = load_data("digits", image_size=16)
    x = torch.from_numpy(np.asarray(load_digits().images, dtype=np.float32)).unsqueeze(1) / 16
    whole = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    whole = whole.clamp(0, 1).mul(255).round().to(torch.uint8)
    labels = torch.from_numpy(load_digits().target.astype(np.int64))
    test, dev, train = hold_out_index(labels, [300, 300], 0)
    for split, index in ((d.train, train), (d.dev, dev), (d.test, test)):
        assert torch.equal(split.images, whole[index])
