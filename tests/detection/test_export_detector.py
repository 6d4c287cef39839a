"""cnnkit.export.export_detector: detectors traced to TorchScript and ONNX, reloaded, compared
with eager.

The reference is the eager detector itself, called as `model([image / 255])[0]`, not the
wrapper the exporter traces; the images of the comparison are not those of the verification
and give other numbers of proposals and detections than the traced example, so a count baked
into the graph fails here.
"""

from __future__ import annotations

import io

import pytest
import torch

from cnnkit import export as export_module
from cnnkit.detection.rcnn import FasterRCNN
from cnnkit.export import DETECTION_OUTPUTS, FORMATS, export_detector

from .test_rcnn import TINY as RCNN_TINY

ort = pytest.importorskip("onnxruntime")

TINY = {
    **RCNN_TINY,
    "min_size": 48,  # the 40 x 56 test images are resized: the transform is in the graph too
    "rpn_pre_nms_top_n_test": 60,
    "rpn_post_nms_top_n_test": 40,
    "box_score_thresh": 0.0,  # untrained: keep everything, so NMS and the heads get work
    "mask_channels": 8,
    "keypoint_channels": 8,
    "keypoint_convs": 2,
}
VARIANTS = {
    "faster_fpn": {},
    "faster_c4": {"head": "c4", "anchor_sizes": [16, 32, 64]},
    "mask": {"mask": True},
    "keypoint": {"num_keypoints": 4},
}


def tiny(**overrides) -> FasterRCNN:
    torch.manual_seed(0)
    return FasterRCNN(**{**TINY, **overrides}).eval()


def images(n: int, seed: int, size=(40, 56)) -> list[torch.Tensor]:
    """Noise with a few bright rectangles: a different scene, and detection count, per image."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        im = torch.randint(0, 120, (3, *size), dtype=torch.uint8, generator=gen)
        for _ in range(int(torch.randint(0, 4, (1,), generator=gen))):
            y, x = (
                torch.randint(0, size[0] - 8, (1,), generator=gen),
                torch.randint(0, size[1] - 8, (1,), generator=gen),
            )
            im[:, y : y + 12, x : x + 16] = 255
        out.append(im)
    return out


def _load(data: bytes, fmt: str = "torchscript"):
    """The exported file run on its own: torch.jit.load, or an onnxruntime session whose named
    outputs make the same dict."""
    if fmt == "torchscript":
        return torch.jit.load(io.BytesIO(data))
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]

    def run(image):
        values = session.run(names, {session.get_inputs()[0].name: image.numpy()})
        return {n: torch.from_numpy(v) for n, v in zip(names, values, strict=True)}

    return run


def flat_heatmaps(model: FasterRCNN) -> FasterRCNN:
    """The keypoint head's last layer zeroed: every heatmap cell ties, and both runtimes take
    the first. (An untrained head's heatmaps have maxima within float rounding of each other,
    which onnxruntime's convolutions may order differently: a keypoint jumps a few cells, and
    the verification rightly refuses that export.)"""
    with torch.no_grad():
        model.keypoint_head.kps_score_lowres.weight.zero_()
    return model


# ONNX with the C4 head adds nothing the FPN variant does not export already.
CASES = [(v, f) for f in FORMATS for v in VARIANTS if (v, f) != ("faster_c4", "onnx")]


@pytest.fixture(scope="module", params=CASES, ids=["-".join(c) for c in CASES])
def exported(request):
    variant, fmt = request.param
    model = tiny(**VARIANTS[variant])
    if variant == "keypoint" and fmt == "onnx":
        model = flat_heatmaps(model)
    result = export_detector(model, kind="uint8", images=images(2, seed=1), fmt=fmt)
    return request.param, model, result


def test_exported_detector_equals_eager_on_new_images(exported):
    (name, fmt), model, result = exported
    loaded = _load(result.data, fmt)
    counts = set()
    with torch.no_grad():
        for image in images(4, seed=7) + [torch.zeros(3, 40, 56, dtype=torch.uint8)]:
            expected = model([image.float() / 255])[0]
            got = loaded(image)
            keys = [k for k in DETECTION_OUTPUTS if k in expected]
            assert list(got) == keys
            for key in keys:
                assert got[key].shape == expected[key].shape, (name, key)
                # TorchScript runs the same kernels (equal); onnxruntime its own convolutions.
                tol = 0 if fmt == "torchscript" else 1e-4
                torch.testing.assert_close(got[key], expected[key], rtol=tol, atol=tol)
            counts.add(len(got["boxes"]))
    assert len(counts) >= 3, counts  # the comparison saw several detection counts
    assert result.max_difference <= 1e-4 and result.images == 4


def test_exported_detector_refuses_another_size_at_run_time(exported):
    (_, fmt), _, result = exported
    # TorchScript raises the graph's own message; onnxruntime a shape error of the input.
    message = (
        r"takes one image \[3, 40, 56\]" if fmt == "torchscript" else r"dimensions for input: image"
    )
    with pytest.raises(Exception, match=message):
        _load(result.data, fmt)(torch.zeros(3, 56, 40, dtype=torch.uint8))


def test_float_input_takes_values_in_0_1():
    model = tiny()
    result = export_detector(model, kind="float", images=images(1, seed=2))
    image = images(1, seed=9)[0]
    with torch.no_grad():
        got = _load(result.data)(image.float() / 255)
        expected = model([image.float() / 255])[0]
    torch.testing.assert_close(got["boxes"], expected["boxes"], rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "overrides, pattern",
    [({"rpn": False}, "only detectors with an RPN"), ({"roi_op": "pool"}, "roi_op 'pool'")],
)
def test_detectors_that_cannot_export_are_named(overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        export_detector(tiny(**overrides), kind="uint8", images=images(1, seed=1))


def test_verification_images_of_another_size_are_refused():
    bad = images(1, seed=1) + images(1, seed=2, size=(40, 40))
    with pytest.raises(ValueError, match=r"verification image 1: expected uint8 \[3, 40, 56\]"):
        export_detector(tiny(), kind="uint8", images=bad)


def test_a_wrong_export_is_not_returned(monkeypatch):
    """The verification can fail: an export whose boxes are off by 1e-3 is refused."""
    real = export_module._torchscript_runner

    def shifted(data):
        module = real(data)

        def run(x):
            out = module(x)
            out["boxes"] = out["boxes"] + 1e-3
            return out

        return run

    monkeypatch.setattr(export_module, "_torchscript_runner", shifted)
    with pytest.raises(ValueError, match="differs from the eager model.*nothing written"):
        export_detector(tiny(), kind="uint8", images=images(1, seed=1))


def test_onnx_detectors_need_opset_16():
    """ONNX's RoiAlign has the coordinate mode that tells aligned boxes apart from opset 16."""
    with pytest.raises(ValueError, match="--opset 15: .*RoiAlign.*--opset 16 or later"):
        export_detector(tiny(), kind="uint8", images=images(1, seed=1), fmt="onnx", opset=15)
