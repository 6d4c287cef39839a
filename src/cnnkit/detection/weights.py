"""Backbone weights for a detector: an ImageNet checkpoint file or a cnnkit classification run.

``--backbone-weights FILE`` takes a torchvision-format ResNet state dict (``conv1.weight``,
``bn1.*``, ``layer1.0.conv1.weight``, ...; the classifier ``fc.*`` is ignored) as safetensors,
or as a ``torch.load`` file read with ``weights_only=True`` (plain tensors only: nothing is
unpickled). ``--backbone-weights RUN_DIR`` takes the weights of a cnnkit classification run.
Shapes must agree with the detector's backbone: a mismatch is a ValueError naming the source
and the first differing tensor.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn


def read_state_dict(source: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of ``source``: a run directory, a ``.safetensors`` file or a weights-only
    ``torch.load`` file (a dict of tensors, possibly under ``"state_dict"`` or ``"model"``)."""
    path = Path(source)
    if path.is_dir():
        from cnnkit.train.checkpoint import load_weights

        return load_weights(path)
    if not path.is_file():
        raise ValueError(f"--backbone-weights {source}: no such file or run directory")
    if path.suffix == ".safetensors":
        from cnnkit.train.checkpoint import load_weights

        return load_weights(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle / zip errors of every kind: the file is not ours to trust
        reason = " ".join(str(err).split())[:200]
        raise ValueError(
            f"--backbone-weights {source}: not a weights-only PyTorch file ({reason})"
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"--backbone-weights {source}: expected a dict of tensors")
    return state


def load_backbone_file(model: nn.Module, source: str | os.PathLike) -> None:
    """Load ``source``'s weights into ``model.backbone`` (see the module docstring)."""
    from cnnkit.detection.backbone import load_backbone_weights

    load_backbone_weights(model.backbone, read_state_dict(source), str(source))
