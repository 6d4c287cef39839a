"""The resume state of a run (``last.ckpt``), read back without ever running code from it.

The state is a ``torch.save`` of plain data (tensors, numbers, strings, lists, dicts: model
and optimizer state_dicts, RNG states, the epoch, the sampler position) read back with
``torch.load(weights_only=True)``, which refuses any pickle that asks to import or call
something. It is replaced atomically (:mod:`cnnkit.atomic`): a crash while saving leaves the
previous checkpoint intact.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch

from cnnkit.atomic import _atomic_replace

CHECKPOINT_NAME = "last.ckpt"


def save_state(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write the resume state ``state`` (tensors, numbers, strings, lists, dicts) atomically.

    ``torch.save`` to a temporary file beside ``path``, fsync, rename, fsync the directory: a
    crash at any moment leaves the previous checkpoint intact under ``path``.
    """
    if not isinstance(state, dict):
        raise TypeError(f"save_state: state must be a dict, not {type(state).__name__}")
    _atomic_replace(path, lambda tmp: torch.save(state, tmp))


def load_state(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a resume state written by :func:`save_state` with ``torch.load(weights_only=True)``.

    Only plain data is rebuilt: a pickle that asks to import or call anything (the way a
    malicious file runs code) is refused before any of it runs.

    Raises:
        ValueError: "refusing to unpickle <file>: <why>" when the file is missing, truncated,
            corrupt, not a dict, or carries anything but plain data.
    """
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"refusing to unpickle {file}: no such file")
    try:
        state = torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"refusing to unpickle {file}: it holds more than plain data (tensors, numbers, "
            f"strings, lists, dicts) and loading it could run code ({_unpickle_reason(err)})"
        ) from None
    except Exception as err:  # torch raises RuntimeError/EOFError/... for damaged archives
        why = " ".join(str(err).split()[:40]) or type(err).__name__
        raise ValueError(f"refusing to unpickle {file}: truncated or corrupt ({why})") from None
    if not isinstance(state, dict):
        raise ValueError(
            f"refusing to unpickle {file}: expected a dict, found {type(state).__name__}"
        )
    return state


def _unpickle_reason(err: Exception) -> str:
    # torch's message opens with advice to retry with weights_only=False, which is exactly
    # what must not be done with a file from elsewhere: keep only the line naming the culprit.
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    culprit = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
    return " ".join((culprit or lines[-1:] or [type(err).__name__])[0].split())
