"""What a run's learning curves say, and what to change next, in plain words.

The procedure (the lecture's iterative design-and-train loop):

1. Choose the number of epochs so that training performance no longer improves at the end.
   If the training loss or accuracy is still moving at the end -> **train longer**.
2. Check underfitting: a model that cannot fit its own training set (training accuracy far
   from perfect, training loss high and flat) needs **more capacity** (a deeper or wider
   model) or longer training.
3. Check overfitting: a large or widening gap between training and dev accuracy while the dev
   loss rises calls for **stronger regularization** (weight decay, stochastic depth, DropBlock,
   Cutout, dropout, label smoothing, more data / augmentation).
4. Otherwise the run is **healthy**.

Trends are read over the end of training: a least-squares line through the last
``TREND_FRACTION`` of the epochs (at least ``MIN_TREND_EPOCHS``), so that one noisy epoch
decides nothing. Levels (training error, train/dev gap) are window means.

Several findings can hold at once; one becomes the verdict, the others are kept as notes.
Precedence, first match wins:

* ``too_short``: fewer than ``MIN_EPOCHS`` epochs, there is no trend to read.
* ``underfitting`` (flat and far from fitting the training set): bias comes first; regularizing
  a model that cannot fit its training data makes it worse. Overfitting signs become a note.
* ``overfitting``: wins over "still improving" because more epochs would widen the gap; the
  still-falling training loss becomes a note.
* ``still_improving``: training has not converged; a high training error becomes a note (it
  may turn into underfitting once the curve levels off).
* ``healthy``.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field
from typing import Any

from cnnkit.train.history import series

# --- thresholds (fractions; accuracies are in [0, 1]) ---------------------------------------
# The "end of training" is its last quarter: long enough to average epoch-to-epoch noise,
# short enough to reflect the state the run finished in.
TREND_FRACTION = 0.25
# A straight line through fewer points is noise, not a trend.
MIN_TREND_EPOCHS = 3
# Below this many epochs there is no "end of training" distinct from its start.
MIN_EPOCHS = 3
# A training loss still falling by >10% of its level over the window has not converged.
IMPROVING_LOSS_DROP = 0.10
# ...unless the fall is <2% of the first epoch's loss: 0.004 -> 0.003 is converged, not learning.
IMPROVING_LOSS_FLOOR = 0.02
# Training accuracy gaining >1 point over the window is still learning.
IMPROVING_ACCURACY_GAIN = 0.01
# Modern CNNs fit their training set to >90% (usually ~100%) even with augmentation; a model
# left with >10% training error cannot fit the data.
UNDERFIT_TRAIN_ERROR = 0.10
# 5 points between train and dev accuracy is beyond dev-set sampling noise and about what
# regularizers recover on CIFAR (ResNet-110: 6.4% -> 5.3% error with stochastic depth).
OVERFIT_GAP = 0.05
# A gap this large is overfitting even while the dev loss stays flat.
SEVERE_GAP = 0.15
# The gap growing by >2 points over the window is widening, not fluctuating.
GAP_WIDENING = 0.02
# Dev loss (3-epoch smoothed) >5% above its best, reached before the window: it has risen.
DEV_LOSS_RISE = 0.05
# Dev accuracy (smoothed) >1 point below its best: the extra epochs made dev worse.
DEV_ACCURACY_DROP = 0.01
# Epochs averaged when smoothing a curve before taking its best value (min of raw noise is biased).
SMOOTHING_EPOCHS = 3

VERDICTS = ("too_short", "underfitting", "overfitting", "still_improving", "healthy")

# Bigger models of the registry to suggest for underfitting: deeper first, then wider.
CAPACITY_LADDER = {
    "resnet20": ("resnet56", "wrn16_8"),
    "resnet32": ("resnet56", "wrn16_8"),
    "resnet44": ("resnet110", "wrn16_8"),
    "resnet56": ("resnet110", "wrn28_10"),
    "resnet110": ("wrn28_10", "pyramidnet110_a270"),
    "wrn16_8": ("wrn28_10",),
    "wrn40_4": ("wrn28_10",),
    "densenet_bc_100_12": ("densenet_bc_250_24", "wrn28_10"),
    "densenet_bc_250_24": ("densenet_bc_190_40",),
    "pyramidnet110_a48": ("pyramidnet110_a270", "wrn28_10"),
    "resnext29_8x64d": ("resnext29_16x64d",),
    "resnet18": ("resnet50", "wide_resnet50_2"),
    "resnet34": ("resnet50", "wide_resnet50_2"),
    "resnet50": ("resnet101", "wide_resnet50_2"),
    "resnet101": ("resnet152", "wide_resnet101_2"),
}
DEFAULT_BIGGER = ("resnet56", "wrn16_8")


@dataclass
class Diagnosis:
    """The verdict on a run, why, and what to do next."""

    verdict: str  # one of VERDICTS
    summary: str  # one sentence
    explanation: str  # the figures behind the verdict, in plain words
    advice: list[str]  # concrete next steps, most important first
    notes: list[str] = field(default_factory=list)  # secondary findings
    figures: dict[str, Any] = field(default_factory=dict)  # the measured quantities

    def __str__(self) -> str:
        lines = [f"Diagnosis: {self.verdict.replace('_', ' ')}: {self.summary}"]
        lines += textwrap.wrap(self.explanation, 96)
        if self.advice:
            lines.append("Advice:")
            lines += [_bullet(a) for a in self.advice]
        if self.notes:
            lines.append("Also:")
            lines += [_bullet(n) for n in self.notes]
        return "\n".join(lines)


def _bullet(text: str) -> str:
    return textwrap.fill(text, 96, initial_indent="  - ", subsequent_indent="    ")


# --------------------------------------------------------------------------- curve arithmetic


def _finite(values: list[float]) -> list[float]:
    return [v for v in values if not math.isnan(v)]


def _mean(values: list[float]) -> float:
    vals = _finite(values)
    return sum(vals) / len(vals) if vals else math.nan


def _fitted_change(values: list[float]) -> float:
    """Change over the window of the least-squares line through the finite points (NaN if < 2)."""
    pts = [(i, v) for i, v in enumerate(values) if not math.isnan(v)]
    if len(pts) < 2:
        return math.nan
    mx = sum(i for i, _ in pts) / len(pts)
    my = sum(v for _, v in pts) / len(pts)
    sxx = sum((i - mx) ** 2 for i, _ in pts)
    slope = sum((i - mx) * (v - my) for i, v in pts) / sxx
    return slope * (len(values) - 1)


def _smooth(values: list[float], k: int = SMOOTHING_EPOCHS) -> list[float]:
    """Centered moving mean over ``k`` epochs, ignoring NaN."""
    half = k // 2
    return [_mean(values[max(0, i - half) : i + half + 1]) for i in range(len(values))]


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _pts(x: float) -> str:
    return f"{100 * x:.1f} points"


# --------------------------------------------------------------------------- findings


@dataclass
class _Curves:
    epochs: list[int]
    window: int  # number of epochs in the trend window
    train_loss: list[float]
    train_acc: list[float]
    dev_loss: list[float]
    dev_acc: list[float]

    def tail(self, values: list[float]) -> list[float]:
        return values[-self.window :]

    @property
    def span(self) -> str:
        return f"epochs {self.epochs[-self.window]}-{self.epochs[-1]}"


def _improving(c: _Curves) -> tuple[bool, str, dict]:
    loss_end = c.tail(c.train_loss)
    drop = -_fitted_change(loss_end)
    level = _mean(loss_end)
    first = _finite(c.train_loss)[0] if _finite(c.train_loss) else math.nan
    gain = _fitted_change(c.tail(c.train_acc))
    loss_moving = (
        drop > IMPROVING_LOSS_DROP * level and drop > IMPROVING_LOSS_FLOOR * first
        if not math.isnan(drop)
        else False
    )
    acc_moving = gain > IMPROVING_ACCURACY_GAIN if not math.isnan(gain) else False
    parts = []
    if loss_moving:
        parts.append(
            f"the training loss fell by {drop:.3g} ({_pct(drop / level)} of its level) "
            f"over the last {c.window} epochs ({c.span})"
        )
    if acc_moving:
        parts.append(f"training accuracy rose {_pts(gain)} over the same epochs")
    figures = {"train_loss_drop_over_window": drop, "train_accuracy_gain_over_window": gain}
    return loss_moving or acc_moving, " and ".join(parts), figures


def _overfitting(c: _Curves) -> tuple[bool, str, str, dict]:
    """(verdict holds, explanation, mild-sign note, figures)."""
    gaps = [t - d for t, d in zip(c.train_acc, c.dev_acc, strict=True)]
    if not _finite(gaps):
        return False, "", "", {}
    gap = _mean(c.tail(gaps))
    widening = _fitted_change(c.tail(gaps))
    smooth_loss = _smooth(c.dev_loss)
    smooth_acc = _smooth(c.dev_acc)
    start = len(c.epochs) - c.window
    loss_rise = acc_drop = math.nan
    best_loss_epoch = best_acc_epoch = None
    if _finite(smooth_loss):
        best = min(_finite(smooth_loss))
        i = smooth_loss.index(best)
        best_loss_epoch = c.epochs[i]
        end = _mean(c.tail(c.dev_loss))
        loss_rise = (end - best) / best if i < start and best > 0 else 0.0
    if _finite(smooth_acc):
        best = max(_finite(smooth_acc))
        i = smooth_acc.index(best)
        best_acc_epoch = c.epochs[i]
        acc_drop = best - _mean(c.tail(c.dev_acc)) if i < start else 0.0
    loss_rising = loss_rise > DEV_LOSS_RISE
    acc_falling = acc_drop > DEV_ACCURACY_DROP
    dev_worse = loss_rising or acc_falling
    is_wide = gap > OVERFIT_GAP
    is_widening = widening > GAP_WIDENING
    holds = (dev_worse and (is_wide or is_widening)) or gap > SEVERE_GAP
    words = [
        f"training accuracy is {_pts(gap)} above dev accuracy over {c.span}"
        + (f", and the gap grew by {_pts(widening)} there" if is_widening else "")
    ]
    if loss_rising:
        words.append(
            f"the dev loss has risen {_pct(loss_rise)} above its best (around epoch "
            f"{best_loss_epoch}) while the training loss kept falling"
        )
    if acc_falling:
        words.append(f"dev accuracy is {_pts(acc_drop)} below its best (epoch {best_acc_epoch})")
    note = ""
    if not holds and loss_rising:
        note = (
            f"The dev loss has risen {_pct(loss_rise)} above its best (around epoch "
            f"{best_loss_epoch}) while the gap stays small ({_pts(gap)}): the model grows "
            "over-confident; mild overfitting, label smoothing (--label-smoothing 0.1) helps."
        )
    figures = {
        "train_dev_gap": gap,
        "gap_change_over_window": widening,
        "dev_loss_rise_from_best": loss_rise,
        "dev_accuracy_drop_from_best": acc_drop,
        "best_dev_loss_epoch": best_loss_epoch,
        "best_dev_accuracy_epoch": best_acc_epoch,
    }
    return holds, "; ".join(words), note, figures


# --------------------------------------------------------------------------- advice


def _train_args(config: dict | None) -> dict:
    train = (config or {}).get("train")
    return train if isinstance(train, dict) else {}


def _arg(train: dict, *names: str, default: Any = None) -> Any:
    for name in names:
        if train.get(name) is not None:
            return train[name]
    return default


def _epochs_advice(n: int, train: dict) -> str:
    planned = _arg(train, "epochs", default=n)
    planned = planned if isinstance(planned, int) and planned > 0 else n
    more = max(2 * planned, 2 * MIN_EPOCHS) if n < MIN_EPOCHS else 2 * planned
    return (
        f"Train longer: --epochs {more} (this run: {planned}). The learning-rate "
        "schedule spans the whole run, so start a new run with more epochs rather than "
        "resuming this one."
    )


def _bigger_models(config: dict | None) -> tuple[str, ...]:
    name = (config or {}).get("name")
    candidates = CAPACITY_LADDER.get(name, DEFAULT_BIGGER) if isinstance(name, str) else None
    candidates = candidates or DEFAULT_BIGGER
    try:
        from cnnkit.models.registry import list_models

        known = set(list_models())
    except Exception:  # the advice must not fail because a model family failed to import
        return candidates
    return tuple(m for m in candidates if m in known) or tuple(m for m in DEFAULT_BIGGER)


def _capacity_advice(config: dict | None) -> str:
    name = (config or {}).get("name") or "the current model"
    bigger = " or ".join(f"--model {m}" for m in _bigger_models(config))
    return f"More capacity: a deeper or wider model, e.g. {bigger} instead of {name}."


def _less_regularization(train: dict) -> str | None:
    active = []
    for flag, names in (
        ("--drop-path", ("drop_path", "drop_path_rate")),
        ("--dropblock", ("dropblock", "drop_block")),
        ("--dropout", ("dropout",)),
        ("--cutout", ("cutout",)),
        ("--label-smoothing", ("label_smoothing",)),
    ):
        value = _arg(train, *names)
        if value not in (None, 0, 0.0, "", "0", False):
            active.append(f"{flag} {value}")
    if not active:
        return None
    return f"Regularization is working against fitting: weaken or drop {', '.join(active)}."


def _regularization_advice(config: dict | None) -> list[str]:
    train = _train_args(config)
    data = (config or {}).get("data") or {}
    size = data.get("input_size") if isinstance(data, dict) else None
    height = size[1] if isinstance(size, list) and len(size) == 3 else 32
    classes = data.get("classes") if isinstance(data, dict) else None
    many = isinstance(classes, list) and len(classes) > 10
    # Cutout's paper: 16 px on CIFAR-10, 8 px on CIFAR-100 (32 px images).
    cutout = max(2, height // 4 if many else height // 2)
    resolved = train.get("resolved") if isinstance(train.get("resolved"), dict) else {}
    wd = _arg(train, "weight_decay") or resolved.get("weight_decay")
    wd_text = f"--weight-decay {2 * wd:g} (now {wd:g})" if wd else "--weight-decay 5e-4"

    def now(names: tuple[str, ...]) -> str:
        value = _arg(train, *names)
        return f" (now {value})" if value not in (None, 0, 0.0, "") else ""

    return [
        f"Stronger regularization: {wd_text}; stochastic depth --drop-path 0.1 to 0.2"
        f"{now(('drop_path', 'drop_path_rate'))}; --dropblock 0.1:3"
        f"{now(('dropblock', 'drop_block'))}; --cutout {cutout}{now(('cutout',))}; "
        f"--dropout 0.3{now(('dropout',))}; --label-smoothing 0.1"
        f"{now(('label_smoothing',))}.",
        "More data or stronger augmentation, which regularizes without shrinking the model.",
    ]


# --------------------------------------------------------------------------- the diagnosis


def diagnose(records: list[dict], config: dict | None = None) -> Diagnosis:
    """Diagnose a run from its history records (see :mod:`cnnkit.train.history`).

    Args:
        records: one dict per epoch with ``epoch``, ``train_loss``, ``train_accuracy``,
            ``dev_loss``, ``dev_accuracy`` (accuracies as fractions); NaN or missing values
            are skipped.
        config: the run's config.json (optional): its model name, data facts and training
            arguments make the advice concrete (bigger models, current flag values).

    Returns:
        A :class:`Diagnosis`; the module docstring gives the procedure and the precedence.
    """
    if not isinstance(records, list) or not records:
        raise ValueError("diagnose: the history has no epochs recorded")
    records = sorted(records, key=lambda r: r.get("epoch", 0))
    n = len(records)
    epochs = [int(r.get("epoch", i + 1)) for i, r in enumerate(records)]
    window = min(n, max(MIN_TREND_EPOCHS, math.ceil(TREND_FRACTION * n)))
    c = _Curves(
        epochs,
        window,
        series(records, "train_loss"),
        series(records, "train_accuracy"),
        series(records, "dev_loss"),
        series(records, "dev_accuracy"),
    )
    train = _train_args(config)
    notes = _data_notes(records, c)

    train_acc_end = _mean(c.tail(c.train_acc))
    dev_acc_end = _mean(c.tail(c.dev_acc))
    figures: dict[str, Any] = {
        "epochs": n,
        "window_epochs": window,
        "final_train_accuracy": train_acc_end,
        "final_dev_accuracy": dev_acc_end,
    }
    final = _final_figures(c)

    if n < MIN_EPOCHS:
        return Diagnosis(
            "too_short",
            f"only {n} epoch{'s' if n > 1 else ''} recorded, too few to read a trend.",
            f"{final} The diagnosis needs at least {MIN_EPOCHS} epochs to tell a curve that is "
            "still moving from one that has levelled off.",
            [_epochs_advice(n, train)],
            notes,
            figures,
        )

    improving, improving_words, fig = _improving(c)
    figures.update(fig)
    overfit, overfit_words, mild_note, fig = _overfitting(c)
    figures.update(fig)
    train_error = 1 - train_acc_end if not math.isnan(train_acc_end) else math.nan
    high_error = train_error > UNDERFIT_TRAIN_ERROR
    underfit = high_error and not improving

    if underfit:
        advice = [_capacity_advice(config), _epochs_advice(n, train)]
        weaker = _less_regularization(train)
        if weaker:
            advice.append(weaker)
        advice.append(
            "Check the learning rate (--lr): too low and the loss crawls, too high "
            "and it stalls high."
        )
        if overfit:
            notes.append(
                f"There are also signs of overfitting ({overfit_words}); fix the "
                "underfitting first, then regularize."
            )
        return Diagnosis(
            "underfitting",
            f"the model does not fit its training data ({_pct(train_error)} training error) "
            "and has stopped improving.",
            f"{final} Over {c.span} the training accuracy averaged {_pct(train_acc_end)} and "
            "the training loss stayed flat: the model cannot fit even the examples it learns "
            f"from (a network of adequate size gets within {_pct(UNDERFIT_TRAIN_ERROR)} of "
            "perfect training accuracy). More capacity, or longer training, is the fix.",
            advice,
            notes,
            figures,
        )
    if overfit:
        if improving:
            notes.append(
                f"Training is still improving ({improving_words}), but more epochs "
                "would widen the gap: regularize first."
            )
        best = figures.get("best_dev_accuracy_epoch")
        advice = _regularization_advice(config)
        if best is not None and figures.get("dev_accuracy_drop_from_best", 0) > DEV_ACCURACY_DROP:
            advice.append(
                f"Until then, the best dev accuracy was at epoch {best}: a run of "
                f"--epochs {best} would have stopped near it."
            )
        return Diagnosis(
            "overfitting",
            "the model fits its training data much better than the dev data.",
            f"{final} {overfit_words[0].upper()}{overfit_words[1:]}. The model memorizes "
            "training examples instead of learning what generalizes: stronger regularization "
            "is the fix.",
            advice,
            notes,
            figures,
        )
    if mild_note:
        notes.append(mild_note)
    if improving:
        if high_error:
            notes.append(
                f"The training error is still {_pct(train_error)}; if it levels off "
                f"there, the model is too small. {_capacity_advice(config)}"
            )
        return Diagnosis(
            "still_improving",
            "training performance was still improving when the run stopped.",
            f"{final} At the end, {improving_words}: the run ended before training converged. "
            "Choose the number of epochs so that training performance no longer improves at "
            "the end; only then do the underfitting and overfitting checks mean something.",
            [_epochs_advice(n, train)],
            notes,
            figures,
        )
    gap = figures.get("train_dev_gap", math.nan)
    gap_words = (
        f" and the train/dev gap is {_pts(gap)} with no rising dev loss"
        if not math.isnan(gap)
        else " (without dev measurements, generalization is unchecked)"
    )
    return Diagnosis(
        "healthy",
        "training converged, fits the training data and generalizes to the dev data.",
        f"{final} Over {c.span} the training curves are flat, the training error is "
        f"{_pct(train_error)} (under {_pct(UNDERFIT_TRAIN_ERROR)}){gap_words}.",
        [
            "Nothing to fix. To go further, try a bigger model together with stronger "
            "regularization, and compare dev accuracy."
        ],
        notes,
        figures,
    )


def _final_figures(c: _Curves) -> str:
    parts = []
    for label, values, fmt in (
        ("training loss", c.train_loss, "{:.4g}"),
        ("training accuracy", c.train_acc, None),
        ("dev loss", c.dev_loss, "{:.4g}"),
        ("dev accuracy", c.dev_acc, None),
    ):
        vals = _finite(values)
        if vals:
            parts.append(f"{label} {fmt.format(vals[-1]) if fmt else _pct(vals[-1])}")
    n = len(c.epochs)
    return f"After {n} epoch{'s' if n > 1 else ''}: {', '.join(parts)}." if parts else ""


def _data_notes(records: list[dict], c: _Curves) -> list[str]:
    notes = []
    for key, values in (("train_loss", c.train_loss), ("dev_loss", c.dev_loss)):
        bad = [
            e
            for e, r, v in zip(c.epochs, records, values, strict=True)
            if key in r and isinstance(r[key], (int, float)) and math.isnan(v)
        ]
        if bad:
            shown = ", ".join(map(str, bad[:5])) + (" ..." if len(bad) > 5 else "")
            notes.append(
                f"The {key.replace('_', ' ')} is not finite (NaN or inf) at epoch(s) {shown}: "
                "those epochs are ignored; a diverging loss usually means too high a learning "
                "rate (--lr) or a numerical problem."
            )
    if not _finite(c.dev_acc) and not _finite(c.dev_loss):
        notes.append("No dev measurements: overfitting cannot be checked.")
    return notes
