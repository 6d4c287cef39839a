"""What a run writes besides its checkpoints: history, curves, TensorBoard events, metrics.json,
the diagnosis and report.md (rank 0 only; the other ranks hold a :class:`RunOutputs` that
writes nothing).

Every JSON file is strict JSON: a non-finite figure is written as ``null``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from cnnkit.train.config import TrainConfig
from cnnkit.train.history import JSONL_NAME
from cnnkit.train.report import CURVES_NAME
from cnnkit.train.task import Metric

METRICS_NAME = "metrics.json"


def default_run_dir(cfg: TrainConfig) -> Path:
    """``runs/<model>-<data kind>[-<data dir name or seed>]-<YYYYmmdd-HHMMSS>``."""
    kind, _, rest = cfg.data.partition(":")
    if rest:
        kind += "-" + Path(rest.rstrip("/")).name
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.model}-{kind}-{stamp}"


def summary_writer_class():
    """TensorBoard's SummaryWriter; ValueError naming the extra when tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError(
            "--tensorboard needs the tensorboard package (pip install 'cnnkit[tensorboard]')"
        ) from None
    return SummaryWriter


def _strict(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strict(v) for v in value]
    return value


class RunOutputs:
    """The run directory's figures and pictures, written as the epochs end."""

    def __init__(self, run_dir: Path, is_main: bool, tensorboard: bool, metric: Metric) -> None:
        self.run_dir, self.is_main, self.metric = run_dir, is_main, metric
        self.tensorboard = tensorboard and is_main
        if self.tensorboard:
            summary_writer_class()  # fail now, not after the first epoch
        self.history = None
        self.writer = None

    def open(self, epochs_done: int, save_model_files: Callable[[], None]) -> None:
        """Create the directory and the history (a resumed run's, cut to its checkpoint)."""
        from cnnkit.train.history import History

        if not self.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if epochs_done == 0 and not (self.run_dir / JSONL_NAME).is_file():
            self.history = History(self.run_dir)
            save_model_files()  # config.json (with the train section) from the start
        else:
            self.history = History.load(self.run_dir)
            self.history.truncate(epochs_done)
        if self.tensorboard:
            # Events go straight into the run directory, one file per process start. Steps
            # after the checkpoint are purged (an epoch logged before a kill, then trained
            # again on resume), so each epoch keeps one value per scalar, as the history does.
            self.writer = summary_writer_class()(
                log_dir=str(self.run_dir), purge_step=epochs_done + 1
            )

    def append(self, record: dict[str, Any]) -> None:
        """One epoch: the history line, the curves, the TensorBoard scalars."""
        from cnnkit.viz import plot_curves

        self.history.append(record)
        plot_curves(self.history.records, self.run_dir / CURVES_NAME, metric=self.metric.name)
        if self.writer is not None:
            for key, value in self.history.records[-1].items():
                number = isinstance(value, (int, float)) and not isinstance(value, bool)
                if key != "epoch" and number:  # a string field has no curve
                    self.writer.add_scalar(key, float(value), record["epoch"])
            self.writer.flush()

    def metrics(self, test: dict[str, float], **engine: Any) -> dict[str, Any]:
        """metrics.json's figures: ``test_<name>`` of every test metric, the best and final dev
        value of the primary metric, then the engine's figures; written atomically."""
        from cnnkit.atomic import atomic_write_text

        records = self.history.records
        key = f"dev_{self.metric.name}"
        dev = [r[key] for r in records if isinstance(r.get(key), float) and math.isfinite(r[key])]
        pick = max if self.metric.higher_is_better else min
        metrics: dict[str, Any] = {f"test_{k}": v for k, v in test.items()}
        metrics[f"best_{key}"] = pick(dev, default=float("nan"))
        metrics[f"final_{key}"] = records[-1].get(key, float("nan")) if records else float("nan")
        metrics.update(engine)
        text = json.dumps(_strict(metrics), indent=2, allow_nan=False)
        atomic_write_text(self.run_dir / METRICS_NAME, text + "\n")
        return metrics

    def report(self, metrics: dict[str, Any]):
        """The diagnosis of the history, written with the figures into report.md."""
        from cnnkit.train.checkpoint import read_config
        from cnnkit.train.diagnose import diagnose
        from cnnkit.train.report import write_report

        config = read_config(self.run_dir)
        diagnosis = diagnose(
            self.history.records,
            config,
            metric=self.metric.name,
            higher_is_better=self.metric.higher_is_better,
        )
        write_report(self.run_dir, config=config, metrics=_strict(metrics), diagnosis=diagnosis)
        return diagnosis

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
