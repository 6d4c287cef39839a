"""The registry: names, families, metadata, overrides and helpful errors."""

from __future__ import annotations

import json

import pytest
import torch

from cnnkit import create_model, list_models, model_info

# The variants issue 2 lists for the families of resnet.py and wide_resnet.py.
FAMILIES = {
    "resnet": [
        "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet1202",
        "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    ],
    "resnext": ["resnext29_8x64d", "resnext29_16x64d", "resnext50_32x4d", "resnext101_32x8d"],
    "wide_resnet": ["wrn16_8", "wrn28_10", "wrn40_4", "wide_resnet50_2", "wide_resnet101_2"],
}  # fmt: skip
CIFAR = {"resnet20", "resnet56", "resnet1202", "resnext29_8x64d", "wrn28_10", "wrn40_4"}
IMAGENET = {"resnet18", "resnet152", "resnext101_32x8d", "wide_resnet50_2"}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_families_list_their_variants(family):
    assert sorted(list_models(family)) == sorted(FAMILIES[family])
    assert set(FAMILIES[family]) <= set(list_models())


@pytest.mark.parametrize("name", sorted(CIFAR | IMAGENET))
def test_input_size_and_paper_figure(name):
    info = model_info(name)
    assert info.input_size == ((3, 32, 32) if name in CIFAR else (3, 224, 224))
    assert "params" in info.paper and "%" in info.paper


@pytest.mark.parametrize(
    ("name", "figure"),
    [
        ("resnet20", "8.75"),
        ("resnet32", "7.51"),
        ("resnet44", "7.17"),
        ("resnet56", "6.97"),
        ("resnet110", "6.43"),
        ("resnet1202", "7.93"),
        ("wrn28_10", "4.00"),
        ("wrn40_4", "4.53"),
        ("wrn16_8", "4.81"),
        ("resnext29_8x64d", "3.65"),
        ("resnext29_16x64d", "3.58"),
        ("resnet50", "23.87"),  # torchvision IMAGENET1K_V1: acc@1 76.130
    ],
)
def test_paper_figures(name, figure):
    assert figure in model_info(name).paper


@pytest.mark.parametrize(
    ("typo", "suggestion"),
    [("resnet21", "resnet20"), ("wrn28-10", "wrn28_10"), ("resnxt50_32x4d", "resnext50_32x4d")],
)
def test_unknown_name_lists_close_names(typo, suggestion):
    with pytest.raises(ValueError, match="unknown model") as err:
        create_model(typo)
    assert suggestion in str(err.value) and typo in str(err.value)


def test_unknown_argument_lists_the_arguments():
    with pytest.raises(TypeError, match="drop_path_rate"):
        create_model("resnet20", drop_rate=0.1)


def test_overrides_and_recorded_config():
    with torch.device("meta"):
        model = create_model("wrn16_8", num_classes=100, block_dropout=0.3)
    config = json.loads(json.dumps(model.cnnkit_config))
    assert config["name"] == "wrn16_8" and config["family"] == "wide_resnet"
    assert config["builder"] == "WideResNet"
    assert config["kwargs"]["num_classes"] == 100 and config["kwargs"]["depth"] == 16
    assert model.fc.out_features == 100
