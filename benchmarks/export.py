"""ONNX export of a classification run: same predictions, and how fast at batch 1.

    python benchmarks/export.py RUN_DIR [--repeats 300]

Exports RUN_DIR with `cnnkit export --format onnx --input uint8 --dynamic-batch` (to a temporary
file), then on the run's whole test split compares top-1 of onnxruntime with eager PyTorch
(`predict_logits`, the code `cnnkit evaluate` runs) and with the accuracy `cnnkit evaluate`
reports; then times single-image inference (batch 1, uint8 input, normalization included on
both sides), the two runtimes interleaved image by image, median of ``--repeats``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads, both runtimes")
    args = parser.parse_args()

    import onnxruntime as ort

    from cnnkit.cli.main import main as cli
    from cnnkit.cli.runs import _eval_split
    from cnnkit.train.checkpoint import load_model, read_config
    from cnnkit.train.classification import predict_logits

    torch.set_num_threads(args.threads)
    run_dir = Path(args.run_dir)
    config = read_config(run_dir)
    data = config["data"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model.onnx"
        argv = ["export", str(run_dir), "--format", "onnx", "--dynamic-batch", "--out", str(out)]
        if cli(argv) != 0:
            return 1
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])

    model = load_model(run_dir)
    _, batches = _eval_split(run_dir, config, model, data["spec"], "test", 256)
    pairs = list(batches)
    images = torch.cat([b[0] for b in pairs])
    labels = torch.cat([b[1] for b in pairs]).long()
    eager = predict_logits(model, images, mean=data["mean"], std=data["std"])
    onnx = torch.from_numpy(session.run(["logits"], {"images": images.numpy()})[0])
    top_eager, top_onnx = eager.argmax(1), onnx.argmax(1)
    with contextlib.redirect_stdout(io.StringIO()), tempfile.TemporaryDirectory() as tmp:
        cli(["evaluate", str(run_dir), "--split", "test", "--device", "cpu", "--out", tmp])
        evaluated = json.loads((Path(tmp) / "evaluation.json").read_text())["accuracy"]
    n = len(labels)
    print(f"{n} test images of {data['spec']}, model {config['name']}")
    print(f"top-1 agreement onnxruntime vs eager: {(top_eager == top_onnx).sum().item()}/{n}")
    print(
        f"accuracy: onnxruntime {100 * (top_onnx == labels).float().mean():.2f}%  "
        f"eager {100 * (top_eager == labels).float().mean():.2f}%  "
        f"cnnkit evaluate {100 * evaluated:.2f}%"
    )
    print(f"max |logit difference| {(onnx - eager).abs().max().item():.2g}")

    mean = torch.tensor(data["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(data["std"]).view(1, -1, 1, 1)
    times: dict[str, list[float]] = {"eager": [], "onnxruntime": []}
    with torch.inference_mode():
        for i in range(args.repeats + 20):  # the first 20 warm up
            x = images[i % n : i % n + 1]
            t0 = time.perf_counter()
            model((x.float() / 255 - mean) / std)
            t1 = time.perf_counter()
            session.run(["logits"], {"images": x.numpy()})
            t2 = time.perf_counter()
            if i >= 20:
                times["eager"].append(t1 - t0)
                times["onnxruntime"].append(t2 - t1)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(
        f"batch-1 latency, median of {args.repeats}, {args.threads} thread(s): "
        f"eager {med['eager']:.3f} ms  onnxruntime {med['onnxruntime']:.3f} ms  "
        f"(eager / onnxruntime = {med['eager'] / med['onnxruntime']:.2f}x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
