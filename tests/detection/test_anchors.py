"""AnchorGenerator against hand-computed torchvision cell anchors and a brute-force grid."""

import math

import pytest
import torch

from cnnkit.detection.anchors import AnchorGenerator, cell_anchors


def test_cell_anchors_by_hand_for_size_32():
    # ratio = h / w, area 32^2: h = 32 sqrt(r), w = 32 / sqrt(r); half-sides rounded.
    # r = 0.5: w/2 = 16 sqrt(2) = 22.63 -> 23, h/2 = 16 / sqrt(2) = 11.31 -> 11.
    expected = torch.tensor(
        [[-23.0, -11.0, 23.0, 11.0], [-16.0, -16.0, 16.0, 16.0], [-11.0, -23.0, 11.0, 23.0]]
    )
    assert torch.equal(cell_anchors([32], [0.5, 1.0, 2.0]), expected)


def test_cell_anchor_order_is_ratio_major_then_size():
    cells = cell_anchors([16, 32], [1.0, 4.0])
    # r = 4: h = 2 s, w = s / 2 -> half-sides (s/4, s).
    expected = torch.tensor(
        [[-8.0, -8, 8, 8], [-16, -16, 16, 16], [-4, -16, 4, 16], [-8, -32, 8, 32]]
    )
    assert torch.equal(cells, expected)


def test_counts_and_grid_match_brute_force():
    gen = AnchorGenerator([[32], [64, 128]], [[0.5, 1.0, 2.0], [1.0]])
    assert gen.num_anchors_per_location() == [3, 2]
    shapes = [(16, 24), (8, 12)]
    anchors = gen((64, 96), shapes)
    assert anchors.shape == (16 * 24 * 3 + 8 * 12 * 2, 4)
    assert anchors.dtype == torch.float32
    # Brute force: level by level, row-major position, then cell anchor; stride = 64 // h.
    expected = []
    for (h, w), sizes, ratios in zip(shapes, gen.sizes, gen.aspect_ratios, strict=True):
        stride_y, stride_x = 64 // h, 96 // w
        for i in range(h):
            for j in range(w):
                for r in ratios:
                    for s in sizes:
                        hw = round(s / math.sqrt(r) / 2)
                        hh = round(s * math.sqrt(r) / 2)
                        x, y = j * stride_x, i * stride_y
                        expected.append([x - hw, y - hh, x + hw, y + hh])
    assert torch.equal(anchors, torch.tensor(expected, dtype=torch.float32))


def test_non_square_strides_per_axis():
    gen = AnchorGenerator([[16]], [[1.0]])
    anchors = gen((32, 64), [(2, 2)])  # stride 16 in y, 32 in x
    expected = torch.tensor([[-8.0, -8, 8, 8], [24, -8, 40, 8], [-8, 8, 8, 24], [24, 8, 40, 24]])
    assert torch.equal(anchors, expected)


def test_cache_and_dtype():
    gen = AnchorGenerator([[32]], [[1.0]])
    a = gen((64, 64), [(4, 4)])
    assert gen((64, 64), [(4, 4)]) is a
    assert gen((64, 64), [(4, 4)], dtype=torch.float64).dtype == torch.float64
    assert gen((128, 128), [(8, 8)]).shape == (64, 4)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="aspect_ratios"):
        AnchorGenerator([[32], [64]], [[1.0]])
    with pytest.raises(ValueError, match=r"sizes\[0\]"):
        AnchorGenerator([[-1]], [[1.0]])
    with pytest.raises(ValueError, match="2 feature maps"):
        AnchorGenerator([[32]], [[1.0]])((64, 64), [(4, 4), (2, 2)])
