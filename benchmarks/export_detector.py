"""TorchScript export of a detection run: the same detections, and how fast per image.

    python benchmarks/export_detector.py RUN_DIR [--images 200] [--repeats 20] [--threads 1]

Exports RUN_DIR with `cnnkit export --format torchscript` (to a temporary file; the command's
own check runs on 16 val images), reloads it with `torch.jit.load`, and on the first
``--images`` val images (of the export's size) compares it with the eager detector called as
`cnnkit detect predict` calls it: detection counts, and the max difference of every output.
Then times single-image inference, the two interleaved image by image, median of
``--repeats`` passes over 16 images (the first passes warm the TorchScript executor up).
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads, both runtimes")
    args = parser.parse_args()

    from cnnkit.cli.detect import _load_run, _read_rgb
    from cnnkit.cli.main import main as cli
    from cnnkit.data.detection import load_detection

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model.ts.pt"
        argv = ["export", args.run_dir, "--format", "torchscript", "--out", str(out)]
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            if cli(argv) != 0:
                return 1
        print(printed.getvalue().strip())
        traced = torch.jit.load(str(out))
    model, config = _load_run(args.run_dir)
    val = load_detection(config["data"]["spec"]).val
    images = [_read_rgb(str(Path(val.image_dir) / val.file_names[i])) for i in range(args.images)]
    images = [im for im in images if im.shape == images[0].shape]

    def eager(image):
        return model([image.float() / 255])[0]

    same_count, worst, detections = 0, {}, 0
    with torch.no_grad():
        for image in images:
            expected, got = eager(image), traced(image)
            if len(got["boxes"]) != len(expected["boxes"]):
                continue
            same_count += 1
            detections += len(got["boxes"])
            for key, value in got.items():
                if value.numel():
                    diff = (value.double() - expected[key].double()).abs().max().item()
                    worst[key] = max(worst.get(key, 0.0), diff)
    print(
        f"{len(images)} val images: {same_count} with the same number of detections "
        f"({detections} detections); max |difference|: "
        + ", ".join(f"{k} {v:.2g}" for k, v in worst.items())
    )

    timed = images[:16]
    times = {"eager": [], "torchscript": []}
    with torch.no_grad():
        for _ in range(args.repeats):
            for name, fn in (("eager", eager), ("torchscript", traced)):
                start = time.perf_counter()
                for image in timed:
                    fn(image)
                times[name].append((time.perf_counter() - start) / len(timed))
    ms = {k: statistics.median(v[3:] or v) * 1e3 for k, v in times.items()}
    print(
        f"per image ({args.threads} thread(s), torch {torch.__version__}): eager "
        f"{ms['eager']:.1f} ms, torchscript {ms['torchscript']:.1f} ms "
        f"({ms['eager'] / ms['torchscript']:.2f}x)"
    )
    return 0 if same_count == len(images) else 1


if __name__ == "__main__":
    sys.exit(main())
