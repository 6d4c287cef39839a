"""The per-epoch record of a run: ``history.jsonl`` (appended) and ``history.csv`` (rewritten).

One record per epoch, keys (accuracies are fractions in [0, 1])::

    epoch (1-based), train_loss, train_accuracy, dev_loss, dev_accuracy, lr,
    images_per_second, epoch_seconds

``history.jsonl`` is the source of truth: each epoch appends one line and fsyncs it, so a
crash can at worst cut the last line, which :meth:`History.load` drops with a warning. It is
strict JSON: a non-finite value (a diverged loss) is ``null``, read back as NaN
(:func:`cnnkit.records.to_json`); history.csv writes it as ``nan``.
``history.csv`` is a convenience copy for spreadsheets, rewritten atomically each epoch.
"""

from __future__ import annotations

import csv
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any

from cnnkit.atomic import atomic_write_text
from cnnkit.records import check_record, series, to_json

JSONL_NAME = "history.jsonl"
CSV_NAME = "history.csv"
# Column order of history.csv; keys a caller adds beyond these follow in first-seen order.
STANDARD_KEYS = (
    "epoch",
    "train_loss",
    "train_accuracy",
    "dev_loss",
    "dev_accuracy",
    "lr",
    "images_per_second",
    "epoch_seconds",
)


class History:
    """The records of a run directory, mirrored to its history files.

    ``History(run_dir)`` starts an empty history (the first :meth:`append` replaces any files
    left there); ``History.load(run_dir)`` continues an existing one.
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.records: list[dict[str, Any]] = []
        # False while the jsonl file may not equal `records` (new history, dropped tail):
        # the next write then rewrites it whole instead of appending.
        self._synced = False

    @property
    def jsonl_path(self) -> Path:
        return self.run_dir / JSONL_NAME

    @property
    def csv_path(self) -> Path:
        return self.run_dir / CSV_NAME

    def __len__(self) -> int:
        return len(self.records)

    def append(self, record: dict[str, Any]) -> None:
        """Add one epoch's record: append (and fsync) a line to the jsonl, rewrite the csv."""
        record = check_record(record)
        if self.records and record["epoch"] <= self.records[-1]["epoch"]:
            raise ValueError(
                f"history record epoch {record['epoch']} does not follow epoch "
                f"{self.records[-1]['epoch']} (truncate the history before resuming)"
            )
        self.records.append(record)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self._synced:
            with open(self.jsonl_path, "a", encoding="utf-8") as fh:
                fh.write(to_json(record) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        else:
            self._rewrite_jsonl()
        self._rewrite_csv()

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> History:
        """The history of ``run_dir`` (a run directory or its history.jsonl).

        A last line cut by a crash is dropped with a warning; any other malformed line is a
        ValueError naming the file and line.
        """
        path = Path(run_dir)
        if path.name == JSONL_NAME or path.suffix == ".jsonl":
            path = path.parent
        history = cls(path)
        file = history.jsonl_path
        if not file.is_file():
            raise ValueError(f"{file}: no such file (is {path} a cnnkit run directory?)")
        text = file.read_text(encoding="utf-8", errors="replace")
        lines = text.split("\n")
        # A complete file ends with "\n", so its last element is ""; anything else was cut.
        complete = lines[-1] == ""
        lines = lines[:-1] if complete else lines
        history._synced = complete
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            last = number == len(lines)
            try:
                record = check_record(json.loads(line))
                if history.records and record["epoch"] <= history.records[-1]["epoch"]:
                    raise ValueError(f"epoch {record['epoch']} is out of order")
            except (json.JSONDecodeError, TypeError, ValueError) as err:
                if last:
                    warnings.warn(
                        f"{file}: ignoring line {number}, cut short by an interrupted write "
                        f"({err})",
                        stacklevel=2,
                    )
                    history._synced = False
                    break
                raise ValueError(f"{file}: line {number}: malformed record ({err})") from None
            history.records.append(record)
        return history

    def truncate(self, epochs: int) -> None:
        """Keep only the records with ``epoch <= epochs`` (on resume) and rewrite both files."""
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
            raise ValueError(f"truncate: epochs must be an integer >= 0, got {epochs!r}")
        self.records = [r for r in self.records if r["epoch"] <= epochs]
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._rewrite_jsonl()
        self._rewrite_csv()

    def column(self, key: str) -> list[float]:
        """The values of ``key`` over epochs (see :func:`cnnkit.records.series`)."""
        return series(self.records, key)

    def _rewrite_jsonl(self) -> None:
        atomic_write_text(self.jsonl_path, "".join(to_json(r) + "\n" for r in self.records))
        self._synced = True

    def _rewrite_csv(self) -> None:
        keys = list(STANDARD_KEYS)
        for record in self.records:
            keys.extend(k for k in record if k not in keys)
        present = [k for k in keys if any(k in r for r in self.records)]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=present, lineterminator="\n")
        writer.writeheader()
        for record in self.records:
            writer.writerow({k: record.get(k, "") for k in present})
        atomic_write_text(self.csv_path, buffer.getvalue())
