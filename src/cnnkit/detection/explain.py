"""A detector's pipeline on one image, stage by stage, as arrays and pictures.

For people learning how region-based detectors work, and for debugging anchors on a new data
set (`cnnkit detect explain`). :func:`explain` runs the model once, in eval mode and without
gradients, and records what each stage produced:

1. the anchors matched to each ground-truth box by the RPN's own :class:`Matcher` (Faster
   R-CNN, sec. 3.1.2: IoU >= ``fg_iou``, or the box's best anchor);
2. the RPN's proposals before NMS (top-k per level, decoded, clipped, tiny ones dropped) and
3. after NMS, with their objectness;
4. the RoIs the box head would learn from in training (:func:`sample_rois` with the model's
   settings under a fixed seed): foreground and background;
5. the class-specific boxes before per-class NMS (Fast R-CNN, sec. 2.3: one box per RoI and
   class above the score threshold) and
6. after it: the detections;
7. / 8. where the model has those heads, the top detections' box-local mask probabilities and
   keypoint heatmaps.

Nothing of the pipeline is re-implemented. Forward hooks on the model's modules read the
anchors and the proposals; the RPN and the RoI heads record the candidates of their NMS and the
indices it kept in their ``nms_trace`` lists while the image runs, so the pictures show
exactly what the model computed; the training-only stages, which inference skips, call the
RPN's own matcher and :func:`sample_rois` with the model's settings. :func:`write_explanation`
draws one PNG per stage and an ``index.md`` saying what each stage is.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from cnnkit.detection.roi_heads import sample_rois
from cnnkit.detection.transform import resize_boxes
from cnnkit.ops import box_iou
from cnnkit.viz import BoxLayer, class_colours, draw_box_heatmaps, draw_box_layers

__all__ = ["BoxSet", "Explanation", "explain", "write_explanation"]

#: Torch seed of the RoI sampling shown (the global generator is restored afterwards).
SAMPLING_SEED = 0
#: Detections whose mask / keypoint outputs are kept (the highest-scoring ones).
INSTANCES = 6
#: Detections at least this confident get their class name and score written beside the box
#: (as `cnnkit detect predict` draws by default); the others are drawn thin.
LABEL_SCORE = 0.5


@dataclass
class BoxSet:
    """Boxes of one stage, in ORIGINAL image coordinates, highest score first where scored.

    Attributes:
        boxes: float32 ``[N, 4]`` xyxy.
        scores: float32 ``[N]`` or None (the stage's score: objectness, class probability, IoU).
        labels: int64 ``[N]`` or None (classes ``1..K``, 0 = background; for the matched anchors
            the index of their ground-truth box in the target).
        total: how many boxes the stage had; ``N < total`` when only the ``top`` best are kept.
    """

    boxes: np.ndarray
    scores: np.ndarray | None = None
    labels: np.ndarray | None = None
    total: int = 0


@dataclass
class Explanation:
    """What each stage of a detector produced on one image (arrays in original coordinates).

    Attributes:
        image_size, resized_size: ``(h, w)`` of the image and of the image the model saw.
        proposals_before_nms: the RPN's candidates (scores: objectness probability).
        proposals_after_nms: the RPN's proposals, the box head's RoIs.
        boxes_before_nms: class-specific boxes above the score threshold (labels, scores).
        detections: the final detections (labels, scores).
        gt: the target's boxes and labels (None without a target).
        anchors: the RPN's positive anchors (labels: index of the matched box in ``gt``;
            scores: IoU with it; total: the anchors of the image). None without a target.
        best_anchor_iou: float32 ``[G]``: each box's best IoU with any anchor (NaN for crowd
            boxes, which the RPN never matches). None without a target.
        sampled_rois: the RoIs sampled for the box head's loss (labels: the class, 0 for
            background; total: the candidates, proposals + ground-truth boxes). None without a
            target.
        mask_probs: float32 ``[S, M, M]``: the top ``S`` detections' box-local mask
            probabilities (the detected class's channel), or None without a mask head.
        keypoints: float32 ``[S, K, 3]`` (x, y, visibility) and ``keypoint_heatmaps`` float32
            ``[S, K, R, R]``: the top detections' keypoints and, per keypoint, the softmax over
            the heatmap's positions (box-local); None without a keypoint head.
        settings: the model's thresholds and counts that the stages used.
    """

    image_size: tuple[int, int]
    resized_size: tuple[int, int]
    proposals_before_nms: BoxSet
    proposals_after_nms: BoxSet
    boxes_before_nms: BoxSet
    detections: BoxSet
    gt: BoxSet | None = None
    anchors: BoxSet | None = None
    best_anchor_iou: np.ndarray | None = None
    sampled_rois: BoxSet | None = None
    mask_probs: np.ndarray | None = None
    keypoints: np.ndarray | None = None
    keypoint_heatmaps: np.ndarray | None = None
    settings: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------- recording


class _Trace:
    """The intermediate values of one forward pass: forward hooks on the model's modules and
    the NMS traces of the RPN and of the box postprocess."""

    def __init__(self) -> None:
        self.values: dict[str, object] = {}
        # Per NMS call: (boxes, scores, categories, kept indices).
        self.nms: dict[str, list[tuple[Tensor, ...]]] = {"rpn": [], "boxes": []}

    @contextmanager
    def attached(self, model: nn.Module) -> Iterator[_Trace]:
        def keep(name: str):
            def hook(module, args, kwargs, output):
                self.values[name] = (args, kwargs, output)

            return hook

        handles = [
            model.rpn.register_forward_hook(keep("rpn"), with_kwargs=True),
            model.rpn.anchor_generator.register_forward_hook(keep("anchors"), with_kwargs=True),
        ]
        model.rpn.nms_trace, model.roi_heads.nms_trace = self.nms["rpn"], self.nms["boxes"]
        try:
            yield self
        finally:
            model.rpn.nms_trace = model.roi_heads.nms_trace = None
            for handle in handles:
                handle.remove()

    def argument(self, name: str, index: int, keyword: str) -> object:
        args, kwargs, _ = self.values[name]
        return args[index] if len(args) > index else kwargs[keyword]

    def output(self, name: str) -> object:
        return self.values[name][2]

    def nms_call(self, name: str) -> tuple[Tensor, ...]:
        calls = self.nms[name]
        if len(calls) != 1:  # our bug, not the user's: the pipeline no longer reads as expected
            raise RuntimeError(
                f"explain: expected one {name} NMS call for one image, saw {len(calls)}"
            )
        return calls[0]


# --------------------------------------------------------------------------- explain


def _numpy(x: Tensor) -> np.ndarray:
    return x.detach().cpu().numpy()


def _box_set(
    boxes: Tensor,
    scores: Tensor | None,
    labels: Tensor | None,
    top: int | None,
    scale: tuple[tuple[int, int], tuple[int, int]],
    total: int | None = None,
) -> BoxSet:
    """The ``top`` highest-scoring boxes (all if ``top`` is None), mapped by ``scale = (from
    size, to size)`` to the original image; ``total`` defaults to the number of ``boxes``."""
    total = int(boxes.shape[0]) if total is None else total
    if scores is not None:
        order = torch.argsort(scores, descending=True, stable=True)[:top]
        boxes, scores = boxes[order], scores[order]
        labels = None if labels is None else labels[order]
    boxes = resize_boxes(boxes.float(), *scale)
    return BoxSet(
        boxes=_numpy(boxes).astype(np.float32).reshape(-1, 4),
        scores=None if scores is None else _numpy(scores).astype(np.float32),
        labels=None if labels is None else _numpy(labels).astype(np.int64),
        total=total,
    )


def _check_inputs(model: nn.Module, image: object, target: object, top: object) -> None:
    if getattr(model, "rpn", None) is None or not hasattr(model, "roi_heads"):
        raise ValueError(
            "explain needs a Faster R-CNN (a detector with a region proposal network); a Fast "
            "R-CNN model (rpn=False) gets its proposals from outside"
        )
    if not isinstance(image, Tensor) or image.dtype != torch.uint8 or image.dim() != 3:
        what = f"{image.dtype} {list(image.shape)}" if isinstance(image, Tensor) else type(image)
        raise ValueError(f"explain: image must be a uint8 Tensor[3, H, W], got {what}")
    if image.shape[0] != 3:
        raise ValueError(f"explain: image must be a uint8 Tensor[3, H, W], got {list(image.shape)}")
    if target is not None and not isinstance(target, dict):
        raise TypeError(f"explain: target must be a dict or None, got {type(target).__name__}")
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"explain: top must be a positive integer, got {top!r}")


def explain(
    model: nn.Module, image: Tensor, target: dict | None = None, *, top: int = 50
) -> Explanation:
    """Run ``model`` (a :class:`~cnnkit.detection.rcnn.FasterRCNN`) on one image and return
    what each stage produced.

    Args:
        model: the detector; run in eval mode without gradients, its mode restored after.
        image: uint8 ``[3, H, W]``.
        target: optional ground truth in ``image``'s coordinates: ``boxes`` float ``[G, 4]``
            xyxy, ``labels`` int64 ``[G]`` in ``1..K``, optional ``iscrowd`` ``[G]``. Enables the
            matched anchors and the sampled RoIs.
        top: how many of the highest-scoring boxes the crowded stages keep (the proposals
            before and after NMS, the boxes before NMS, the detections); ``total`` counts all.
    """
    _check_inputs(model, image, target, top)
    device = next(model.parameters()).device
    image = image.to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            # Masks pasted into the image are not shown (the box-local probabilities are):
            # skip them, 4 MB per detection at 800 x 1333.
            extra = {"paste_masks": False} if getattr(model, "has_masks", False) else {}
            with _Trace().attached(model) as trace:
                detection = model([image], **extra)[0]
            return _explanation(model, image, target, top, trace, detection)
    finally:
        model.train(was_training)


def _explanation(
    model: nn.Module,
    image: Tensor,
    target: dict | None,
    top: int,
    trace: _Trace,
    detection: dict[str, Tensor],
) -> Explanation:
    original = (int(image.shape[1]), int(image.shape[2]))
    resized = tuple(trace.argument("rpn", 0, "image_sizes")[0])
    back = (resized, original)
    rpn, heads = model.rpn, model.roi_heads
    proposals = trace.output("rpn")[0][0]  # resized coordinates, the RoI heads' input
    boxes, scores, _, kept = trace.nms_call("rpn")
    class_boxes, class_scores, class_labels, _ = trace.nms_call("boxes")
    out = Explanation(
        image_size=original,
        resized_size=resized,
        proposals_before_nms=_box_set(boxes, scores, None, top, back),
        proposals_after_nms=_proposals_after_nms(boxes, scores, kept, proposals, top, back),
        boxes_before_nms=_box_set(class_boxes, class_scores, class_labels, top, back),
        detections=_box_set(
            detection["boxes"], detection["scores"], detection["labels"], top, (original,) * 2
        ),
        settings={
            "rpn_fg_iou": rpn.matcher.high,
            "rpn_bg_iou": rpn.matcher.low,
            "rpn_pre_nms_top_n": rpn.pre_nms_top_n["testing"],
            "rpn_post_nms_top_n": rpn.post_nms_top_n["testing"],
            "rpn_nms_thresh": rpn.nms_thresh,
            "box_fg_iou": heads.fg_iou,
            "box_bg_iou_lo": heads.bg_iou_lo,
            "box_batch_size_per_image": heads.batch_size_per_image,
            "box_positive_fraction": heads.positive_fraction,
            "box_score_thresh": heads.score_thresh,
            "box_nms_thresh": heads.nms_thresh,
            "box_detections_per_img": heads.detections_per_img,
            "top": top,
        },
    )
    _add_instances(out, detection)
    if target is not None:
        _add_ground_truth(out, model, image, target, trace, proposals)
    return out


def _proposals_after_nms(
    boxes: Tensor, scores: Tensor, kept: Tensor, proposals: Tensor, top: int, back
) -> BoxSet:
    """The RPN's output with each proposal's objectness: the first ``P`` candidates that NMS
    kept (by decreasing score), ``P`` the number of proposals the RPN returned."""
    kept = kept[: proposals.shape[0]]
    if not torch.equal(boxes[kept], proposals):  # our bug: the RPN no longer reads as expected
        raise RuntimeError("explain: the RPN's proposals are not the candidates its NMS kept")
    return _box_set(proposals, scores[kept], None, top, back)


def _add_instances(out: Explanation, detection: dict[str, Tensor]) -> None:
    """The top detections' mask probabilities and keypoint heatmaps, where the model has them
    (detections come sorted by decreasing score)."""
    shown = slice(0, INSTANCES)
    if "mask_probs" in detection:
        probs = detection["mask_probs"][shown].float()
        out.mask_probs = _numpy(probs.reshape(probs.shape[0], *probs.shape[-2:]))
    if "keypoint_heatmaps" in detection:
        logits = detection["keypoint_heatmaps"][shown].float()  # [S, K, R, R]
        # The keypoint loss is a softmax over the R x R positions of each keypoint's map.
        probs = torch.softmax(logits.flatten(2), dim=2).view_as(logits)
        out.keypoint_heatmaps = _numpy(probs)
        out.keypoints = _numpy(detection["keypoints"][shown].float())


def _add_ground_truth(
    out: Explanation,
    model: nn.Module,
    image: Tensor,
    target: dict,
    trace: _Trace,
    proposals: Tensor,
) -> None:
    """The RPN's positive anchors per ground-truth box and the box head's sampled RoIs."""
    _, (resized_target,) = model.transform([image], [target])
    back = (out.resized_size, out.image_size)
    gt = resized_target["boxes"].to(proposals.device, torch.float32)
    labels = resized_target["labels"].to(proposals.device, torch.int64)
    out.gt = BoxSet(
        boxes=_numpy(target["boxes"].float()).reshape(-1, 4).astype(np.float32),
        labels=_numpy(labels),
        total=int(gt.shape[0]),
    )
    crowd = resized_target.get("iscrowd")
    crowd = torch.zeros_like(labels, dtype=torch.bool) if crowd is None else crowd.bool()
    crowd = crowd.to(gt.device).reshape(-1)
    usable = torch.where(~crowd)[0]  # the RPN never matches crowd boxes
    anchors = trace.output("anchors")
    iou = box_iou(gt[usable], anchors)  # [G', A]
    matches = model.rpn.matcher(iou)  # [A]: index into `usable`, or negative
    positive = torch.where(matches >= 0)[0]
    matched = matches[positive]
    out.anchors = _box_set(
        anchors[positive], iou[matched, positive], usable[matched], None, back, anchors.shape[0]
    )
    best = torch.full((gt.shape[0],), float("nan"), device=gt.device)
    if iou.numel():
        best[usable] = iou.max(dim=1).values
    out.best_anchor_iou = _numpy(best).astype(np.float32)

    heads = model.roi_heads
    cuda = [proposals.device] if proposals.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(SAMPLING_SEED)
        sample = sample_rois(
            [proposals],
            [resized_target],
            fg_iou=heads.fg_iou,
            bg_iou_lo=heads.bg_iou_lo,
            batch_size_per_image=heads.batch_size_per_image,
            positive_fraction=heads.positive_fraction,
            weights=heads.weights,
        )
    candidates = int(proposals.shape[0] + usable.numel())  # the ground truth is appended
    out.sampled_rois = _box_set(sample.boxes, None, sample.labels, None, back, candidates)


# --------------------------------------------------------------------------- pictures


@dataclass
class _Page:
    """One stage's picture and its entry in ``index.md``."""

    name: str
    text: str
    details: list[str] = field(default_factory=list)


def _class_names(labels: np.ndarray, classes: list[str]) -> list[str]:
    bad = [int(v) for v in labels if not 1 <= v <= len(classes)]
    if bad:
        raise ValueError(f"write_explanation: label {bad[0]} is not in 1..{len(classes)} (classes)")
    return [classes[int(v) - 1] for v in labels]


def _by_class(boxes: BoxSet, classes: list[str], *, fade: bool, **style) -> list[BoxLayer]:
    """One layer per class present (legend: the class name), the best boxes drawn last;
    ``fade``: lower scores fainter (relative to the best)."""
    names = np.asarray(_class_names(boxes.labels, classes), dtype=object)
    top = max(float(boxes.scores.max()), 1e-12) if fade and boxes.scores.size else 1.0
    layers = []
    for name in dict.fromkeys(names.tolist()):
        rows = np.flatnonzero(names == name)[::-1]  # scores are decreasing: best last
        layers.append(
            BoxLayer(
                boxes.boxes[rows],
                name=name,
                colour=class_colours([name], classes)[0],
                alpha=0.25 + 0.75 * boxes.scores[rows] / top if fade else 1.0,
                **style,
            )
        )
    return layers


def _scored(boxes: BoxSet) -> BoxLayer:
    """Proposals coloured by objectness, the best drawn last."""
    return BoxLayer(
        boxes.boxes[::-1],
        name="proposals",
        values=boxes.scores[::-1],
        value_label="objectness",
        linewidth=1.0,
    )


def _gt_layer(expl: Explanation, classes: list[str]) -> list[BoxLayer]:
    if expl.gt is None or not expl.gt.total:
        return []
    texts = [f"box {i + 1}: {n}" for i, n in enumerate(_class_names(expl.gt.labels, classes))]
    return [BoxLayer(expl.gt.boxes, name="ground truth", colour="white", texts=texts, halo=True)]


def _shown(boxes: BoxSet) -> str:
    n = boxes.boxes.shape[0]
    return f"all {n}" if n == boxes.total else f"the best {n} of {boxes.total}"


def write_explanation(
    expl: Explanation, image: np.ndarray, out_dir: str | Path, classes: list[str]
) -> list[Path]:
    """Draw each stage of ``expl`` on ``image`` (uint8 ``[H, W, 3]``, the explained image)
    into ``out_dir`` and write ``index.md``, one entry per picture saying what the stage is
    and its counts.

    Files: ``01_anchors.png`` and ``04_sampled_rois.png`` (with a target),
    ``02_proposals_before_nms.png``, ``03_proposals_after_nms.png``, ``05_boxes_before_nms.png``,
    ``06_detections.png``, ``07_masks.png`` / ``08_keypoints.png`` (with those heads).
    ``classes``: the K class names (label ``i`` is ``classes[i - 1]``). Returns the paths
    written, ``index.md`` last.
    """
    from cnnkit.atomic import atomic_write_text

    pixels = np.asarray(image)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ValueError(
            f"write_explanation: image must be uint8 [H, W, 3], got {pixels.dtype} "
            f"{list(pixels.shape)}"
        )
    if tuple(pixels.shape[:2]) != tuple(expl.image_size):
        raise ValueError(
            f"write_explanation: the image is {pixels.shape[0]} x {pixels.shape[1]} but the "
            f"explanation is of a {expl.image_size[0]} x {expl.image_size[1]} image"
        )
    for part in (expl.gt, expl.sampled_rois, expl.boxes_before_nms, expl.detections):
        if part is not None:
            _class_names(part.labels[part.labels > 0], classes)  # every label has a name
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pages = [page(expl, pixels, out, classes) for page in _PAGES]
    pages = [p for p in pages if p is not None]
    (h, w), (rh, rw) = expl.image_size, expl.resized_size
    lines = [
        "# A detector's pipeline on one image",
        "",
        f"The image is {w} x {h} pixels; the model saw it resized to {rw} x {rh}. Every box is "
        "drawn in the image's own pixels. The stages, in the order the detector runs them:",
        "",
    ]
    for p in pages:
        lines += [f"- [{p.name}]({p.name}): {p.text}", *p.details]
    if expl.gt is None:
        lines += [
            "",
            "Without ground truth there is no 01_anchors.png (the anchors matched to each box) "
            "and no 04_sampled_rois.png (the RoIs a training step would sample): give the "
            "image's annotations for those.",
        ]
    atomic_write_text(out / "index.md", "\n".join(lines) + "\n")
    return [out / p.name for p in pages] + [out / "index.md"]


def _anchors_page(expl, pixels, out, classes) -> _Page | None:
    if expl.anchors is None:
        return None
    name, a, st = "01_anchors.png", expl.anchors, expl.settings
    order = np.argsort(a.scores, kind="stable")  # the best IoU drawn last
    boxes = [f"box {i + 1}" for i in range(expl.gt.total)]
    layers = [
        *_gt_layer(expl, classes),
        BoxLayer(
            a.boxes[order],
            name="positive anchors (colour: their box)",
            colour=class_colours([boxes[g] for g in a.labels[order]], boxes),
        ),
    ]
    positives = a.boxes.shape[0]
    title = f"01 anchors matched to the ground truth: {positives} of {a.total} anchors"
    draw_box_layers(pixels, layers, out / name, title=title)
    text = (
        "**Anchors matched to the ground truth.** The region proposal network (RPN) slides "
        "fixed reference boxes, the anchors, over every feature map; in training an anchor is "
        f"a positive for a box when their IoU is at least {st['rpn_fg_iou']:g}, or when it is "
        f"that box's best anchor (Faster R-CNN, sec. 3.1.2). {positives} of the image's "
        f"{a.total} anchors are positives; those with IoU below {st['rpn_bg_iou']:g} with "
        "every box are the negatives."
    )
    return _Page(name, text, _anchor_details(expl, classes))


def _anchor_details(expl: Explanation, classes: list[str]) -> list[str]:
    """Per ground-truth box: its positive anchors and best IoU; then the boxes that only the
    best-anchor rule matched (what to look at when anchors do not fit a data set's boxes)."""
    fg = expl.settings["rpn_fg_iou"]
    lines, poor = [], []
    names = _class_names(expl.gt.labels, classes)
    for i, (name, best) in enumerate(zip(names, expl.best_anchor_iou, strict=True)):
        if np.isnan(best):
            lines.append(f"  - box {i + 1} ({name}): a crowd region, which the RPN never matches")
            continue
        count = int((expl.anchors.labels == i).sum())
        plural = "" if count == 1 else "s"
        lines.append(
            f"  - box {i + 1} ({name}): {count} positive anchor{plural}, best IoU {best:.2f}"
        )
        if best < fg:
            poor.append(str(i + 1))
    if poor:
        lines.append(
            f"  - no anchor reaches IoU {fg:g} with box{'es' if len(poor) > 1 else ''} "
            f"{', '.join(poor)}: only the best anchors match them. Anchor sizes or aspect ratios "
            "closer to such boxes (the model's anchor_sizes / aspect_ratios) give them more "
            "positives."
        )
    return lines


def _before_nms_page(expl, pixels, out, classes) -> _Page:
    name, b, st = "02_proposals_before_nms.png", expl.proposals_before_nms, expl.settings
    title = f"02 RPN proposals before NMS: {_shown(b)}"
    draw_box_layers(pixels, [*_gt_layer(expl, classes), _scored(b)], out / name, title=title)
    return _Page(
        name,
        "**Proposals before NMS.** The RPN scores every anchor (objectness: is there an object "
        f"here?) and regresses it to a box; the {int(st['rpn_pre_nms_top_n'])} best anchors of "
        f"each feature level are decoded, clipped to the image and the tiny ones dropped: "
        f"{b.total} candidates ({_shown(b)} drawn, coloured by objectness). Many cover the "
        "same object.",
    )


def _after_nms_page(expl, pixels, out, classes) -> _Page:
    name, p, st = "03_proposals_after_nms.png", expl.proposals_after_nms, expl.settings
    title = f"03 RPN proposals after NMS: {_shown(p)}"
    draw_box_layers(pixels, [*_gt_layer(expl, classes), _scored(p)], out / name, title=title)
    return _Page(
        name,
        f"**Proposals after NMS.** Non-maximum suppression (IoU {st['rpn_nms_thresh']:g}, per "
        "feature level) removes the near-duplicates of better-scoring candidates, and the "
        f"{int(st['rpn_post_nms_top_n'])} best are kept: {p.total} proposals ({_shown(p)} "
        "drawn, coloured by objectness). They are the regions of interest (RoIs) that the box "
        "head classifies.",
    )


def _sampled_page(expl, pixels, out, classes) -> _Page | None:
    if expl.sampled_rois is None:
        return None
    name, r, st = "04_sampled_rois.png", expl.sampled_rois, expl.settings
    fg_rows, bg_rows = np.flatnonzero(r.labels > 0), np.flatnonzero(r.labels == 0)
    layers = [
        *_gt_layer(expl, classes),
        BoxLayer(r.boxes[bg_rows], name=f"background ({bg_rows.size})", colour="tab:red"),
        BoxLayer(
            r.boxes[fg_rows],
            name=f"foreground ({fg_rows.size})",
            colour="tab:green",
            texts=_class_names(r.labels[fg_rows], classes),
            linewidth=2.0,
        ),
    ]
    title = f"04 RoIs sampled for training: {fg_rows.size} foreground, {bg_rows.size} background"
    draw_box_layers(pixels, layers, out / name, title=title)
    fg, lo = st["box_fg_iou"], st["box_bg_iou_lo"]
    return _Page(
        name,
        "**RoIs sampled for training.** A training step teaches the box head on at most "
        f"{int(st['box_batch_size_per_image'])} RoIs per image, drawn from the proposals plus "
        f"the ground-truth boxes ({r.total} candidates here): foreground (green, with its "
        f"box's class) when the IoU with a box is at least {fg:g}, background (red) when it is "
        f"in [{lo:g}, {fg:g}), at most {st['box_positive_fraction']:.0%} foreground (Fast "
        f"R-CNN, sec. 2.3). This draw: {fg_rows.size} foreground, {bg_rows.size} background "
        f"(torch seed {SAMPLING_SEED}, from the test-time proposals of 03; training keeps "
        "more proposals).",
    )


def _boxes_page(expl, pixels, out, classes) -> _Page:
    name, b, st = "05_boxes_before_nms.png", expl.boxes_before_nms, expl.settings
    layers = [*_gt_layer(expl, classes), *_by_class(b, classes, fade=True, linewidth=1.0)]
    title = f"05 class-specific boxes before NMS: {_shown(b)}"
    draw_box_layers(pixels, layers, out / name, title=title)
    return _Page(
        name,
        "**Class-specific boxes before NMS.** The box head gives every RoI a probability per "
        "class (softmax) and a box refined separately for each class; each RoI and class "
        f"scoring above {st['box_score_thresh']:g} is one candidate: {b.total} boxes "
        f"({_shown(b)} drawn; colour: class, fainter: lower score). Several RoIs on one object "
        "give near-identical boxes.",
    )


def _detections_page(expl, pixels, out, classes) -> _Page:
    name, d, st = "06_detections.png", expl.detections, expl.settings
    confident = d.scores >= LABEL_SCORE
    sure = BoxSet(d.boxes[confident], d.scores[confident], d.labels[confident])
    unsure = BoxSet(d.boxes[~confident], d.scores[~confident], d.labels[~confident])
    dotted = {"linewidth": 1.0, "linestyle": ":"}
    layers = [
        *_gt_layer(expl, classes),
        BoxLayer(np.zeros((0, 4)), name=f"score < {LABEL_SCORE:g}", colour="grey", **dotted),
    ]
    for layer in _by_class(unsure, classes, fade=False, **dotted):
        layer.name = None  # one legend entry for them all (above); the classes name the others
        layers.append(layer)
    for layer in _by_class(sure, classes, fade=False, linewidth=2.0):
        rows = np.flatnonzero(np.asarray(_class_names(sure.labels, classes)) == layer.name)
        layer.texts = [f"{layer.name} {sure.scores[i]:.2f}" for i in rows[::-1]]
        layers.append(layer)
    draw_box_layers(pixels, layers, out / name, title=f"06 detections: {_shown(d)}")
    return _Page(
        name,
        f"**Detections.** Per-class NMS (IoU {st['box_nms_thresh']:g}; only boxes of the same "
        "class suppress each other) keeps the best box of each object, at most "
        f"{int(st['box_detections_per_img'])}: {d.total} detections ({_shown(d)} drawn), "
        f"{int(confident.sum())} of them scoring at least {LABEL_SCORE:g} (named, solid; the "
        "others dotted).",
    )


def _instance_titles(expl: Explanation, classes: list[str], count: int) -> list[str]:
    d = expl.detections
    names = _class_names(d.labels[:count], classes)
    return [f"{n} {s:.2f}" for n, s in zip(names, d.scores[:count], strict=True)]


def _masks_page(expl, pixels, out, classes) -> _Page | None:
    if expl.mask_probs is None:
        return None
    name, probs = "07_masks.png", expl.mask_probs
    count, size = probs.shape[0], probs.shape[-1]
    draw_box_heatmaps(
        pixels,
        expl.detections.boxes[:count],
        probs,
        out / name,
        titles=_instance_titles(expl, classes, count),
        title=f"07 mask probabilities of the top {count} detections",
    )
    return _Page(
        name,
        f"**Masks.** For each detection the mask head predicts a {size} x {size} map of "
        "probabilities inside the box, for the detected class only (a sigmoid per class: "
        f"classes do not compete); drawn on the boxes of the top {count} detections. Resized "
        "onto its box and thresholded at 0.5, it is the instance's mask.",
    )


def _keypoints_page(expl, pixels, out, classes) -> _Page | None:
    if expl.keypoint_heatmaps is None:
        return None
    name, maps = "08_keypoints.png", expl.keypoint_heatmaps
    count, k, size = maps.shape[0], maps.shape[1], maps.shape[-1]
    heads = _instance_titles(expl, classes, count)
    titles = [
        f"{heads[i]}: kp {j + 1}" if j == 0 else f"kp {j + 1}"
        for i in range(count)
        for j in range(k)
    ]
    draw_box_heatmaps(
        pixels,
        expl.detections.boxes[:count],
        maps,
        out / name,
        titles=titles,
        points=expl.keypoints[..., :2],
        vmax=None,
        columns=k,
        title=f"08 keypoint heatmaps of the top {count} detections",
    )
    return _Page(
        name,
        f"**Keypoint heatmaps.** For each of the {k} keypoints the keypoint head predicts a "
        f"{size} x {size} map over the box; its softmax over the positions says where the "
        "keypoint is likely to be, and the most likely position (cross) is the predicted "
        f"keypoint. One row per detection, the top {count}; each map's colours scaled to its "
        "own peak.",
    )


_PAGES = (
    _anchors_page,
    _before_nms_page,
    _after_nms_page,
    _sampled_page,
    _boxes_page,
    _detections_page,
    _masks_page,
    _keypoints_page,
)
