"""The model registry: every architecture is one ``create_model(name)`` away.

A named variant is a family constructor plus a configuration (``register_model("resnet20",
ResNet, depth=20, ...)``), never a copy of code. ``create_model`` records the full, resolved
constructor arguments on the model (``model.cnnkit_config``) so that a saved model can be
rebuilt from JSON alone.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass(frozen=True)
class ModelInfo:
    """What the registry knows of a named model."""

    name: str
    family: str
    builder: type[nn.Module]
    config: dict[str, Any]
    input_size: tuple[int, int, int]
    paper: str = ""
    tags: tuple[str, ...] = field(default_factory=tuple)


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(
    name: str,
    builder: type[nn.Module],
    *,
    family: str,
    input_size: tuple[int, int, int],
    paper: str = "",
    tags: tuple[str, ...] = (),
    **config: Any,
) -> None:
    """Register ``name`` as ``builder(**config)``; ``paper`` is the published figure it matches,
    ``tags`` e.g. the task (``("detection",)``)."""
    if name in _REGISTRY:
        raise ValueError(f"model name {name!r} is registered twice")
    _REGISTRY[name] = ModelInfo(
        name, family, builder, dict(config), tuple(input_size), paper, tuple(tags)
    )


def _ensure_loaded() -> None:
    # Importing the family modules fills the registry; done lazily to keep `import cnnkit` light.
    import cnnkit.detection.models  # noqa: F401
    import cnnkit.models  # noqa: F401


def list_models(family: str | None = None) -> list[str]:
    """Names of the registered models, optionally of one family, in registration order."""
    _ensure_loaded()
    return [n for n, i in _REGISTRY.items() if family is None or i.family == family]


def model_info(name: str) -> ModelInfo:
    """The registry entry of ``name``; a ValueError lists the closest names when unknown."""
    _ensure_loaded()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=5, cutoff=0.5)
        hint = f"; closest: {', '.join(close)}" if close else ""
        raise ValueError(f"unknown model {name!r}{hint} (see `cnnkit models`)")
    return _REGISTRY[name]


def resolve_config(builder: type[nn.Module], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Every constructor argument of ``builder``, defaults filled in, as JSON-ready values."""
    sig = inspect.signature(builder)
    try:
        bound = sig.bind(**kwargs)
    except TypeError as err:
        known = ", ".join(p for p in sig.parameters if p != "self")
        raise TypeError(f"{builder.__name__}: {err} (arguments: {known})") from None
    bound.apply_defaults()
    return {k: list(v) if isinstance(v, tuple) else v for k, v in bound.arguments.items()}


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build the registered model ``name``, with constructor arguments overridden by keyword.

    The model carries ``cnnkit_config = {"name", "family", "builder", "kwargs"}``: everything
    :func:`cnnkit.load_model` needs to rebuild it.
    """
    info = model_info(name)
    kwargs = resolve_config(info.builder, {**info.config, **overrides})
    model = info.builder(**kwargs)
    model.cnnkit_config = {
        "name": name,
        "family": info.family,
        "builder": info.builder.__name__,
        "kwargs": kwargs,
    }
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of learnable parameters (what papers report)."""
    return sum(p.numel() for p in model.parameters())
