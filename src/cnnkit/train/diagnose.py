"""What a run's learning curves say, and what to change next, in plain words.

The procedure (the lecture's iterative design-and-train loop), on the training and dev loss
and a primary metric (``accuracy`` by default; any fraction in [0, 1] such as ``box_ap``):

1. Choose the number of epochs so that training performance no longer improves at the end.
   If the training loss or metric is still moving at the end -> **train longer**.
2. Check underfitting: a model that cannot fit its own training set (training metric far
   from perfect, training loss high and flat) needs **more capacity** (a deeper or wider
   model) or longer training.
3. Check overfitting: a large or widening gap between the training and dev metric while the
   dev loss rises calls for **stronger regularization** (weight decay, stochastic depth,
   DropBlock, Cutout, dropout, label smoothing, more data / augmentation).
4. Otherwise the run is **healthy**.

How the curves are read (trends over the end of training, levels as window means) is
:mod:`cnnkit.train.findings`; the flags and models the advice names are
:mod:`cnnkit.train.advice`.

Several findings can hold at once; one becomes the verdict, the others are kept as notes.
:data:`RULES` is the table of verdicts, first match wins:

* ``diverged``: the run blew up (a non-finite training loss in any epoch, a non-finite loss in
  the last epoch, or the engine stopped it as diverged). Whatever the curves did before, the
  step size or the numerics are the fault; more epochs or capacity would change nothing.
* ``too_short``: fewer than ``MIN_EPOCHS`` epochs, there is no trend to read.
* ``stuck_at_chance``: training and dev accuracy ~ 1/K (K classes, from the config's
  ``data.classes``), or the training loss flat at log K: the network learned nothing, which
  points at the data, the learning rate or the normalization, not at its size.
* ``underfitting`` (flat and far from fitting the training set): bias comes first; regularizing
  a model that cannot fit its training data makes it worse. Overfitting signs become a note.
* ``overfitting``: wins over "still improving" because more epochs would widen the gap; the
  still-falling training loss becomes a note.
* ``still_improving``: training has not converged; a high training error becomes a note (it
  may turn into underfitting once the curve levels off).
* ``healthy``.

Without the training metric (a detector measures no training AP) there is no train/dev gap
and no training error: underfitting cannot be checked (a note says so), overfitting is the
dev metric falling from its best, and the rest reads the losses as usual.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from cnnkit.train.advice import (
    CAPACITY_LADDER,
    LEARNING_RATE_ADVICE,
    capacity_advice,
    chance_advice,
    divergence_advice,
    epochs_advice,
    less_regularization,
    regularization_advice,
    train_args,
)
from cnnkit.train.findings import (
    CHANCE_ACCURACY_MARGIN,
    CHANCE_LOSS_FRACTION,
    DEV_ACCURACY_DROP,
    DEV_LOSS_RISE,
    GAP_WIDENING,
    IMPROVING_ACCURACY_GAIN,
    IMPROVING_LOSS_DROP,
    IMPROVING_LOSS_FLOOR,
    MIN_TREND_EPOCHS,
    OVERFIT_GAP,
    SEVERE_GAP,
    SMOOTHING_EPOCHS,
    TREND_FRACTION,
    Findings,
    Metric,
    measure,
    pct,
    pts,
)

# The thresholds of the findings and the capacity ladder stay importable from here.
__all__ = [
    "CAPACITY_LADDER",
    "CHANCE_ACCURACY_MARGIN",
    "CHANCE_LOSS_FRACTION",
    "DEV_ACCURACY_DROP",
    "DEV_LOSS_RISE",
    "GAP_WIDENING",
    "IMPROVING_ACCURACY_GAIN",
    "IMPROVING_LOSS_DROP",
    "IMPROVING_LOSS_FLOOR",
    "MIN_EPOCHS",
    "MIN_TREND_EPOCHS",
    "OVERFIT_GAP",
    "RULES",
    "SEVERE_GAP",
    "SMOOTHING_EPOCHS",
    "TREND_FRACTION",
    "UNDERFIT_TRAIN_ERROR",
    "VERDICTS",
    "Diagnosis",
    "diagnose",
]

# --- verdict thresholds ----------------------------------------------------------------------
# Below this many epochs there is no "end of training" distinct from its start.
MIN_EPOCHS = 3
# Modern CNNs fit their training set to >90% (usually ~100%) even with augmentation; a model
# left with >10% training error cannot fit the data.
UNDERFIT_TRAIN_ERROR = 0.10

VERDICTS = (
    "diverged",
    "too_short",
    "stuck_at_chance",
    "underfitting",
    "overfitting",
    "still_improving",
    "healthy",
)


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


# --------------------------------------------------------------------------- the verdicts

# What a rule writes: (summary, explanation, advice, notes added to the data notes).
_Texts = tuple[str, str, list[str], list[str]]


def _too_short(f: Findings, config: dict | None) -> _Texts:
    return (
        f"only {f.n} epoch{'s' if f.n > 1 else ''} recorded, too few to read a trend.",
        f"{f.final} The diagnosis needs at least {MIN_EPOCHS} epochs to tell a curve that is "
        "still moving from one that has levelled off.",
        [epochs_advice(f.n, train_args(config), MIN_EPOCHS)],
        [],
    )


def _diverged(f: Findings, config: dict | None) -> _Texts:
    first: dict[str, list[int]] = {}
    for key, epoch in f.non_finite:
        first.setdefault(key.replace("_", " ").replace("train", "training"), []).append(epoch)
    where = "; ".join(
        f"the {k} from epoch {es[0]}" + (f" ({len(es)} epochs)" if len(es) > 1 else "")
        for k, es in first.items()
    )
    found = f"Non-finite (NaN or inf): {where}" if where else "The run was stopped as diverged"
    return (
        "training diverged: the loss became NaN or infinite.",
        f"{f.final} {found}: the weights blew up. Training longer or a bigger model would "
        "change nothing; the step size or the numerics must.",
        divergence_advice(train_args(config)),
        [],
    )


def _stuck_at_chance(f: Findings, config: dict | None) -> _Texts:
    return (
        "the network has learned nothing: its predictions are no better than chance.",
        f"{f.final} Over {f.c.span} {f.chance_words}: the predictions are no better than a "
        "uniform guess. A model too small would still learn something; learning nothing "
        "points at the labels or the data, the learning rate, or the normalization.",
        chance_advice(train_args(config)),
        [],
    )


def _underfitting(f: Findings, config: dict | None) -> _Texts:
    m = f.c.metric
    weaker = less_regularization(train_args(config))
    advice = [capacity_advice(config), epochs_advice(f.n, train_args(config), MIN_EPOCHS)]
    advice += [weaker] if weaker else []
    advice.append(LEARNING_RATE_ADVICE)
    notes = []
    if f.overfit:
        notes.append(
            f"There are also signs of overfitting ({f.overfit_words}); fix the "
            "underfitting first, then regularize."
        )
    return (
        f"the model does not fit its training data ({pct(f.train_error)} training {m.error}) "
        "and has stopped improving.",
        f"{f.final} Over {f.c.span} the training {m.label} averaged "
        f"{pct(f.figures[f'final_train_{m.name}'])} and the training loss stayed flat: the "
        "model cannot fit even the examples it learns from (a network of adequate size gets "
        f"within {pct(UNDERFIT_TRAIN_ERROR)} of perfect training {m.label}). More capacity, "
        "or longer training, is the fix.",
        advice,
        notes,
    )


def _overfitting_verdict(f: Findings, config: dict | None) -> _Texts:
    m = f.c.metric
    notes = []
    if f.improving:
        worse = "widen the gap" if f.has_gap else f"take the dev {m.label} further from its best"
        notes.append(
            f"Training is still improving ({f.improving_words}), but more epochs "
            f"would {worse}: regularize first."
        )
    best = f.figures.get(f"best_dev_{m.name}_epoch")
    advice = regularization_advice(config)
    if best is not None and f.figures.get(f"dev_{m.name}_drop_from_best", 0) > DEV_ACCURACY_DROP:
        advice.append(
            f"Until then, the best dev {m.label} was at epoch {best}: a run of "
            f"--epochs {best} would have stopped near it."
        )
    words = f.overfit_words
    return (
        "the model fits its training data much better than the dev data."
        if f.has_gap
        else f"the dev {m.label} fell from its best while training went on.",
        f"{f.final} {words[0].upper()}{words[1:]}. The model memorizes training examples "
        "instead of learning what generalizes: stronger regularization is the fix.",
        advice,
        notes,
    )


def _still_improving(f: Findings, config: dict | None) -> _Texts:
    m = f.c.metric
    notes = [f.mild_note] if f.mild_note else []
    if f.train_error > UNDERFIT_TRAIN_ERROR:
        notes.append(
            f"The training {m.error} is still {pct(f.train_error)}; if it levels off "
            f"there, the model is too small. {capacity_advice(config)}"
        )
    return (
        "training performance was still improving when the run stopped.",
        f"{f.final} At the end, {f.improving_words}: the run ended before training converged. "
        "Choose the number of epochs so that training performance no longer improves at "
        "the end; only then do the underfitting and overfitting checks mean something.",
        [epochs_advice(f.n, train_args(config), MIN_EPOCHS)],
        notes,
    )


def _healthy(f: Findings, config: dict | None) -> _Texts:
    m = f.c.metric
    if not math.isnan(f.train_error):
        gap = f.figures.get("train_dev_gap", math.nan)
        gap_words = (
            f" and the train/dev gap is {pts(gap)} with no rising dev loss"
            if not math.isnan(gap)
            else " (without dev measurements, generalization is unchecked)"
        )
        summary = "training converged, fits the training data and generalizes to the dev data."
        explanation = (
            f"{f.final} Over {f.c.span} the training curves are flat, the training {m.error} "
            f"is {pct(f.train_error)} (under {pct(UNDERFIT_TRAIN_ERROR)}){gap_words}."
        )
    elif f.loss_only_words:  # no training metric; the loss falls, the dev metric does not
        summary = f"the dev {m.label} has stopped improving and holds its best."
        explanation = (
            f"{f.final} At the end, {f.loss_only_words}, but the dev {m.label} gained at most "
            f"{pts(IMPROVING_ACCURACY_GAIN)} over those epochs: more epochs would fit the "
            f"training images further without raising the dev {m.label}."
        )
    else:  # no training metric: the fit to the training data is not measured
        dev = f.has_dev_metric
        summary = f"training converged{f' and the dev {m.label} holds its best' if dev else ''}."
        explanation = (
            f"{f.final} Over {f.c.span} the training loss is flat"
            + (f" and the dev {m.label} stays near its best" if dev else "")
            + f"; with no training {m.label} recorded, how well the model fits its training "
            "data is unchecked."
        )
    return (
        summary,
        explanation,
        [
            "Nothing to fix. To go further, try a bigger model together with stronger "
            f"regularization, and compare dev {m.label}."
        ],
        [f.mild_note] if f.mild_note else [],
    )


class _Rule(NamedTuple):
    verdict: str
    when: Callable[[Findings], bool]
    write: Callable[[Findings, dict | None], _Texts]


# The verdicts in precedence order, first match wins (the module docstring says why).
RULES = (
    _Rule(
        "diverged",
        lambda f: (
            f.stopped_diverged
            or f.ended_non_finite
            or any(k == "train_loss" for k, _ in f.non_finite)
        ),
        _diverged,
    ),
    _Rule("too_short", lambda f: f.n < MIN_EPOCHS, _too_short),
    _Rule("stuck_at_chance", lambda f: f.at_chance, _stuck_at_chance),
    _Rule(
        "underfitting",
        lambda f: f.train_error > UNDERFIT_TRAIN_ERROR and not f.improving,
        _underfitting,
    ),
    _Rule("overfitting", lambda f: f.overfit, _overfitting_verdict),
    _Rule("still_improving", lambda f: f.improving, _still_improving),
    _Rule("healthy", lambda f: True, _healthy),
)


def diagnose(
    records: list[dict],
    config: dict | None = None,
    *,
    metric: str = "accuracy",
    higher_is_better: bool = True,
    diverged: bool = False,
) -> Diagnosis:
    """Diagnose a run from its history records (see :mod:`cnnkit.records`).

    Args:
        records: one dict per epoch with ``epoch``, ``train_loss``, ``dev_loss``,
            ``train_<metric>``, ``dev_<metric>`` (fractions); NaN or missing values are
            skipped, and without ``train_<metric>`` the losses and the dev metric decide.
        config: the run's config.json (optional): its model name, data facts and training
            arguments make the advice concrete (bigger models, current flag values).
        metric: the primary metric's name in the records, e.g. ``"accuracy"``, ``"box_ap"``;
            a name that no record holds is a ValueError naming the metrics they do hold.
        higher_is_better: False for a metric such as an error rate (0 is perfect).
        diverged: the run was stopped as diverged (its last, non-finite epoch is then not in
            ``records``).

    Returns:
        A :class:`Diagnosis`; the module docstring gives the procedure and the precedence.
    """
    if not isinstance(records, list) or not records:
        raise ValueError("diagnose: the history has no epochs recorded")
    if not isinstance(metric, str) or not metric:
        raise ValueError(f"diagnose: metric must be a name such as 'accuracy', got {metric!r}")
    if not any(f"train_{metric}" in r or f"dev_{metric}" in r for r in records):
        found = sorted({k[4:] for r in records for k in r if k.startswith("dev_")} - {"loss"})
        raise ValueError(
            f"diagnose: no record has train_{metric} or dev_{metric}; "
            + (f"the records measure {', '.join(found)}" if found else "no dev metric recorded")
        )
    records = sorted(records, key=lambda r: r.get("epoch", 0))
    m = Metric(metric, bool(higher_is_better))
    classes = ((config or {}).get("data") or {}).get("classes")
    k = len(classes) if isinstance(classes, list) else None
    f = measure(records, m, trends=len(records) >= MIN_EPOCHS, classes=k)
    f.stopped_diverged = bool(diverged)
    rule = next(r for r in RULES if r.when(f))
    summary, explanation, advice, notes = rule.write(f, config)
    return Diagnosis(rule.verdict, summary, explanation, advice, f.notes + notes, f.figures)
