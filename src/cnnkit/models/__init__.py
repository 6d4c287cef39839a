"""Classification architectures; importing this module registers every named variant."""

from cnnkit.models import densenet, pyramidnet, resnet, wide_resnet  # noqa: F401  (registration)
from cnnkit.models.registry import count_parameters, create_model, list_models, model_info

__all__ = ["count_parameters", "create_model", "list_models", "model_info"]
