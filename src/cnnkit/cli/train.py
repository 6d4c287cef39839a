"""`cnnkit train`: train a classifier and write a run directory.

With no arguments it trains the default model (ResNet-20) on the embedded digits. Under
``torchrun --nproc_per_node=N -m cnnkit train ...`` every process runs this command and they
train one model with DistributedDataParallel (``--batch-size`` is per process).

Exit status: 0 on success; 2 for bad input (unknown model, missing or malformed data, wrong
channel count, non-positive epochs or batch size: one line on stderr); 1 when training
diverged (non-finite loss: one line on stderr naming the epoch, the step and the last good
checkpoint, which is left intact).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from cnnkit.layers.norm import NORMS
from cnnkit.train.config import OPTIMIZERS, PRECISIONS, SCHEDULES, TOGGLES

DEFAULTS_NOTE = "defaults train resnet20 on the embedded digits (1-2 minutes on 2 CPU cores)"


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


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a classifier (default: resnet20 on the embedded digits)",
        description=f"Train a classification network and write a run directory; {DEFAULTS_NOTE}.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("what to train")
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

    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, default=30)
    g.add_argument("--batch-size", type=int, default=128, help="per process")
    g.add_argument(
        "--lr",
        type=float,
        help="learning rate for a batch of --lr-batch (default 0.1 for sgd, 1e-3 for adamw); "
        "the rate used is lr * global batch / lr-batch",
    )
    g.add_argument("--lr-batch", type=int, default=128, help="reference batch of --lr")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--nesterov", action="store_true")
    g.add_argument("--weight-decay", type=float, help="default 5e-4 (sgd), 0.05 (adamw)")
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
    g.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warmup length")

    g = p.add_argument_group("regularization")
    g.add_argument(
        "--label-smoothing",
        type=float,
        default=None,
        help="target smoothing epsilon (default 0.1 for the digits, 0 otherwise)",
    )
    g.add_argument(
        "--drop-path", type=float, default=0.0, help="stochastic depth rate of the last block"
    )
    g.add_argument("--dropblock", metavar="PROB[:SIZE]", help="DropBlock, ramped linearly from 0")
    g.add_argument("--dropout", type=float, default=0.0, help="dropout before the classifier")
    g.add_argument(
        "--cutout", type=int, default=0, metavar="SIZE", help="Cutout square side (0: off)"
    )
    g.add_argument("--norm", choices=NORMS, help="normalization layers")
    g.add_argument("--norm-groups", type=_positive_int, help="groups of --norm group")
    g.add_argument(
        "--crop-padding", type=int, help="random-crop padding (0: off; default 4, digits 2)"
    )
    g.add_argument("--flip", choices=TOGGLES, default="auto", help="auto: off for digits")

    g = p.add_argument_group("hardware")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--precision", choices=PRECISIONS, default="auto")
    g.add_argument("--channels-last", choices=TOGGLES, default="auto")
    g.add_argument("--compile", choices=TOGGLES, default="auto", help="torch.compile")
    g.add_argument("--threads", type=_positive_int, help="CPU threads (default: torch's)")
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes")

    g = p.add_argument_group("run")
    g.add_argument("--out", help="run directory (default runs/<model>-<data>-<time>)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--deterministic", action="store_true", help="bit-reproducible kernels")
    g.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR with its saved arguments")
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
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace):
    from cnnkit.train.config import TrainConfig

    # Every TrainConfig field is the dest of the flag of the same name, except model_args
    # (collected from the repeated --model-arg).
    values = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainConfig)
        if f.name != "model_args"
    }
    values["model_args"] = dict(args.model_arg)
    return TrainConfig(**values)


def run(args: argparse.Namespace) -> int:
    from cnnkit.train.engine import TrainingDiverged
    from cnnkit.train.run import resume, train

    try:
        if args.resume:
            resume(args.resume)
        else:
            train(config_from_args(args))
    except TrainingDiverged as err:
        print(f"cnnkit: training diverged: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    return 0
