"""A registry classifier without its head: the stage feature maps a detector builds on.

``Backbone("resnet50")`` is cnnkit's ResNet-50 minus ``fc``; ``forward`` returns C2..C5 (strides
4, 8, 16, 32), the inputs of a feature pyramid (Lin et al., 2017) or, for the C4 design, C4 with
the last stage re-used as the RoI head (He et al., 2016, Sec. A).

Fine-tuning follows torchvision's detection backbones: frozen BatchNorm by default (1-2 images
per GPU give no useful batch statistics) and the bottom stages frozen (:meth:`Backbone.freeze`).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from cnnkit.layers.norm import check_norm
from cnnkit.models.registry import create_model


def _check_stage_model(body: nn.Module, name: str) -> None:
    for attr in ("stage_names", "stage_channels", "stage_strides", "forward_stem"):
        if not hasattr(body, attr):
            raise ValueError(
                f"backbone {name!r} has no {attr}: only ResNet-like registry models with "
                f"stage_names can be detection backbones"
            )


class Backbone(nn.Module):
    """The stages of registry model ``name`` as a feature extractor.

    Args:
        name: a registry model with stages (``"resnet18"``, ``"resnet50"``, ...).
        widths: the model's stage ``widths`` override (``None``: the registered ones).
        norm, norm_groups: the model's normalization (default ``"frozen_batch"``).
        trainable_layers: how many stages, counted from the top, are trained; the stem counts
            as one more (ResNet: 5 = everything, 3 = layer2..layer4, 0 = nothing). ``None``: 3
            with frozen BatchNorm (torchvision's default for ImageNet weights), else all.

    Attributes:
        body: the classifier module, its classifier and head dropout removed.
        stage_channels, stage_strides: per stage output, e.g. ``[256, 512, 1024, 2048]`` and
            ``[4, 8, 16, 32]`` for ResNet-50.
        stage_names: e.g. ``["layer1", ..., "layer4"]``.
    """

    def __init__(
        self,
        name: str = "resnet50",
        widths: list[int] | None = None,
        norm: str = "frozen_batch",
        norm_groups: int = 32,
        trainable_layers: int | None = None,
    ) -> None:
        super().__init__()
        check_norm(norm)
        overrides = {"num_classes": 1, "norm": norm, "norm_groups": norm_groups}
        if widths is not None:
            overrides["widths"] = list(widths)
        body = create_model(name, **overrides)
        _check_stage_model(body, name)
        classifier = getattr(body, "classifier_name", "fc")
        if hasattr(body, classifier):
            delattr(body, classifier)
        body.head_dropout = None
        self.body = body
        self.name = name
        self.stage_names = list(body.stage_names)
        self.stage_channels = list(body.stage_channels)
        self.stage_strides = list(body.stage_strides)
        if trainable_layers is None:
            trainable_layers = 3 if norm == "frozen_batch" else len(self.stage_names) + 1
        self.trainable_layers = trainable_layers
        self.freeze(trainable_layers)

    def freeze(self, trainable_layers: int) -> None:
        """Train only the top ``trainable_layers`` stages (the stem is the lowest "layer").

        torchvision's rule: with ResNet's four stages, 5 trains everything (stem included),
        4 = layer1..layer4, 3 = layer2..layer4, 0 = nothing. Parameters outside the trained
        stages get ``requires_grad=False``; a later call may unfreeze them again.
        """
        total = len(self.stage_names) + 1
        if (
            isinstance(trainable_layers, bool)
            or not isinstance(trainable_layers, int)
            or not 0 <= trainable_layers <= total
        ):
            raise ValueError(
                f"trainable_layers={trainable_layers!r} must be an integer from 0 to {total} "
                f"(the {total - 1} stages of {self.name} plus its stem)"
            )
        # The top min(trainable_layers, stages) stages; the stem only when everything trains.
        stages = self.stage_names[max(len(self.stage_names) - trainable_layers, 0) :]
        stages = stages if trainable_layers else []
        train_stem = trainable_layers == total
        for param_name, param in self.body.named_parameters():
            stage = param_name.split(".", 1)[0]
            trained = stage in stages if stage in self.stage_names else train_stem
            param.requires_grad_(trained)
        self.trainable_layers = trainable_layers

    def forward(self, x: Tensor, num_stages: int | None = None) -> list[Tensor]:
        """``[N, 3, H, W]`` -> one ``[N, stage_channels[s], H / stride_s, W / stride_s]`` per stage.

        ``num_stages`` stops after the first ``num_stages`` stages (the C4 design runs the last
        stage on RoIs instead of on the whole image).
        """
        if num_stages is None:
            return self.body.forward_stages(x)
        x = self.body.forward_stem(x)
        outputs = []
        for name in self.stage_names[:num_stages]:
            x = getattr(self.body, name)(x)
            outputs.append(x)
        return outputs


def _is_ignored(key: str) -> bool:
    # The ImageNet classifier and BatchNorm's step counter carry nothing a detector uses.
    return key.startswith("fc.") or key.endswith("num_batches_tracked")


def load_backbone_weights(
    backbone: Backbone, state_dict: Mapping[str, Tensor], source: str
) -> None:
    """Load a torchvision-format ImageNet ResNet ``state_dict`` into ``backbone.body``.

    Keys as torchvision's ResNet (``conv1.weight``, ``bn1.running_mean``,
    ``layer1.0.conv1.weight``, ...); ``fc.*`` and ``num_batches_tracked`` are ignored. Every
    other key must exist on both sides with the same shape.

    Raises:
        ValueError: naming ``source`` and the first missing, unexpected or mis-shaped key.
    """
    own = {k: v for k, v in backbone.body.state_dict().items() if not _is_ignored(k)}
    given = {k: v for k, v in state_dict.items() if not _is_ignored(k)}
    for key, value in own.items():
        if key not in given:
            raise ValueError(
                f"{source}: missing key {key!r} for backbone {backbone.name} (is it a "
                f"torchvision-format ResNet state_dict with the same norm and widths?)"
            )
        if tuple(given[key].shape) != tuple(value.shape):
            raise ValueError(
                f"{source}: {key!r} has shape {list(given[key].shape)}, backbone "
                f"{backbone.name} expects {list(value.shape)}"
            )
    for key in given:
        if key not in own:
            raise ValueError(
                f"{source}: unexpected key {key!r} for backbone {backbone.name} (norm or "
                f"architecture differs from the checkpoint)"
            )
    backbone.body.load_state_dict(given, strict=False)
