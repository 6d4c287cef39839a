"""Precomputed region proposals per image: what Fast R-CNN is fed (Girshick, 2015).

Two file formats, both keyed by the data set's image id:

* JSON ``{"<image_id>": [[x1, y1, x2, y2], ...], ...}`` (xyxy, original image pixels);
* NumPy ``.npz`` with one ``float [P, 4]`` array per image, named by its image id
  (read with ``allow_pickle=False``: nothing is unpickled from a user's file).

An image id is written in decimal ASCII digits (``"-"`` allowed), once; coordinates are JSON
numbers (not strings or booleans) or an npz array of integers or floats.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

# A proposal file beyond this is not a proposal file (COCO train2017 with 2000 boxes per image
# in JSON is about 12 GB; give npz for such sets).
MAX_JSON_BYTES = 4 << 30
# What reading a damaged or hostile .npz raises: a bad zip (BadZipFile, zlib.error, EOFError),
# zip features numpy cannot read (NotImplementedError, RuntimeError: encryption), an array
# header declaring terabytes (MemoryError), pickled object arrays (ValueError).
_NPZ_ERRORS = (
    OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError,
    RuntimeError, MemoryError,
)  # fmt: skip


def _image_id(key: str, where: str) -> int:
    # int() alone takes " 7", "0_7" and Arabic-Indic digits: two keys could name one image.
    if not (re.fullmatch(r"-?[0-9]{1,19}", key) and -(2**63) <= int(key) < 2**63):
        raise ValueError(f"{where}: key {key[:40]!r} is not an image id (a 64-bit integer)")
    return int(key)


def _boxes(value: object, where: str) -> np.ndarray:
    """``float32 [P, 4]`` xyxy with finite coordinates and x2 >= x1, y2 >= y1."""
    try:
        # No dtype first: numpy would parse strings ("3"); and it takes a boolean among
        # numbers for a number ([true, 0, 1, 1] -> int64), so JSON rows are looked at too.
        raw = np.asarray(value)
        if raw.dtype.kind not in "iuf" and raw.size:
            raise TypeError(raw.dtype)
        if isinstance(value, list) and bool in set(map(type, itertools.chain(*value))):
            raise TypeError(bool)
        with np.errstate(over="ignore"):  # beyond float32: inf, refused below
            boxes = raw.astype(np.float32)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{where}: expected a list of [x1, y1, x2, y2] boxes (numbers)") from None
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
    if path.suffix.lower() == ".npz":
        try:
            archive = np.load(path, allow_pickle=False)
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise ValueError("one array, not arrays named by image id as numpy.savez writes")
            with archive:
                items = {k: archive[k] for k in archive.files}
        except _NPZ_ERRORS as err:
            raise ValueError(f"--proposals {path}: not a readable .npz file ({err})") from None
    else:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise ValueError(f"--proposals {path}: too large for JSON; write an .npz file")
        try:
            items = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"--proposals {path}: not valid JSON ({err})") from None
        except (ValueError, RecursionError) as err:  # > 4300 digits; nested too deeply
            raise ValueError(
                f"--proposals {path}: not usable JSON ({type(err).__name__})"
            ) from None
        if not isinstance(items, dict):
            raise ValueError(f"--proposals {path}: expected an object {{image_id: boxes}}")
    table: dict[int, np.ndarray] = {}
    for key, value in items.items():
        image_id = _image_id(key, f"{path}")
        if image_id in table:
            raise ValueError(f"{path}: image id {image_id} has two entries")
        table[image_id] = _boxes(value, f"{path}: image {key}")
    return table


def write_proposals(path: str | os.PathLike, proposals: Mapping[int, np.ndarray]) -> None:
    """Write ``{image_id: [P, 4]}`` atomically, as ``.npz`` when ``path`` ends so, else JSON
    (coordinates rounded to 0.01 px)."""
    from cnnkit.atomic import atomic_write_bytes, atomic_write_text

    path = Path(path)
    for k, v in proposals.items():
        if not np.isfinite(np.asarray(v, dtype=np.float64)).all():
            raise ValueError(f"{path}: the proposals of image {k} are not finite")
    if path.suffix.lower() == ".npz":
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
    atomic_write_text(path, json.dumps(rows, separators=(",", ":")) + "\n")
