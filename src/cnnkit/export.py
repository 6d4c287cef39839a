"""Export a classifier (its input normalization folded in) or a detector, verified before it
is written.

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

Detectors (:func:`export_detector`) are traced to TorchScript behind :class:`Detecting`: one
image of a fixed size in, a dict of detections out; the ops whose work depends on the data
switch to traceable forms while ``torch.jit.is_tracing()`` (see the function).
"""

from __future__ import annotations

import functools
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
    "DETECTION_OUTPUTS",
    "DETECTOR_INPUT",
    "Detecting",
    "Exported",
    "InputSpec",
    "Normalized",
    "check_detector_opset",
    "cast_input",
    "check_opset",
    "detection_difference",
    "detector_outputs",
    "export",
    "export_detector",
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


def _input_scale(kind: str) -> float:
    """What an input of ``kind`` is divided by to reach [0, 1]; ValueError naming ``--input``."""
    if kind not in INPUT_KINDS:
        raise ValueError(f"--input {kind!r}: expected one of {', '.join(INPUT_KINDS)}")
    return 255.0 if kind == "uint8" else 1.0


def cast_input(images: Tensor, kind: str) -> Tensor:
    """``uint8`` images as inputs of ``kind`` (float: divided by 255)."""
    return images if kind == "uint8" else images.float() / 255


class Normalized(nn.Module):
    """``model`` behind the run's input normalization: raw images in, logits out.

    ``(x / scale - mean) / std`` is computed as ``x * a + b`` (one multiply-add per pixel),
    as :class:`cnnkit.data.transforms.BatchAugment` does for evaluation.
    """

    def __init__(
        self, model: nn.Module, mean: Sequence[float], std: Sequence[float], input_kind: str
    ):
        super().__init__()
        scale = _input_scale(input_kind)
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
        return cast_input(images, self.kind)


@dataclass(frozen=True)
class Exported:
    data: bytes
    max_difference: float
    images: int
    detail: str  # "opset 17" / "traced"


class Detecting(nn.Module):
    """A detector behind one raw image: ``uint8 [3, H, W]`` (0..255) or ``float32 [3, H, W]`` in
    ``[0, 1]``, of exactly the size it was exported at -> a dict of the detections, sorted by
    decreasing score: ``boxes`` float32 ``[D, 4]`` (xyxy, pixels), ``labels`` int64 ``[D]``
    (``1..K``), ``scores`` float32 ``[D]``; with a mask head ``masks`` float32 ``[D, 1, H, W]``
    (probabilities; threshold at 0.5); with a keypoint head ``keypoints`` float32 ``[D, K, 3]``
    (x, y, 1) and ``keypoints_scores`` float32 ``[D, K]``. The detector normalizes itself.
    """

    def __init__(self, model: nn.Module, input_kind: str, size: tuple[int, int]):
        super().__init__()
        self.model = model
        self.scale = _input_scale(input_kind)
        self.size = (int(size[0]), int(size[1]))
        self.eval()

    @property
    def output_names(self) -> list[str]:
        return detector_outputs(self.model)

    def forward(self, image: Tensor) -> dict[str, Tensor]:
        if torch.jit.is_tracing():
            # The graph holds the resize and anchors of this size: refuse any other, at run time.
            _scripted_size_check()(image, self.size[0], self.size[1])
        out = self.model([image.float() / self.scale])[0]
        return {k: out[k] for k in self.output_names}


# What an exported detector returns, of the eager model's outputs (the box-local mask_probs and
# keypoint_heatmaps are internals the pasted masks and the keypoints already carry).
DETECTION_OUTPUTS = ("boxes", "labels", "scores", "masks", "keypoints", "keypoints_scores")
DETECTOR_INPUT = "image"


def detector_outputs(model: nn.Module) -> list[str]:
    """The outputs of ``model`` exported (:class:`Detecting`), in :data:`DETECTION_OUTPUTS`
    order: the box outputs, ``masks`` with a mask head, the keypoints with a keypoint head."""
    keypoints = model.num_keypoints > 0
    heads = {"masks": model.has_masks, "keypoints": keypoints, "keypoints_scores": keypoints}
    return [k for k in DETECTION_OUTPUTS if heads.get(k, True)]


def _check_image_size(image: Tensor, height: int, width: int) -> Tensor:
    if image.dim() != 3 or image.size(0) != 3 or image.size(1) != height or image.size(2) != width:
        raise ValueError(
            "this exported detector takes one image [3, " + str(height) + ", " + str(width) + "]"
        )
    return image


@functools.cache
def _scripted_size_check():
    return torch.jit.script(_check_image_size)  # compiled once, when first traced


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


def _ort_session(data: bytes):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # notes on unused initializers, graph rewrites: not the user's
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def _onnx_runner(data: bytes) -> Callable[[Tensor], Tensor]:
    session = _ort_session(data)
    return lambda x: torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0])


def _traced_bytes(module: nn.Module, example: Tensor) -> bytes:
    """``torch.jit.trace`` of ``module`` on ``example``, saved to bytes (every export is
    checked on real images afterwards, so the tracer's own check and its warnings about the
    shape checks it folds add nothing)."""
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # torch 2.9+ marks torch.jit deprecated in favour of torch.export; it still works.
        warnings.filterwarnings("ignore", message=".*torch.jit", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(module, (example,), check_trace=False, strict=False)
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
        check_opset(opset)
        data = _onnx_bytes(wrapper, spec, opset)
        run, detail = _onnx_runner(data), f"opset {opset}"
    else:
        data = _traced_bytes(wrapper, _example(spec, 2))
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


# ONNX's RoiAlign has coordinate_transformation_mode (aligned or legacy boxes) from opset 16.
MIN_DETECTOR_OPSET = 16


def check_detector_opset(opset: int) -> None:
    check_opset(opset)
    if opset < MIN_DETECTOR_OPSET:
        raise ValueError(
            f"--opset {opset}: ONNX's RoiAlign tells aligned from legacy boxes from opset "
            f"{MIN_DETECTOR_OPSET} on; use --opset {MIN_DETECTOR_OPSET} or later for a detector"
        )


def detection_difference(
    run: Callable[[Tensor], dict[str, Tensor]], wrapper: Detecting, inputs: Sequence[Tensor]
) -> float:
    """Max difference over every output of ``run`` against ``wrapper`` on each of ``inputs``:
    absolute for values up to 1 (scores, mask probabilities), relative above (pixels, keypoint
    logits: float32 carries ~7 digits whatever the magnitude); ValueError when the keys or
    shapes differ (another number of detections, say)."""
    worst = 0.0
    wrapper.eval()
    with torch.no_grad():
        for i, x in enumerate(inputs):
            expected, got = wrapper(x), run(x)
            if list(got) != list(expected):
                raise ValueError(
                    f"the exported detector returns {list(got)}, expected {list(expected)}; "
                    "nothing written"
                )
            for key, value in expected.items():
                if got[key].shape != value.shape:
                    raise ValueError(
                        f"the exported detector's {key!r} has shape {list(got[key].shape)} on "
                        f"verification image {i}, the eager model's {list(value.shape)}; "
                        "nothing written"
                    )
                if value.numel():
                    expected_ = value.double()
                    diff = (got[key].double() - expected_).abs() / expected_.abs().clamp(min=1)
                    worst = max(worst, diff.max().item())
    return worst


def export_detector(
    model: nn.Module,
    *,
    kind: str,
    images: Sequence[Tensor],
    fmt: str = "torchscript",
    opset: int = DEFAULT_OPSET,
) -> Exported:
    """A detector (:class:`cnnkit.detection.rcnn.FasterRCNN`, with its mask / keypoint heads)
    as TorchScript or ONNX bytes behind :class:`Detecting`, checked against the eager model.

    ``torch.jit.trace`` (which the ONNX exporter runs too) records the model on ``images[0]``;
    the parts whose work depends on the data (NMS, the FPN level split of the RoIs, mask
    pasting) run as TorchScript functions or as tensor operations while tracing, and NMS as
    ONNX's ``NonMaxSuppression`` in an ONNX export, so the graph stays valid for any number of
    proposals and detections. The input size is fixed: every ``images`` (``uint8 [3, H, W]``,
    cast to ``kind``) must have the size of the first, and a blank and a white image of that
    size are checked too (no detections: the empty paths). Outputs must agree within
    :data:`TOLERANCE` (boxes in pixels, scores, mask probabilities, keypoints).

    Raises:
        ValueError: one line: a detector that cannot be exported (proposals from outside,
            RoI max pooling), images of another size, or outputs that differ.
    """
    if not getattr(model, "has_rpn", False):
        raise ValueError(
            "only detectors with an RPN export: a Fast R-CNN model (rpn=False) takes its "
            "proposals from outside the graph"
        )
    if model.roi_heads.pooler.op != "align":
        raise ValueError(
            f"roi_op {model.roi_heads.pooler.op!r} cannot be traced yet; models with roi_op "
            "'align' export"
        )
    if not images:
        raise ValueError("verification needs at least one image")
    size = tuple(images[0].shape[-2:])
    for i, im in enumerate(images):
        if im.dtype != torch.uint8 or im.dim() != 3 or tuple(im.shape) != (3, *size):
            raise ValueError(
                f"verification image {i}: expected uint8 [3, {size[0]}, {size[1]}], got "
                f"{im.dtype} {list(im.shape)}"
            )
    wrapper = Detecting(model, kind, size)
    inputs = [cast_input(im, kind) for im in images]
    inputs += [
        torch.zeros_like(inputs[0]),
        torch.full_like(inputs[0], 255 if kind == "uint8" else 1),
    ]
    if fmt == "onnx":
        require_onnx()
        check_detector_opset(opset)
        data = _detector_onnx_bytes(wrapper, inputs[0], opset)
        run, detail = _detector_onnx_runner(data), f"opset {opset}"
    elif fmt == "torchscript":
        data = _traced_bytes(wrapper, inputs[0])
        run, detail = _torchscript_runner(data), "traced"
    else:
        raise ValueError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    diff = detection_difference(run, wrapper, inputs)
    if not diff <= TOLERANCE:  # NaN fails too
        raise ValueError(
            f"the exported detector differs from the eager model: max difference {diff:.3g} "
            f"> {TOLERANCE:g} on {len(inputs)} images; nothing written"
        )
    return Exported(data=data, max_difference=diff, images=len(inputs), detail=detail)


class _Outputs(nn.Module):
    """:class:`Detecting` with a tuple of outputs in :data:`DETECTION_OUTPUTS` order (ONNX
    graphs return tuples; the names are given to the exporter)."""

    def __init__(self, detecting: Detecting):
        super().__init__()
        self.detecting = detecting

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        return tuple(self.detecting(image).values())


def _detector_onnx_bytes(wrapper: Detecting, example: Tensor, opset: int) -> bytes:
    names = wrapper.output_names
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Constant folding", category=UserWarning)
        # "...incorrect results if indices include negative values": the mask head's
        # (arange, label) gather, whose indices never are.
        warnings.filterwarnings("ignore", message=".*aten::index", category=UserWarning)
        torch.onnx.export(
            _Outputs(wrapper),
            (example,),
            buffer,
            dynamo=False,
            input_names=[DETECTOR_INPUT],
            output_names=names,
            dynamic_axes={name: {0: "detections"} for name in names},
            opset_version=opset,
        )
    wrapper.eval()  # the exporter leaves the module in the mode it traced in
    return buffer.getvalue()


def _detector_onnx_runner(data: bytes) -> Callable[[Tensor], dict[str, Tensor]]:
    session = _ort_session(data)
    names = [o.name for o in session.get_outputs()]

    def run(x: Tensor) -> dict[str, Tensor]:
        values = session.run(names, {DETECTOR_INPUT: x.numpy()})
        return {n: torch.from_numpy(v) for n, v in zip(names, values, strict=True)}

    return run
