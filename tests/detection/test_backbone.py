"""Backbone: stage outputs, torchvision's freeze rule, and loading torchvision-format weights."""

import pytest
import torch

from cnnkit.detection.backbone import Backbone, load_backbone_weights
from cnnkit.layers.norm import FrozenBatchNorm2d
from cnnkit.models.registry import create_model

WIDTHS = [8, 8, 16, 16]


def _trainable_prefixes(backbone: Backbone) -> set[str]:
    return {n.split(".", 1)[0] for n, p in backbone.body.named_parameters() if p.requires_grad}


def test_stage_outputs_channels_and_strides():
    backbone = Backbone("resnet18", widths=WIDTHS)
    assert backbone.stage_channels == WIDTHS
    assert backbone.stage_strides == [4, 8, 16, 32]
    assert not hasattr(backbone.body, "fc")
    outs = backbone(torch.randn(2, 3, 64, 96))
    assert [tuple(o.shape) for o in outs] == [
        (2, 8, 16, 24),
        (2, 8, 8, 12),
        (2, 16, 4, 6),
        (2, 16, 2, 3),
    ]
    first_three = backbone(torch.randn(1, 3, 64, 64), num_stages=3)
    assert [o.shape[1] for o in first_three] == [8, 8, 16]


def test_freeze_rule_counts_stages_from_the_top():
    backbone = Backbone("resnet18", widths=WIDTHS, norm="batch", trainable_layers=5)
    assert _trainable_prefixes(backbone) == {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4"}
    backbone.freeze(3)
    assert _trainable_prefixes(backbone) == {"layer2", "layer3", "layer4"}
    backbone.freeze(4)
    assert _trainable_prefixes(backbone) == {"layer1", "layer2", "layer3", "layer4"}
    backbone.freeze(1)
    assert _trainable_prefixes(backbone) == {"layer4"}
    backbone.freeze(0)
    assert _trainable_prefixes(backbone) == set()
    with pytest.raises(ValueError, match="trainable_layers=6"):
        backbone.freeze(6)


def test_default_trainable_layers_depend_on_norm():
    frozen = Backbone("resnet18", widths=WIDTHS)
    assert frozen.trainable_layers == 3
    assert _trainable_prefixes(frozen) == {"layer2", "layer3", "layer4"}
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in frozen.modules())
    group = Backbone("resnet18", widths=WIDTHS, norm="group", norm_groups=4)
    assert group.trainable_layers == 5
    assert all(p.requires_grad for p in group.parameters())


def test_loads_torchvision_format_weights_into_frozen_batch_norm():
    # A torchvision-layout ResNet with BatchNorm (cnnkit's names are torchvision's) and
    # non-trivial statistics: the frozen backbone must compute what the eval-mode source does.
    torch.manual_seed(0)
    source = create_model("resnet18", widths=WIDTHS, norm="batch", num_classes=5)
    source.train()
    with torch.no_grad():
        for _ in range(2):
            source(torch.randn(2, 3, 64, 64))
    source.eval()
    state = source.state_dict()
    assert "fc.weight" in state and "bn1.num_batches_tracked" in state
    backbone = Backbone("resnet18", widths=WIDTHS)
    load_backbone_weights(backbone, state, source="r18.pth")
    assert isinstance(backbone.body.bn1, FrozenBatchNorm2d)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for ours, theirs in zip(backbone(x), source.forward_stages(x), strict=True):
            torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_weight_errors_name_the_source_and_key():
    source = create_model("resnet18", widths=WIDTHS, norm="batch").state_dict()
    backbone = Backbone("resnet18", widths=WIDTHS)
    bad = dict(source)
    bad["layer2.0.conv1.weight"] = torch.zeros(1, 1, 1, 1)
    with pytest.raises(ValueError, match=r"r18\.pth: 'layer2\.0\.conv1\.weight' has shape"):
        load_backbone_weights(backbone, bad, source="r18.pth")
    missing = {k: v for k, v in source.items() if k != "bn1.running_var"}
    with pytest.raises(ValueError, match=r"w\.pth: missing key 'bn1\.running_var'"):
        load_backbone_weights(backbone, missing, source="w.pth")
    group = Backbone("resnet18", widths=WIDTHS, norm="group", norm_groups=4)
    with pytest.raises(ValueError, match=r"w\.pth: unexpected key 'bn1\.running_mean'"):
        load_backbone_weights(group, source, source="w.pth")
