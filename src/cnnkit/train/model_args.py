"""The constructor arguments a classifier gets from the data and the training flags, and the
check that the data's images fit the architecture, both before anything is written."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

from cnnkit.train.config import TrainConfig, parse_dropblock


def model_overrides(cfg: TrainConfig, channels: int, num_classes: int, spec: str) -> dict[str, Any]:
    """Constructor arguments for ``cfg.model`` from the data and the regularizer flags.

    A flag the architecture does not take is a ValueError naming both; so is a ``--model-arg``
    that contradicts the data (``num_classes``, ``in_chans``) or a flag given as well.
    """
    from cnnkit.models.registry import model_info

    info = model_info(cfg.model)
    if cfg.in_chans is not None and cfg.in_chans != channels:
        raise ValueError(
            f"--in-chans {cfg.in_chans} does not match --data {spec}, whose images have "
            f"{channels} channel(s)"
        )
    kwargs: dict[str, Any] = {"num_classes": num_classes, "in_chans": channels}
    drop_block, drop_block_size = parse_dropblock(cfg.dropblock)
    flags = {
        "--norm": ("norm", cfg.norm),
        "--norm-groups": ("norm_groups", cfg.norm_groups),
        "--drop-path": ("drop_path_rate", cfg.drop_path or None),
        "--dropout": ("dropout", cfg.dropout or None),
        "--dropblock": ("drop_block", drop_block or None),
        "--dropblock SIZE": ("drop_block_size", drop_block_size),
    }
    accepted = inspect.signature(info.builder).parameters
    given: dict[str, str] = {
        "num_classes": f"--data {spec}, which has {num_classes} classes",
        "in_chans": f"--data {spec}, whose images have {channels} channel(s)",
    }
    for flag, (name, value) in flags.items():
        if value is None:
            continue
        if name not in accepted:
            raise ValueError(f"{flag} is not supported by model {cfg.model!r}")
        kwargs[name] = value
        given[name] = f"{flag} {value}"
    for name, value in cfg.model_args.items():
        if name not in accepted:
            raise ValueError(f"--model-arg {name}: model {cfg.model!r} has no such argument")
        if name in given and value != kwargs[name]:
            raise ValueError(f"--model-arg {name}={value!r} conflicts with {given[name]}")
        kwargs[name] = value
    return kwargs


def check_input_size(name: str, kwargs: dict[str, Any], input_size: Sequence[int]) -> None:
    """One ``input_size`` sample through model ``name`` on the meta device (shapes only: no
    memory, no arithmetic): an image too small for the model's downsampling (densenet121 at
    4 px pools 1x1 maps to 0x0) is a ValueError naming ``--image-size``, before any run
    directory exists. The global random state is left as it was.
    """
    from cnnkit.models.registry import create_model

    c, h, w = (int(v) for v in input_size)
    state = torch.get_rng_state()
    try:
        with torch.device("meta"):
            probe = create_model(name, **kwargs).eval()
            x = torch.empty(1, c, h, w)
        with torch.no_grad():
            probe(x)
    except RuntimeError as err:  # a shape error: the meta kernels compute nothing else
        reason = " ".join(str(err).split())[:300]
        raise ValueError(
            f"--image-size {h}: model {name!r} cannot take {c}x{h}x{w} images ({reason}); "
            "use larger images or another model"
        ) from None
    finally:
        torch.set_rng_state(state)
