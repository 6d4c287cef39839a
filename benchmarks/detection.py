"""Faster R-CNN training step and inference: cnnkit vs torchvision's FasterRCNN, same run.

    PYTHONPATH=src /tmp/cnnkit-peers/bin/python benchmarks/detection.py [--repeats 5]
        [--setting r50|scenes|both] [--threads N]

Both detectors are built with the same configuration (backbone, FPN, anchors, proposal counts,
RoI sampling, post-processing), the same inputs and fp32 (each with its own random initial
weights: the work per step does not depend on them):

* ``r50``: resnet50-FPN, frozen BatchNorm, the lower backbone stages frozen (torchvision's
  trainable_backbone_layers=3), 2 images of 512x512 (min_size = max_size = 512: no resize),
  torchvision's defaults otherwise (2000/1000 proposals, 512 sampled RoIs per image);
* ``scenes``: resnet18-FPN, 8 images of 128x128 (no resize), 64 sampled RoIs per image,
  torchvision's other defaults.

Each image has 4 random ground-truth boxes. Timings alternate between the two libraries (the
order swapped every repeat, the first round a warm-up); medians are reported with the ratio
torchvision / cnnkit (> 1: cnnkit faster). The global RNG is reseeded before every call.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops import FrozenBatchNorm2d

from cnnkit.models.registry import count_parameters, create_model

SETTINGS = {
    "r50": {
        "backbone": "resnet50",
        "images": 2,
        "size": 512,
        "box_batch_size_per_image": 512,
        "trainable_layers": 3,
    },
    "scenes": {
        "backbone": "resnet18",
        "images": 8,
        "size": 128,
        "box_batch_size_per_image": 64,
        "trainable_layers": 3,
    },
}
NUM_CLASSES = 10  # foreground classes; torchvision counts the background too


def torchvision_model(s: dict) -> torch.nn.Module:
    backbone = resnet_fpn_backbone(
        backbone_name=s["backbone"],
        weights=None,
        norm_layer=FrozenBatchNorm2d,
        trainable_layers=s["trainable_layers"],
    )
    return FasterRCNN(
        backbone,
        num_classes=NUM_CLASSES + 1,
        min_size=s["size"],
        max_size=s["size"],
        box_batch_size_per_image=s["box_batch_size_per_image"],
    )


def cnnkit_model(s: dict) -> torch.nn.Module:
    # torchvision's defaults where ours differ: NMS 0.5 after the box head, background RoIs
    # with IoU down to 0 (ours: 0.3 and 0.1, the lecture's and Fast R-CNN's values).
    return create_model(
        f"faster_rcnn_{'r50' if s['backbone'] == 'resnet50' else 'r18'}_fpn",
        num_classes=NUM_CLASSES,
        norm="frozen_batch",
        trainable_layers=s["trainable_layers"],
        min_size=s["size"],
        max_size=s["size"],
        box_batch_size_per_image=s["box_batch_size_per_image"],
        box_bg_iou_lo=0.0,
        box_nms_thresh=0.5,
    )


def inputs(s: dict, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    n, size = s["images"], s["size"]
    images = [torch.rand(3, size, size, generator=gen) for _ in range(n)]
    targets = []
    for _ in range(n):
        xy = torch.rand(4, 2, generator=gen) * size * 0.7
        wh = torch.rand(4, 2, generator=gen) * size * 0.3 + 8
        boxes = torch.cat((xy, (xy + wh).clamp(max=size)), 1)
        labels = torch.randint(1, NUM_CLASSES + 1, (4,), generator=gen)
        targets.append({"boxes": boxes, "labels": labels})
    return images, targets


def train_step(model, opt, images, targets) -> float:
    model.train()
    t0 = time.perf_counter()
    losses = model(images, targets)
    sum(losses.values()).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


@torch.no_grad()
def infer(model, images) -> float:
    model.eval()
    t0 = time.perf_counter()
    model(images)
    return time.perf_counter() - t0


def compare(name: str, repeats: int) -> None:
    s = SETTINGS[name]
    torch.manual_seed(0)
    models = {"cnnkit": cnnkit_model(s), "torchvision": torchvision_model(s)}
    opts = {
        k: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
        for k, m in models.items()
    }
    images, targets = inputs(s)
    counts = {k: count_parameters(m) for k, m in models.items()}
    print(f"\n[{name}] {s['backbone']}-FPN, {s['images']} images of {s['size']}^2, "
          f"{s['box_batch_size_per_image']} RoIs/image; parameters {counts}")  # fmt: skip
    times = {(k, what): [] for k in models for what in ("train", "infer")}
    for rep in range(repeats + 1):
        order = list(models) if rep % 2 == 0 else list(reversed(models))
        for what in ("train", "infer"):
            for key in order:
                torch.manual_seed(rep)
                if what == "train":
                    t = train_step(models[key], opts[key], images, targets)
                else:
                    t = infer(models[key], images)
                if rep > 0:
                    times[(key, what)].append(t)
    for what in ("train", "infer"):
        ck = statistics.median(times[("cnnkit", what)])
        tv = statistics.median(times[("torchvision", what)])
        print(f"  {what:5s}: cnnkit {ck * 1e3:8.1f} ms  torchvision {tv * 1e3:8.1f} ms  "
              f"ratio {tv / ck:5.2f}x")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--setting", choices=("r50", "scenes", "both"), default="both")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"threads {torch.get_num_threads()}, fp32, median of {args.repeats}")  # fmt: skip
    for name in ("r50", "scenes") if args.setting == "both" else (args.setting,):
        compare(name, args.repeats)


if __name__ == "__main__":
    main()
