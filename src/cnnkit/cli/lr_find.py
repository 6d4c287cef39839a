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

# The flags of `cnnkit train` that have no meaning for the range test: the epochs and schedule
# (it sets every step's rate), --lr (the range replaces it) and the run directory's flags (it
# writes none; its own --out and --quiet are the plot's and the progress lines').
LEFT_OUT = frozenset(
    {"--epochs", "--lr", "--schedule", "--warmup-epochs"}
    | {"--out", "--overwrite", "--resume", "--save-every", "--quiet", "--tensorboard"}
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lr-find",
        help="learning-rate range test: plot loss vs rate, suggest --lr",
        description="Learning-rate range test (Smith, 2017, Sec. 3.3): train a fresh copy of "
        "the model `cnnkit train` would train with these flags for up to --steps steps, the "
        "rate growing exponentially from --start to --end, stop when the loss explodes, plot "
        "the loss against the rate and print the suggested --lr (midway, on a log scale, between "
        "where the smoothed loss falls fastest and where it stops falling). No run directory is "
        "written.",
        formatter_class=train_cli._HelpFormatter,
    )
    train_cli.add_train_flags(p, exclude=LEFT_OUT)
    g = p.add_argument_group("range test")
    g.add_argument("--start", type=float, default=1e-6, help="first rate (at the batch used)")
    g.add_argument("--end", type=float, default=10.0, help="last rate (at the batch used)")
    g.add_argument("--steps", type=int, default=200, help="most optimizer steps (10..1000)")
    g.add_argument("--out", dest="plot", default="lr_find.png", help="the plot (PNG) to write")
    g.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cnnkit.train.lr_find import check_range, lr_find, plot_lr_find
    from cnnkit.train.rundir import check_png_out

    check_range(args.start, args.end, args.steps)
    plot = Path(args.plot)
    check_png_out(plot, refuse_run_dirs=True)  # the run's own pictures stay the run's
    cfg = train_cli.config_from_args(args)  # validates like `cnnkit train`
    log = None if args.quiet else print
    result = lr_find(cfg, start=args.start, end=args.end, steps=args.steps, log=log)
    plot_lr_find(result, plot)
    ran = f"{len(result.losses)} steps" + (f", stopped: {result.stopped}" if result.stopped else "")
    print(f"range test: {ran}; plot: {plot}")
    print(f"suggested: {result.flags(cfg.lr_batch)}")
    return 0
