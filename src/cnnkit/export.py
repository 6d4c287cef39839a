"""Export a classifier with its input normalization folded in, verified before it is written.

The exported model takes raw images, not normalized tensors:

* ``uint8`` (default): ``uint8 [N, C, H, W]``, values 0..255, exactly what ``load_image`` and
  the in-memory data sets hold;
* ``float``: ``float32 [N, C, H, W]`` in ``[0, 1]``.

It computes ``x -> x / 255 (uint8 only) -> (x - mean) / std -> model -> logits float32 [N, K]``
with the run's own statistics, so a deployment needs no preprocessing code beyond decoding and
resizing to the run's input size. ``N`` is 1 unless the batch dimension is dynamic.

Formats: ONNX (the TorchScript-based ``torch.onnx.export(dynamo=False)``: no onnxscript
dependency, ``dynamic_axes`` for the batch) checked with onnxruntime, and TorchScript
(``torch.jit.trace``) checked by running the loaded module. Each export is serialized to
memory, reloaded from those bytes and compared with the eager wrapper on real images; only a
model whose logits agree within :data:`TOLERANCE` is returned for writing.
"""

from __future__ import annotations

import importlib
import io
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "DEFAULT_OPSET",
    "EXPORT_SUFFIXES",
    "FORMATS",
    "INPUT_KINDS",
    "MAX_OPSET",
    "MIN_OPSET",
    "TOLERANCE",
    "Exported",
    "InputSpec",
    "Normalized",
    "check_opset",
    "export",
    "max_difference",
    "require_onnx",
]

FORMATS = ("onnx", "torchscript")
EXPORT_SUFFIXES = {"onnx": ".onnx", "torchscript": ".ts.pt"}
INPUT_KINDS = ("uint8", "float")
# Max |logit difference| between the exported model and the eager wrapper (fp32 reorderings
# give ~1e-6 on the residual nets; a wrong op or constant gives far more).
TOLERANCE = 1e-4
# The TorchScript-based ONNX exporter writes opsets 7..20; 17 runs on every onnxruntime since
# 1.11 and on TensorRT 8.5+, and holds every op of the classifiers.
MIN_OPSET, MAX_OPSET, DEFAULT_OPSET = 7, 20, 17
INPUT_NAME, OUTPUT_NAME = "images", "logits"


class Normalized(nn.Module):
    """``model`` behind the run's input normalization: raw images in, logits out.

    ``(x / scale - mean) / std`` is computed as ``x * a + b`` (one multiply-add per pixel),
    as :class:`cnnkit.data.transforms.BatchAugment` does for evaluation.
    """

    def __init__(
        self, model: nn.Module, mean: Sequence[float], std: Sequence[float], input_kind: str
    ):
        super().__init__()
        if input_kind not in INPUT_KINDS:
            raise ValueError(f"--input {input_kind!r}: expected one of {', '.join(INPUT_KINDS)}")
        scale = 255.0 if input_kind == "uint8" else 1.0
        a = torch.tensor([1.0 / (scale * s) for s in std], dtype=torch.float32)
        b = torch.tensor([-m / s for m, s in zip(mean, std, strict=True)], dtype=torch.float32)
        self.model = model
        self.register_buffer("a", a.view(1, -1, 1, 1))
        self.register_buffer("b", b.view(1, -1, 1, 1))
        self.eval()  # inference only: BatchNorm uses its running statistics

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x.float() * self.a + self.b)


@dataclass(frozen=True)
class InputSpec:
    """What the exported model takes: ``[batch, C, H, W]`` of ``kind`` (see the module doc)."""

    channels: int
    height: int
    width: int
    kind: str
    dynamic_batch: bool

    @property
    def dtype(self) -> torch.dtype:
        return torch.uint8 if self.kind == "uint8" else torch.float32

    def describe(self) -> str:
        batch = "N" if self.dynamic_batch else "1"
        values = "0..255" if self.kind == "uint8" else "[0, 1]"
        dtype = "uint8" if self.kind == "uint8" else "float32"
        return f"{dtype} [{batch}, {self.channels}, {self.height}, {self.width}], values {values}"

    def cast(self, images: Tensor) -> Tensor:
        """``uint8`` images as this spec's inputs (float: divided by 255)."""
        return images if self.kind == "uint8" else images.float() / 255


@dataclass(frozen=True)
class Exported:
    data: bytes
    max_difference: float
    images: int
    detail: str  # "opset 17" / "traced"


def require_onnx() -> None:
    """ValueError (one line, what to install) unless onnx and onnxruntime import."""
    for name in ("onnx", "onnxruntime"):
        try:
            importlib.import_module(name)
        except ImportError:
            raise ValueError(
                f"ONNX export needs the {name} package: pip install 'cnnkit[export]'"
            ) from None


def check_opset(opset: int) -> None:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"--opset {opset}: the exporter writes opsets {MIN_OPSET}..{MAX_OPSET}")


def _example(spec: InputSpec, batch: int) -> Tensor:
    shape = (batch, spec.channels, spec.height, spec.width)
    if spec.kind == "uint8":
        return torch.randint(
            0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
        )
    return torch.rand(shape, generator=torch.Generator().manual_seed(0))


def _onnx_bytes(wrapper: Normalized, spec: InputSpec, opset: int) -> bytes:
    buffer = io.BytesIO()
    dynamic = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if spec.dynamic_batch else None
    with warnings.catch_warnings():
        # "Only steps=1 can be constant folded" (the ::2 of a zero-pad shortcut): harmless.
        warnings.filterwarnings("ignore", message="Constant folding", category=UserWarning)
        _export_onnx(wrapper, spec, opset, buffer, dynamic)
    return buffer.getvalue()


def _export_onnx(wrapper: Normalized, spec: InputSpec, opset: int, buffer, dynamic) -> None:
    torch.onnx.export(
        wrapper,
        (_example(spec, 2 if spec.dynamic_batch else 1),),
        buffer,
        dynamo=False,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        opset_version=opset,
        dynamic_axes=dynamic,
        do_constant_folding=True,
    )


def _onnx_runner(data: bytes) -> Callable[[Tensor], Tensor]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # warnings about unused initializers are not the user's
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0])


def _torchscript_bytes(wrapper: Normalized, spec: InputSpec) -> bytes:
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # torch 2.9+ marks torch.jit deprecated in favour of torch.export; it still works.
        warnings.filterwarnings("ignore", message=".*torch.jit", category=DeprecationWarning)
        traced = torch.jit.trace(wrapper, (_example(spec, 2),), check_trace=False)
        torch.jit.save(traced, buffer)
    return buffer.getvalue()


def _torchscript_runner(data: bytes) -> Callable[[Tensor], Tensor]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit", category=DeprecationWarning)
        return torch.jit.load(io.BytesIO(data), map_location="cpu").eval()


def max_difference(
    run: Callable[[Tensor], Tensor], wrapper: Normalized, inputs: Tensor, batch: int
) -> float:
    """Max |logit difference| of ``run`` against ``wrapper`` on ``inputs``, ``batch`` at a time."""
    worst = 0.0
    wrapper.eval()  # the exporters restore the mode they found (a wrapper in training mode)
    with torch.no_grad():
        for start in range(0, inputs.shape[0], batch):
            x = inputs[start : start + batch].contiguous()
            expected, got = wrapper(x), run(x)
            if got.shape != expected.shape:
                raise ValueError(
                    f"the exported model returns shape {list(got.shape)}, expected "
                    f"{list(expected.shape)}; nothing written"
                )
            worst = max(worst, (got.float() - expected).abs().max().item())
    return worst


def export(
    model: nn.Module,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    spec: InputSpec,
    fmt: str,
    images: Tensor,
    opset: int = DEFAULT_OPSET,
) -> Exported:
    """``model`` (a classifier) exported to ``fmt`` behind its normalization, as bytes, checked
    against the eager wrapper on ``images`` (``uint8 [M, C, H, W]``, cast to ``spec``).

    Raises:
        ValueError: one line, when a package is missing, an option is out of range, or the
            exported model's logits differ by more than :data:`TOLERANCE` (the difference named).
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if images.dim() != 4 or images.dtype != torch.uint8 or images.shape[0] == 0:
        raise ValueError(f"verification images must be uint8 [M, C, H, W], got {images.shape}")
    wrapper = Normalized(model, mean, std, spec.kind)
    if fmt == "onnx":
        require_onnx()
        if not MIN_OPSET <= opset <= MAX_OPSET:
            raise ValueError(
                f"--opset {opset}: the exporter writes opsets {MIN_OPSET}..{MAX_OPSET}"
            )
        data = _onnx_bytes(wrapper, spec, opset)
        run, detail = _onnx_runner(data), f"opset {opset}"
    else:
        data = _torchscript_bytes(wrapper, spec)
        run, detail = _torchscript_runner(data), "traced"
    inputs = spec.cast(images)
    # A fixed-batch export is checked one image at a time; a dynamic one at batch M and 1.
    diff = max_difference(run, wrapper, inputs, 1)
    if spec.dynamic_batch:
        diff = max(diff, max_difference(run, wrapper, inputs, inputs.shape[0]))
    if not diff <= TOLERANCE:  # NaN fails too
        raise ValueError(
            f"the exported {fmt} model differs from the eager model: max |logit difference| "
            f"{diff:.3g} > {TOLERANCE:g} on {inputs.shape[0]} images; nothing written"
        )
    return Exported(data=data, max_difference=diff, images=int(inputs.shape[0]), detail=detail)
