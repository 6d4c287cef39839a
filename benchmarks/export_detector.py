"""Detector export (TorchScript and ONNX): the same detections, and how fast per image.

    python benchmarks/export_detector.py RUN_DIR [--images 100] [--repeats 10] [--threads 1]

Exports the detection run RUN_DIR with `cnnkit export --format torchscript` and `--format onnx`
(temporary files; the command's own check runs on 16 val images), loads them with
`torch.jit.load` and onnxruntime alone, and on the first ``--images`` val images (of the
export's size) compares each with the eager detector called as `cnnkit detect predict` calls
it: detection counts, and the max difference of every output (relative above 1, as the
command's check). Then times single-image inference, eager and both exports interleaved image
by image, median of ``--repeats`` passes over 16 images (after 3 warm-up passes: the
TorchScript executor optimizes on its first calls).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

FORMATS = ("torchscript", "onnx")


def _runner(path: Path, fmt: str, threads: int):
    if fmt == "torchscript":
        return torch.jit.load(str(path))
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # its graph-optimizer notes are not results
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]

    def run(image):
        values = session.run(names, {"image": image.numpy()})
        return {n: torch.from_numpy(v) for n, v in zip(names, values, strict=True)}

    return run


def _compare(name, runner, eager, images) -> bool:
    same, detections, worst = 0, 0, {}
    with torch.no_grad():
        for image in images:
            expected, got = eager(image), runner(image)
            if len(got["boxes"]) != len(expected["boxes"]):
                continue
            same += 1
            detections += len(got["boxes"])
            for key, value in got.items():
                if value.numel():
                    e = expected[key].double()
                    diff = ((value.double() - e).abs() / e.abs().clamp(min=1)).max().item()
                    worst[key] = max(worst.get(key, 0.0), diff)
    print(
        f"{name}: {len(images)} val images, {same} with the same number of detections "
        f"({detections} detections); max difference: "
        + ", ".join(f"{k} {v:.2g}" for k, v in worst.items())
    )
    return same == len(images)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads, all runtimes")
    args = parser.parse_args()

    from cnnkit.cli.detect import _load_run, _read_rgb
    from cnnkit.cli.main import main as cli
    from cnnkit.data.detection import load_detection

    torch.set_num_threads(args.threads)
    runners = {}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in FORMATS:
            out = Path(tmp) / f"model.{fmt}"
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                if cli(["export", args.run_dir, "--format", fmt, "--out", str(out)]) != 0:
                    return 1
            print(printed.getvalue().strip())
            runners[fmt] = _runner(out, fmt, args.threads)
    model, config = _load_run(args.run_dir)
    val = load_detection(config["data"]["spec"]).val
    count = min(args.images, len(val.file_names))
    images = [_read_rgb(str(Path(val.image_dir) / val.file_names[i])) for i in range(count)]
    images = [im for im in images if im.shape == images[0].shape]

    def eager(image):
        return model([image.float() / 255])[0]

    ok = all([_compare(fmt, runner, eager, images) for fmt, runner in runners.items()])
    timed = images[:16]
    fns = {"eager": eager, **runners}
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad():
        for _ in range(args.repeats + 3):
            for name, fn in fns.items():
                start = time.perf_counter()
                for image in timed:
                    fn(image)
                times[name].append((time.perf_counter() - start) / len(timed))
    ms = {name: statistics.median(t[3:]) * 1e3 for name, t in times.items()}
    print(
        f"per image ({args.threads} thread(s), torch {torch.__version__}): "
        + ", ".join(
            f"{name} {ms[name]:.1f} ms ({ms['eager'] / ms[name]:.2f}x eager)" for name in fns
        )
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
