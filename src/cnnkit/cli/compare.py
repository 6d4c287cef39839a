"""`cnnkit compare RUN_DIR...` (curves overlaid, the settings that differ) and `cnnkit runs
[DIR]` (every run under a directory in one table, with its verdict and state).

Both read run directories without writing them (see :mod:`cnnkit.train.compare`), so they
work on runs still training.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from cnnkit.cli.table import text_table

DEFAULT_OUT = "compare.png"
DEFAULT_RUNS = "runs"
# The columns of `cnnkit runs`, in order; NUMERIC ones sort as numbers.
RUNS_COLUMNS = ("run", "model", "data", "epochs", "metric", "best", "verdict", "state")
NUMERIC = frozenset({"epochs", "best"})


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare", help="overlay the learning curves of runs and list the settings that differ"
    )
    p.add_argument("runs", metavar="RUN_DIR", nargs="+", help="run directories (one or more)")
    p.add_argument(
        "--out",
        metavar="FILE.png",
        default=DEFAULT_OUT,
        help=f"where to write the figure (default: {DEFAULT_OUT} in the current directory)",
    )
    p.add_argument(
        "--metric",
        metavar="NAME",
        help="a history key to compare, e.g. loss, accuracy, dev_accuracy, box_ap50, lr "
        "(default: each run's primary metric)",
    )
    p.set_defaults(func=run_compare)

    p = sub.add_parser("runs", help="every run under a directory: model, epochs, metric, state")
    p.add_argument(
        "dir",
        metavar="DIR",
        nargs="?",
        default=DEFAULT_RUNS,
        help=f"where to look, recursively (default: {DEFAULT_RUNS}/)",
    )
    p.add_argument(
        "--sort",
        metavar="COLUMN",
        choices=RUNS_COLUMNS,
        default="run",
        help=f"order by this column: {', '.join(RUNS_COLUMNS)} (default: run; missing last)",
    )
    p.add_argument("--reverse", action="store_true", help="sort in descending order")
    p.set_defaults(func=run_runs)


# --------------------------------------------------------------------------- shared


def _number(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.4f}"


def _labels(paths: list[Path], given: list[str]) -> list[str]:
    """Each run's directory name, or the path given when two names coincide."""
    names = [p.name or str(p) for p in paths]
    return [n if names.count(n) == 1 else g for n, g in zip(names, given, strict=True)]


# --------------------------------------------------------------------------- compare


def _check_distinct(paths: list[Path], given: list[str]) -> None:
    """ValueError when one run is named twice (two identical columns say nothing)."""
    seen: dict[Path, str] = {}
    for path, name in zip(paths, given, strict=True):
        key = path.resolve()
        if key in seen:
            raise ValueError(f"{name}: the same run as {seen[key]}; name each run once")
        seen[key] = name


def run_compare(args: argparse.Namespace) -> int:
    from cnnkit.train.compare import (
        check_metric,
        curves,
        differing_settings,
        final_and_best,
        load_run,
        plot_comparison,
        run_state,
        verdict,
    )
    from cnnkit.train.rundir import check_png_out

    out = Path(args.out)
    check_png_out(out, refuse_run_dirs=False)  # before the work: a bad --out fails fast
    runs = [load_run(path) for path in args.runs]
    _check_distinct([r.path for r in runs], args.runs)
    check_metric(runs, args.metric)
    labels = _labels([r.path for r in runs], args.runs)

    differing = differing_settings(runs)
    rows = [[name, *values] for name, values in differing]
    results: list[list[str]] = [[], [], [], [], []]
    for run in runs:
        c = curves(run, args.metric)
        final, best, at = final_and_best(run, c)
        planned = "?" if run.epochs_planned is None else str(run.epochs_planned)
        results[0].append(f"{run.epochs_done}/{planned}")
        results[1].append(c.key if c else "-")
        results[2].append(_number(final))
        results[3].append(_number(best) + (f" (epoch {at})" if at is not None else ""))
        results[4].append(run_state(run.path))
    names = ("epochs done/planned", "metric", "final", "best", "state")
    rows += [[name, *values] for name, values in zip(names, results, strict=True)]
    if len(runs) > 1:
        print(f"{len(differing)} setting(s) differ:" if differing else "every setting is the same:")
    for line in text_table(["", *labels], rows):
        print(line)
    print("verdicts:")
    for label, run in zip(labels, runs, strict=True):
        word, why = verdict(run)
        print(f"  {label}: {word}: {why}")
    plot_comparison(runs, labels, out, args.metric)
    print(f"wrote {out}")
    return 0


# --------------------------------------------------------------------------- runs


def run_runs(args: argparse.Namespace) -> int:
    from cnnkit.train.compare import find_runs

    root = Path(args.dir)
    found = find_runs(root)
    if not found:
        print(f"no runs under {root}")
        return 0
    rows, problems = [], []
    for path in found:
        row, problem = _runs_row(root, path)
        rows.append(row)
        if problem:
            problems.append(f"{row['run']}: {problem}")
    rows = _sorted(rows, args.sort, args.reverse)
    header = [c if c != "best" else "best dev" for c in RUNS_COLUMNS]
    for line in text_table(header, [[_cell(r, c) for c in RUNS_COLUMNS] for r in rows]):
        print(line)
    for line in problems:
        print(line)
    return 0


def _runs_row(root: Path, path: Path) -> tuple[dict[str, Any], str | None]:
    """One row of `cnnkit runs` (raw values: numbers stay numbers for sorting) and the reason
    the run could not be read, if it could not (its row then shows state ``damaged``)."""
    from cnnkit.train.compare import curves, final_and_best, load_run, run_state, verdict

    name = path.relative_to(root).as_posix()
    row: dict[str, Any] = {"run": "." if name == "." else name}
    try:
        run = load_run(path)
    except ValueError as err:  # one damaged run must not hide the others
        row["state"] = "damaged"
        return row, str(err)
    c = curves(run, None)
    _, best, _ = final_and_best(run, c)
    row.update(
        model=run.config["name"],
        data=run.data_spec,
        epochs=run.epochs_done,
        planned=run.epochs_planned,
        metric=c.key if c else run.metric,
        best=None if math.isnan(best) else best,
        verdict=verdict(run)[0],
        state=run_state(path),
    )
    return row, None


def _cell(row: dict[str, Any], column: str) -> str:
    value = row.get(column)
    if value is None:
        return "-"
    if column == "epochs":
        return f"{value}/{'?' if row.get('planned') is None else row['planned']}"
    if column == "best":
        return _number(value)
    return str(value)


def _sorted(rows: list[dict[str, Any]], column: str, reverse: bool) -> list[dict[str, Any]]:
    """``rows`` ordered by ``column`` (numbers as numbers, text as text), missing values last
    whatever the direction; ties keep the run-name order."""
    present = [r for r in rows if r.get(column) is not None]
    missing = [r for r in rows if r.get(column) is None]
    key = (lambda r: r[column]) if column in NUMERIC else (lambda r: str(r[column]))
    return sorted(present, key=key, reverse=reverse) + missing
