"""Batch augmentation as tensor operations, run on the training device.

The standard CIFAR augmentation (He et al., 2016, Sec. 4.2: "4 pixels are padded on each side,
and a 32x32 crop is randomly sampled from the padded image or its horizontal flip") and Cutout
(DeVries & Taylor, 2017) applied to a whole ``[N, C, H, W]`` batch at once: a few indexing and
comparison kernels per batch instead of N Python-level image operations.

Order inside :class:`BatchAugment`: crop and flip on ``uint8`` (one byte per value moves the
least memory; the padding is black, 0, as torchvision's ``RandomCrop(padding=4)``), then
conversion to float and normalization by the training split's mean/std, then Cutout with 0,
which in normalized space *is* the training mean, as in the paper's code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def random_crop(x: Tensor, padding: int, generator: torch.Generator | None = None) -> Tensor:
    """Zero-pad ``x`` ``[N, C, H, W]`` by ``padding`` on each side and crop ``H x W`` back.

    Each sample gets its own offset ``(dy, dx)`` uniform in ``0..2*padding``; output pixel
    ``(i, j)`` is padded pixel ``(i + dy, j + dx)``, i.e. input pixel
    ``(i + dy - padding, j + dx - padding)`` or 0 outside the image.
    """
    if padding <= 0:
        return x
    n, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    offsets = torch.randint(0, 2 * padding + 1, (2, n), device=x.device, generator=generator)
    rows = (offsets[0, :, None] + torch.arange(h, device=x.device))[:, :, None]  # [N, H, 1]
    cols = (offsets[1, :, None] + torch.arange(w, device=x.device))[:, None, :]  # [N, 1, W]
    batch = torch.arange(n, device=x.device)[:, None, None]
    # Advanced indexing on dims 0, 2, 3 puts them first: [N, H, W, C] -> back to NCHW.
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


def random_flip(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Mirror each sample of ``[N, C, H, W]`` left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def cutout_mask(size: int, height: int, width: int, centers: Tensor) -> Tensor:
    """``bool [N, H, W]``: True inside the ``size x size`` square centred on each ``centers[n]``.

    The square covers rows ``cy - size // 2 .. cy - size // 2 + size - 1`` (likewise columns),
    clipped to the image: a centre near the border removes less than ``size**2`` pixels, as in
    the paper (Sec. 3.2), which lets the network also see partially occluded images.

    Args:
        centers: ``int64 [N, 2]`` of ``(cy, cx)``.
    """
    top = centers[:, 0] - size // 2
    left = centers[:, 1] - size // 2
    rows = torch.arange(height, device=centers.device)
    cols = torch.arange(width, device=centers.device)
    in_rows = (rows >= top[:, None]) & (rows < (top + size)[:, None])  # [N, H]
    in_cols = (cols >= left[:, None]) & (cols < (left + size)[:, None])  # [N, W]
    return in_rows[:, :, None] & in_cols[:, None, :]


def cutout(
    x: Tensor,
    size: int,
    fill: float | Tensor = 0.0,
    generator: torch.Generator | None = None,
    centers: Tensor | None = None,
) -> Tensor:
    """Cutout (DeVries & Taylor, 2017): one ``size x size`` square per sample set to ``fill``.

    Args:
        x: ``[N, C, H, W]`` float batch (normalized: ``fill=0`` is the training mean).
        size: side of the square; 0 disables.
        fill: a scalar or a per-channel ``[C]`` tensor.
        centers: ``int64 [N, 2]`` centres ``(cy, cx)``; by default uniform over all pixels,
            so the square may lie partly outside the image.
    Returns:
        A new ``[N, C, H, W]`` tensor.
    """
    if size <= 0:
        return x
    n, c, h, w = x.shape
    if centers is None:
        cy = torch.randint(0, h, (n,), device=x.device, generator=generator)
        cx = torch.randint(0, w, (n,), device=x.device, generator=generator)
        centers = torch.stack([cy, cx], dim=1)
    mask = cutout_mask(size, h, w, centers.to(x.device))[:, None]  # [N, 1, H, W]
    if isinstance(fill, (int, float)):  # a scalar goes to the kernel as is: no host-to-device copy
        return x.masked_fill(mask, fill)
    fill_t = torch.as_tensor(fill, dtype=x.dtype, device=x.device).reshape(-1, 1, 1)
    return torch.where(mask, fill_t, x)


class BatchAugment:
    """uint8 batch -> normalized float batch, with the training augmentation when asked.

    Args:
        mean, std: per-channel statistics of the training split, in [0, 1] units.
        crop_padding: the random-crop padding (4 for CIFAR; 0 disables).
        flip: random horizontal flips (off for digits: a mirrored 2 is no digit).
        cutout_size: Cutout square side (0 disables).
        channels_last: return the batch in channels_last memory format.
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        crop_padding: int = 4,
        flip: bool = True,
        cutout_size: int = 0,
        channels_last: bool = False,
    ) -> None:
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
        if crop_padding < 0 or cutout_size < 0:
            raise ValueError(
                f"crop_padding={crop_padding} and cutout_size={cutout_size} must be >= 0"
            )
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]
        self.crop_padding = int(crop_padding)
        self.flip = bool(flip)
        self.cutout_size = int(cutout_size)
        self.channels_last = channels_last
        # (device, scale) -> the [1, C, 1, 1] factors of normalize, built once per device so the
        # per-step path copies nothing from the host.
        self._affine: dict[tuple[torch.device, float], tuple[Tensor, Tensor]] = {}

    def _affine_factors(self, device: torch.device, scale: float) -> tuple[Tensor, Tensor]:
        """``(a, b)``, each ``float32 [1, C, 1, 1]``: ``(x / scale - mean) / std == x * a + b``."""
        key = (device, scale)
        if key not in self._affine:
            a = torch.tensor([1.0 / (scale * s) for s in self.std], device=device)
            b = torch.tensor(
                [-m / s for m, s in zip(self.mean, self.std, strict=True)], device=device
            )
            self._affine[key] = (a.view(1, -1, 1, 1), b.view(1, -1, 1, 1))
        return self._affine[key]

    def normalize(self, x: Tensor) -> Tensor:
        """uint8 ``[N, C, H, W]`` (0..255) or float in [0, 1] -> ``(x - mean) / std``, float32."""
        if x.shape[1] != len(self.mean):
            raise ValueError(
                f"images have {x.shape[1]} channels but the normalization has {len(self.mean)}"
            )
        scale = 255.0 if x.dtype == torch.uint8 else 1.0
        # (x / scale - mean) / std == x * a + b, one fused multiply-add per value.
        a, b = self._affine_factors(x.device, scale)
        out = torch.addcmul(b, x.float(), a)
        return out.contiguous(memory_format=torch.channels_last) if self.channels_last else out

    def __call__(
        self, x: Tensor, *, train: bool, generator: torch.Generator | None = None
    ) -> Tensor:
        """``uint8 [N, C, H, W]`` -> ``float32 [N, C, H, W]``; augmented only when ``train``."""
        if train:
            x = random_crop(x, self.crop_padding, generator)
            if self.flip:
                x = random_flip(x, generator)
        out = self.normalize(x)
        if train and self.cutout_size:
            out = cutout(out, self.cutout_size, 0.0, generator)
        return out


# --------------------------------------------------------------------------- joint detection flips
#
# Pixel convention: continuous coordinates, pixel column c covers [c, c + 1) (COCO's boxes and
# keypoints, torchvision's and detectron2's flips). Mirroring a W-wide image sends column c to
# W - 1 - c, so a coordinate x to W - x: a box (x1, y1, x2, y2) becomes (W - x2, y1, W - x1, y2)
# (it covers the mirrored pixels exactly) and a keypoint at x goes to W - x.


def hflip_boxes(boxes: Tensor, width: float) -> Tensor:
    """``[N, 4]`` xyxy boxes of a ``width``-wide image, mirrored left-right."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([width - x2, y1, width - x1, y2], dim=-1)


def hflip_masks(masks: Tensor) -> Tensor:
    """``[N, H, W]`` masks mirrored left-right."""
    return masks.flip(-1)


def hflip_keypoints(keypoints: Tensor, width: float, flip_map: Sequence[int]) -> Tensor:
    """``[N, K, 3]`` keypoints ``(x, y, visibility)`` of a ``width``-wide image, mirrored.

    A mirrored left eye is where a right eye belongs: the new keypoint ``k`` is the old
    keypoint ``flip_map[k]`` (``cnnkit.data.detection_split.keypoint_flip_map``) at
    ``x' = width - x``. Points not labelled (visibility 0, COCO's ``(0, 0, 0)``) keep their
    coordinates.
    """
    index = torch.as_tensor(list(flip_map), dtype=torch.long, device=keypoints.device)
    if index.numel() != keypoints.shape[1]:
        raise ValueError(
            f"flip_map has {index.numel()} entries but the keypoints are {list(keypoints.shape)}"
        )
    out = keypoints[:, index].clone()
    labelled = out[..., 2] > 0
    out[..., 0] = torch.where(labelled, width - out[..., 0], out[..., 0])
    return out


def hflip_detection(
    image: Tensor, target: dict, flip_map: Sequence[int] | None = None
) -> tuple[Tensor, dict]:
    """``image [C, H, W]`` and its target (``boxes``; optional ``masks``, ``keypoints``, which
    need ``flip_map``) mirrored left-right together; other keys are kept as they are."""
    width = image.shape[-1]
    out = dict(target)
    out["boxes"] = hflip_boxes(target["boxes"], width)
    if "masks" in target:
        out["masks"] = hflip_masks(target["masks"])
    if "keypoints" in target:
        if flip_map is None:
            raise ValueError("hflip_detection: keypoints need a flip_map")
        out["keypoints"] = hflip_keypoints(target["keypoints"], width, flip_map)
    return image.flip(-1), out
