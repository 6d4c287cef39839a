"""Loader throughput: cnnkit's stream_loader vs torchvision's ImageFolder + DataLoader.

The same generated folder, the same work (decode, RandomResizedCrop to 224 with scale 0.08-1 and
ratio 3/4-4/3, horizontal flip, uint8 CHW tensors batched), the same workers and batch size;
persistent workers on both sides, one warm-up pass each, then interleaved timed passes; the
figure is the median of the per-round ratios of images per second (ours / torchvision's).
torchvision lives only in the peers environment:

    PY=$(bash ../shared/tools/peers-venv.sh)
    PYTHONPATH=src $PY benchmarks/data_loader.py
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

VARIANTS = {  # name: (format, width, height)
    "jpeg-500x375": ("JPEG", 500, 375),  # the typical ImageNet photo
    "png-500x375": ("PNG", 500, 375),
    "jpeg-1600x1200": ("JPEG", 1600, 1200),  # a phone photo: libjpeg's DCT scaling pays here
}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def make_folder(root: Path, fmt: str, width: int, height: int, n: int, classes: int = 4) -> Path:
    """``n`` photo-like images (smooth shapes + texture noise) in ``root/c<k>/``."""
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    ext = ".JPEG" if fmt == "JPEG" else ".png"
    for i in range(n):
        fx, fy, phase = rng.uniform(5, 60, 2).tolist() + [rng.uniform(0, 6)]
        base = np.stack(
            [
                127 + 100 * np.sin(xx / fx + phase),
                127 + 100 * np.cos(yy / fy - phase),
                127 + 100 * np.sin((xx + yy) / (fx + fy)),
            ],
            axis=2,
        )
        image = (base + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)
        path = root / f"c{i % classes}" / f"{i:05d}{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        kwargs = {"quality": 90} if fmt == "JPEG" else {"compress_level": 6}
        Image.fromarray(image).save(path, fmt, **kwargs)
    return root


def ours(folder: Path, workers: int, batch_size: int):
    from cnnkit.data.classification import _class_tree
    from cnnkit.data.streaming import FileSource, ShardBatchSampler, StreamDataset, stream_loader

    files, labels, _ = _class_tree(folder, None)  # every image (no split): as ImageFolder
    data = StreamDataset(FileSource(files, labels, 3), image_size=224, train=True, seed=0)
    sampler = ShardBatchSampler(len(data), batch_size, seed=0)
    loader = stream_loader(data, sampler, workers=workers, pin_memory=False)
    epoch = [0]

    def one_pass() -> int:
        epoch[0] += 1
        sampler.set_epoch(epoch[0])
        return sum(len(b) for b in loader)

    return one_pass


def theirs(folder: Path, workers: int, batch_size: int):
    import torch
    from torchvision import datasets, transforms

    tf = transforms.Compose(
        [
            transforms.RandomResizedCrop(224),
            transforms.RandomHorizontalFlip(),
            transforms.PILToTensor(),
        ]
    )
    data = datasets.ImageFolder(str(folder), transform=tf)
    loader = torch.utils.data.DataLoader(
        data,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=False,
    )

    def one_pass() -> int:
        return sum(int(y.shape[0]) for _, y in loader)

    return one_pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=256, help="images per folder")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = p.parse_args()
    print(f"CPU: {cpu_name()}; {args.workers} workers, batch {args.batch_size}", flush=True)
    with tempfile.TemporaryDirectory(prefix="cnnkit-data-loader-") as tmp:
        for name in args.variants:
            fmt, w, h = VARIANTS[name]
            folder = make_folder(Path(tmp) / name, fmt, w, h, args.images)
            loaders = {
                "cnnkit": ours(folder, args.workers, args.batch_size),
                "torchvision": theirs(folder, args.workers, args.batch_size),
            }
            for run in loaders.values():
                run()  # warm-up: start the workers, fill the page cache
            rates: dict[str, list[float]] = {k: [] for k in loaders}
            for r in range(args.rounds):
                order = list(loaders) if r % 2 == 0 else list(loaders)[::-1]
                for key in order:
                    t0 = time.perf_counter()
                    n = loaders[key]()
                    rates[key].append(n / (time.perf_counter() - t0))
            ratios = [a / b for a, b in zip(rates["cnnkit"], rates["torchvision"], strict=True)]
            print(
                f"{name}: cnnkit {statistics.median(rates['cnnkit']):.0f} img/s, torchvision "
                f"{statistics.median(rates['torchvision']):.0f} img/s; median ratio "
                f"{statistics.median(ratios):.2f} (rounds: {', '.join(f'{x:.2f}' for x in ratios)})",
                flush=True,
            )
            del loaders


if __name__ == "__main__":
    main()
