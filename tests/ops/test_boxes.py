"""Box geometry, box coding and smooth L1 against hand-computed values and brute force."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from cnnkit.ops import (
    box_area,
    box_convert,
    box_iou,
    clip_boxes_to_image,
    decode_boxes,
    elementwise_box_iou,
    encode_boxes,
    remove_small_boxes,
    smooth_l1_loss,
)
from cnnkit.ops.boxes import BBOX_XFORM_CLIP


def brute_iou(a: list[float], b: list[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def test_area_and_iou_hand_values():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 6.0, 6.0]])
    assert box_area(a).tolist() == [4.0, 1.0]
    expected = [[1 / 7, 1.0, 0.0], [0.0, 1 / 4, 0.0]]
    torch.testing.assert_close(box_iou(a, b), torch.tensor(expected))


def test_iou_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(30, 2, generator=gen, dtype=torch.float64) * 50
    boxes = torch.cat((xy, xy + torch.rand(30, 2, generator=gen, dtype=torch.float64) * 30), 1)
    a, b = boxes[:12], boxes[12:]
    expected = torch.tensor(
        [[brute_iou(u, v) for v in b.tolist()] for u in a.tolist()], dtype=torch.float64
    )
    torch.testing.assert_close(box_iou(a, b), expected)
    torch.testing.assert_close(elementwise_box_iou(a, b[:12]), expected.diagonal())


def test_degenerate_boxes_give_zero_not_nan():
    point = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    line = torch.tensor([[0.0, 1.0, 3.0, 1.0]])
    box = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    for a, b in ((point, point), (point, box), (line, line), (line, box)):
        assert box_iou(a, b).tolist() == [[0.0]]
        assert elementwise_box_iou(a, b).tolist() == [0.0]


box_st = st.tuples(
    st.integers(-20, 20), st.integers(-20, 20), st.integers(0, 15), st.integers(0, 15)
).map(lambda t: [t[0], t[1], t[0] + t[2], t[1] + t[3]])


@settings(max_examples=60, deadline=None)
@given(st.lists(box_st, min_size=1, max_size=8), st.lists(box_st, min_size=1, max_size=8))
def test_iou_properties(a, b):
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    iou = box_iou(ta, tb)
    assert not torch.isnan(iou).any()
    assert ((iou >= 0) & (iou <= 1)).all()
    torch.testing.assert_close(iou, box_iou(tb, ta).T)
    expected = torch.tensor([[brute_iou(u, v) for v in b] for u in a], dtype=torch.float64)
    torch.testing.assert_close(iou, expected)


def test_integer_boxes_are_promoted():
    a = torch.tensor([[0, 0, 2, 2]])
    b = torch.tensor([[1, 1, 3, 3]])
    assert box_iou(a, b).dtype == torch.float32
    assert box_iou(a, b).item() == pytest.approx(1 / 7)


def test_box_convert_hand_values():
    xywh = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert box_convert(xywh, "xywh", "xyxy").tolist() == [[1.0, 2.0, 4.0, 6.0]]
    cxcywh = torch.tensor([[2.0, 3.0, 4.0, 2.0]])
    assert box_convert(cxcywh, "cxcywh", "xyxy").tolist() == [[0.0, 2.0, 4.0, 4.0]]
    xyxy = torch.tensor([[0.0, 2.0, 4.0, 4.0]])
    assert box_convert(xyxy, "xyxy", "cxcywh").tolist() == [[2.0, 3.0, 4.0, 2.0]]
    assert box_convert(xyxy, "xyxy", "xywh").tolist() == [[0.0, 2.0, 4.0, 2.0]]


def test_box_convert_round_trips():
    gen = torch.Generator().manual_seed(1)
    boxes = torch.rand(20, 4, generator=gen, dtype=torch.float64) * 100
    boxes[:, 2:] += boxes[:, :2]
    for fmt in ("xywh", "cxcywh"):
        back = box_convert(box_convert(boxes, "xyxy", fmt), fmt, "xyxy")
        torch.testing.assert_close(back, boxes)
    out = box_convert(boxes, "xyxy", "xyxy")
    assert out is not boxes and torch.equal(out, boxes)


def test_clip_and_remove_small():
    boxes = torch.tensor([[-5.0, -1.0, 20.0, 8.0], [2.0, 3.0, 4.0, 30.0]])
    assert clip_boxes_to_image(boxes, (10, 12)).tolist() == [
        [0.0, 0.0, 12.0, 8.0],
        [2.0, 3.0, 4.0, 10.0],
    ]
    boxes = torch.tensor([[0.0, 0.0, 1.0, 5.0], [0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 3.0, 1.9]])
    assert remove_small_boxes(boxes, 2.0).tolist() == [1]


def test_encode_hand_values():
    ref = torch.tensor([[0.0, 0.0, 10.0, 20.0]])  # centre (5, 10), size 10 x 20
    box = torch.tensor([[5.0, 5.0, 25.0, 25.0]])  # centre (15, 15), size 20 x 20
    torch.testing.assert_close(
        encode_boxes(ref, box), torch.tensor([[1.0, 0.25, math.log(2.0), 0.0]])
    )
    weighted = encode_boxes(ref, box, weights=(10.0, 10.0, 5.0, 5.0))
    torch.testing.assert_close(weighted, torch.tensor([[10.0, 2.5, 5 * math.log(2.0), 0.0]]))


def test_decode_clamps_size_deltas():
    ref = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    deltas = torch.tensor([[0.0, 0.0, 50.0, -1.0]])
    out = decode_boxes(ref, deltas)
    width = out[0, 2] - out[0, 0]
    assert width.item() == pytest.approx(16.0 * math.exp(BBOX_XFORM_CLIP)) == pytest.approx(1000.0)
    assert (out[0, 3] - out[0, 1]).item() == pytest.approx(16.0 * math.exp(-1.0))


def test_decode_several_sets_per_row():
    ref = torch.tensor([[0.0, 0.0, 10.0, 10.0], [10.0, 10.0, 30.0, 20.0]])
    d1 = torch.tensor([[0.1, -0.2, 0.3, 0.0], [0.0, 0.5, -0.1, 0.2]])
    d2 = torch.tensor([[-0.3, 0.2, 0.0, 0.1], [1.0, 0.0, 0.0, 0.0]])
    out = decode_boxes(ref, torch.cat((d1, d2), 1), weights=(10.0, 10.0, 5.0, 5.0))
    torch.testing.assert_close(out[:, :4], decode_boxes(ref, d1, (10.0, 10.0, 5.0, 5.0)))
    torch.testing.assert_close(out[:, 4:], decode_boxes(ref, d2, (10.0, 10.0, 5.0, 5.0)))


# Sizes within a factor 50 of each other: below the decoder's clamp at 1000 / 16.
pos_box_st = st.tuples(
    st.floats(-100, 100), st.floats(-100, 100), st.floats(2, 100), st.floats(2, 100)
).map(lambda t: [t[0], t[1], t[0] + t[2], t[1] + t[3]])


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(pos_box_st, pos_box_st), min_size=1, max_size=6),
    st.sampled_from([(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]),
)
def test_decode_inverts_encode(pairs, weights):
    ref = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
    boxes = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
    back = decode_boxes(ref, encode_boxes(ref, boxes, weights), weights)
    torch.testing.assert_close(back, boxes, atol=1e-6, rtol=1e-9)


def test_smooth_l1_hand_values_and_torch_oracle():
    x = torch.tensor([0.5, -2.0, 0.0, 1.0])
    zero = torch.zeros(4)
    assert smooth_l1_loss(x, zero, beta=1.0, reduction="none").tolist() == [0.125, 1.5, 0.0, 0.5]
    assert smooth_l1_loss(x, zero, beta=1.0).item() == pytest.approx(2.125)
    assert smooth_l1_loss(x, zero, beta=0.0, reduction="mean").item() == pytest.approx(3.5 / 4)
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(50, generator=gen), torch.randn(50, generator=gen)
    for beta in (1 / 9, 0.5, 1.0):
        for red in ("sum", "mean", "none"):
            want = F.smooth_l1_loss(a, b, beta=beta, reduction=red)
            torch.testing.assert_close(smooth_l1_loss(a, b, beta, red), want)


@pytest.mark.parametrize(
    ("call", "exc", "name"),
    [
        (lambda: box_iou(torch.zeros(3, 3), torch.zeros(2, 4)), ValueError, "boxes1"),
        (lambda: box_iou(torch.zeros(3, 4), [[0, 0, 1, 1]]), TypeError, "boxes2"),
        (lambda: elementwise_box_iou(torch.zeros(3, 4), torch.zeros(2, 4)), ValueError, "boxes1"),
        (lambda: box_area(torch.zeros(2, 5)), ValueError, "boxes"),
        (lambda: box_convert(torch.zeros(2, 4), "xyxy", "yxyx"), ValueError, "out_fmt"),
        (lambda: clip_boxes_to_image(torch.zeros(2, 4), (3,)), ValueError, "size"),
        (lambda: encode_boxes(torch.zeros(2, 4), torch.zeros(3, 4)), ValueError, "reference_boxes"),
        (lambda: decode_boxes(torch.zeros(2, 4), torch.zeros(2, 5)), ValueError, "deltas"),
        (
            lambda: decode_boxes(torch.zeros(2, 4), torch.zeros(2, 4), (1.0, 1.0)),
            ValueError,
            "weights",
        ),
        (lambda: smooth_l1_loss(torch.zeros(2), torch.zeros(3)), ValueError, "shape"),
        (lambda: smooth_l1_loss(torch.zeros(2), torch.zeros(2), beta=-1), ValueError, "beta"),
        (
            lambda: smooth_l1_loss(torch.zeros(2), torch.zeros(2), reduction="avg"),
            ValueError,
            "reduction",
        ),
    ],
)
def test_bad_input_errors_name_the_argument(call, exc, name):
    with pytest.raises(exc, match=name):
        call()
