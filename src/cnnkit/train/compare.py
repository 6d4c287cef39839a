"""Several runs side by side: what they read from their directories, where their settings
differ, how far each got, what state each is in, and one figure of their curves overlaid.

Read-only: a run may be training while it is read. Its ``history.jsonl`` is then read as far
as it is written (a last line cut mid-write is dropped silently: that is what a reader sees
while a line is appended), and no ``metrics.json`` means "not finished".

A run's state (:func:`run_state`), first match wins:

* ``diverged``: the engine stopped it as diverged (it wrote ``diverged.json``);
* ``finished``: it wrote its results (``metrics.json`` or ``report.md``);
* ``running``: a live process holds its lock (:class:`cnnkit.train.rundir.RunLock`); for a run
  without a lock file (older runs, a platform without ``flock``), its history or checkpoint
  was written within :data:`RECENT_SECONDS`;
* ``interrupted``: none of these (killed, crashed, or stopped with Ctrl-C).
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnkit.records import series
from cnnkit.train.checkpoint import CONFIG_NAME, read_config
from cnnkit.train.divergence import read_divergence
from cnnkit.train.history import JSONL_NAME, History
from cnnkit.train.outputs import METRICS_NAME
from cnnkit.train.report import REPORT_NAME
from cnnkit.train.rundir import LOCK_NAME, run_directory, run_markers
from cnnkit.train.state import CHECKPOINT_NAME

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the modification times decide
    fcntl = None

# A run without a lock file whose history or checkpoint changed this recently counts as
# running: an epoch of a real run rarely takes longer, and a crashed run looks stale after it.
RECENT_SECONDS = 300.0
STATES = ("finished", "running", "interrupted", "diverged")
# Train-section fields left out of the settings: where the run went and how it talked (they
# differ between any two runs and change nothing), and copies of what is compared elsewhere
# (the model name and its arguments are compared from the model's own config; `data` as spec).
IGNORED_TRAIN_FIELDS = frozenset(
    {"out", "quiet", "tensorboard", "save_every", "model", "data", "model_args", "resolved"}
)


@dataclass
class Run:
    """What a run directory holds, read once."""

    path: Path
    config: dict[str, Any]
    records: list[dict[str, Any]]
    metric: str  # the primary metric's name in the history (``accuracy``, ``box_ap``)
    higher_is_better: bool
    epochs_planned: int | None

    @property
    def train(self) -> dict[str, Any]:
        return self.config.get("train") or {}

    @property
    def epochs_done(self) -> int:
        return self.records[-1]["epoch"] if self.records else 0

    @property
    def data_spec(self) -> str | None:
        spec = (self.config.get("data") or {}).get("spec", self.train.get("data"))
        return spec if isinstance(spec, str) else None


# --------------------------------------------------------------------------- reading runs


def read_records(path: Path) -> list[dict[str, Any]]:
    """The history of run directory ``path`` as far as it is written: no file yet is no
    epochs; a cut last line is dropped; any other malformed line is a ValueError naming the
    file and line."""
    if not (path / JSONL_NAME).is_file():
        return []
    with warnings.catch_warnings():
        # History.load warns about a cut last line; for a run being written that is normal.
        warnings.simplefilter("ignore")
        return History.load(path).records


def load_run(path: str | os.PathLike) -> Run:
    """Read the run directory ``path`` (config.json, history.jsonl).

    Raises:
        ValueError: naming the directory, file or field that is missing or malformed.
    """
    path = run_directory(path)
    config = read_config(path)
    file = path / CONFIG_NAME
    train = config.get("train") or {}
    resolved = train.get("resolved") or {}
    if not isinstance(resolved, dict):
        raise ValueError(f"{file}: field 'train.resolved' must be an object")
    metric = resolved.get("metric", "accuracy")
    higher = resolved.get("higher_is_better", True)
    if not isinstance(metric, str) or not metric:
        raise ValueError(f"{file}: field 'train.resolved.metric' must be a name, got {metric!r}")
    if not isinstance(higher, bool):
        raise ValueError(
            f"{file}: field 'train.resolved.higher_is_better' must be true or false, got {higher!r}"
        )
    epochs = train.get("epochs")
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int)):
        raise ValueError(f"{file}: field 'train.epochs' must be an integer, got {epochs!r}")
    return Run(path, config, read_records(path), metric, higher, epochs)


def find_runs(root: str | os.PathLike) -> list[Path]:
    """Every run directory under ``root`` (``root`` itself included), sorted; a run
    directory's own sub-directories are not searched, nor hidden ones.

    Raises:
        ValueError: ``root`` is missing or not a directory.
    """
    root = Path(root)
    if not root.exists():
        raise ValueError(f"{root}: no such directory")
    if not root.is_dir():
        raise ValueError(f"{root}: not a directory")
    found = []
    for here, dirs, _ in os.walk(root):
        if run_markers(Path(here)):
            found.append(Path(here))
            dirs[:] = []  # a run's sub-directories (e.g. evaluation outputs) are not runs
        else:
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    return sorted(found)


# --------------------------------------------------------------------------- state


def _lock_held(path: Path) -> bool | None:
    """Whether a live process holds ``path``'s run lock; None when it cannot be known (no
    lock file, no ``flock``)."""
    lock = path / LOCK_NAME
    if fcntl is None or not lock.is_file():
        return None
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        # A shared lock conflicts with the trainer's exclusive one and is dropped on close at
        # once; a run starting in those microseconds retries (rundir.RunLock).
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return None
    finally:
        os.close(fd)
    return False


def _recently_written(path: Path, now: float) -> bool:
    for name in (JSONL_NAME, CHECKPOINT_NAME):
        try:
            if now - (path / name).stat().st_mtime < RECENT_SECONDS:
                return True
        except FileNotFoundError:
            continue
    return False


def run_state(path: Path, now: float | None = None) -> str:
    """One of :data:`STATES` for run directory ``path`` (the module docstring gives the
    rules)."""
    if read_divergence(path):
        return "diverged"
    if (path / METRICS_NAME).is_file() or (path / REPORT_NAME).is_file():
        return "finished"
    held = _lock_held(path)
    if held is None:
        held = _recently_written(path, time.time() if now is None else now)
    return "running" if held else "interrupted"


# --------------------------------------------------------------------------- settings


def _text(value: Any) -> str:
    """A setting's value as one short, comparable string."""
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True)


def settings(run: Run) -> dict[str, str]:
    """The run's settings, flat: ``model``, ``data``, ``kwargs.<arg>`` (the model's resolved
    constructor arguments), every train field but :data:`IGNORED_TRAIN_FIELDS`, and
    ``resolved.<name>`` (what ``auto`` / unset values became)."""
    out = {"model": run.config["name"], "data": _text(run.data_spec)}
    out.update({f"kwargs.{k}": _text(v) for k, v in sorted(run.config["kwargs"].items())})
    train = run.train
    out.update({k: _text(v) for k, v in train.items() if k not in IGNORED_TRAIN_FIELDS})
    resolved = train.get("resolved") or {}
    out.update({f"resolved.{k}": _text(v) for k, v in resolved.items()})
    return out


def differing_settings(runs: list[Run]) -> list[tuple[str, list[str]]]:
    """``(setting, value per run)`` of every setting that is not the same in all ``runs``
    (``-`` where a run lacks it), in first-seen order. ``resolved.X`` is left out where it
    only repeats a differing ``X`` (explicit values resolve to themselves); a model argument
    only some runs have (their models differ) is compared among the runs that have it: that
    a ResNet has no ``anchor_sizes`` is no difference, the model row says it."""
    flat = [settings(r) for r in runs]
    names = list(dict.fromkeys(k for s in flat for k in s))
    rows = {name: [s.get(name, "-") for s in flat] for name in names}
    differing = {
        name: values
        for name, values in rows.items()
        if len(set(values) - ({"-"} if name.startswith("kwargs.") else set())) > 1
    }
    return [
        (name, values)
        for name, values in differing.items()
        if not (name.startswith("resolved.") and differing.get(name[9:]) == values)
    ]


# --------------------------------------------------------------------------- metrics


@dataclass
class Curves:
    """Which history keys one run plots for a metric and which one the table reads."""

    train: str | None  # drawn dashed
    dev: str | None  # drawn solid
    key: str  # the key of the final / best values
    higher_is_better: bool


def _keys(records: list[dict[str, Any]]) -> set[str]:
    return {k for r in records for k, v in r.items() if k != "epoch" and _finite(v)}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _lower_is_better(name: str) -> bool:
    return any(word in name for word in ("loss", "error", "seconds"))


def curves(run: Run, metric: str | None) -> Curves | None:
    """The curves of ``metric`` in ``run`` (None: its primary metric): ``NAME`` plots
    ``train_NAME`` and ``dev_NAME``, ``dev_NAME`` / ``train_NAME`` plot both and read that
    one, any other history key (``lr``) is one solid curve. None when the run has none."""
    keys = _keys(run.records)
    name = metric or run.metric
    if metric and metric in keys and not metric.startswith(("train_", "dev_")):
        return Curves(None, metric, metric, not _lower_is_better(metric))
    base = name.split("_", 1)[1] if name.startswith(("train_", "dev_")) else name
    train, dev = f"train_{base}", f"dev_{base}"
    if train not in keys and dev not in keys:
        return None
    key = name if name in (train, dev) else dev if dev in keys else train
    higher = run.higher_is_better if base == run.metric else not _lower_is_better(base)
    return Curves(train if train in keys else None, dev if dev in keys else None, key, higher)


def check_metric(runs: list[Run], metric: str | None) -> None:
    """ValueError naming ``--metric`` when no run's history records it."""
    if metric is None or any(curves(r, metric) for r in runs):
        return
    recorded = sorted({k for r in runs for k in _keys(r.records)})
    raise ValueError(
        f"--metric {metric}: no run's {JSONL_NAME} records it"
        + (f" (they record: {', '.join(recorded)})" if recorded else " (no epochs recorded yet)")
    )


def final_and_best(run: Run, c: Curves | None) -> tuple[float, float, int | None]:
    """The last and best finite value of ``c.key`` and the epoch of the best (NaN, NaN, None
    when there is none)."""
    if c is None:
        return math.nan, math.nan, None
    points = [
        (r["epoch"], v)
        for r, v in zip(run.records, series(run.records, c.key), strict=True)
        if math.isfinite(v)
    ]
    if not points:
        return math.nan, math.nan, None
    pick = max if c.higher_is_better else min
    epoch, best = pick(points, key=lambda p: p[1])
    return points[-1][1], best, epoch


def verdict(run: Run) -> tuple[str, str]:
    """The diagnosis of ``run`` (what ``cnnkit diagnose`` says): its verdict and summary; ``-``
    and the reason when its history cannot be diagnosed (no epochs yet, no metric)."""
    from cnnkit.train.diagnose import diagnose

    if not run.records:
        return "-", "no epochs recorded yet"
    try:
        result = diagnose(
            run.records,
            run.config,
            metric=run.metric,
            higher_is_better=run.higher_is_better,
            diverged=read_divergence(run.path),
        )
    except ValueError as err:  # a history without its primary metric: nothing to judge
        return "-", str(err)
    return result.verdict.replace("_", " "), result.summary


# --------------------------------------------------------------------------- the figure


def plot_comparison(
    runs: list[Run], labels: list[str], path: Path, metric: str | None = None
) -> None:
    """One PNG at ``path``: the curves of ``metric`` (None: each run's primary metric) of all
    ``runs`` overlaid, one colour per run, train dashed and dev solid, x the epoch; a loss
    panel beside it unless the metric is the loss itself."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from cnnkit.viz import save_png  # (it selects the Agg backend)

    chosen = [curves(r, metric) for r in runs]
    with_loss = (metric or "").removeprefix("train_").removeprefix("dev_") != "loss"
    fig, axes = plt.subplots(1, 2 if with_loss else 1, figsize=(11 if with_loss else 6, 4))
    axes = list(axes) if with_loss else [axes]
    colours = plt.get_cmap("tab10")
    names = {c.key.removeprefix("dev_").removeprefix("train_") for c in chosen if c}
    title = metric or (names.pop() if len(names) == 1 else "primary metric")
    for i, (run, label, c) in enumerate(zip(runs, labels, chosen, strict=True)):
        colour = colours(i % 10)
        _draw(axes[0], run, label, c, colour)
        if with_loss:
            _draw(axes[1], run, label, curves(run, "loss"), colour)
    for ax, name in zip(axes, (title, "loss"), strict=False):
        ax.set_title(name.replace("_", " "))
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.tight_layout()
    save_png(fig, path)


def _draw(ax: Any, run: Run, label: str, c: Curves | None, colour: Any) -> None:
    if c is None:
        return
    epochs = [r["epoch"] for r in run.records]
    marker = "o" if len(epochs) == 1 else None  # one epoch: a point, not an invisible line
    for key, style in ((c.train, "--"), (c.dev, "-")):
        if key is not None:
            ys = series(run.records, key)
            ax.plot(epochs, ys, style, color=colour, marker=marker, label=f"{label} {key}")
