"""What a run's learning curves show at the end of training, measured for the diagnosis.

:func:`measure` reads the training and dev loss and a primary metric (a fraction in [0, 1];
``accuracy`` by default, ``box_ap`` for a detector) from the history records and finds whether
training is still improving (a least-squares line through the last ``TREND_FRACTION`` of the
epochs, at least ``MIN_TREND_EPOCHS``, so that one noisy epoch decides nothing), how far the
training metric is above the dev metric (window means) and whether the dev curves have turned
away from their best. :mod:`cnnkit.train.diagnose` turns these findings into a verdict.

Without the training metric (a detector measures no training AP) there is no train/dev gap:
overfitting is then the dev metric falling from its best.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from cnnkit.records import series

# --- thresholds (fractions of the metric; accuracies are in [0, 1]) -------------------------
# The "end of training" is its last quarter: long enough to average epoch-to-epoch noise,
# short enough to reflect the state the run finished in.
TREND_FRACTION = 0.25
# A straight line through fewer points is noise, not a trend.
MIN_TREND_EPOCHS = 3
# A training loss still falling by >10% of its level over the window has not converged.
IMPROVING_LOSS_DROP = 0.10
# ...unless the fall is <2% of the first epoch's loss: 0.004 -> 0.003 is converged, not learning.
IMPROVING_LOSS_FLOOR = 0.02
# The training metric (accuracy) gaining >1 point over the window is still learning.
IMPROVING_ACCURACY_GAIN = 0.01
# 5 points between train and dev accuracy is beyond dev-set sampling noise and about what
# regularizers recover on CIFAR (ResNet-110: 6.4% -> 5.3% error with stochastic depth).
OVERFIT_GAP = 0.05
# A gap this large is overfitting even while the dev loss stays flat.
SEVERE_GAP = 0.15
# The gap growing by >2 points over the window is widening, not fluctuating.
GAP_WIDENING = 0.02
# Dev loss (3-epoch smoothed) >5% above its best, reached before the window: it has risen.
DEV_LOSS_RISE = 0.05
# The dev metric (smoothed) >1 point below its best: the extra epochs made dev worse.
DEV_ACCURACY_DROP = 0.01
# Epochs averaged when smoothing a curve before taking its best value (min of raw noise is biased).
SMOOTHING_EPOCHS = 3
# Stuck at chance: accuracy within this of 1/K (at most 1/K itself: up to 55% for 2 classes,
# 15% for 10, 2% for 100), or the training loss within this fraction of log K, the
# cross-entropy of a uniform guess, after training stopped moving.
CHANCE_ACCURACY_MARGIN = 0.05
CHANCE_LOSS_FRACTION = 0.05


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


def pct(x: float) -> str:  # a fraction in %
    return f"{100 * x:.1f}%"


def pts(x: float) -> str:  # a difference of fractions in points
    return f"{100 * x:.1f} points"


# --------------------------------------------------------------------------- the metric


@dataclass(frozen=True)
class Metric:
    """The primary metric, read as a score where higher is better (a fraction; 1 or 0 perfect)."""

    name: str
    higher_is_better: bool

    @property
    def label(self) -> str:
        return self.name.replace("_", " ")

    @property
    def error(self) -> str:
        """The name of its distance from perfect, after "training"."""
        if self.name == "accuracy":
            return "error"
        return f"{self.label} shortfall" if self.higher_is_better else self.label

    def score(self, values: list[float]) -> list[float]:
        return values if self.higher_is_better else [-v for v in values]

    def value(self, score: float) -> float:
        return score if self.higher_is_better else -score

    def shortfall(self, score: float) -> float:
        return 1 - score if self.higher_is_better else -score

    def words(self) -> tuple[str, str, str]:
        """(how it improves, how the better of two compares, how the worse compares)."""
        return ("rose", "above", "below") if self.higher_is_better else ("fell", "below", "above")


# --------------------------------------------------------------------------- findings


@dataclass
class Curves:
    epochs: list[int]
    window: int  # number of epochs in the trend window
    metric: Metric
    train_loss: list[float]
    train_score: list[float]  # the metric, negated where lower is better
    dev_loss: list[float]
    dev_score: list[float]

    def tail(self, values: list[float]) -> list[float]:
        return values[-self.window :]

    @property
    def span(self) -> str:
        return f"epochs {self.epochs[-self.window]}-{self.epochs[-1]}"


def _improving(c: Curves) -> tuple[bool, str, dict]:
    m = c.metric
    loss_end = c.tail(c.train_loss)
    drop = -_fitted_change(loss_end)
    level = _mean(loss_end)
    first = _finite(c.train_loss)[0] if _finite(c.train_loss) else math.nan
    gain = _fitted_change(c.tail(c.train_score))
    loss_moving = (
        drop > IMPROVING_LOSS_DROP * level and drop > IMPROVING_LOSS_FLOOR * first
        if not math.isnan(drop)
        else False
    )
    acc_moving = gain > IMPROVING_ACCURACY_GAIN if not math.isnan(gain) else False
    parts = []
    if loss_moving:
        parts.append(
            f"the training loss fell by {drop:.3g} ({pct(drop / level)} of its level) "
            f"over the last {c.window} epochs ({c.span})"
        )
    if acc_moving:
        parts.append(f"training {m.label} {m.words()[0]} {pts(gain)} over the same epochs")
    figures = {"train_loss_drop_over_window": drop, f"train_{m.name}_gain_over_window": gain}
    return loss_moving or acc_moving, " and ".join(parts), figures


def _dev_metric_flat(c: Curves) -> tuple[bool, dict]:
    """Whether the dev metric gained at most :data:`IMPROVING_ACCURACY_GAIN` over the window:
    what decides "still improving" for a run without a training metric (a detector), whose
    training loss can fall for many epochs after dev AP has stopped moving."""
    gain = _fitted_change(c.tail(c.dev_score))
    return (not math.isnan(gain) and gain <= IMPROVING_ACCURACY_GAIN), {
        f"dev_{c.metric.name}_gain_over_window": gain
    }


def _best(smooth: list[float], raw: list[float], c: Curves, *, lowest: bool) -> tuple:
    """(relative change or drop of the window from the smoothed best, epoch of the best)."""
    if not _finite(smooth):
        return math.nan, None
    best = (min if lowest else max)(_finite(smooth))
    i = smooth.index(best)
    before_window = i < len(c.epochs) - c.window
    if lowest:
        change = (_mean(c.tail(raw)) - best) / best if before_window and best > 0 else 0.0
    else:
        change = best - _mean(c.tail(raw)) if before_window else 0.0
    return change, c.epochs[i]


def _overfitting(c: Curves) -> tuple[bool, str, str, dict]:
    """(verdict holds, explanation, mild-sign note, figures)."""
    m = c.metric
    _, better, worse = m.words()
    gaps = [t - d for t, d in zip(c.train_score, c.dev_score, strict=True)]
    has_gap = bool(_finite(gaps))
    if not has_gap and _finite(c.train_score):
        return False, "", "", {}  # no dev metric to compare with
    gap = _mean(c.tail(gaps))
    widening = _fitted_change(c.tail(gaps))
    loss_rise, best_loss_epoch = _best(_smooth(c.dev_loss), c.dev_loss, c, lowest=True)
    acc_drop, best_acc_epoch = _best(_smooth(c.dev_score), c.dev_score, c, lowest=False)
    loss_rising = loss_rise > DEV_LOSS_RISE
    acc_falling = acc_drop > DEV_ACCURACY_DROP
    is_wide = gap > OVERFIT_GAP
    is_widening = widening > GAP_WIDENING
    if has_gap:
        holds = ((loss_rising or acc_falling) and (is_wide or is_widening)) or gap > SEVERE_GAP
        words = [
            f"training {m.label} is {pts(gap)} {better} dev {m.label} over {c.span}"
            + (f", and the gap grew by {pts(widening)} there" if is_widening else "")
        ]
    else:  # no training metric: the dev metric falling from its best is the sign
        holds = acc_falling
        words = []
    if loss_rising:
        words.append(
            f"the dev loss has risen {pct(loss_rise)} above its best (around epoch "
            f"{best_loss_epoch}) while the training loss kept falling"
        )
    if acc_falling:
        words.append(f"dev {m.label} is {pts(acc_drop)} {worse} its best (epoch {best_acc_epoch})")
    note = ""
    if not holds and loss_rising:
        rise = f"The dev loss has risen {pct(loss_rise)} above its best (around epoch {best_loss_epoch})"
        note = (
            f"{rise} while the gap stays small ({pts(gap)}): the model grows over-confident; "
            "mild overfitting, label smoothing (--label-smoothing 0.1) helps."
            if has_gap
            else f"{rise} while the dev {m.label} holds: mild overfitting; regularize if it "
            "goes on."
        )
    figures = {
        "train_dev_gap": gap,
        "gap_change_over_window": widening,
        "dev_loss_rise_from_best": loss_rise,
        f"dev_{m.name}_drop_from_best": acc_drop,
        "best_dev_loss_epoch": best_loss_epoch,
        f"best_dev_{m.name}_epoch": best_acc_epoch,
    }
    return holds, "; ".join(words), note, figures


@dataclass
class Findings:
    """Everything the verdict rules read: the curves and what was measured on them."""

    c: Curves
    final: str  # "After n epochs: training loss ..., ..." (or "")
    figures: dict[str, Any]
    notes: list[str]  # data notes, whatever the verdict
    improving: bool = False
    improving_words: str = ""
    overfit: bool = False
    overfit_words: str = ""
    mild_note: str = ""
    train_error: float = math.nan  # distance of the training metric from perfect
    non_finite: list[tuple[str, int]] = field(default_factory=list)  # (loss key, epoch)
    ended_non_finite: bool = False  # the last epoch's training or dev loss is NaN/inf
    at_chance: bool = False  # accuracy ~ 1/K or training loss ~ log K (K known)
    stopped_diverged: bool = False  # the engine stopped the run on a non-finite figure
    chance_words: str = ""
    # Without a training metric: the training loss still falls (these words) but the dev
    # metric has stopped improving, so the run does not count as "still improving".
    loss_only_words: str = ""

    @property
    def n(self) -> int:
        return len(self.c.epochs)

    @property
    def has_gap(self) -> bool:
        return not math.isnan(self.figures.get("train_dev_gap", math.nan))

    @property
    def has_dev_metric(self) -> bool:
        return bool(_finite(self.c.dev_score))


def measure(
    records: list[dict], m: Metric, *, trends: bool, classes: int | None = None
) -> Findings:
    """The curves of ``records`` (sorted by epoch) and, if ``trends``, what their end shows;
    ``classes`` (K, when known) lets it tell a network stuck at chance."""
    n = len(records)
    epochs = [int(r.get("epoch", i + 1)) for i, r in enumerate(records)]
    window = min(n, max(MIN_TREND_EPOCHS, math.ceil(TREND_FRACTION * n)))
    c = Curves(
        epochs,
        window,
        m,
        series(records, "train_loss"),
        m.score(series(records, f"train_{m.name}")),
        series(records, "dev_loss"),
        m.score(series(records, f"dev_{m.name}")),
    )
    train_end = _mean(c.tail(c.train_score))
    figures: dict[str, Any] = {
        "epochs": n,
        "window_epochs": window,
        f"final_train_{m.name}": m.value(train_end),
        f"final_dev_{m.name}": m.value(_mean(c.tail(c.dev_score))),
    }
    f = Findings(c, _final_figures(c), figures, _data_notes(records, c))
    f.non_finite = _non_finite(records, c)
    # Blew up at the end: the last loss is non-finite where that loss was finite before (a dev
    # loss that is NaN throughout was never measured).
    f.ended_non_finite = any(
        e == c.epochs[-1] and _finite(values)
        for k, e in f.non_finite
        for values in [c.train_loss if k == "train_loss" else c.dev_loss]
    )
    if trends and classes is not None and classes >= 2:
        f.at_chance, f.chance_words, fig = _chance(c, classes)
        figures.update(fig)
    if trends:
        f.improving, f.improving_words, fig = _improving(c)
        figures.update(fig)
        if f.improving and not _finite(c.train_score):
            flat, fig = _dev_metric_flat(c)
            figures.update(fig)
            if flat:  # only the loss moves: more epochs would not help dev
                f.improving, f.loss_only_words = False, f.improving_words
        f.overfit, f.overfit_words, f.mild_note, fig = _overfitting(c)
        figures.update(fig)
        f.train_error = m.shortfall(train_end)
    return f


def _non_finite(records: list[dict], c: Curves) -> list[tuple[str, int]]:
    """(key, epoch) of every recorded training or dev loss that is NaN, inf or null."""
    out = []
    for key, values in (("train_loss", c.train_loss), ("dev_loss", c.dev_loss)):
        out += [
            (key, e)
            for e, r, v in zip(c.epochs, records, values, strict=True)
            if key in r and (r[key] is None or isinstance(r[key], (int, float))) and math.isnan(v)
        ]
    return out


def _chance(c: Curves, classes: int) -> tuple[bool, str, dict]:
    """Whether the end of training sits at chance for ``classes`` classes: training (and dev)
    accuracy within the margin of 1/K, or, without accuracies, a flat training loss ~ log K."""
    chance, uniform = 1.0 / classes, math.log(classes)
    margin = min(CHANCE_ACCURACY_MARGIN, chance)
    figures = {"chance_accuracy": chance, "uniform_guess_loss": uniform}
    if c.metric.name != "accuracy" or not c.metric.higher_is_better:
        return False, "", figures
    train_acc, dev_acc = _mean(c.tail(c.train_score)), _mean(c.tail(c.dev_score))
    loss = _mean(c.tail(c.train_loss))
    near = [abs(v - chance) <= margin for v in (train_acc, dev_acc) if not math.isnan(v)]
    if near:
        holds = all(near)
        words = (
            f"training and dev accuracy ({pct(train_acc)}, {pct(dev_acc)}) sit at chance, "
            f"1/{classes} = {pct(chance)}"
        )
    else:
        flat = not math.isnan(loss) and abs(loss - uniform) <= CHANCE_LOSS_FRACTION * uniform
        holds = flat and not _improving(c)[0]
        words = f"the training loss ({loss:.3g}) sits at log {classes} = {uniform:.3g}"
    if holds and not math.isnan(loss) and near:
        words += f", the training loss at {loss:.3g} (log {classes} = {uniform:.3g})"
    return holds, words if holds else "", figures


def _final_figures(c: Curves) -> str:
    m = c.metric
    parts = []
    for label, values, fmt in (
        ("training loss", c.train_loss, "{:.4g}"),
        (f"training {m.label}", c.train_score, None),
        ("dev loss", c.dev_loss, "{:.4g}"),
        (f"dev {m.label}", c.dev_score, None),
    ):
        vals = _finite(values)
        if vals:
            parts.append(f"{label} {fmt.format(vals[-1]) if fmt else pct(m.value(vals[-1]))}")
    n = len(c.epochs)
    return f"After {n} epoch{'s' if n > 1 else ''}: {', '.join(parts)}." if parts else ""


def _data_notes(records: list[dict], c: Curves) -> list[str]:
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
    if not _finite(c.dev_score) and not _finite(c.dev_loss):
        notes.append("No dev measurements: overfitting cannot be checked.")
    if not _finite(c.train_score):
        label = c.metric.label
        notes.append(
            f"No training {label} recorded: whether the model fits its training data "
            f"(underfitting) cannot be checked; the verdict rests on the losses and the dev "
            f"{label}."
        )
    return notes
