"""``report.md``: what a run was, what it reached, its curves and what to do next.

Sections: configuration (model, parameter count, data, main training arguments), final
figures (``metrics.json``), the learning curves (``curves.png`` embedded), the diagnosis, and
the full training arguments for reproduction.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from cnnkit.atomic import atomic_write_text
from cnnkit.train.diagnose import Diagnosis

REPORT_NAME = "report.md"
CURVES_NAME = "curves.png"
# Training arguments shown in the configuration table (argparse names), in this order; the
# full set follows at the end of the report.
MAIN_TRAIN_ARGS = (
    "epochs",
    "batch_size",
    "lr",
    "lr_batch",
    "optimizer",
    "momentum",
    "nesterov",
    "schedule",
    "warmup_epochs",
    "weight_decay",
    "label_smoothing",
    "drop_path",
    "dropblock",
    "dropout",
    "cutout",
    "norm",
    "precision",
    "device",
    "seed",
    "deterministic",
)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.6g}"
    if isinstance(value, (list, dict)):
        return f"`{json.dumps(value)}`"
    return str(value).replace("|", "\\|")


def _table(rows: list[tuple[str, Any]], header: tuple[str, str]) -> list[str]:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in rows]
    return lines


def _parameter_count(config: dict, metrics: dict) -> int | None:
    for source in (metrics, config):
        for key in ("parameters", "num_parameters", "params"):
            if isinstance(source.get(key), int):
                return source[key]
    try:  # Build the architecture on the meta device: shapes only, no memory, no weights.
        import torch

        from cnnkit.models.registry import count_parameters, create_model

        with torch.device("meta"):
            model = create_model(config["name"], **config.get("kwargs", {}))
        return count_parameters(model)
    except Exception:  # an unknown model must not stop the report
        return None


def _base_lr(train: dict, resolved: dict) -> float | None:
    """``--lr`` as used: the effective rate undone by the linear scaling rule
    (``lr = effective * lr_batch / global_batch``), for runs that left ``--lr`` at its default."""
    effective, batch, ref = resolved.get("lr"), resolved.get("global_batch"), train.get("lr_batch")
    numbers = (effective, batch, ref)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers):
        return None
    return effective * ref / batch if batch > 0 else None


def _train_rows(train: dict, model_kwargs: dict) -> list[tuple[str, Any]]:
    """The main training arguments as used: where ``auto``/a default was resolved, the resolved
    value (``--lr`` from ``train.resolved``, ``--norm`` from the model's arguments)."""
    resolved = train.get("resolved") if isinstance(train.get("resolved"), dict) else {}
    used = {"lr": _base_lr(train, resolved), "norm": model_kwargs.get("norm")}
    rows = []
    for key in MAIN_TRAIN_ARGS:
        if key not in train:
            continue
        value, actual = train[key], used.get(key, resolved.get(key))
        if key == "dropblock" and not value:
            value = "off"
        elif value is None and actual is not None:
            value = f"{_fmt(actual)} (default)"
        elif actual is not None and actual != value and key != "lr":
            value = f"{value} ({actual})"
        rows.append((key, "not recorded" if value is None else value))
    for key, label in (
        ("lr", "effective lr (linear scaling rule)"),
        ("global_batch", "global batch"),
        ("world_size", "processes"),
    ):
        if key in resolved:
            rows.append((label, resolved[key]))
    return rows


def _metric_rows(metrics: dict) -> list[tuple[str, Any]]:
    rows = []
    for key, value in metrics.items():
        if isinstance(value, float) and "accuracy" in key and 0 <= value <= 1:
            rows.append((key, f"{value:.4f} ({100 * value:.2f}%)"))
        else:
            rows.append((key, value))
    return rows


def render_report(run_dir: Path, config: dict, metrics: dict, diagnosis: Diagnosis) -> str:
    """The Markdown text of the report (see :func:`write_report`)."""
    name = config.get("name", "?")
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    train = config.get("train") if isinstance(config.get("train"), dict) else {}
    params = _parameter_count(config, metrics)
    classes = data.get("classes")

    lines = [f"# Run report: {name} on {data.get('spec', '?')}", ""]
    lines += ["## Configuration", ""]
    rows: list[tuple[str, Any]] = [
        ("model", name),
        ("family", config.get("family", "?")),
        ("parameters", f"{params:,}" if params is not None else "unknown"),
        ("data", data.get("spec", "?")),
        ("classes", len(classes) if isinstance(classes, list) else "?"),
        ("input size (C, H, W)", data.get("input_size", "?")),
    ]
    sizes = data.get("sizes")
    if isinstance(sizes, dict):
        rows.append(
            (
                "images (train / dev / test)",
                " / ".join(str(sizes.get(s, "?")) for s in ("train", "dev", "test")),
            )
        )
    model_kwargs = config.get("kwargs") if isinstance(config.get("kwargs"), dict) else {}
    rows += _train_rows(train, model_kwargs)
    kwargs = {k: v for k, v in model_kwargs.items() if v not in (None, 0, 0.0, False)}
    rows.append(("model arguments", kwargs))
    rows.append(("cnnkit version", config.get("cnnkit_version", "?")))
    lines += _table(rows, ("setting", "value")) + [""]

    lines += ["## Final figures", ""]
    if metrics:
        lines += _table(_metric_rows(metrics), ("metric", "value")) + [""]
    else:
        lines += ["No final metrics (the run did not finish).", ""]

    lines += ["## Learning curves", ""]
    if (run_dir / CURVES_NAME).is_file():
        lines += [f"![loss and accuracy, train vs dev]({CURVES_NAME})", ""]
    else:
        lines += [f"({CURVES_NAME} is missing.)", ""]

    lines += ["## Diagnosis", "", f"**{diagnosis.verdict.replace('_', ' ')}**: {diagnosis.summary}"]
    lines += ["", diagnosis.explanation, ""]
    if diagnosis.advice:
        lines += ["What to do next:", ""] + [f"- {a}" for a in diagnosis.advice] + [""]
    if diagnosis.notes:
        lines += ["Also:", ""] + [f"- {n}" for n in diagnosis.notes] + [""]

    if train:
        lines += ["## All training arguments", "", "```json", json.dumps(train, indent=2)]
        lines += ["```", ""]
    return "\n".join(lines)


def write_report(
    run_dir: str | os.PathLike, *, config: dict, metrics: dict, diagnosis: Diagnosis
) -> Path:
    """Write ``run_dir/report.md`` atomically and return its path.

    Args:
        run_dir: the run directory (``curves.png`` there is embedded by relative link).
        config: the run's config.json content (model name/kwargs, ``data``, ``train``).
        metrics: the final figures (metrics.json content); may be empty.
        diagnosis: :func:`cnnkit.train.diagnose.diagnose` of the run's history.
    """
    run_dir = Path(run_dir)
    if not isinstance(config, dict):
        raise TypeError(f"write_report: config must be a dict, not {type(config).__name__}")
    if not isinstance(metrics, dict):
        raise TypeError(f"write_report: metrics must be a dict, not {type(metrics).__name__}")
    path = run_dir / REPORT_NAME
    atomic_write_text(path, render_report(run_dir, config, metrics or {}, diagnosis))
    return path
