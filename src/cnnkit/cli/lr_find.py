"""`cnnkit lr-find [train options]`: the learning-rate range test (:mod:`cnnkit.train.lr_find`).

Takes the flags of `cnnkit train` that shape a step (model, data, batch, optimizer,
regularization, hardware, seed, ``--lr-batch``), trains a fresh copy of that model for up to
``--steps`` steps at exponentially growing rates, writes the loss-vs-rate plot to ``--out`` and
prints the suggested rate as ``cnnkit train`` flags. Nothing else is written.

Exit status: 0 on success; 2 for bad input (one line on stderr): a bad range, an ``--out``
that is a directory or lies in a run directory, or any input `cnnkit train` refuses.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cnnkit.cli import train as train_cli

# The `cnnkit train` groups whose flags the range test takes, and the flags that have no
# meaning for it: the epochs and schedule (it sets every step's rate), --lr (the range
# replaces it) and the run directory's flags (it writes none).
GROUPS = ("what to train", "optimization", "regularization", "hardware", "run")
LEFT_OUT = frozenset(
    {"epochs", "lr", "schedule", "warmup_epochs"}
    | {"out", "overwrite", "resume", "save_every", "quiet", "tensorboard"}
)


def _train_parser() -> argparse.ArgumentParser:
    sub = argparse.ArgumentParser().add_subparsers()
    train_cli.register(sub)
    return sub.choices["train"]


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    """The flags of :data:`GROUPS` of `cnnkit train`, the same action objects (names, types,
    defaults, help), less :data:`LEFT_OUT`; the --stream/--in-memory exclusion kept."""
    source = _train_parser()
    for group in source._action_groups:
        if group.title not in GROUPS:
            continue
        target = p.add_argument_group(group.title)
        for action in group._group_actions:
            if action.dest not in LEFT_OUT:
                target._add_action(action)
    for mutex in source._mutually_exclusive_groups:
        copy = p.add_mutually_exclusive_group(required=mutex.required)
        copy._group_actions.extend(mutex._group_actions)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lr-find",
        help="learning-rate range test: plot loss vs rate, suggest --lr",
        description="Learning-rate range test (Smith, 2017, Sec. 3.3): train a fresh copy of "
        "the model `cnnkit train` would train with these flags for up to --steps steps, the "
        "rate growing exponentially from --start to --end, stop when the loss explodes, plot "
        "the loss against the rate and print the suggested --lr (the steepest descent of the "
        "smoothed loss). No run directory is written.",
        formatter_class=train_cli._HelpFormatter,
    )
    _add_train_flags(p)
    g = p.add_argument_group("range test")
    g.add_argument("--start", type=float, default=1e-6, help="first rate (at the batch used)")
    g.add_argument("--end", type=float, default=10.0, help="last rate (at the batch used)")
    g.add_argument("--steps", type=int, default=200, help="most optimizer steps (10..1000)")
    g.add_argument("--out", dest="plot", default="lr_find.png", help="the plot (PNG) to write")
    g.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=run)


def check_plot_path(path: Path) -> None:
    """ValueError for an ``--out`` the range test must not write: a directory, a file in a run
    directory (the run's own pictures), a name without ``.png``, a missing directory."""
    from cnnkit.train.rundir import run_markers

    if path.is_dir():
        raise ValueError(f"--out {path} is a directory; give a .png file name")
    if path.suffix.lower() != ".png":
        raise ValueError(f"--out {path}: the plot is a PNG; give a name ending in .png")
    parent = path.parent
    if not parent.is_dir():
        raise ValueError(f"--out {path}: no such directory {parent}")
    found = run_markers(parent)
    if found:
        raise ValueError(
            f"--out {path} is in a run directory ({', '.join(found)}); write the plot elsewhere"
        )


def run(args: argparse.Namespace) -> int:
    from cnnkit.train.lr_find import check_range, lr_find, plot_lr_find

    check_range(args.start, args.end, args.steps)
    plot = Path(args.plot)
    check_plot_path(plot)
    cfg = train_cli.config_from_args(args)  # validates like `cnnkit train`
    log = None if args.quiet else print
    result = lr_find(cfg, start=args.start, end=args.end, steps=args.steps, log=log)
    plot_lr_find(result, plot)
    ran = f"{len(result.losses)} steps" + (f", stopped: {result.stopped}" if result.stopped else "")
    print(f"range test: {ran}; plot: {plot}")
    print(f"suggested: {result.flags(cfg.lr_batch)}")
    return 0
