"""Anchors: reference boxes at every feature-map position (Ren et al., 2015, Sec. 3.1.1).

Each level has "cell anchors", one per (aspect ratio, size), centred at zero. With
``ratio = h / w`` and area ``size^2``::

    h = size * sqrt(ratio),  w = size / sqrt(ratio),  cell = round([-w, -h, w, h] / 2)

(torchvision's rounding, to integer coordinates). They are shifted by ``stride * (i, j)`` for
every position ``(i, j)`` of the map, with ``stride = padded image size // map size`` per axis.
The order is torchvision's: level by level, then position (row-major), then cell anchor
(ratio-major, then size), which is also the order of the RPN head's outputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

_MAX_CACHED_GRIDS = 16


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> Tensor:
    """``Tensor[len(ratios) * len(sizes), 4]`` float32 zero-centred xyxy anchors, ratio-major."""
    scales = torch.as_tensor(sizes, dtype=torch.float32)
    ratios = torch.as_tensor(aspect_ratios, dtype=torch.float32)
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1 / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
    return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()


def _check_nested(value: object, name: str) -> list[list[float]]:
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{name} must be a non-empty list with one list per feature map")
    out = []
    for level, items in enumerate(value):
        if not isinstance(items, (list, tuple)) or not items:
            raise ValueError(f"{name}[{level}] must be a non-empty list of numbers, got {items!r}")
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 for v in items):
            raise ValueError(f"{name}[{level}] must hold positive numbers, got {items!r}")
        out.append([float(v) for v in items])
    return out


class AnchorGenerator(nn.Module):
    """Anchors for every position of every feature map of a padded batch.

    Args:
        sizes: per feature map, the anchor sizes (square root of the area), e.g.
            ``[[32], [64], [128], [256], [512]]`` for FPN levels P2..P6.
        aspect_ratios: per feature map, the ratios ``h / w``, e.g. ``[[0.5, 1.0, 2.0]] * 5``.
    """

    def __init__(self, sizes: list[list[float]], aspect_ratios: list[list[float]]) -> None:
        super().__init__()
        self.sizes = _check_nested(sizes, "sizes")
        self.aspect_ratios = _check_nested(aspect_ratios, "aspect_ratios")
        if len(self.sizes) != len(self.aspect_ratios):
            raise ValueError(
                f"sizes has {len(self.sizes)} levels but aspect_ratios has "
                f"{len(self.aspect_ratios)}: give one list of each per feature map"
            )
        self._cells = [
            cell_anchors(s, r) for s, r in zip(self.sizes, self.aspect_ratios, strict=True)
        ]
        self._cache: dict[tuple, Tensor] = {}

    def num_anchors_per_location(self) -> list[int]:
        """Cell anchors per position of each feature map: ``len(sizes) * len(ratios)``."""
        return [len(s) * len(r) for s, r in zip(self.sizes, self.aspect_ratios, strict=True)]

    def _grid(self, image_size: tuple[int, int], shape: tuple[int, int], cells: Tensor) -> Tensor:
        """``Tensor[h * w * A, 4]``: ``cells`` shifted over an ``h x w`` map, position-major."""
        height, width = shape
        stride_h = image_size[0] // height
        stride_w = image_size[1] // width
        shifts_x = torch.arange(width, device=cells.device, dtype=torch.int64) * stride_w
        shifts_y = torch.arange(height, device=cells.device, dtype=torch.int64) * stride_h
        shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
        shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
        shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1).to(cells.dtype)
        return (shifts[:, None, :] + cells[None, :, :]).reshape(-1, 4)

    def forward(
        self,
        image_size_padded: tuple[int, int],
        feature_shapes: list[tuple[int, int]],
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Anchors of a padded batch: ``Tensor[sum_l h_l * w_l * A_l, 4]`` xyxy.

        Args:
            image_size_padded: ``(H, W)`` of the padded batch tensor.
            feature_shapes: ``(h_l, w_l)`` of each feature map, fine to coarse.

        The result is cached per (image size, shapes, device, dtype): batches padded to the
        same size (the common case) reuse it.
        """
        if len(feature_shapes) != len(self.sizes):
            raise ValueError(
                f"AnchorGenerator has sizes for {len(self.sizes)} feature maps, got "
                f"{len(feature_shapes)} feature maps"
            )
        image_size = (int(image_size_padded[0]), int(image_size_padded[1]))
        shapes = tuple((int(h), int(w)) for h, w in feature_shapes)
        device = torch.device(device) if device is not None else torch.device("cpu")
        key = (image_size, shapes, str(device), dtype)
        anchors = self._cache.get(key)
        if anchors is None:
            cells = [c.to(device=device, dtype=dtype) for c in self._cells]
            anchors = torch.cat(
                [self._grid(image_size, s, c) for s, c in zip(shapes, cells, strict=True)]
            )
            if len(self._cache) >= _MAX_CACHED_GRIDS:  # multi-scale training: bounded memory
                self._cache.clear()
            self._cache[key] = anchors
        return anchors
