"""Pasting box-local masks: against a per-pixel bilinear reference, torch's interpolate on integer
boxes, and pycocotools' RLE encoder."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from cnnkit.detection.paste import masks_to_rles, paste_masks, paste_masks_dense


def reference_paste(mask: np.ndarray, box, height: int, width: int) -> np.ndarray:
    """Pixel by pixel, in float64: a pixel whose centre lies in the box takes the bilinear
    interpolation of the mask at the centre's position in cell units (cell centres at integers,
    edge cells extended to the box's border); every other pixel is 0."""
    mh, mw = mask.shape
    x1, y1, x2, y2 = (float(v) for v in box)
    out = np.zeros((height, width))
    for y in range(height):
        for x in range(width):
            cx, cy = x + 0.5, y + 0.5
            if not (x1 <= cx < x2 and y1 <= cy < y2):
                continue
            u = min(max((cx - x1) / (x2 - x1) * mw - 0.5, 0.0), mw - 1.0)
            v = min(max((cy - y1) / (y2 - y1) * mh - 0.5, 0.0), mh - 1.0)
            j0, i0 = math.floor(u), math.floor(v)
            j1, i1 = min(j0 + 1, mw - 1), min(i0 + 1, mh - 1)
            a, b = u - j0, v - i0
            out[y, x] = (
                (1 - a) * (1 - b) * mask[i0, j0]
                + a * (1 - b) * mask[i0, j1]
                + (1 - a) * b * mask[i1, j0]
                + a * b * mask[i1, j1]
            )
    return out


# Fractional boxes, boxes crossing the image's border, one covering it all, a sub-pixel box that
# contains one pixel centre, one that contains none, and a degenerate one.
BOXES = [
    [2.3, 1.7, 13.9, 9.2],
    [-4.0, 3.5, 6.25, 30.0],
    [10.0, 6.0, 40.0, 19.5],
    [0.0, 0.0, 24.0, 18.0],
    [5.2, 5.3, 5.8, 5.9],
    [5.6, 5.6, 5.9, 5.9],
    [7.0, 4.0, 7.0, 9.0],
]


def test_paste_matches_the_per_pixel_bilinear_reference():
    g = torch.Generator().manual_seed(0)
    height, width = 18, 24
    probs = torch.rand(len(BOXES), 1, 6, 6, generator=g)
    out = paste_masks(probs, torch.tensor(BOXES), (height, width))
    assert out.shape == (len(BOXES), 1, height, width) and out.dtype == torch.float32
    for i, box in enumerate(BOXES):
        want = reference_paste(probs[i, 0].double().numpy(), box, height, width)
        np.testing.assert_allclose(out[i, 0].numpy(), want, atol=2e-6, err_msg=f"box {box}")
    # Zero outside every box; the sub-pixel box still paints the one pixel whose centre it holds.
    assert out[4, 0].count_nonzero() == 1 and out[4, 0, 5, 5] > 0
    assert out[5, 0].count_nonzero() == 0 and out[6, 0].count_nonzero() == 0


def test_integer_boxes_give_torch_interpolate_placed_at_the_box():
    g = torch.Generator().manual_seed(1)
    probs = torch.rand(3, 1, 28, 28, generator=g)
    boxes = torch.tensor([[3.0, 5.0, 43.0, 22.0], [0.0, 0.0, 28.0, 28.0], [30.0, 10.0, 37.0, 40.0]])
    out = paste_masks(probs, boxes, (40, 50))
    for i, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
        want = torch.zeros(40, 50)
        resized = F.interpolate(
            probs[i : i + 1], size=(y2 - y1, x2 - x1), mode="bilinear", align_corners=False
        )
        want[y1:y2, x1:x2] = resized[0, 0]
        torch.testing.assert_close(out[i, 0], want, atol=3e-6, rtol=0)
    # A box of exactly the mask's size copies it.
    assert torch.equal(out[1, 0, :28, :28], probs[1, 0])


def test_masks_to_rles_equal_pycocotools_encode_of_the_thresholded_paste():
    g = torch.Generator().manual_seed(2)
    height, width = 18, 24
    boxes = torch.tensor(BOXES + [[0.0, 0.0, 24.0, 18.0], [0.0, 0.0, 24.0, 18.0], [0, 0, 3, 18]])
    probs = torch.rand(len(boxes), 1, 6, 6, generator=g)
    probs[-3] = 1.0  # the whole image: one run over every column boundary
    probs[-2] = 0.0  # nothing
    probs[-1] = 1.0  # full-height columns: runs that continue into the next column
    rles = masks_to_rles(probs, boxes, (height, width))
    dense = paste_masks(probs, boxes, (height, width))[:, 0] > 0.5
    want = mask_utils.encode(np.asfortranarray(dense.permute(1, 2, 0).numpy().astype(np.uint8)))
    assert len(rles) == len(want)
    for got, ref in zip(rles, want, strict=True):
        assert got == {"size": [height, width], "counts": ref["counts"].decode("ascii")}
        assert isinstance(got["counts"], str)
    assert dense[-3].all() and not dense[-2].any() and dense[-1, :, :3].all()
    # Another threshold: values are compared with ">", so 0 keeps every pixel with mass.
    for t in (0.0, 0.9):
        got = masks_to_rles(probs, boxes, (height, width), threshold=t)
        ref = mask_utils.encode(
            np.asfortranarray(
                (paste_masks(probs, boxes, (height, width))[:, 0] > t)
                .permute(1, 2, 0)
                .numpy()
                .astype(np.uint8)
            )
        )
        assert [r["counts"] for r in got] == [r["counts"].decode("ascii") for r in ref]


def test_no_detections():
    empty = torch.zeros(0, 1, 28, 28)
    out = paste_masks(empty, torch.zeros(0, 4), (30, 40))
    assert out.shape == (0, 1, 30, 40) and out.dtype == torch.float32
    assert masks_to_rles(empty, torch.zeros(0, 4), (30, 40)) == []


def test_bad_arguments():
    with pytest.raises(ValueError, match="mask_probs"):
        paste_masks(torch.zeros(2, 28, 28), torch.zeros(2, 4), (10, 10))
    with pytest.raises(ValueError, match="boxes"):
        paste_masks(torch.zeros(2, 1, 28, 28), torch.zeros(3, 4), (10, 10))
    with pytest.raises(ValueError, match="image_size"):
        masks_to_rles(torch.zeros(1, 1, 28, 28), torch.zeros(1, 4), (0, 10))


def test_dense_paste_of_exported_models_equals_the_paste():
    """paste_masks_dense (every pixel, tensor operations: what a traced model runs) gives the
    box-by-box paste bit for bit, for boxes inside, across and outside the image, thin or empty,
    and for no masks at all."""
    gen = torch.Generator().manual_seed(3)
    corner = torch.rand(40, 2, generator=gen) * 90 - 20
    size = torch.rand(40, 2, generator=gen) * 50
    size[:4] = torch.tensor([[0.0, 5.0], [0.3, 0.3], [200.0, 1.0], [50.0, 0.0]])
    boxes = torch.cat([corner, corner + size], 1)
    masks = torch.rand(40, 1, 28, 28, generator=gen)
    for n in (0, 1, 40):
        dense = paste_masks_dense(masks[:n], boxes[:n], (61, 75))
        assert torch.equal(dense, paste_masks(masks[:n], boxes[:n], (61, 75)))
    assert dense.count_nonzero() > 0


def test_traced_paste_follows_the_number_of_masks():
    gen = torch.Generator().manual_seed(4)
    masks, boxes = torch.rand(5, 1, 28, 28, generator=gen), torch.rand(5, 4, generator=gen) * 30
    boxes[:, 2:] += boxes[:, :2]
    with torch.no_grad():
        traced = torch.jit.trace(
            lambda m, b: paste_masks(m, b, (40, 50)), (masks[:2], boxes[:2]), check_trace=False
        )
    for n in (0, 1, 5):
        assert torch.equal(
            traced(masks[:n], boxes[:n]), paste_masks(masks[:n], boxes[:n], (40, 50))
        )
