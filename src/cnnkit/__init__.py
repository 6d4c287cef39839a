"""cnnkit: design, train and evaluate modern convolutional networks.

Public API::

    import cnnkit
    model = cnnkit.create_model("resnet56", num_classes=100, drop_path_rate=0.5)
    cnnkit.list_models()
    cnnkit.save_model(model, "runs/my-model")
    model = cnnkit.load_model("runs/my-model")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cnnkit.models.registry import count_parameters, create_model, list_models, model_info

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "count_parameters",
    "create_model",
    "list_models",
    "load_model",
    "load_weights",
    "model_info",
    "save_model",
]

if TYPE_CHECKING:
    from torch import nn


def save_model(model: nn.Module, path: str, **extra: Any) -> None:
    """Write ``path/config.json`` (architecture + arguments) and ``path/model.safetensors``."""
    from cnnkit.train.checkpoint import save_model as _save

    _save(model, path, **extra)


def load_model(path: str) -> nn.Module:
    """Rebuild a model saved by :func:`save_model` from its JSON config and safetensors weights."""
    from cnnkit.train.checkpoint import load_model as _load

    return _load(path)


def load_weights(path: str) -> dict:
    """The state_dict saved at ``path`` (a run directory or a ``.safetensors`` file)."""
    from cnnkit.train.checkpoint import load_weights as _load

    return _load(path)
