"""Pictures a practitioner looks at: learning curves, confusion matrices, PR curves, boxes
on images (detections, a detector's stages).

Matplotlib with the Agg backend (no display needed); every function writes one PNG.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")


# --------------------------------------------------------------------------- training runs


def save_png(fig, path) -> None:
    """Write ``fig`` to ``path`` through a temporary file + rename: a reader never sees half a PNG."""
    import io

    import matplotlib.pyplot as plt

    from cnnkit.atomic import atomic_write_bytes

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


# Above this many decades between the smallest and largest loss, the loss axis is logarithmic:
# a linear axis then squeezes everything below a tenth of the top into the bottom pixels.
LOG_LOSS_DECADES = 1.5


def plot_curves(
    records: list[dict], path, *, metric: str = "accuracy", percent: bool | None = None
) -> None:
    """Learning curves of a run: the losses (left) and the primary metric (right), per epoch.

    ``records`` are history records: ``epoch``, ``train_loss``, ``dev_loss``,
    ``train_<metric>`` and ``dev_<metric>`` (train and dev lines), and any named training
    losses ``train_loss_<name>`` (a detector's ``train_loss_box_reg``...), drawn dashed beside
    the total. The metric is shown in % if ``percent``; by default (None) when every value is
    a fraction in [0, 1] (accuracy, AP). Missing or non-finite values leave gaps; a single
    record draws markers. The loss axis is logarithmic when the positive losses span more than
    :data:`LOG_LOSS_DECADES` decades, so an early spike (a dev loss of 42 in epoch 1) does not
    flatten the rest of the curves into one line.
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from cnnkit.records import series

    if not records:
        raise ValueError("plot_curves: no records to plot")
    epochs = [r.get("epoch", i + 1) for i, r in enumerate(records)]
    named = [k for k in dict.fromkeys(k for r in records for k in r) if k.startswith("train_loss_")]
    values = {split: series(records, f"{split}_{metric}") for split in ("train", "dev")}
    if percent is None:
        finite = [v for split in values.values() for v in split if v == v]
        percent = all(0.0 <= v <= 1.0 for v in finite)
    scale = 100.0 if percent else 1.0
    label = metric.replace("_", " ")
    losses = [
        ("train", series(records, "train_loss"), "-o"),
        ("dev", series(records, "dev_loss"), "-s"),
    ]
    losses += [(k[len("train_loss_") :], series(records, k), "--.") for k in named]
    scores = [
        (split, [v * scale for v in values[split]], style)
        for split, style in (("train", "-o"), ("dev", "-s"))
    ]

    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 3.8))
    panels = (
        (ax_loss, losses, "loss", "loss"),
        (ax_metric, scores, label, f"{label} (%)" if percent else label),
    )
    for ax, lines, title, ylabel in panels:
        for name, ys, style in lines:
            if all(v != v for v in ys):  # all NaN: not measured
                continue
            ax.plot(epochs, ys, style, label=name, markersize=3 if len(epochs) > 20 else 5)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        if len(epochs) == 1:
            ax.set_xlim(epochs[0] - 1, epochs[0] + 1)
    finite = [v for _, ys, _ in losses for v in ys if math.isfinite(v)]
    if finite and min(finite) > 0 and math.log10(max(finite) / min(finite)) > LOG_LOSS_DECADES:
        ax_loss.set_yscale("log")
        ax_loss.set_title("loss (log scale)")
    fig.tight_layout()
    save_png(fig, path)


# Class names on the ticks need this font size (points) at least; below it, the ticks show
# indices and a key beside the matrix maps each index to its name.
_MIN_TICK_FONT = 4.0


def plot_confusion_matrix(matrix, classes: list[str], path) -> None:
    """Confusion matrix ``[K, K]`` (rows = true class, columns = predicted) as a PNG.

    Cells are coloured by the row-normalized rate (the share of each true class) and, for up
    to 30 classes, labelled with the counts. Every tick carries its class name while the
    names fit (a few hundred classes); beyond that the ticks show class indices and a key
    beside the matrix lists "index  name" for every class.
    """
    import math

    import matplotlib.pyplot as plt
    import numpy as np

    counts = np.asarray(matrix.tolist() if hasattr(matrix, "tolist") else matrix, dtype=np.int64)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        raise ValueError(f"plot_confusion_matrix: matrix must be [K, K], got {list(counts.shape)}")
    k = counts.shape[0]
    if len(classes) != k:
        raise ValueError(f"plot_confusion_matrix: {len(classes)} class names for a {k}x{k} matrix")
    names = [str(c) for c in classes]
    totals = counts.sum(axis=1, keepdims=True)
    rates = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    size = min(4 + 0.45 * k, 24)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    pitch = 72.0 * 0.7 * size * 0.9 / max(k, 1)  # points per class along an axis (about)
    font = min(8.0, 0.8 * pitch)
    if font >= _MIN_TICK_FONT:
        ticks = range(k)
        ax.set_xticks(ticks, names, rotation=90 if k > 10 else 0, fontsize=font)
        ax.set_yticks(ticks, names, fontsize=font)
    else:
        step = math.ceil(_MIN_TICK_FONT * 3 / (0.8 * pitch))  # an index is ~3 digits wide
        ticks = range(0, k, step)
        ax.set_xticks(ticks, [str(i) for i in ticks], rotation=90, fontsize=_MIN_TICK_FONT)
        ax.set_yticks(ticks, [str(i) for i in ticks], fontsize=_MIN_TICK_FONT)
        _write_key(fig, names, size)
    if k <= 30:
        for i in range(k):
            for j in range(k):
                if counts[i, j]:
                    color = "white" if rates[i, j] > 0.5 else "black"
                    ax.text(
                        j, i, str(counts[i, j]), ha="center", va="center", color=color, fontsize=8
                    )
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    accuracy = np.trace(counts) / max(int(counts.sum()), 1)
    ax.set_title(f"confusion matrix (accuracy {100 * accuracy:.2f}%, n={int(counts.sum())})")
    fig.tight_layout()
    save_png(fig, path)


def _write_key(fig, names: list[str], size: float) -> None:
    """ "index  name" of every class in columns to the right of the figure."""
    font = _MIN_TICK_FONT
    per_column = max(int(size * 0.9 * 72 / (font * 1.25)), 1)
    width = max(len(n) for n in names) + len(str(len(names))) + 2
    column_width = width * 0.62 * font / (72 * size)  # figure fraction (monospace)
    for c, start in enumerate(range(0, len(names), per_column)):
        rows = [
            f"{i:>{len(str(len(names)))}}  {names[i]}"
            for i in range(start, min(start + per_column, len(names)))
        ]
        text = fig.text(
            1.01 + c * column_width,
            1.0,
            "\n".join(rows),
            fontsize=font,
            family="monospace",
            va="top",
            ha="left",
        )
        text.set_gid("class-key")


# --------------------------------------------------------------------------- detection


def pr_envelope(recall, precision):
    """The interpolated precision of a ranked PR curve as a step curve from recall 0.

    ``recall`` (non-decreasing), ``precision`` [N] in ranked order; returns ``(r [N + 1], p [N + 1])`` with
    ``p[i]`` the largest precision at recall >= ``r[i]`` (Everingham et al.'s p~), to draw with
    ``drawstyle="steps-pre"``: p~(r_i) holds on (r_{i-1}, r_i]. Empty in, empty out.
    """
    import numpy as np

    r = np.asarray(recall, dtype=np.float64).reshape(-1)
    p = np.asarray(precision, dtype=np.float64).reshape(-1)
    if r.size == 0:
        return r, p
    env = np.maximum.accumulate(p[::-1])[::-1]
    # Points of equal recall share the largest precision among them (recall is sorted).
    env = env[np.searchsorted(r, r, side="left")]
    return np.concatenate([[0.0], r]), np.concatenate([env[:1], env])


_LINESTYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def plot_pr_curves(
    curves, path, title: str = "precision / recall", *, envelope: bool = False
) -> None:
    """Precision/recall curves, one line each, as a PNG.

    ``curves`` maps a label to ``(recall [N], precision [N])`` (e.g. COCO's mean interpolated
    precision at IoU .50 and .75, or one VOC curve per class); the legend gives each label.
    ``envelope``: the points are a ranked curve (VOC's raw precision per detection); draw its
    interpolated precision (the largest at any higher recall) as a step curve from recall 0,
    the curve that AP measures, instead of joining the raw points.

    Curves may coincide (COCO's .50 and .75 on easy data): each has its own colour, line style
    and markers (placed at staggered points), and the earlier ones are drawn wider, so a curve
    drawn over another leaves it visible on both sides. A curve's last point is marked, and
    the axes reach past 1, so a curve at recall or precision 1.0 (or a single point) shows.
    The data are drawn as given: nothing is offset.
    """
    import matplotlib.pyplot as plt
    import numpy as np

    if not curves:
        raise ValueError("plot_pr_curves: no curves to plot")
    n = len(curves)
    colors = plt.get_cmap("tab10" if n <= 10 else "tab20").colors
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for i, (label, (recall, precision)) in enumerate(curves.items()):
        r = np.asarray(recall, dtype=np.float64).reshape(-1)
        p = np.asarray(precision, dtype=np.float64).reshape(-1)
        if r.shape != p.shape:
            raise ValueError(f"plot_pr_curves: {label!r} has {r.size} recalls, {p.size} precisions")
        if envelope:
            r, p = pr_envelope(r, p)
        step = max(len(r) // 8, 1)
        marks = list(range((i * step) // n, len(r), step))
        if len(r) and len(r) - 1 not in marks:
            marks.append(len(r) - 1)  # the reach of the curve
        ax.plot(
            r,
            p,
            label=str(label),
            color=colors[i % len(colors)],
            linestyle=_LINESTYLES[i % len(_LINESTYLES)],
            linewidth=1.2 + 2.0 * (n - 1 - i) / max(n - 1, 1),
            marker=_MARKERS[i % len(_MARKERS)],
            markersize=5,
            markevery=marks,
            drawstyle="steps-pre" if envelope else "default",
            zorder=2 + i,
        )
    ax.set_xlim(-0.01, 1.03)
    ax.set_ylim(-0.01, 1.05)
    ax.set_xlabel("recall")
    ax.set_ylabel("interpolated precision" if envelope else "precision")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7 if n > 8 else 9, ncol=2 if n > 12 else 1)
    fig.tight_layout()
    save_png(fig, path)


# --------------------------------------------------------------------------- detections on images

# Detections drawn on an image: the picture is enlarged to this many pixels on its longer
# side at least (a 128 px scene 5x), so that class names and scores in a readable font fit
# beside small boxes; larger images keep their own size.
DETECTION_MIN_SIDE = 640
_DETECTION_DPI = 110  # save_png's resolution: figure inches x this = PNG pixels
_MASK_OPACITY = 0.45


def draw_detections(
    image,
    boxes,
    labels: list[str],
    scores,
    path,
    *,
    classes: list[str] | None = None,
) -> None:
    """Boxes with their class names and scores drawn on an image, as a PNG.

    Args:
        image: ``uint8 [H, W, 3]`` RGB (``[H, W]`` grey is accepted).
        boxes: ``[N, 4]`` ``(x1, y1, x2, y2)`` in pixels of ``image`` (pixel ``i`` spans
            ``[i, i + 1]``).
        labels: ``N`` class names.
        scores: ``[N]`` or None (names only: ground truth).
        path: the PNG to write.
        classes: every class name, to give each class the same colour in every picture
            (default: the classes of this picture, sorted).

    Small images are enlarged (:data:`DETECTION_MIN_SIDE`); each class has its own colour,
    and a label sits on a box of its colour above the box (inside it at the image's top).
    """
    draw_instances(image, boxes, labels, path, scores=scores, classes=classes)


def draw_instances(
    image,
    boxes,
    labels: list[str],
    path,
    *,
    scores=None,
    masks=None,
    keypoints=None,
    skeleton: list[list[int]] | None = None,
    classes: list[str] | None = None,
) -> None:
    """As :func:`draw_detections`, with instance masks and keypoints where given.

    Args:
        masks: ``[N, H, W]`` (binary, or probabilities: drawn where > 0.5), overlaid in each
            instance's class colour.
        keypoints: ``[N, K, 3]`` ``(x, y, visibility)`` in pixels (continuous coordinates,
            as the boxes); points with visibility 0 are not drawn.
        skeleton: 1-based keypoint pairs joined by lines (COCO's ``skeleton``).
    """
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Rectangle

    pixels = _rgb_image(image)
    h, w = pixels.shape[:2]
    box_array = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) if len(boxes) else None
    n = 0 if box_array is None else box_array.shape[0]
    names = [str(label) for label in labels]
    if len(names) != n:
        raise ValueError(f"draw_detections: {len(names)} labels for {n} boxes")
    score_array = None if scores is None else np.asarray(scores, dtype=np.float64).reshape(-1)
    if score_array is not None and score_array.size != n:
        raise ValueError(f"draw_detections: {score_array.size} scores for {n} boxes")
    colour_of = _class_colours(names if classes is None else [str(c) for c in classes])
    unknown = sorted(set(names) - set(colour_of))
    if unknown:
        raise ValueError(f"draw_detections: labels {unknown} are not in classes")

    scale = max(1.0, DETECTION_MIN_SIDE / max(h, w))
    fig = plt.figure(figsize=(w * scale / _DETECTION_DPI, h * scale / _DETECTION_DPI))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(pixels, extent=(0, w, h, 0), interpolation="nearest")
    if masks is not None:
        ax.imshow(_mask_overlay(masks, names, colour_of, (h, w)), extent=(0, w, h, 0))
    for i in range(n):
        x1, y1, x2, y2 = box_array[i]
        colour = colour_of[names[i]]
        ax.add_patch(
            Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=2)
        )
        text = names[i] if score_array is None else f"{names[i]} {score_array[i]:.2f}"
        # Above the box; inside it where the image's top edge leaves no room (~5% of it).
        inside = y1 < 0.05 * h
        ax.text(
            x1,
            y1,
            text,
            fontsize=9,
            va="top" if inside else "bottom",
            ha="left",
            color="black" if _luminance(colour) > 0.55 else "white",
            bbox={"facecolor": colour, "edgecolor": "none", "pad": 1.0, "alpha": 0.85},
            clip_on=True,
        )
    if keypoints is not None:
        _draw_keypoints(ax, keypoints, skeleton, names, colour_of, n)
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_axis_off()
    save_png(fig, path)


def _rgb_image(image):
    import numpy as np

    pixels = np.asarray(image)
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[..., 0]
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ValueError(
            f"draw_detections: image must be uint8 [H, W, 3], got {pixels.dtype} "
            f"{list(pixels.shape)}"
        )
    return pixels


def _class_colours(classes: list[str]) -> dict[str, tuple[float, float, float]]:
    """A colour per class name: tab10 (tab20 beyond 10 classes), cycled, in sorted order."""
    import matplotlib.pyplot as plt

    unique = sorted(set(classes))
    palette = plt.get_cmap("tab10" if len(unique) <= 10 else "tab20").colors
    return {name: tuple(palette[i % len(palette)]) for i, name in enumerate(unique)}


def _luminance(colour) -> float:
    r, g, b = colour[:3]
    return 0.299 * r + 0.587 * g + 0.114 * b


def _mask_overlay(masks, names, colour_of, shape):
    """``float [H, W, 4]`` RGBA: each mask's pixels (> 0.5) in its class colour."""
    import numpy as np

    m = np.asarray(masks, dtype=np.float32)
    if m.ndim == 4 and m.shape[1] == 1:  # a model's [N, 1, H, W] probabilities
        m = m[:, 0]
    if m.shape != (len(names), *shape):
        raise ValueError(
            f"draw_detections: masks must be [{len(names)}, {shape[0]}, {shape[1]}], "
            f"got {list(m.shape)}"
        )
    overlay = np.zeros((*shape, 4), dtype=np.float32)
    for mask, name in zip(m, names, strict=True):
        overlay[mask > 0.5] = (*colour_of[name], _MASK_OPACITY)
    return overlay


def _draw_keypoints(ax, keypoints, skeleton, names, colour_of, n) -> None:
    import numpy as np

    points = np.asarray(keypoints, dtype=np.float64)
    if points.ndim != 3 or points.shape[0] != n or points.shape[2] != 3:
        raise ValueError(
            f"draw_detections: keypoints must be [{n}, K, 3], got {list(points.shape)}"
        )
    k = points.shape[1]
    for pair in skeleton or []:
        if len(pair) != 2 or not all(1 <= int(p) <= k for p in pair):
            raise ValueError(f"draw_detections: skeleton pair {pair} is not two of 1..{k}")
    for i in range(n):
        colour = colour_of[names[i]]
        visible = points[i, :, 2] > 0
        for a, b in skeleton or []:
            if visible[a - 1] and visible[b - 1]:
                ax.plot(*points[i, [a - 1, b - 1], :2].T, color=colour, linewidth=1.5)
        ax.scatter(
            points[i, visible, 0],
            points[i, visible, 1],
            s=18,
            color=colour,
            edgecolors="white",
            linewidths=0.8,
            zorder=3,
        )


# --------------------------------------------------------------------------- pipeline stages


@dataclass
class BoxLayer:
    """Boxes drawn alike on an image by :func:`draw_box_layers`.

    Attributes:
        boxes: ``[N, 4]`` ``(x1, y1, x2, y2)`` in pixels of the image.
        name: the layer's legend entry (None: not in the legend).
        colour: one matplotlib colour for every box, or float ``[N, 3]`` RGB rows in [0, 1].
        values: ``[N]`` numbers that colour the boxes through ``cmap`` instead (e.g. scores),
            with a colour bar labelled ``value_label`` from ``vmin`` to ``vmax``.
        texts: ``N`` labels written at the boxes' top-left corners (None or "" for none).
        linewidth, linestyle, alpha: of the box outlines (``alpha`` may be ``[N]``).
        halo: a black edge around each line, to show on any background (ground truth).
    """

    boxes: Any
    name: str | None = None
    colour: Any = "tab:blue"
    values: Any = None
    cmap: str = "viridis"
    value_label: str = ""
    vmin: float = 0.0
    vmax: float = 1.0
    texts: list[str] | None = None
    linewidth: float = 1.5
    linestyle: str = "-"
    alpha: Any = 1.0
    halo: bool = False


def draw_box_layers(image, layers: list[BoxLayer], path, *, title: str = "") -> None:
    """Layers of boxes on an image (one detector stage: anchors, proposals, RoIs), as a PNG.

    The image is enlarged as in :func:`draw_detections`; layers are drawn in order (the last
    on top), each as one line collection, so thousands of boxes stay fast. Named layers get a
    legend entry below the image, valued layers a colour bar on the right, and ``title`` goes
    above.
    """
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib import patheffects
    from matplotlib.collections import LineCollection
    from matplotlib.colors import Normalize, to_rgb
    from matplotlib.lines import Line2D

    pixels = _rgb_image(image)
    h, w = pixels.shape[:2]
    scale = max(1.0, DETECTION_MIN_SIDE / max(h, w))
    fig = plt.figure(figsize=(w * scale / _DETECTION_DPI, h * scale / _DETECTION_DPI))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(pixels, extent=(0, w, h, 0), interpolation="nearest")
    handles, bars = [], []
    for i, layer in enumerate(layers):
        boxes = np.asarray(layer.boxes, dtype=np.float64).reshape(-1, 4)
        n = boxes.shape[0]
        if layer.values is not None:
            values = np.asarray(layer.values, dtype=np.float64).reshape(-1)
            if values.size != n:
                raise ValueError(f"draw_box_layers: layer {i} has {values.size} values, {n} boxes")
            norm = Normalize(layer.vmin, layer.vmax)
            rgb = plt.get_cmap(layer.cmap)(norm(values))[:, :3]
            bars.append((layer, norm))
        elif isinstance(layer.colour, str) or np.ndim(layer.colour) == 1:
            rgb = np.tile(to_rgb(layer.colour), (n, 1))
        else:
            rgb = np.asarray(layer.colour, dtype=np.float64).reshape(-1, 3)
            if rgb.shape[0] != n:
                raise ValueError(
                    f"draw_box_layers: layer {i} has {rgb.shape[0]} colours, {n} boxes"
                )
        alpha = np.broadcast_to(np.asarray(layer.alpha, dtype=np.float64), (n,))
        rgba = np.concatenate([rgb, alpha[:, None]], axis=1)
        x1, y1, x2, y2 = boxes.T
        outlines = np.stack(
            [np.stack(c, axis=1) for c in ((x1, y1), (x2, y1), (x2, y2), (x1, y2), (x1, y1))],
            axis=1,
        )  # [N, 5, 2] closed rectangles
        effects = (
            [
                patheffects.Stroke(linewidth=layer.linewidth + 2, foreground="black"),
                patheffects.Normal(),
            ]
            if layer.halo
            else None
        )
        ax.add_collection(
            LineCollection(
                outlines,
                colors=rgba,
                linewidths=layer.linewidth,
                linestyles=layer.linestyle,
                zorder=2 + i,
                path_effects=effects,
            )
        )
        texts = layer.texts or []
        if texts and len(texts) != n:
            raise ValueError(f"draw_box_layers: layer {i} has {len(texts)} texts, {n} boxes")
        for text, box, colour in zip(texts, boxes, rgb, strict=False):
            if text:
                inside = box[1] < 0.05 * h  # no room above the box at the image's top
                ax.text(
                    box[0],
                    box[1],
                    text,
                    fontsize=8,
                    va="top" if inside else "bottom",
                    ha="left",
                    color="black" if _luminance(colour) > 0.55 else "white",
                    bbox={"facecolor": colour, "edgecolor": "none", "pad": 1.0, "alpha": 0.85},
                    clip_on=True,
                    zorder=20,
                )
        if layer.name:
            colour = rgb[0] if n and layer.values is None else "grey"
            handles.append(
                Line2D(
                    [],
                    [],
                    color=colour,
                    linewidth=layer.linewidth,
                    linestyle=layer.linestyle,
                    path_effects=effects,
                )
            )
            handles[-1].set_label(layer.name)
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=10, loc="left")
    if handles:
        ax.legend(
            handles=handles,
            loc="upper left",
            bbox_to_anchor=(0.0, -0.01),
            ncol=min(len(handles), 3),
            fontsize=8,
            frameon=False,
        )
    for k, (layer, norm) in enumerate(bars):
        cax = fig.add_axes((1.02 + 0.1 * k, 0.0, 0.03, 1.0))
        mappable = plt.cm.ScalarMappable(norm=norm, cmap=layer.cmap)
        fig.colorbar(mappable, cax=cax, label=layer.value_label)
    save_png(fig, path)


def draw_box_heatmaps(
    image,
    boxes,
    heatmaps,
    path,
    *,
    titles: list[str] | None = None,
    points=None,
    vmax: float | None = 1.0,
    columns: int | None = None,
    title: str = "",
    context: float = 0.25,
) -> None:
    """Box-local maps (mask probabilities, keypoint heatmaps) shown on their boxes, as a PNG.

    Args:
        image: ``uint8 [H, W, 3]``.
        boxes: ``[S, 4]`` xyxy in pixels of ``image``.
        heatmaps: ``[S, C, h, w]`` (or ``[S, h, w]``: ``C = 1``): map ``c`` of box ``s`` covers
            the box, row 0 at its top (a mask head's ``M x M`` output, a keypoint's heatmap).
        titles: one per panel (``S * C``, box-major), or None.
        points: ``[S, C, 2]`` ``(x, y)`` image pixels marked with a cross (decoded keypoints).
        vmax: the colour scale's top (1.0 for probabilities); None: each panel's own maximum
            (a distribution over positions, whose peak matters more than its height).
        columns: panels per row (default ``C`` when ``C > 1``, else up to 4 boxes a row).
        context: each panel shows its box enlarged by this fraction of its size on each side.

    Each panel shows the image around the box with the map over the box, translucent.
    """
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Rectangle

    pixels = _rgb_image(image)
    h, w = pixels.shape[:2]
    maps = np.asarray(heatmaps, dtype=np.float32)
    if maps.ndim == 3:
        maps = maps[:, None]
    box_array = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if maps.ndim != 4 or maps.shape[0] != box_array.shape[0]:
        raise ValueError(
            f"draw_box_heatmaps: heatmaps must be [{box_array.shape[0]}, C, h, w], got "
            f"{list(maps.shape)}"
        )
    s, c = maps.shape[:2]
    if titles is not None and len(titles) != s * c:
        raise ValueError(f"draw_box_heatmaps: {len(titles)} titles for {s * c} panels")
    marks = None if points is None else np.asarray(points, dtype=np.float64).reshape(s, c, -1)
    columns = columns or (c if c > 1 else min(max(s, 1), 4))
    rows = max(1, -(-(s * c) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(1.9 * columns, 2.0 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for panel, ax in zip(range(s * c), axes.flat, strict=False):
        i, j = divmod(panel, c)
        x1, y1, x2, y2 = box_array[i]
        bw, bh = max(x2 - x1, 1.0), max(y2 - y1, 1.0)
        ax.imshow(pixels, extent=(0, w, h, 0), interpolation="nearest")
        top = vmax if vmax is not None else max(float(maps[i, j].max()), 1e-12)
        ax.imshow(
            maps[i, j],
            extent=(x1, x2, y2, y1),
            cmap="magma",
            vmin=0.0,
            vmax=top,
            alpha=0.7,
            interpolation="bilinear",
        )
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="white"))
        if marks is not None:
            ax.plot(*marks[i, j, :2], marker="x", color="cyan", markersize=7, mew=2)
        ax.set_xlim(x1 - context * bw, x2 + context * bw)
        ax.set_ylim(y2 + context * bh, y1 - context * bh)
        if titles is not None:
            ax.set_title(titles[panel], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_png(fig, path)


def class_colours(names: list[str], classes: list[str]):
    """float ``[N, 3]`` RGB: the colour of each of ``names`` among ``classes`` (the colours of
    :func:`draw_detections` with ``classes``), for :class:`BoxLayer`."""
    import numpy as np

    colour_of = _class_colours([str(c) for c in classes])
    unknown = sorted(set(map(str, names)) - set(colour_of))
    if unknown:
        raise ValueError(f"class_colours: names {unknown} are not in classes")
    return np.asarray([colour_of[str(n)] for n in names], dtype=np.float64).reshape(-1, 3)
