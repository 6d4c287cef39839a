"""Batch augmentation: random crop, flip, Cutout and normalization against brute force."""

from __future__ import annotations

import torch

from cnnkit.data.transforms import BatchAugment, cutout, cutout_mask, random_crop, random_flip


def _brute_crop(image, dy, dx, padding):
    c, h, w = image.shape
    out = torch.zeros_like(image)
    for i in range(h):
        for j in range(w):
            y, x = i + dy - padding, j + dx - padding
            if 0 <= y < h and 0 <= x < w:
                out[:, i, j] = image[:, y, x]
    return out


def test_random_crop_is_a_zero_padded_shift():
    x = torch.randint(1, 256, (16, 2, 6, 5), dtype=torch.uint8)
    out = random_crop(x, 2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    for n in range(16):
        # Exactly one of the 25 offsets reproduces each output: find it by brute force.
        matches = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.equal(out[n], _brute_crop(x[n], dy, dx, 2))
        ]
        assert len(matches) == 1


def test_random_crop_offsets_cover_the_range():
    x = torch.zeros(2000, 1, 1, 1, dtype=torch.uint8) + 1
    out = random_crop(x, 4, torch.Generator().manual_seed(1))
    # A 1x1 image survives only at offset (4, 4): probability 1/81.
    frac = out.float().mean().item()
    assert abs(frac - 1 / 81) < 0.01


def test_random_flip_mirrors_about_half():
    x = torch.arange(4 * 3).view(1, 1, 1, 12).repeat(1000, 1, 1, 1)
    out = random_flip(x, torch.Generator().manual_seed(0))
    flipped = (out == x.flip(3)).all(dim=(1, 2, 3))
    kept = (out == x).all(dim=(1, 2, 3))
    assert torch.all(flipped ^ kept)
    assert 400 < int(flipped.sum()) < 600


def _brute_cutout(h, w, size, cy, cx):
    mask = torch.zeros(h, w, dtype=torch.bool)
    for i in range(h):
        for j in range(w):
            # The square [cy - size//2, cy - size//2 + size) clipped to the image.
            if (
                cy - size // 2 <= i < cy - size // 2 + size
                and cx - size // 2 <= j < cx - size // 2 + size
            ):
                mask[i, j] = True
    return mask


def test_cutout_geometry_inside_and_partly_outside():
    h, w = 10, 12
    cases = [(4, 5, 6), (5, 5, 6), (0, 0, 6), (9, 11, 6), (9, 0, 3), (2, 7, 16)]
    for cy, cx, size in cases:
        mask = cutout_mask(size, h, w, torch.tensor([[cy, cx]]))[0]
        assert torch.equal(mask, _brute_cutout(h, w, size, cy, cx)), (cy, cx, size)
    # Well inside: exactly a size x size square at the right rows and columns.
    mask = cutout_mask(4, h, w, torch.tensor([[5, 6]]))[0]
    rows, cols = mask.nonzero(as_tuple=True)
    assert int(mask.sum()) == 16
    assert (rows.min().item(), rows.max().item(), cols.min().item(), cols.max().item()) == (
        3,
        6,
        4,
        7,
    )
    # Centre in a corner: clipped to the quarter inside the image.
    assert int(cutout_mask(4, h, w, torch.tensor([[0, 0]]))[0].sum()) == 4


def test_cutout_fill_and_random_centres():
    x = torch.ones(500, 3, 8, 8)
    fill = torch.tensor([7.0, 8.0, 9.0])
    out = cutout(x, 4, fill, torch.Generator().manual_seed(0))
    changed = out != 1
    # Each sample: the same square in every channel, filled with that channel's value.
    assert torch.equal(changed[:, 0], changed[:, 1]) and torch.equal(changed[:, 0], changed[:, 2])
    for c in range(3):
        assert torch.all(out[:, c][changed[:, c]] == fill[c])
    area = changed[:, 0].sum(dim=(1, 2))
    assert int(area.max()) == 16 and int(area.min()) >= 4  # corner centres keep a 2x2 quarter
    # Centres are uniform over all 64 pixels: P(fully inside) = (rows 2..6)^2 / 64 = 25/64.
    assert abs(float((area == 16).float().mean()) - 25 / 64) < 0.07


def test_batch_augment_cutout_fills_with_the_training_mean():
    mean, std = [0.2, 0.5], [0.1, 0.25]
    aug = BatchAugment(mean, std, crop_padding=0, flip=False, cutout_size=3)
    x = torch.full((50, 2, 9, 9), 255, dtype=torch.uint8)
    out = aug(x, train=True, generator=torch.Generator().manual_seed(0))
    pixels = out * torch.tensor(std).view(1, 2, 1, 1) + torch.tensor(mean).view(1, 2, 1, 1)
    cut = (pixels[:, 0] - 1.0).abs() > 1e-5
    assert cut.any()
    assert torch.allclose(pixels[:, 0][cut], torch.tensor(0.2))  # channel means, in [0, 1]
    assert torch.allclose(pixels[:, 1][cut], torch.tensor(0.5))
    assert torch.allclose(pixels[:, 0][~cut], torch.tensor(1.0), atol=1e-5)


def test_batch_augment_normalizes_and_eval_is_plain():
    aug = BatchAugment([0.5], [0.25], crop_padding=4, flip=True, cutout_size=8)
    x = torch.randint(0, 256, (4, 1, 5, 5), dtype=torch.uint8)
    out = aug(x, train=False)
    assert out.dtype == torch.float32
    assert torch.allclose(out, (x.float() / 255 - 0.5) / 0.25, atol=1e-5)
    # Float input in [0, 1] is the same image.
    assert torch.allclose(aug(x.float() / 255, train=False), out, atol=1e-5)
    assert aug(x, train=True, generator=torch.Generator().manual_seed(0)).shape == x.shape
