"""RoI pooling and RoIAlign against loop references written from the papers' definitions."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from cnnkit.ops import MultiScaleRoIAlign, RoIAlign, RoIPool, roi_align, roi_pool
from cnnkit.ops.roi import fpn_levels

# `cnnkit.ops.roi_pool` is the function; the module's internals are reached by name.
roi_pool_module = importlib.import_module("cnnkit.ops.roi_pool")


def bilinear(f: torch.Tensor, y: float, x: float) -> torch.Tensor:
    """Mask R-CNN's bilinear sample of ``f: [C, H, W]`` at (y, x), with the kernel's edge rules:
    0 beyond one pixel outside the map, clamped to the border pixels otherwise."""
    _, h, w = f.shape
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return torch.zeros(f.shape[0], dtype=f.dtype)
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= h - 1:
        y0 = y1 = h - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= w - 1:
        x0 = x1 = w - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    hy, hx = 1 - ly, 1 - lx
    return (
        hy * hx * f[:, y0, x0]
        + hy * lx * f[:, y0, x1]
        + ly * hx * f[:, y1, x0]
        + ly * lx * f[:, y1, x1]
    )


def ref_roi_align(x, rois, ph, pw, scale, ratio, aligned):
    out = torch.zeros(len(rois), x.shape[1], ph, pw, dtype=x.dtype)
    off = 0.5 if aligned else 0.0
    for k, (b, x1, y1, x2, y2) in enumerate(rois.tolist()):
        sx, sy = x1 * scale - off, y1 * scale - off
        rw, rh = x2 * scale - off - sx, y2 * scale - off - sy
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        bh, bw = rh / ph, rw / pw
        gh = ratio if ratio > 0 else math.ceil(rh / ph)
        gw = ratio if ratio > 0 else math.ceil(rw / pw)
        for i in range(ph):
            for j in range(pw):
                acc = torch.zeros(x.shape[1], dtype=x.dtype)
                for iy in range(gh):
                    yy = sy + i * bh + (iy + 0.5) * bh / gh
                    for ix in range(gw):
                        xx = sx + j * bw + (ix + 0.5) * bw / gw
                        acc += bilinear(x[int(b)], yy, xx)
                out[k, :, i, j] = acc / max(gh * gw, 1)
    return out


def c_round(v: float) -> int:
    return int(math.copysign(math.floor(abs(v) + 0.5), v))  # halves away from zero


def ref_pool_bins(rois, ph, pw, scale, h, w):
    """Fast R-CNN's quantized bins: ``(k, image, i, j, h0, h1, w0, w1)`` for every bin ``(i, j)``
    of every RoI ``k``, the cells ``[h0, h1) x [w0, w1)`` clipped to the ``h x w`` map."""
    for k, (b, x1, y1, x2, y2) in enumerate(rois.tolist()):
        sx, sy, ex, ey = (c_round(v * scale) for v in (x1, y1, x2, y2))
        rw, rh = max(ex - sx + 1, 1), max(ey - sy + 1, 1)
        for i in range(ph):
            h0 = min(max(math.floor(i * (rh / ph)) + sy, 0), h)
            h1 = min(max(math.ceil((i + 1) * (rh / ph)) + sy, 0), h)
            for j in range(pw):
                w0 = min(max(math.floor(j * (rw / pw)) + sx, 0), w)
                w1 = min(max(math.ceil((j + 1) * (rw / pw)) + sx, 0), w)
                yield k, int(b), i, j, h0, h1, w0, w1


def ref_roi_pool(x, rois, ph, pw, scale):
    _, c, h, w = x.shape
    out = torch.zeros(len(rois), c, ph, pw, dtype=x.dtype)
    for k, b, i, j, h0, h1, w0, w1 in ref_pool_bins(rois, ph, pw, scale, h, w):
        if h1 > h0 and w1 > w0:
            out[k, :, i, j] = x[b, :, h0:h1, w0:w1].amax(dim=(1, 2))
    return out


def random_case(seed: int, n=2, c=3, h=9, w=11, k=12, scale=0.5, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=gen, dtype=dtype)
    xy = torch.rand(k, 2, generator=gen, dtype=dtype) * torch.tensor([w, h]) / scale * 1.2 - 3
    wh = torch.rand(k, 2, generator=gen, dtype=dtype) * torch.tensor([w, h]) / scale * 0.7
    wh[0] = 0  # a degenerate RoI
    batch = torch.randint(0, n, (k, 1), generator=gen).to(dtype)
    return x, torch.cat((batch, xy, xy + wh), 1)


@pytest.mark.parametrize("ratio", [-1, 2, 3])
@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_matches_loop_reference(ratio, aligned):
    x, rois = random_case(seed=ratio + 10 * aligned)
    got = roi_align(x, rois, (3, 4), 0.5, ratio, aligned)
    torch.testing.assert_close(got, ref_roi_align(x, rois, 3, 4, 0.5, ratio, aligned))


def test_roi_align_on_a_ramp_hand_value():
    # f(y, x) = x: bilinear interpolation is exact. RoI [0, 4] (aligned: [-0.5, 3.5]), 1 bin,
    # 2 x 2 samples at x = 0.5 and 2.5: the mean is 1.5. Unaligned: samples at 1 and 3 -> 2.
    x = torch.arange(6, dtype=torch.float64).expand(1, 1, 6, 6).contiguous()
    box = torch.tensor([[0.0, 0.0, 0.0, 4.0, 4.0]], dtype=torch.float64)
    assert roi_align(x, box, 1, 1.0, 2, aligned=True).item() == pytest.approx(1.5)
    assert roi_align(x, box, 1, 1.0, 2, aligned=False).item() == pytest.approx(2.0)


def test_roi_pool_matches_loop_reference():
    for seed, scale, size in ((0, 0.5, (3, 4)), (1, 1.0, (2, 2)), (2, 0.25, (5, 3))):
        x, rois = random_case(seed=seed, scale=scale)
        torch.testing.assert_close(
            roi_pool(x, rois, size, scale), ref_roi_pool(x, rois, *size, scale)
        )


def test_roi_pool_gradient_goes_to_first_maximum():
    x = torch.zeros(1, 1, 4, 4, requires_grad=True)  # all ties
    roi_pool(x, torch.tensor([[0.0, 1.0, 1.0, 2.0, 2.0]]), 1, 1.0).sum().backward()
    expected = torch.zeros(1, 1, 4, 4)
    expected[0, 0, 1, 1] = 1.0  # row-major first cell of the window rows 1..2, cols 1..2
    assert torch.equal(x.grad, expected)


def ref_roi_pool_grad(x, rois, ph, pw, scale, grad):
    """Input gradient of RoI pooling: each bin's grad goes to its first maximum (row-major)."""
    _, c, h, w = x.shape
    out = torch.zeros_like(x)
    for k, b, i, j, h0, h1, w0, w1 in ref_pool_bins(rois, ph, pw, scale, h, w):
        for ch in range(c):
            best, where = None, None
            for yy in range(h0, h1):
                for xx in range(w0, w1):
                    v = x[b, ch, yy, xx].item()
                    if best is None or v > best:
                        best, where = v, (yy, xx)
            if where is not None:
                out[b, ch, where[0], where[1]] += grad[k, ch, i, j]
    return out


def test_roi_pool_values_and_gradient_match_reference_with_ties():
    x, rois = random_case(seed=5, c=3, k=10, scale=0.5)
    x = torch.round(x * 1.5).requires_grad_()  # few distinct values: many ties
    got = roi_pool(x, rois, (3, 4), 0.5)
    assert torch.equal(got, ref_roi_pool(x.detach(), rois, 3, 4, 0.5))
    grad = torch.randn(got.shape, generator=torch.Generator().manual_seed(0), dtype=x.dtype)
    got.backward(grad)
    assert torch.equal(x.grad, ref_roi_pool_grad(x.detach(), rois, 3, 4, 0.5, grad))


@pytest.mark.parametrize(("aligned", "ratio"), [(True, 2), (False, -1)])
def test_gradcheck_roi_align(aligned, ratio):
    x, rois = random_case(seed=3, n=1, c=2, h=5, w=6, k=4)
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: roi_align(t, rois, (2, 3), 0.5, ratio, aligned), (x,))


def test_gradcheck_roi_pool():
    x, rois = random_case(seed=4, n=1, c=2, h=5, w=6, k=4)  # random values: no ties
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: roi_pool(t, rois, (2, 3), 0.5), (x,))


def test_list_of_boxes_and_modules_equal_tensor_form():
    x, rois = random_case(seed=5, dtype=torch.float32)
    per_image = [rois[rois[:, 0] == i, 1:] for i in range(2)]
    order = torch.cat([torch.where(rois[:, 0] == i)[0] for i in range(2)])
    a = roi_align(x, per_image, 2, 0.5, 2, True)
    torch.testing.assert_close(a, roi_align(x, rois[order], 2, 0.5, 2, True))
    torch.testing.assert_close(RoIAlign(2, 0.5, 2, True)(x, per_image), a)
    p = roi_pool(x, per_image, 2, 0.5)
    torch.testing.assert_close(p, roi_pool(x, rois[order], 2, 0.5))
    torch.testing.assert_close(RoIPool(2, 0.5)(x, per_image), p)


def test_empty_and_degenerate_rois():
    x = torch.randn(1, 3, 5, 5, requires_grad=True)
    for fn in (lambda b: roi_align(x, b, 2, 1.0, -1, True), lambda b: roi_pool(x, b, 2, 1.0)):
        assert fn(torch.zeros(0, 5)).shape == (0, 3, 2, 2)
        out = fn(torch.tensor([[0.0, 2.0, 2.0, 2.0, 2.0], [0.0, 50.0, 50.0, 60.0, 60.0]]))
        assert torch.isfinite(out).all()
        out.sum().backward()
    # aligned, zero-size RoI with adaptive sampling: no samples, the bins are 0
    assert (
        roi_align(x, torch.tensor([[0.0, 2.0, 2.0, 2.0, 2.0]]), 2, 1.0, -1, True).abs().sum() == 0
    )


def test_fpn_levels_hand_computed():
    sizes = torch.tensor([10.0, 111.9, 112.0, 223.0, 224.0, 447.0, 448.0, 2000.0])
    boxes = torch.stack((torch.zeros(8), torch.zeros(8), sizes, sizes), 1)
    # k = floor(4 + log2(s / 224)) in [2, 5]: 10 -> -0.5 -> 2; 111.9 -> 2; 112 -> 3; 223 -> 3;
    # 224 -> 4; 447 -> 4; 448 -> 5; 2000 -> 7 -> 5. Returned relative to k_min = 2.
    assert fpn_levels(boxes, 2, 5).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_multiscale_roi_align_picks_the_level_and_scale():
    gen = torch.Generator().manual_seed(6)
    names = ["p2", "p3", "p4", "p5"]
    image = (512, 512)
    feats = {
        n: torch.randn(1, 2, 512 // 2**i, 512 // 2**i, generator=gen)
        for i, n in enumerate(names, 2)
    }
    sizes = [60.0, 112.0, 224.0, 448.0, 223.0]
    boxes = [torch.tensor([[10.0, 20.0, 10.0 + s, 20.0 + s] for s in sizes])]
    out = MultiScaleRoIAlign(names, (3, 3), 2)(feats, boxes, [image])
    for s, level, row in zip(sizes, [2, 3, 4, 5, 3], out, strict=True):
        box = torch.tensor([[0.0, 10.0, 20.0, 10.0 + s, 20.0 + s]])
        want = roi_align(feats[f"p{level}"], box, (3, 3), 2.0**-level, 2, aligned=False)
        torch.testing.assert_close(row, want[0])


def test_multiscale_single_level_and_missing_key():
    x = {"feat": torch.randn(1, 2, 16, 16)}
    box = [torch.tensor([[0.0, 0.0, 30.0, 30.0]])]
    out = MultiScaleRoIAlign(["feat"], 2, 2)(x, box, [(64, 64)])
    torch.testing.assert_close(out, roi_align(x["feat"], box, 2, 0.25, 2))
    with pytest.raises(ValueError, match="p9"):
        MultiScaleRoIAlign(["p9"], 2, 2)(x, box, [(64, 64)])


@pytest.mark.parametrize(
    ("call", "exc", "name"),
    [
        (lambda: roi_align(torch.zeros(2, 3, 4), torch.zeros(1, 5), 2), ValueError, "input"),
        (lambda: roi_align(torch.zeros(1, 1, 4, 4), torch.zeros(1, 4), 2), ValueError, "boxes"),
        (
            lambda: roi_pool(torch.zeros(1, 1, 4, 4), [torch.zeros(1, 5)], 2),
            ValueError,
            r"boxes\[0\]",
        ),
        (lambda: roi_pool(torch.zeros(1, 1, 4, 4), "boxes", 2), TypeError, "boxes"),
        (
            lambda: roi_align(torch.zeros(1, 1, 4, 4), torch.zeros(1, 5), (2, 0)),
            ValueError,
            "output_size",
        ),
        (lambda: roi_align([[0.0]], torch.zeros(1, 5), 2), TypeError, "input"),
    ],
)
def test_bad_input_errors_name_the_argument(call, exc, name):
    with pytest.raises(exc, match=name):
        call()


def _check_pool_against_reference(x, rois, size, scale):
    """Values and input gradient of roi_pool equal (bit for bit) the loop references."""
    x = x.detach().requires_grad_()
    got = roi_pool(x, rois, size, scale)
    assert torch.equal(got, ref_roi_pool(x.detach(), rois, *size, scale).to(x.dtype))
    grad = torch.randn(got.shape, generator=torch.Generator().manual_seed(1)).to(x.dtype)
    got.backward(grad)
    assert torch.equal(x.grad, ref_roi_pool_grad(x.detach(), rois, *size, scale, grad))


@pytest.mark.parametrize("size", [(1, 1), (2, 3), (3, 4)])
def test_roi_pool_float32_ties_and_large_windows(size):
    # float32 takes the bit-pattern key path (float64 ranks its values); (1, 1) and (2, 3) bins
    # span up to 11 x 13 cells: several window maps and two look-ups per axis.
    x, rois = random_case(seed=7, c=4, h=11, w=13, k=16, scale=1.0, dtype=torch.float32)
    _check_pool_against_reference(torch.round(x * 1.5), rois, size, 1.0)


@pytest.mark.parametrize("per_element", [True, False])
def test_roi_pool_images_without_rois_and_clipped_rois(monkeypatch, per_element):
    # An image with no RoI, RoIs in the last image (keys carry global indices), and RoIs beyond
    # the map's edges (clipped or empty bins), with element and row keys.
    if not per_element:
        monkeypatch.setattr(roi_pool_module, "_INT32_INDEX_LIMIT", 0)
    x = torch.round(torch.randn(3, 2, 7, 9, generator=torch.Generator().manual_seed(3)) * 2)
    rois = torch.tensor(
        [
            [2.0, 3.0, 2.0, 30.0, 40.0],  # runs past the bottom-right corner
            [0.0, -9.0, -9.0, 4.0, 5.0],  # starts before the top-left corner
            [2.0, 20.0, 16.0, 25.0, 20.0],  # entirely outside: empty bins
            [0.0, 1.0, 1.0, 1.0, 1.0],  # a single cell
        ]
    )
    _check_pool_against_reference(x, rois, (3, 4), 0.5)


def test_roi_pool_negative_zero_ties_with_zero():
    # -0.0 == +0.0: the first of them in row-major order gets the gradient.
    x = torch.tensor([[[[-0.0, 0.0], [0.0, -1.0]]]], requires_grad=True)
    roi_pool(x, torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0]]), 1, 1.0).sum().backward()
    assert x.grad.tolist() == [[[[1.0, 0.0], [0.0, 0.0]]]]


def test_roi_pool_row_keys_when_element_indices_overflow_int32(monkeypatch):
    # Feature maps of 2**31 elements or more key by row; forced here on a small map.
    monkeypatch.setattr(roi_pool_module, "_INT32_INDEX_LIMIT", 0)
    x, rois = random_case(seed=8, c=3, k=10, scale=0.5, dtype=torch.float32)
    _check_pool_against_reference(torch.round(x * 1.5), rois, (3, 2), 0.5)


def test_roi_pool_bfloat16_equals_float32():
    x, rois = random_case(seed=9, c=3, k=10, scale=0.5, dtype=torch.float32)
    x = x.bfloat16()
    got = roi_pool(x, rois.float(), (2, 2), 0.5)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, roi_pool(x.float(), rois.float(), (2, 2), 0.5).bfloat16())


def test_window_ladder_doubles_at_most():
    assert roi_pool_module._ladder([1]) == [1]
    assert roi_pool_module._ladder([2, 8, 4]) == [1, 2, 4, 8]
    assert roi_pool_module._ladder([3, 13]) == [1, 2, 3, 6, 12, 13]


# ------------------------------------------------------------ layout, as torchvision's


@pytest.mark.parametrize("k", [0, 1, 5])
@pytest.mark.parametrize("size", [(1, 1), (2, 3), (7, 7)])
@pytest.mark.parametrize(
    "op",
    [
        lambda x, b, s: roi_align(x, b, s, 0.5, 2, aligned=False),
        lambda x, b, s: roi_align(x, b, s, 0.5, 2, aligned=True),
        lambda x, b, s: roi_align(x, b, s, 0.5, -1, aligned=True),  # one RoI group per grid
        lambda x, b, s: roi_pool(x, b, s, 0.5),
    ],
    ids=["align", "align-aligned", "align-adaptive", "pool"],
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_outputs_are_contiguous_like_torchvision(op, size, k, channels_last):
    # torchvision returns a contiguous [K, C, ph, pw] tensor (also for a channels_last input), and
    # code written for it flattens with .view: a permuted view would raise there.
    x, rois = random_case(seed=11, c=3, k=max(k, 1), dtype=torch.float32)
    rois = rois[:k]
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    out = op(x, rois, size)
    assert out.shape == (k, 3, *size)
    assert out.is_contiguous()
    # .view raises on a non-contiguous layout (and on [0, -1]: ambiguous, for torchvision too)
    flat = out.view(k, -1) if k else out.view(0, 3 * size[0] * size[1])
    flat.sum().backward()
    assert x.grad.shape == x.shape


def test_multiscale_output_is_contiguous():
    feats = {n: torch.randn(1, 3, 64 // 2**i, 64 // 2**i) for i, n in enumerate(["p2", "p3"])}
    boxes = [torch.tensor([[0.0, 0.0, 40.0, 40.0], [3.0, 5.0, 60.0, 62.0]])]
    for names in (["p2"], ["p2", "p3"]):
        out = MultiScaleRoIAlign(names, (7, 7), 2)(feats, boxes, [(256, 256)])
        assert out.is_contiguous()
        assert out.view(2, -1).shape == (2, 3 * 49)


# ------------------------------------------------------- reduced-precision feature maps


def far_case(seed: int = 12):
    """A 1/4-scale map of a 1024-pixel image with RoIs near x = 500 (y = 300): there bfloat16
    holds only every 2nd (4th above 512) pixel and float16 every quarter pixel, so RoIs cast to
    the feature dtype move by up to a quarter of a feature cell."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 100, 256, generator=gen)
    x1 = 480.0 + 40.0 * torch.rand(8, generator=gen)
    y1 = 280.0 + 40.0 * torch.rand(8, generator=gen)
    w = 20.0 + 60.0 * torch.rand(8, generator=gen)
    h = 20.0 + 60.0 * torch.rand(8, generator=gen)
    batch = torch.tensor([0.0, 1.0] * 4)
    return x, torch.stack((batch, x1, y1, x1 + w, y1 + h), 1)


def assert_rounded_float32_result(got, x_low, want_fn, rois, *, sensitive_to=None):
    """``got`` equals ``want_fn`` computed in float32 on ``x_low.float()``, rounded to
    ``x_low.dtype`` (within that rounding: 2**-8 relative); and, so that this can fail, RoIs
    rounded to the low dtype (the old behaviour) would miss by far more."""
    want = want_fn(x_low.float(), rois).to(x_low.dtype)
    assert got.dtype == x_low.dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-8, atol=1e-6)
    if sensitive_to is not None:
        rounded = rois.to(x_low.dtype).float()
        miss = (want_fn(x_low.float(), rounded) - want.float()).abs().max().item()
        assert miss > sensitive_to, f"the case is not sensitive to RoI rounding ({miss})"


@pytest.mark.parametrize(("dtype", "miss"), [(torch.bfloat16, 0.1), (torch.float16, 0.02)])
@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_low_precision_features_keep_float32_coordinates(dtype, miss, aligned):
    x, rois = far_case()
    x_low = x.to(dtype)

    def fn(t, r):
        return roi_align(t, r, (7, 7), 0.25, 2, aligned)

    assert_rounded_float32_result(fn(x_low, rois), x_low, fn, rois, sensitive_to=miss)
    # adaptive sampling: the grid of each RoI comes from float32 sizes too
    adaptive = roi_align(x_low, rois, (7, 7), 0.25, -1, aligned)
    want = roi_align(x_low.float(), rois, (7, 7), 0.25, -1, aligned).to(dtype)
    torch.testing.assert_close(adaptive.float(), want.float(), rtol=2**-8, atol=1e-6)


def test_roi_align_bfloat16_gradient_is_the_float32_one_rounded():
    x, rois = far_case()
    x_low = x.bfloat16().requires_grad_()
    x32 = x_low.detach().float().requires_grad_()
    grad = torch.randn(8, 4, 7, 7, generator=torch.Generator().manual_seed(0)).bfloat16()
    roi_align(x_low, rois, (7, 7), 0.25, 2, True).backward(grad)
    roi_align(x32, rois, (7, 7), 0.25, 2, True).backward(grad.float())
    assert x_low.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x_low.grad.float(), x32.grad.bfloat16().float(), rtol=2**-8, atol=0)


def test_roi_align_under_cpu_autocast_follows_torchvision():
    # torchvision registers roi_align for autocast: it runs in float32 and casts the result back
    # to the input's dtype. So float32 features stay float32 (bit for bit the plain result), and
    # the bfloat16 features that a conv yields under autocast give the float32 result rounded.
    x, rois = far_case()
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    plain = roi_align(x, rois, (7, 7), 0.25, 2, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = roi_align(x, rois, (7, 7), 0.25, 2, True)
        feat = conv(x)
        pooled = roi_align(feat, rois, (7, 7), 0.25, 2, True)
    assert out.dtype == torch.float32
    assert torch.equal(out, plain)
    assert feat.dtype == torch.bfloat16

    def fn(t, r):
        return roi_align(t, r, (7, 7), 0.25, 2, True)

    assert_rounded_float32_result(pooled, feat.detach(), fn, rois, sensitive_to=0.1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_roi_pool_low_precision_features_keep_float32_coordinates(dtype):
    # A max is exact in any dtype, so the result equals the float32 one bit for bit; RoIs rounded
    # to bfloat16 would shift the quantized bins (501.3 / 4 rounds to 125, 502 / 4 to 126).
    x, rois = far_case()
    x_low = x.to(dtype)
    got = roi_pool(x_low, rois, (7, 7), 0.25)
    assert got.dtype == dtype
    assert torch.equal(got, roi_pool(x_low.float(), rois, (7, 7), 0.25).to(dtype))
    if dtype == torch.bfloat16:
        shifted = roi_pool(x_low.float(), rois.bfloat16().float(), (7, 7), 0.25)
        assert not torch.equal(shifted.to(dtype), got)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(roi_pool(x, rois, (7, 7), 0.25), roi_pool(x, rois, (7, 7), 0.25))
        assert roi_pool(x, rois, (7, 7), 0.25).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_multiscale_roi_align_low_precision_features(dtype):
    # Levels from float32 box sizes, sampling in float32, one rounding of the output.
    gen = torch.Generator().manual_seed(13)
    names = ["p2", "p3", "p4"]
    feats = {
        n: torch.randn(1, 3, 1024 // 2**i, 1024 // 2**i, generator=gen).to(dtype)
        for i, n in enumerate(names, 2)
    }
    x1 = 480.0 + 40.0 * torch.rand(12, 1, generator=gen)
    size = torch.tensor([30.0, 90.0, 150.0, 200.0, 300.0, 440.0] * 2)[:, None]
    boxes = [torch.cat((x1, x1 - 100.0, x1 + size, x1 - 100.0 + size), 1)]
    pooler = MultiScaleRoIAlign(names, (7, 7), 2)
    got = pooler(feats, boxes, [(1024, 1024)])
    want = pooler({n: f.float() for n, f in feats.items()}, boxes, [(1024, 1024)]).to(dtype)
    assert got.dtype == dtype and got.is_contiguous()
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-8, atol=1e-6)


def test_traced_roi_align_follows_the_number_of_rois():
    """An exported (traced) model pools however many RoIs come at run time, none included,
    although its example had 3 (the eager path chunks and groups them in Python)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 4, 12, 16, generator=gen)

    def pool(feature, rois):
        return roi_align(feature, rois, (3, 2), 0.5, 2, True)

    def rois(k):
        corner = torch.rand(k, 2, generator=gen) * 20
        index = torch.randint(0, 2, (k, 1), generator=gen).float()
        return torch.cat([index, corner, corner + torch.rand(k, 2, generator=gen) * 20 + 1], 1)

    with torch.no_grad():
        traced = torch.jit.trace(pool, (x, rois(3)), check_trace=False)
    for k in (0, 1, 3, 40):
        r = rois(k)
        assert traced(x, r).shape == (k, 4, 3, 2)
        torch.testing.assert_close(traced(x, r), pool(x, r), rtol=0, atol=0)


def test_tracing_refuses_adaptive_sampling():
    with pytest.raises(ValueError, match="sampling_ratio > 0"):
        torch.jit.trace(
            lambda f, r: roi_align(f, r, 2, 1.0, -1), (torch.rand(1, 1, 8, 8), torch.ones(1, 5))
        )
