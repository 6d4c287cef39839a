"""Precomputed region proposals per image: what Fast R-CNN is fed (Girshick, 2015).

Two file formats, both keyed by the data set's image id:

* JSON ``{"<image_id>": [[x1, y1, x2, y2], ...], ...}`` (xyxy, original image pixels);
* NumPy ``.npz`` with one ``float [P, 4]`` array per image, named by its image id
  (read with ``allow_pickle=False``: nothing is unpickled from a user's file).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

# A proposal file beyond this is not a proposal file (COCO train2017 with 2000 boxes per image
# in JSON is about 12 GB; give npz for such sets).
MAX_JSON_BYTES = 4 << 30


def _image_id(key: str, where: str) -> int:
    try:
        return int(key)
    except ValueError:
        raise ValueError(f"{where}: key {key!r} is not an image id (an integer)") from None


def _boxes(value: object, where: str) -> np.ndarray:
    """``float32 [P, 4]`` xyxy with finite coordinates and x2 >= x1, y2 >= y1."""
    try:
        boxes = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected a list of [x1, y1, x2, y2] boxes") from None
    if boxes.size == 0:
        return np.zeros((0, 4), dtype=np.float32)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{where}: expected boxes of shape [P, 4], got {list(boxes.shape)}")
    if not np.isfinite(boxes).all():
        raise ValueError(f"{where}: boxes must be finite numbers")
    if (boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any():
        raise ValueError(f"{where}: boxes must be [x1, y1, x2, y2] with x2 >= x1 and y2 >= y1")
    return boxes


def read_proposals(path: str | os.PathLike) -> dict[int, np.ndarray]:
    """``{image_id: float32 [P, 4]}`` from a JSON or ``.npz`` proposal file (module docstring);
    ValueError naming the file and the image id of a malformed entry."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--proposals {path}: no such file")
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                items = {k: archive[k] for k in archive.files}
        except (OSError, ValueError) as err:
            raise ValueError(f"--proposals {path}: not a readable .npz file ({err})") from None
    else:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise ValueError(f"--proposals {path}: too large for JSON; write an .npz file")
        try:
            items = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"--proposals {path}: not valid JSON ({err})") from None
        if not isinstance(items, dict):
            raise ValueError(f"--proposals {path}: expected an object {{image_id: boxes}}")
    return {_image_id(k, f"{path}"): _boxes(v, f"{path}: image {k}") for k, v in items.items()}


def write_proposals(path: str | os.PathLike, proposals: Mapping[int, np.ndarray]) -> None:
    """Write ``{image_id: [P, 4]}`` atomically, as ``.npz`` when ``path`` ends so, else JSON
    (coordinates rounded to 0.01 px)."""
    from cnnkit.atomic import atomic_write_bytes, atomic_write_text

    path = Path(path)
    if path.suffix == ".npz":
        import io

        buffer = io.BytesIO()
        np.savez_compressed(
            buffer, **{str(k): np.asarray(v, np.float32) for k, v in proposals.items()}
        )
        atomic_write_bytes(path, buffer.getvalue())
        return
    rows = {
        str(k): [[round(float(c), 2) for c in box] for box in np.asarray(v).tolist()]
        for k, v in proposals.items()
    }
    if any(not math.isfinite(c) for boxes in rows.values() for box in boxes for c in box):
        raise ValueError(f"{path}: proposals must be finite")
    atomic_write_text(path, json.dumps(rows, separators=(",", ":")) + "\n")
