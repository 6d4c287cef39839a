"""The concrete next steps a diagnosis gives: flags and models to try, from the run's config.

Each function turns a finding of :mod:`cnnkit.train.diagnose` into advice that names the
command-line flags of ``cnnkit train`` with values, and the current values where the config
records them, so the advice can be followed as written.
"""

from __future__ import annotations

from typing import Any

# Bigger models of the registry to suggest for underfitting: deeper first, then wider.
CAPACITY_LADDER = {
    "resnet20": ("resnet56", "wrn16_8"),
    "resnet32": ("resnet56", "wrn16_8"),
    "resnet44": ("resnet110", "wrn16_8"),
    "resnet56": ("resnet110", "wrn28_10"),
    "resnet110": ("wrn28_10", "pyramidnet110_a270"),
    "wrn16_8": ("wrn28_10",),
    "wrn40_4": ("wrn28_10",),
    "densenet_bc_100_12": ("densenet_bc_250_24", "wrn28_10"),
    "densenet_bc_250_24": ("densenet_bc_190_40",),
    "pyramidnet110_a48": ("pyramidnet110_a270", "wrn28_10"),
    "resnext29_8x64d": ("resnext29_16x64d",),
    "resnet18": ("resnet50", "wide_resnet50_2"),
    "resnet34": ("resnet50", "wide_resnet50_2"),
    "resnet50": ("resnet101", "wide_resnet50_2"),
    "resnet101": ("resnet152", "wide_resnet101_2"),
}
DEFAULT_BIGGER = ("resnet56", "wrn16_8")

LEARNING_RATE_ADVICE = (
    "Check the learning rate (--lr): too low and the loss crawls, too high and it stalls high."
)


def train_args(config: dict | None) -> dict:
    """The ``train`` section of a run's config (the training arguments), ``{}`` if absent."""
    train = (config or {}).get("train")
    return train if isinstance(train, dict) else {}


def _arg(train: dict, *names: str, default: Any = None) -> Any:
    for name in names:
        if train.get(name) is not None:
            return train[name]
    return default


def epochs_advice(n: int, train: dict, min_epochs: int) -> str:
    """Train longer: twice the planned epochs (at least twice ``min_epochs``, for a short run)."""
    planned = _arg(train, "epochs", default=n)
    planned = planned if isinstance(planned, int) and planned > 0 else n
    more = max(2 * planned, 2 * min_epochs) if n < min_epochs else 2 * planned
    return (
        f"Train longer: --epochs {more} (this run: {planned}). The learning-rate "
        "schedule spans the whole run: a new run with more epochs follows the recipe; "
        f"--resume RUN --epochs {more} is quicker but re-plans the schedule from where this "
        "run stopped (a finished cosine run restarts warm)."
    )


def _bigger_models(config: dict | None) -> tuple[str, ...]:
    name = (config or {}).get("name")
    candidates = CAPACITY_LADDER.get(name, DEFAULT_BIGGER) if isinstance(name, str) else None
    candidates = candidates or DEFAULT_BIGGER
    try:
        from cnnkit.models.registry import list_models

        known = set(list_models())
    except Exception:  # the advice must not fail because a model family failed to import
        return candidates
    return tuple(m for m in candidates if m in known) or tuple(m for m in DEFAULT_BIGGER)


def capacity_advice(config: dict | None) -> str:
    """More capacity: the next models up the :data:`CAPACITY_LADDER` that are registered."""
    name = (config or {}).get("name") or "the current model"
    bigger = " or ".join(f"--model {m}" for m in _bigger_models(config))
    return f"More capacity: a deeper or wider model, e.g. {bigger} instead of {name}."


def less_regularization(train: dict) -> str | None:
    """Weaken the regularizers this run had switched on; None if it had none."""
    active = []
    for flag, names in (
        ("--drop-path", ("drop_path", "drop_path_rate")),
        ("--dropblock", ("dropblock", "drop_block")),
        ("--dropout", ("dropout",)),
        ("--cutout", ("cutout",)),
        ("--label-smoothing", ("label_smoothing",)),
    ):
        value = _arg(train, *names)
        if value not in (None, 0, 0.0, "", "0", False):
            active.append(f"{flag} {value}")
    if not active:
        return None
    return f"Regularization is working against fitting: weaken or drop {', '.join(active)}."


def regularization_advice(config: dict | None) -> list[str]:
    """Stronger regularization with values sized to the data, and the current values."""
    train = train_args(config)
    data = (config or {}).get("data") or {}
    size = data.get("input_size") if isinstance(data, dict) else None
    height = size[1] if isinstance(size, list) and len(size) == 3 else 32
    classes = data.get("classes") if isinstance(data, dict) else None
    many = isinstance(classes, list) and len(classes) > 10
    # Cutout's paper: 16 px on CIFAR-10, 8 px on CIFAR-100 (32 px images).
    cutout = max(2, height // 4 if many else height // 2)
    resolved = train.get("resolved") if isinstance(train.get("resolved"), dict) else {}
    wd = _arg(train, "weight_decay") or resolved.get("weight_decay")
    wd_text = f"--weight-decay {2 * wd:g} (now {wd:g})" if wd else "--weight-decay 5e-4"

    def now(names: tuple[str, ...]) -> str:
        value = _arg(train, *names)
        return f" (now {value})" if value not in (None, 0, 0.0, "") else ""

    return [
        f"Stronger regularization: {wd_text}; stochastic depth --drop-path 0.1 to 0.2"
        f"{now(('drop_path', 'drop_path_rate'))}; --dropblock 0.1:3"
        f"{now(('dropblock', 'drop_block'))}; --cutout {cutout}{now(('cutout',))}; "
        f"--dropout 0.3{now(('dropout',))}; --label-smoothing 0.1"
        f"{now(('label_smoothing',))}.",
        "More data or stronger augmentation, which regularizes without shrinking the model.",
    ]


def divergence_advice(train: dict) -> list[str]:
    """What makes a run that blew up (non-finite loss) train: a smaller step first."""
    lr = _arg(train, "lr")
    warmup = _arg(train, "warmup_epochs", default=1.0)
    precision = _arg(train, "precision", default="auto")
    lower = f"--lr {lr / 10:g}" if isinstance(lr, (int, float)) else "a tenth of the current --lr"
    advice = [
        f"Lower the learning rate ({lower}): a step too large for the loss surface sends the "
        "weights to infinity.",
        f"Warm up for longer (--warmup-epochs {max(2 * float(warmup), 2.0):g}), so the first "
        "steps, taken before the normalization statistics settle, are small.",
    ]
    if precision != "fp32":
        advice.append(
            "Train in fp32 (--precision fp32) to rule out reduced-precision overflow or underflow."
        )
    return advice


def chance_advice(train: dict) -> list[str]:
    """What makes a network that learned nothing (chance accuracy) learn: data first, then
    the step size, then the normalization."""
    lr = _arg(train, "lr")
    rate = f"--lr {lr:g}" if isinstance(lr, (int, float)) else "the --lr used"
    return [
        "Check the data and labels: look at a few training images with their labels; "
        "shuffled, constant or misaligned labels leave nothing to learn, and so do images "
        "normalized to a constant.",
        f"Check the learning rate: {rate} may be too high (the weights saturate: the loss "
        "jumps, then sits at log K) or far too low (nothing moves); try 10x lower and 10x "
        "higher on a few epochs.",
        "Check the normalization: a network without normalization (--norm none) or with a "
        "broken input normalization (mean/std) often cannot start learning; try --norm batch.",
        "Overfit a tiny subset first (--train-subset 100): a healthy setup reaches ~100% "
        "training accuracy there within a few epochs.",
    ]
