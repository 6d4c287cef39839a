"""Faster / Mask R-CNN training step and inference, and mask pasting: cnnkit vs torchvision.

    PYTHONPATH=src /tmp/cnnkit-peers/bin/python benchmarks/detection.py [--repeats 5]
        [--setting r50|scenes|both] [--detector faster|mask|both|none] [--threads N] [--no-paste]

Both detectors are built with the same configuration (backbone, FPN, anchors, proposal counts,
RoI sampling, post-processing), the same inputs and fp32 (each with its own random initial
weights: the work per step does not depend on them):

* ``r50``: resnet50-FPN, frozen BatchNorm, the lower backbone stages frozen (torchvision's
  trainable_backbone_layers=3), 2 images of 512x512 (min_size = max_size = 512: no resize),
  torchvision's defaults otherwise (2000/1000 proposals, 512 sampled RoIs per image);
* ``scenes``: resnet18-FPN, 8 images of 128x128 (no resize), 64 sampled RoIs per image,
  torchvision's other defaults.

Mask R-CNN adds the paper's mask head to both (4 convolutions of 256 channels, 14 x 14 RoIs,
28 x 28 masks; inference pastes every detection's mask into the image, as torchvision's
``MaskRCNN`` does). The paste benchmark puts 100 masks of 28 x 28 into an 800 x 1333 image:
``paste_masks`` against torchvision's ``paste_masks_in_image``, and ``masks_to_rles`` (the
evaluation's path: COCO RLE straight from the box-local masks, no dense float mask).

Inference runs on copies of the initial models and keeps every class score
(``box_score_thresh=0``), so that both return exactly 100 detections per image (printed): how
many of an untrained detector's boxes pass 0.05 is chance, and Mask R-CNN's inference cost is
mostly the mask head on every detection.

Each image has 4 random ground-truth boxes (with an elliptic mask inside each). Timings alternate between the two libraries (the
order swapped every repeat, the first round a warm-up); medians are reported with the ratio
torchvision / cnnkit (> 1: cnnkit faster). The global RNG is reseeded before every call.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torchvision
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.ops import FrozenBatchNorm2d

from cnnkit.detection.paste import masks_to_rles, paste_masks
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


def torchvision_model(s: dict, mask: bool) -> torch.nn.Module:
    backbone = resnet_fpn_backbone(
        backbone_name=s["backbone"],
        weights=None,
        norm_layer=FrozenBatchNorm2d,
        trainable_layers=s["trainable_layers"],
    )
    return (MaskRCNN if mask else FasterRCNN)(
        backbone,
        num_classes=NUM_CLASSES + 1,
        min_size=s["size"],
        max_size=s["size"],
        box_batch_size_per_image=s["box_batch_size_per_image"],
        box_score_thresh=0.0,
    )


def cnnkit_model(s: dict, mask: bool) -> torch.nn.Module:
    # torchvision's defaults where ours differ: NMS 0.5 after the box head, background RoIs
    # with IoU down to 0 (ours: 0.3 and 0.1, the lecture's and Fast R-CNN's values). The
    # faster_rcnn rows with mask=True: the registry's mask_rcnn_r18_fpn is the light scenes model.
    return create_model(
        f"faster_rcnn_{'r50' if s['backbone'] == 'resnet50' else 'r18'}_fpn",
        num_classes=NUM_CLASSES,
        mask=mask,
        norm="frozen_batch",
        trainable_layers=s["trainable_layers"],
        min_size=s["size"],
        max_size=s["size"],
        box_batch_size_per_image=s["box_batch_size_per_image"],
        box_bg_iou_lo=0.0,
        box_nms_thresh=0.5,
        box_score_thresh=0.0,
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
        targets.append({"boxes": boxes, "labels": labels, "masks": ellipses(boxes, size)})
    return images, targets


def ellipses(boxes: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 ``[N, size, size]``: the ellipse inscribed in each box."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    radius = (boxes[:, 2:] - boxes[:, :2]) / 2
    grid = torch.arange(size) + 0.5
    dx = (grid[None, None, :] - centre[:, 0, None, None]) / radius[:, 0, None, None]
    dy = (grid[None, :, None] - centre[:, 1, None, None]) / radius[:, 1, None, None]
    return (dx**2 + dy**2 <= 1).to(torch.uint8)


def train_step(model, opt, images, targets) -> float:
    model.train()
    t0 = time.perf_counter()
    losses = model(images, targets)
    sum(losses.values()).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


@torch.no_grad()
def infer(model, images) -> tuple[float, list[int]]:
    model.eval()
    t0 = time.perf_counter()
    out = model(images)
    return time.perf_counter() - t0, [len(o["boxes"]) for o in out]


def compare(name: str, mask: bool, repeats: int) -> None:
    s = SETTINGS[name]
    torch.manual_seed(0)
    models = {"cnnkit": cnnkit_model(s, mask), "torchvision": torchvision_model(s, mask)}
    opts = {
        k: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
        for k, m in models.items()
    }
    # Inference runs on untouched copies: the timed training steps change the weights, and with
    # them how many detections survive (torchvision's r50 Mask R-CNN returned none once).
    frozen = {k: copy.deepcopy(m).eval() for k, m in models.items()}
    images, targets = inputs(s)
    if not mask:
        targets = [{k: v for k, v in t.items() if k != "masks"} for t in targets]
    counts = {k: count_parameters(m) for k, m in models.items()}
    print(f"\n[{'Mask' if mask else 'Faster'} R-CNN, {name}] {s['backbone']}-FPN, {s['images']} images of {s['size']}^2, "
          f"{s['box_batch_size_per_image']} RoIs/image; parameters {counts}")  # fmt: skip
    times = {(k, what): [] for k in models for what in ("train", "infer")}
    detected = {}
    for rep in range(repeats + 1):
        order = list(models) if rep % 2 == 0 else list(reversed(models))
        for what in ("train", "infer"):
            for key in order:
                torch.manual_seed(rep)
                if what == "train":
                    t = train_step(models[key], opts[key], images, targets)
                else:
                    t, detected[key] = infer(frozen[key], images)
                if rep > 0:
                    times[(key, what)].append(t)
    for what in ("train", "infer"):
        ck = statistics.median(times[("cnnkit", what)])
        tv = statistics.median(times[("torchvision", what)])
        print(f"  {what:5s}: cnnkit {ck * 1e3:8.1f} ms  torchvision {tv * 1e3:8.1f} ms  "
              f"ratio {tv / ck:5.2f}x")  # fmt: skip
    print(f"  detections per image at the last inference: {detected}")


def compare_paste(repeats: int, n: int = 100, size: tuple[int, int] = (800, 1333)) -> None:
    """Pasting ``n`` 28 x 28 masks into one image, and the RLE path, interleaved."""
    gen = torch.Generator().manual_seed(0)
    height, width = size
    probs = torch.rand(n, 1, 28, 28, generator=gen)
    xy = torch.rand(n, 2, generator=gen) * torch.tensor([width * 0.7, height * 0.7])
    wh = torch.rand(n, 2, generator=gen) * torch.tensor([width * 0.3, height * 0.3]) + 8
    boxes = torch.cat((xy, xy + wh), 1)
    runs = {
        "cnnkit paste_masks": lambda: paste_masks(probs, boxes, size),
        "torchvision paste_masks_in_image": lambda: paste_masks_in_image(probs, boxes, size),
        "cnnkit masks_to_rles (no dense mask)": lambda: masks_to_rles(probs, boxes, size),
    }
    times = {k: [] for k in runs}
    for rep in range(repeats + 1):
        for key in runs if rep % 2 == 0 else reversed(runs):
            t0 = time.perf_counter()
            out = runs[key]()
            if rep > 0:
                times[key].append(time.perf_counter() - t0)
            del out
    med = {k: statistics.median(v) for k, v in times.items()}
    tv = med["torchvision paste_masks_in_image"]
    print(f"\n[paste] {n} masks of 28x28 into {height}x{width}")
    for key, t in med.items():
        print(f"  {key:38s} {t * 1e3:8.1f} ms  ratio {tv / t:5.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--setting", choices=("r50", "scenes", "both"), default="both")
    parser.add_argument("--detector", choices=("faster", "mask", "both", "none"), default="both")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-paste", action="store_true", help="skip the paste benchmark")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"threads {torch.get_num_threads()}, fp32, median of {args.repeats}")  # fmt: skip
    if not args.no_paste:  # first: a fresh process's memory, as an evaluation would have
        compare_paste(3 * args.repeats)  # a fraction of a second each: more repeats
    settings = ("r50", "scenes") if args.setting == "both" else (args.setting,)
    detectors = {"faster": (False,), "mask": (True,), "both": (False, True), "none": ()}
    for mask in detectors[args.detector]:
        for name in settings:
            compare(name, mask, args.repeats)


if __name__ == "__main__":
    main()
