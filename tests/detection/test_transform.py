"""DetectionTransform: resize rule, normalization, padding, target scaling, and the way back."""

from __future__ import annotations

import pytest
import torch

from cnnkit.detection.transform import DetectionTransform, resize_boxes, resized_size

MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


def make(min_size: int, max_size: int, divisible: int = 32) -> DetectionTransform:
    return DetectionTransform(min_size, max_size, MEAN, STD, size_divisible=divisible)


def test_scale_one_keeps_pixels_and_boxes_exactly():
    torch.manual_seed(0)
    image = torch.rand(3, 64, 96)
    boxes = torch.tensor([[1.25, 2.5, 30.75, 40.0]])
    target = {"boxes": boxes, "labels": torch.tensor([1])}
    batch, (out,) = make(64, 96)(image.unsqueeze(0).unbind(0), [target])
    assert batch.image_sizes == [(64, 96)] and batch.original_sizes == [(64, 96)]
    assert batch.tensors.shape == (1, 3, 64, 96)
    for c in range(3):  # no resampling: each pixel is only normalized
        expected = (image[c] - MEAN[c]) / STD[c]
        torch.testing.assert_close(batch.tensors[0, c], expected, rtol=0, atol=1e-6)
    assert torch.equal(out["boxes"], boxes)


def test_resize_rule_with_max_size_cap_and_rounding():
    assert resized_size(60, 100, 120, 1000) == (120, 200)  # shorter side -> min_size
    assert resized_size(50, 200, 100, 300) == (75, 300)  # longer side capped: scale 1.5
    assert resized_size(600, 900, 800, 1333) == (800, 1200)  # 600 * (800 / 600) is 800
    assert resized_size(600, 1000, 800, 1333) == (799, 1333)  # capped: 600 * 1.333 = 799.8
    assert resized_size(480, 640, 800, 1333) == (800, 1066)


def test_resize_pad_and_targets():
    image = torch.full((3, 30, 50), 0.5)
    masks = torch.zeros(1, 30, 50, dtype=torch.uint8)
    masks[0, 10:20, 5:15] = 1
    target = {
        "boxes": torch.tensor([[5.0, 10.0, 15.0, 20.0]]),
        "labels": torch.tensor([2]),
        "masks": masks,
        "keypoints": torch.tensor([[[10.0, 15.0, 2.0], [0.0, 0.0, 0.0]]]),
    }
    small = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    other = torch.full((3, 40, 40), 0.5)
    batch, (t0, t1) = make(60, 200)([image, other], [target, small])
    # 30 x 50 -> 60 x 100 (scale 2); 40 x 40 -> 60 x 60; padded to multiples of 32.
    assert batch.image_sizes == [(60, 100), (60, 60)]
    assert batch.tensors.shape == (2, 3, 64, 128)
    inside = batch.tensors[0, :, :60, :100]
    expected = torch.tensor([(0.5 - m) / s for m, s in zip(MEAN, STD, strict=True)])
    torch.testing.assert_close(inside, expected[:, None, None].expand_as(inside))
    assert (batch.tensors[0, :, 60:] == 0).all() and (batch.tensors[0, :, :, 100:] == 0).all()
    assert (batch.tensors[1, :, :, 60:] == 0).all()
    torch.testing.assert_close(t0["boxes"], torch.tensor([[10.0, 20.0, 30.0, 40.0]]))
    assert t0["masks"].shape == (1, 60, 100) and t0["masks"].dtype == torch.uint8
    assert t0["masks"].sum() == 4 * 100 and t0["masks"][0, 20:40, 10:30].all()
    torch.testing.assert_close(t0["keypoints"][0, 0], torch.tensor([20.0, 30.0, 2.0]))
    assert t1["boxes"].shape == (0, 4)
    # The caller's targets are untouched.
    assert target["boxes"][0, 0] == 5.0 and target["masks"].shape == (1, 30, 50)


def test_postprocess_round_trip_to_original_coordinates():
    transform = make(100, 150)
    boxes = torch.tensor([[3.0, 4.0, 20.0, 33.0], [0.0, 0.0, 70.0, 45.0]])
    images = [torch.rand(3, 45, 70), torch.rand(3, 80, 30)]
    targets = [
        {"boxes": boxes, "labels": torch.tensor([1, 2])},
        {"boxes": boxes[:1], "labels": torch.tensor([1])},
    ]
    batch, resized = transform(images, targets)
    assert batch.image_sizes == [(96, 150), (150, 56)]  # 45 * (150 / 70) = 96.4; 30 * 1.875
    dets = [{"boxes": t["boxes"], "scores": torch.ones(len(t["boxes"]))} for t in resized]
    back = transform.postprocess(dets, batch.image_sizes, batch.original_sizes)
    torch.testing.assert_close(back[0]["boxes"], boxes)
    torch.testing.assert_close(back[1]["boxes"], boxes[:1])
    assert torch.equal(back[0]["scores"], dets[0]["scores"])
    # Per-axis ratios: x by 150 / 70, y by 96 / 45.
    torch.testing.assert_close(
        resize_boxes(boxes[:1], (45, 70), (96, 150)),
        torch.tensor([[3 * 150 / 70, 4 * 96 / 45, 20 * 150 / 70, 33 * 96 / 45]]),
    )


def test_uint8_images_are_scaled_to_unit_range():
    image = torch.full((3, 32, 32), 255, dtype=torch.uint8)
    batch, _ = make(32, 32)([image])
    expected = torch.tensor([(1.0 - m) / s for m, s in zip(MEAN, STD, strict=True)])
    torch.testing.assert_close(batch.tensors[0, :, 0, 0], expected)


def test_bad_inputs_name_the_culprit():
    transform = make(32, 32)
    with pytest.raises(ValueError, match=r"images\[1\]"):
        transform([torch.rand(3, 8, 8), torch.rand(1, 8, 8)])
    with pytest.raises(ValueError, match=r"targets\[0\]\['boxes'\]"):
        transform([torch.rand(3, 8, 8)], [{"boxes": torch.zeros(3), "labels": torch.zeros(3)}])
    with pytest.raises(ValueError, match="2 images but 1 targets"):
        transform([torch.rand(3, 8, 8)] * 2, [{"boxes": torch.zeros(0, 4)}])
