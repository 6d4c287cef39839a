"""Saving and loading models, without ever running code from a file.

A saved model is a directory holding two files:

* ``config.json``: the architecture (registry ``name``, ``family``, ``builder`` and every
  constructor argument in ``kwargs``), the ``cnnkit_version`` that wrote it and any extra
  sections the caller passes (``data``: class names, normalization statistics, input size;
  ``train``: the training arguments).
* ``model.safetensors``: the state_dict. Tensors that share storage (tied weights) are stored
  once; the names of their aliases go in the file's metadata.

Every file is replaced atomically (:mod:`cnnkit.atomic`): a crash at any moment leaves either
the previous file or the new one, never a partial file under the final name. The resume state
(``last.ckpt``) is :mod:`cnnkit.train.state`.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

# Both writers stay importable from here for code not yet moved to cnnkit.atomic.
from cnnkit.atomic import _atomic_replace, atomic_write_bytes, atomic_write_text  # noqa: F401

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# Metadata key of model.safetensors holding {alias_name: stored_name} for tied tensors.
ALIASES_KEY = "cnnkit_aliases"
# Top-level config fields that describe the architecture; extra sections may not replace them.
ARCH_FIELDS = ("name", "family", "builder", "kwargs")


# --------------------------------------------------------------------------- config.json


def _json_ready(value: Any, where: str) -> Any:
    """``value`` with tuples as lists and tensors/NumPy scalars as numbers; TypeError otherwise."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: key {k!r} is not a string")
            out[k] = _json_ready(v, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [_json_ready(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Tensor):
        return _json_ready(value.tolist(), where)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise TypeError(f"{where}: {value} is not a finite number (not valid JSON)")
        return value
    if hasattr(value, "item") and callable(value.item):  # NumPy scalars
        return _json_ready(value.item(), where)
    raise TypeError(f"{where}: {type(value).__name__} is not JSON-serializable")


def _model_config(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "cnnkit_config", None)
    if not isinstance(config, dict) or "name" not in config or "kwargs" not in config:
        raise TypeError(
            f"save_model: {type(model).__name__} has no cnnkit_config (architecture name and "
            "constructor arguments), so it could not be rebuilt from the saved files; build it "
            "with cnnkit.create_model(name, ...) or pass config={'name': ..., 'kwargs': {...}}"
        )
    return config


def save_model(model: nn.Module, path: str | os.PathLike, **extra: Any) -> None:
    """Write ``path/config.json`` and ``path/model.safetensors`` (each atomically).

    Args:
        model: a model built by :func:`cnnkit.create_model` (it carries ``cnnkit_config``).
        path: the directory to write (created if needed).
        **extra: additional JSON sections of config.json, e.g. ``data={...}``, ``train={...}``.
            ``config={"name": ..., "kwargs": {...}, ...}`` supplies the architecture of a model
            built without :func:`cnnkit.create_model`.
    """
    from cnnkit import __version__

    arch = extra.pop("config", None)
    arch = _model_config(model) if arch is None else arch
    if not isinstance(arch, dict) or "name" not in arch or "kwargs" not in arch:
        raise TypeError("save_model: config must be a dict with at least 'name' and 'kwargs'")
    clash = sorted(set(extra) & {*ARCH_FIELDS, "cnnkit_version"})
    if clash:
        raise ValueError(f"save_model: extra section(s) {clash} would replace the architecture")
    config = {"cnnkit_version": __version__}
    config.update({k: arch[k] for k in ARCH_FIELDS if k in arch})
    config.update(extra)
    config = _json_ready(config, "config")

    directory = Path(path)
    tensors, aliases = _dedup_state_dict(model.state_dict())
    metadata = {"format": "pt", ALIASES_KEY: json.dumps(aliases, sort_keys=True)}
    _atomic_replace(directory / WEIGHTS_NAME, lambda tmp: _save_safetensors(tensors, metadata, tmp))
    atomic_write_text(directory / CONFIG_NAME, json.dumps(config, indent=2) + "\n")


def _save_safetensors(tensors: dict[str, Tensor], metadata: dict[str, str], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)


def _dedup_state_dict(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Contiguous CPU tensors with tied ones stored once, and ``{alias: stored name}``.

    safetensors refuses tensors that share memory; a tensor identical to an earlier one (same
    storage, offset, shape and strides: a tied weight) becomes an alias; one that merely
    overlaps another's storage (a view) is copied, so that every stored tensor owns its bytes.
    """
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[tuple[str, int]] = set()
    for name, value in state.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"save_model: state_dict entry {name!r} is not a tensor")
        value = value.detach()
        if value.numel() == 0:
            tensors[name] = value.cpu().contiguous().clone()
            continue
        storage = value.untyped_storage()
        key = (
            value.device.type,
            storage.data_ptr(),
            value.storage_offset(),
            tuple(value.shape),
            value.stride(),
            value.dtype,
        )
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        where = (value.device.type, storage.data_ptr())
        shared = where in storages or value.numel() * value.element_size() != storage.nbytes()
        storages.add(where)
        value = value.cpu()
        tensors[name] = value.clone(memory_format=torch.contiguous_format) if shared else value
        tensors[name] = tensors[name].contiguous()
    return tensors, aliases


def _config_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        return path / CONFIG_NAME
    if path.name == CONFIG_NAME or path.suffix == ".json":
        return path
    if path.suffix == ".safetensors":
        return path.with_name(CONFIG_NAME)
    if not path.exists():
        raise ValueError(f"{path}: no such run directory or config file")
    raise ValueError(f"{path}: expected a run directory or its {CONFIG_NAME}")


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed, validated ``config.json`` of a run directory (or the file itself).

    Raises:
        ValueError: naming the file and the field when it is missing, not JSON, or malformed.
    """
    file = _config_file(path)
    if not file.is_file():
        raise ValueError(f"{file}: no such file (is {file.parent} a cnnkit run directory?)")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{file}: malformed JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file}: expected a JSON object, found {type(config).__name__}")
    if not isinstance(config.get("name"), str) or not config["name"]:
        raise ValueError(f"{file}: field 'name' (the registered model name) is missing or empty")
    if not isinstance(config.get("kwargs"), dict):
        raise ValueError(f"{file}: field 'kwargs' (constructor arguments) must be an object")
    for section in ("data", "train"):
        if section in config and not isinstance(config[section], dict):
            raise ValueError(f"{file}: field {section!r} must be an object")
    return config


# --------------------------------------------------------------------------- weights


def _weights_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        return path / WEIGHTS_NAME
    if path.name == CONFIG_NAME:
        return path.with_name(WEIGHTS_NAME)
    return path


def load_weights(path: str | os.PathLike) -> dict[str, Tensor]:
    """The state_dict saved in a run directory (or a ``.safetensors`` file), aliases restored.

    Raises:
        ValueError: naming the file when it is missing, truncated or corrupt.
    """
    from safetensors import safe_open

    file = _weights_file(path)
    if not file.is_file():
        raise ValueError(f"{file}: no such file")
    try:
        state: dict[str, Tensor] = {}
        with safe_open(str(file), framework="pt") as fh:
            metadata = fh.metadata() or {}
            for name in fh.keys():  # noqa: SIM118  (safe_open is not a mapping)
                state[name] = fh.get_tensor(name)
    except Exception as err:  # safetensors raises its own error types for bad headers/sizes
        raise ValueError(
            f"{file}: not a readable safetensors file, truncated or corrupt ({err})"
        ) from None
    try:
        aliases = json.loads(metadata.get(ALIASES_KEY, "{}"))
    except json.JSONDecodeError:
        raise ValueError(f"{file}: metadata field {ALIASES_KEY!r} is not JSON") from None
    if not isinstance(aliases, dict):
        raise ValueError(f"{file}: metadata field {ALIASES_KEY!r} must be an object")
    for alias, target in aliases.items():
        if target not in state:
            raise ValueError(f"{file}: tensor {alias!r} is an alias of missing tensor {target!r}")
        state[alias] = state[target]
    return state


def _check_state(file: Path, expected: dict[str, Tensor], found: dict[str, Tensor]) -> None:
    """ValueError naming the tensors that are missing, unexpected or of the wrong shape."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [
        f"{k}: saved {list(found[k].shape)}, model {list(v.shape)}"
        for k, v in expected.items()
        if k in found and found[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {_few(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch {_few(shapes)}")
    if problems:
        raise ValueError(
            f"{file}: does not match the model in {CONFIG_NAME}: {'; '.join(problems)}"
        )


def _few(items: list[str], limit: int = 5) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def load_model(path: str | os.PathLike) -> nn.Module:
    """Rebuild the model saved at ``path`` (run directory or its config.json) and load its weights.

    The architecture comes from the registry (``create_model(name, **kwargs)``), the weights are
    loaded with ``strict=True``. The model is returned in eval mode, on the CPU, carrying
    ``cnnkit_config``. A config written by another cnnkit version gives a warning.

    Raises:
        ValueError: naming the file and the field or tensor when the config is missing or
            malformed, the model name is unknown, the arguments are rejected by the current
            code, or the weights are truncated, corrupt or do not match the architecture.
    """
    from cnnkit import __version__
    from cnnkit.models.registry import create_model, model_info

    file = _config_file(path)
    config = read_config(file)
    saved_version = config.get("cnnkit_version")
    if saved_version != __version__:
        warnings.warn(
            f"{file}: written by cnnkit {saved_version}, loading with {__version__}",
            stacklevel=2,
        )
    name, kwargs = config["name"], config["kwargs"]
    try:
        info = model_info(name)
    except ValueError as err:
        raise ValueError(f"{file}: field 'name': {err}") from None
    builder = config.get("builder")
    if builder is not None and builder != info.builder.__name__:
        warnings.warn(
            f"{file}: saved with builder {builder}, {name} is now built by {info.builder.__name__}",
            stacklevel=2,
        )
    # The architecture is first built on the meta device (shapes, no memory): kwargs whose
    # tensors would not fit (num_classes=10**12) are a mismatch with the saved weights, not an
    # allocation failure. The builders check the kwargs' types and ranges.
    try:
        with torch.device("meta"):
            skeleton = create_model(name, **kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{file}: field 'kwargs' is rejected by {name}: {err}") from None

    weights_file = file.with_name(WEIGHTS_NAME)
    state = load_weights(weights_file)
    _check_state(weights_file, skeleton.state_dict(), state)
    model = create_model(name, **kwargs)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{weights_file}: {' '.join(str(err).split())}") from None
    return model.eval()
