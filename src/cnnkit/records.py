"""The per-epoch record of a run, as plain data: what one holds and how to read a curve.

A record is a flat dict of scalars with an ``epoch`` (integer >= 1) and measurements such as
``train_loss``, ``train_<metric>``, ``dev_loss``, ``dev_<metric>``, ``lr`` (fractions, e.g.
accuracies, in [0, 1]). :mod:`cnnkit.train.history` stores them, :mod:`cnnkit.viz` plots them,
:mod:`cnnkit.train.diagnose` reads them; this module imports nothing of cnnkit, so all of them
can use it.

On disk (:func:`to_json`) a record is strict JSON: a non-finite measurement (a diverged loss) is
written as ``null`` and :func:`check_record` reads ``null`` back as NaN.
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["check_record", "series", "to_json"]


def _plain(value: Any, key: str) -> Any:
    """JSON-ready scalar: tensors and NumPy scalars become Python numbers."""
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"history record field {key!r}: {type(value).__name__} is not a scalar")


def check_record(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with string keys and plain scalar values (``None``, JSON's ``null``, read as
    NaN); TypeError/ValueError otherwise."""
    if not isinstance(record, dict):
        raise TypeError(f"history record must be a dict, not {type(record).__name__}")
    out = {str(k): _plain(v, str(k)) for k, v in record.items()}
    out = {k: math.nan if v is None else v for k, v in out.items()}
    epoch = out.get("epoch")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
        raise ValueError(f"history record field 'epoch' must be an integer >= 1, got {epoch!r}")
    return out


def to_json(record: dict[str, Any]) -> str:
    """``record`` as one line of strict JSON, each non-finite float written as ``null``."""
    strict = {
        k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()
    }
    return json.dumps(strict, allow_nan=False)


def series(records: list[dict[str, Any]], key: str) -> list[float]:
    """``records[i][key]`` as floats, NaN where a record lacks it or holds a non-finite or
    non-numeric value (plots leave a gap there; the diagnosis skips it)."""
    out = []
    for record in records:
        value = record.get(key)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        out.append(float(value) if number and math.isfinite(value) else math.nan)
    return out
