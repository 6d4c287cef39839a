"""Resize, normalize and batch images for a detector, and map its detections back.

A detector sees one padded batch ``[B, 3, H, W]``: each image is resized so that its shorter
side becomes ``min_size`` unless its longer side would then exceed ``max_size`` (Faster R-CNN,
sec. 4: "we re-scale the images such that their shorter side is s = 600 pixels"; FPN and
torchvision use 800 / 1333), normalized by the ImageNet mean and std, and zero-padded at the
bottom and right to a multiple of ``size_divisible`` (the coarsest stride, so that FPN's
top-down sums line up). Targets are rescaled with the image; detections are mapped back to the
original image coordinates by :meth:`DetectionTransform.postprocess`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DetectionTransform", "ImageBatch", "resize_boxes", "resized_size"]


@dataclass
class ImageBatch:
    """Images of a detector's batch.

    Attributes:
        tensors: ``Tensor[B, 3, H, W]`` normalized, zero-padded to a multiple of ``size_divisible``.
        image_sizes: ``(h, w)`` of each resized image inside ``tensors`` (before padding).
        original_sizes: ``(h, w)`` of each input image.
    """

    tensors: Tensor
    image_sizes: list[tuple[int, int]]
    original_sizes: list[tuple[int, int]]

    @property
    def padded_size(self) -> tuple[int, int]:
        """``(H, W)`` of the padded batch."""
        return int(self.tensors.shape[-2]), int(self.tensors.shape[-1])


def resized_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """``(h', w')`` of an image resized by ``s = min(min_size / shorter, max_size / longer)``.

    Sizes are ``floor(h * s)`` as torchvision's ``interpolate(recompute_scale_factor=True)``, with
    a 1e-6 tolerance so that the shorter side lands exactly on ``min_size`` despite rounding in
    ``s`` (``600 * (800 / 600)`` is 799.99... in floating point).
    """
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return (
        max(1, math.floor(height * scale + 1e-6)),
        max(1, math.floor(width * scale + 1e-6)),
    )


def resize_boxes(boxes: Tensor, original_size: Sequence[int], new_size: Sequence[int]) -> Tensor:
    """Scale ``boxes: Tensor[N, 4]`` (xyxy) from an image of ``original_size = (h, w)`` to one of
    ``new_size``: x by ``w' / w``, y by ``h' / h``."""
    ratio_h = new_size[0] / original_size[0]
    ratio_w = new_size[1] / original_size[1]
    if ratio_h == 1.0 and ratio_w == 1.0:
        return boxes
    scale = boxes.new_tensor([ratio_w, ratio_h, ratio_w, ratio_h])
    return boxes * scale


def _resize_keypoints(
    keypoints: Tensor, original_size: Sequence[int], new_size: Sequence[int]
) -> Tensor:
    """Scale ``keypoints: Tensor[N, K, 3]`` (x, y, visibility); the visibility is unchanged."""
    ratio_h = new_size[0] / original_size[0]
    ratio_w = new_size[1] / original_size[1]
    if ratio_h == 1.0 and ratio_w == 1.0:
        return keypoints
    scale = keypoints.new_tensor([ratio_w, ratio_h, 1.0])
    return keypoints * scale


def _check_image(image: object, index: int) -> Tensor:
    if not isinstance(image, Tensor):
        raise TypeError(f"images[{index}] must be a torch.Tensor, got {type(image).__name__}")
    if image.dim() != 3 or image.shape[0] != 3 or image.shape[1] == 0 or image.shape[2] == 0:
        raise ValueError(f"images[{index}] must have shape [3, H, W], got {list(image.shape)}")
    if image.dtype == torch.uint8:
        return image.float().div_(255.0)
    if not image.is_floating_point():
        raise TypeError(f"images[{index}] must be float in [0, 1] or uint8, got {image.dtype}")
    return image


def _check_target(target: object, index: int) -> None:
    if not isinstance(target, dict):
        raise TypeError(f"targets[{index}] must be a dict, got {type(target).__name__}")
    boxes = target.get("boxes")
    if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
        shape = list(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
        raise ValueError(f"targets[{index}]['boxes'] must be a float Tensor[N, 4], got {shape}")
    labels = target.get("labels")
    if not isinstance(labels, Tensor) or labels.shape != boxes.shape[:1]:
        shape = list(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(
            f"targets[{index}]['labels'] must be an int64 Tensor[{boxes.shape[0]}], got {shape}"
        )


class DetectionTransform(nn.Module):
    """Resize + normalize + pad a list of images into an :class:`ImageBatch`.

    Args:
        min_size: target length of the shorter side.
        max_size: cap on the longer side.
        image_mean, image_std: per-channel normalization of ``[0, 1]`` images.
        size_divisible: the padded ``H`` and ``W`` are multiples of it.
    """

    def __init__(
        self,
        min_size: int,
        max_size: int,
        image_mean: Sequence[float],
        image_std: Sequence[float],
        size_divisible: int = 32,
    ) -> None:
        super().__init__()
        if min_size <= 0 or max_size <= 0:
            raise ValueError(f"min_size and max_size must be > 0, got {min_size}, {max_size}")
        if len(image_mean) != 3 or len(image_std) != 3:
            raise ValueError(
                f"image_mean and image_std must hold 3 numbers, got {image_mean}, {image_std}"
            )
        self.min_size = int(min_size)
        self.max_size = int(max_size)
        self.image_mean = [float(m) for m in image_mean]
        self.image_std = [float(s) for s in image_std]
        self.size_divisible = int(size_divisible)

    def _normalize(self, x: Tensor) -> Tensor:
        """``(x - mean) / std`` over the channel axis of ``[..., 3, H, W]``."""
        mean = torch.tensor(self.image_mean, dtype=x.dtype, device=x.device)[:, None, None]
        std = torch.tensor(self.image_std, dtype=x.dtype, device=x.device)[:, None, None]
        return (x - mean) / std

    def _resize_target(self, target: dict, original: tuple[int, int], new: tuple[int, int]) -> dict:
        out = dict(target)
        out["boxes"] = resize_boxes(target["boxes"], original, new)
        if "keypoints" in target:
            out["keypoints"] = _resize_keypoints(target["keypoints"], original, new)
        masks = target.get("masks")
        if masks is not None and masks.shape[0] > 0 and tuple(masks.shape[-2:]) != new:
            resized = F.interpolate(masks[:, None].float(), size=new, mode="nearest")
            out["masks"] = resized[:, 0].to(masks.dtype)
        return out

    def forward(
        self, images: list[Tensor], targets: list[dict] | None = None
    ) -> tuple[ImageBatch, list[dict] | None]:
        """``images``: list of ``Tensor[3, H_i, W_i]`` (float in [0, 1], or uint8);
        ``targets``: optional per-image dicts in the images' coordinates.

        Returns the :class:`ImageBatch` and the targets rescaled to the resized images (new
        dicts; the inputs are not modified).
        """
        if not isinstance(images, (list, tuple)) or not images:
            raise ValueError("images must be a non-empty list of Tensor[3, H, W]")
        if targets is not None and len(targets) != len(images):
            raise ValueError(f"got {len(images)} images but {len(targets)} targets")
        images = [_check_image(im, i) for i, im in enumerate(images)]
        original_sizes = [(int(im.shape[1]), int(im.shape[2])) for im in images]
        image_sizes = [resized_size(h, w, self.min_size, self.max_size) for h, w in original_sizes]
        resized = []
        for image, old, new in zip(images, original_sizes, image_sizes, strict=True):
            if old != new:  # a scale of 1 keeps the pixels as they are
                image = F.interpolate(
                    image[None], size=new, mode="bilinear", align_corners=False, antialias=False
                )[0]
            resized.append(image)
        if targets is not None:
            for i, target in enumerate(targets):
                _check_target(target, i)
            targets = [
                self._resize_target(t, old, new)
                for t, old, new in zip(targets, original_sizes, image_sizes, strict=True)
            ]
        tensors = self._batch(resized, image_sizes)
        return ImageBatch(tensors, image_sizes, original_sizes), targets

    def _batch(self, images: list[Tensor], sizes: list[tuple[int, int]]) -> Tensor:
        """Normalize and zero-pad ``images`` into ``[B, 3, H, W]``, ``H, W`` multiples of
        ``size_divisible``."""
        d = self.size_divisible
        height = math.ceil(max(s[0] for s in sizes) / d) * d
        width = math.ceil(max(s[1] for s in sizes) / d) * d
        if all(s == (height, width) for s in sizes):
            return self._normalize(torch.stack(images))  # one op for the whole batch
        batch = images[0].new_zeros((len(images), 3, height, width))
        for i, (image, (h, w)) in enumerate(zip(images, sizes, strict=True)):
            batch[i, :, :h, :w].copy_(self._normalize(image))
        return batch

    def postprocess(
        self,
        detections: list[dict],
        image_sizes: list[tuple[int, int]],
        original_sizes: list[tuple[int, int]],
    ) -> list[dict]:
        """Map ``boxes`` (and ``keypoints``) of each detection dict from the resized image back
        to the original one; other keys pass through."""
        out = []
        for det, new, old in zip(detections, image_sizes, original_sizes, strict=True):
            det = dict(det)
            if "boxes" in det:
                det["boxes"] = resize_boxes(det["boxes"], new, old)
            if "keypoints" in det:
                det["keypoints"] = _resize_keypoints(det["keypoints"], new, old)
            out.append(det)
        return out

    def extra_repr(self) -> str:
        return (
            f"min_size={self.min_size}, max_size={self.max_size}, mean={self.image_mean}, "
            f"std={self.image_std}, size_divisible={self.size_divisible}"
        )
