"""`cnnkit train`: train a classifier and write a run directory.

With no arguments it trains the default model (ResNet-20) on the embedded digits. Under
``torchrun --nproc_per_node=N -m cnnkit train ...`` every process runs this command and they
train one model with DistributedDataParallel (``--batch-size`` is per process).

Exit status: 0 on success; 2 for bad input (unknown model, missing or malformed data, wrong
channel count, non-positive epochs or batch size, an --out that holds a run, a run directory
another process is training into, a flag --resume cannot change: one line on stderr, before
any file is written); 1 when training diverged (non-finite training loss, or dev/test loss or
metric: one line on stderr naming the epoch and the last good checkpoint, left intact).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from cnnkit.layers.norm import NORMS
from cnnkit.train.config import OPTIMIZERS, PRECISIONS, SCHEDULES, TOGGLES

DEFAULTS_NOTE = "defaults train resnet20 on the embedded digits (1-2 minutes on 2 CPU cores)"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` only where there is an X and the help does not already say
    what the default is (``None`` means a default resolved at run time, described in the help)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text:
            return text
        return super()._get_help_string(action)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _model_arg(text: str) -> tuple[str, object]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE (a JSON value), got {text!r}")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


class _Given:
    """Mixin of the train parser's actions: records each flag given on the command line in
    ``namespace.given_flags`` (dest -> option string), so --resume knows what was asked for
    even when it equals the default."""

    def __call__(self, parser, namespace, values, option_string=None):
        vars(namespace).setdefault("given_flags", {})[self.dest] = option_string
        super().__call__(parser, namespace, values, option_string)


def _track_given(parser: argparse.ArgumentParser) -> None:
    # Argument groups share the parser's action registry: every flag added after this records
    # itself when given.
    for name in (None, "store", "store_true", "store_const", "append"):
        base = parser._registry_get("action", name)
        parser.register("action", name, type(f"Given{base.__name__}", (_Given, base), {}))


class _FlagGroup:
    """An argument group that leaves out the flags named in ``exclude`` (by option string, e.g.
    ``"--epochs"``): how another command takes `cnnkit train`'s flags but a few, through
    argparse's public API only."""

    def __init__(self, group, exclude: frozenset[str]) -> None:
        self.group, self.exclude = group, exclude

    def add_argument(self, *flags: str, **kwargs) -> None:
        if not self.exclude.intersection(flags):
            self.group.add_argument(*flags, **kwargs)

    def add_mutually_exclusive_group(self, **kwargs) -> _FlagGroup:
        return _FlagGroup(self.group.add_mutually_exclusive_group(**kwargs), self.exclude)


def _group(p: argparse.ArgumentParser, title: str, exclude: frozenset[str]) -> _FlagGroup:
    return _FlagGroup(p.add_argument_group(title), frozenset(exclude))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a classifier (default: resnet20 on the embedded digits)",
        description=f"Train a classification network and write a run directory; {DEFAULTS_NOTE}.",
        formatter_class=_HelpFormatter,
    )
    _track_given(p)
    add_train_flags(p)
    p.set_defaults(func=run)


def add_train_flags(p: argparse.ArgumentParser, *, exclude: frozenset[str] = frozenset()) -> None:
    """Every flag of `cnnkit train`, in its groups (what to train, optimization,
    regularization, hardware, run), less the option strings in ``exclude``: `cnnkit lr-find`
    takes them all but those that have no meaning for it."""
    add_what_to_train_args(p, exclude=exclude)
    add_optimization_args(p, exclude=exclude)
    add_regularization_args(p, exclude=exclude)
    add_hardware_and_run_args(p, exclude=exclude)


def add_what_to_train_args(
    p: argparse.ArgumentParser, *, exclude: frozenset[str] = frozenset()
) -> None:
    """The model and data flags of `cnnkit train`; --stream and --in-memory exclude each other."""
    g = _group(p, "what to train", exclude)
    g.add_argument("--model", default="resnet20", help="registered model name (`cnnkit models`)")
    g.add_argument(
        "--data",
        default="digits",
        help="digits | cifar10:PATH | cifar100:PATH | folder:PATH (official CIFAR python "
        "batches; folder: PATH/<class>/*.png or PATH/{train,dev,test}/<class>/*)",
    )
    g.add_argument(
        "--image-size",
        type=_positive_int,
        default=32,
        help="side images are resized to (digits, folder)",
    )
    g.add_argument(
        "--in-chans", type=_positive_int, help="expected input channels (checked against the data)"
    )
    g.add_argument(
        "--train-subset", type=_positive_int, help="train on this many images only (stratified)"
    )
    storage = g.add_mutually_exclusive_group()
    storage.add_argument(
        "--stream",
        dest="storage",
        action="store_const",
        const="stream",
        default="auto",
        help="decode images in DataLoader workers as they are needed (default: when the "
        "decoded data set would not fit comfortably in memory)",
    )
    storage.add_argument(
        "--in-memory",
        dest="storage",
        action="store_const",
        const="memory",
        help="decode the whole data set into memory up front (default for digits and CIFAR)",
    )
    g.add_argument(
        "--workers",
        type=int,
        help="DataLoader worker processes when streaming (default: the cores per process)",
    )
    g.add_argument(
        "--skip-invalid",
        action="store_true",
        help="drop unreadable images of a streamed folder and report how many, instead of "
        "stopping at the first",
    )
    g.add_argument(
        "--model-arg",
        type=_model_arg,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra model constructor argument, e.g. --model-arg zero_init_residual=true",
    )


def add_regularization_args(
    p: argparse.ArgumentParser, *, exclude: frozenset[str] = frozenset()
) -> None:
    """The regularization and augmentation flags of `cnnkit train`."""
    g = _group(p, "regularization", exclude)
    g.add_argument(
        "--label-smoothing",
        type=float,
        help="target smoothing epsilon of the training loss; the logged train loss is the plain "
        "cross-entropy, like the dev loss (default: 0.1 for the digits, 0 otherwise)",
    )
    g.add_argument(
        "--drop-path", type=float, default=0.0, help="stochastic depth rate of the last block"
    )
    g.add_argument("--dropblock", metavar="PROB[:SIZE]", help="DropBlock, ramped linearly from 0")
    g.add_argument("--dropout", type=float, default=0.0, help="dropout before the classifier")
    g.add_argument(
        "--cutout", type=int, default=0, metavar="SIZE", help="Cutout square side (0: off)"
    )
    g.add_argument(
        "--norm",
        choices=NORMS,
        help="normalization layers (default: the model's own, batch for every registered model)",
    )
    g.add_argument(
        "--norm-groups",
        type=_positive_int,
        help="most groups per layer of --norm group: each layer takes the largest divisor of "
        "its channels not above this (default: 32, as in Wu & He)",
    )
    g.add_argument(
        "--crop-padding", type=int, help="random-crop padding (0: off; default 4, digits 2)"
    )
    g.add_argument("--flip", choices=TOGGLES, default="auto", help="auto: off for digits")


def add_optimization_args(
    p: argparse.ArgumentParser,
    *,
    epochs: int | None = 30,
    epochs_help: str = "passes over the training split",
    batch_size: int = 128,
    lr_batch: int = 128,
    lr_help: str = "default: 0.1 for sgd, 1e-3 for adamw",
    decay_help: str = "default 5e-4 (sgd), 0.05 (adamw)",
    warmup_epochs: float = 1.0,
    exclude: frozenset[str] = frozenset(),
) -> None:
    """The optimization flags, shared by `cnnkit train`, `cnnkit lr-find` and `cnnkit detect
    train` (each with its own defaults), less the option strings in ``exclude``."""
    g = _group(p, "optimization", exclude)
    g.add_argument("--epochs", type=int, default=epochs, help=epochs_help)
    g.add_argument("--batch-size", type=int, default=batch_size, help="per process")
    g.add_argument(
        "--lr",
        type=float,
        help="learning rate for a batch of --lr-batch; the rate used is lr * global batch / "
        f"lr-batch ({lr_help})",
    )
    g.add_argument("--lr-batch", type=int, default=lr_batch, help="reference batch of --lr")
    g.add_argument(
        "--optimizer", choices=OPTIMIZERS, default="sgd", help="sgd (with momentum) or adamw"
    )
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (ignored by adamw)")
    g.add_argument("--nesterov", action="store_true", help="Nesterov momentum (sgd)")
    g.add_argument("--weight-decay", type=float, help=decay_help)
    g.add_argument(
        "--no-decay-norm-bias",
        action="store_true",
        help="no weight decay on norm parameters and biases",
    )
    g.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default="cosine",
        help="step: /10 at 50%% and 75%%",
    )
    g.add_argument(
        "--warmup-epochs", type=float, default=warmup_epochs, help="linear warmup length"
    )


def add_hardware_and_run_args(
    p: argparse.ArgumentParser, *, exclude: frozenset[str] = frozenset()
) -> None:
    """The hardware and run-directory flags, shared by `cnnkit train`, `cnnkit lr-find` and
    `cnnkit detect train`, less the option strings in ``exclude``."""
    g = _group(p, "hardware", exclude)
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="auto: bf16 autocast where it is fast (CUDA with bf16; CPUs with AMX or "
        "AVX512-BF16), fp32 elsewhere",
    )
    g.add_argument(
        "--channels-last",
        choices=TOGGLES,
        default="auto",
        help="channels_last (NHWC) memory format; auto: on (faster on CUDA and CPUs alike)",
    )
    g.add_argument("--compile", choices=TOGGLES, default="auto", help="torch.compile")
    g.add_argument(
        "--threads",
        type=_positive_int,
        help="CPU threads (default: torch's choice, the cores available to the process)",
    )
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes")

    g = _group(p, "run", exclude)
    g.add_argument(
        "--out",
        help="run directory (default runs/<model>-<data>-<time>[-N], a new one); one that "
        "holds a run is refused unless --overwrite or --resume",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run in --out: its run files (config.json, model.safetensors, "
        "last.ckpt, history.*, metrics.json, report.md, curves.png, evaluation.json, "
        "confusion_matrix.png, TensorBoard events) are removed; other files stay",
    )
    g.add_argument(
        "--seed", type=int, default=0, help="seed of the weights, the batch order and augmentation"
    )
    g.add_argument("--deterministic", action="store_true", help="bit-reproducible kernels")
    g.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue RUN_DIR with its saved arguments. These may be given anew: --epochs "
        "(a new total; the schedule is re-planned for it from the current step, so the rate "
        "jumps to where a run of that length would be now, unlike a run started with that "
        "many epochs), --quiet, --threads, --workers, --save-every, --tensorboard, --device, "
        "--skip-invalid; any other flag given with another value than the saved one is an "
        "error",
    )
    g.add_argument(
        "--save-every",
        type=_positive_int,
        metavar="STEPS",
        help="also save a resumable checkpoint every STEPS optimizer steps (mid-epoch)",
    )
    g.add_argument(
        "--quiet", action="store_true", help="one line per epoch instead of progress bars"
    )
    g.add_argument("--tensorboard", action="store_true", help="write TensorBoard events")


def config_from_args(args: argparse.Namespace):
    from cnnkit.train.config import TrainConfig

    # Every TrainConfig field is the dest of the flag of the same name, except model_args
    # (collected from the repeated --model-arg); a command without a flag (`detect train` has
    # no --cutout) leaves the field at its default or sets it with set_defaults.
    values = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainConfig)
        if f.name != "model_args" and hasattr(args, f.name)
    }
    values["model_args"] = dict(args.model_arg)
    return TrainConfig(**values)


def resume_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The training arguments given explicitly on the command line (TrainConfig field -> value),
    for --resume to apply or refuse."""
    from cnnkit.train.config import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = getattr(args, "given_flags", {})
    values = {dest: getattr(args, dest) for dest in given if dest in fields}
    if "model_arg" in given:
        values["model_args"] = dict(args.model_arg)
    return values


def run(args: argparse.Namespace, make_config=config_from_args) -> int:
    """Train ``make_config(args)``, or resume ``--resume``; status 1 when training diverged."""
    from cnnkit.train.engine import TrainingDiverged
    from cnnkit.train.run import resume, train

    try:
        if args.resume:
            if args.overwrite:
                raise ValueError(
                    f"--resume {args.resume} --overwrite: choose one (continue the run, or "
                    "replace it by training afresh with --out)"
                )
            resume(args.resume, overrides=resume_overrides(args))
        else:
            train(make_config(args), overwrite=args.overwrite)
    except TrainingDiverged as err:
        print(f"cnnkit: training diverged: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    return 0
