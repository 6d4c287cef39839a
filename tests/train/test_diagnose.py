"""The diagnosis on synthetic learning curves of each kind (formulas + seeded noise)."""

from __future__ import annotations

import math
import random

import pytest

import cnnkit
from cnnkit.train import diagnose as dg
from cnnkit.train.diagnose import VERDICTS, Diagnosis, diagnose


def history(n, train_loss, train_acc, dev_loss, dev_acc, *, noise=0.0, seed=0):
    """Records for epochs 1..n from curve formulas f(t); noise: relative (loss) / absolute (acc)."""
    rng = random.Random(seed)
    out = []
    for t in range(1, n + 1):

        def jitter(x, rel):
            return x * (1 + rel * rng.gauss(0, 1))

        out.append(
            {
                "epoch": t,
                "train_loss": jitter(train_loss(t), noise),
                "train_accuracy": min(1.0, train_acc(t) + noise / 2 * rng.gauss(0, 1)),
                "dev_loss": jitter(dev_loss(t), noise),
                "dev_accuracy": min(1.0, dev_acc(t) + noise / 2 * rng.gauss(0, 1)),
                "lr": 0.1,
            }
        )
    return out


def exp(tau):
    return lambda t: math.exp(-t / tau)


def still_improving(noise=0.01, seed=0):
    # A slow exponential cut at 20 epochs: loss still -13% per 4 epochs, accuracy +6 points.
    e = exp(30)
    return history(
        20,
        lambda t: 2.3 * e(t),
        lambda t: 1 - 0.9 * e(t),
        lambda t: 2.5 * e(t) + 0.02,
        lambda t: 0.98 - 0.9 * e(t),
        noise=noise,
        seed=seed,
    )


def underfitting(noise=0.01, seed=0):
    # Converges fast to a high loss floor and 45% accuracy: a model too small for the data.
    e = exp(2)
    return history(
        30,
        lambda t: 1.6 + 0.7 * e(t),
        lambda t: 0.45 - 0.2 * e(t),
        lambda t: 1.65 + 0.7 * e(t),
        lambda t: 0.44 - 0.2 * e(t),
        noise=noise,
        seed=seed,
    )


def overfitting(noise=0.01, seed=0):
    # Training loss -> 0, accuracy -> 100%; dev loss bottoms out near epoch 10 and climbs,
    # dev accuracy plateaus at 90%.
    e = exp(5)
    return history(
        40,
        lambda t: 0.01 + 2.3 * e(t),
        lambda t: 1 - 0.9 * e(t),
        lambda t: 0.35 + 2.0 * exp(3)(t) + 0.02 * max(0, t - 10),
        lambda t: 0.90 - 0.8 * e(t),
        noise=noise,
        seed=seed,
    )


def healthy(noise=0.01, seed=0):
    e = exp(3)
    return history(
        30,
        lambda t: 0.02 + 2.3 * e(t),
        lambda t: 0.998 - 0.9 * e(t),
        lambda t: 0.05 + 2.3 * e(t),
        lambda t: 0.99 - 0.9 * e(t),
        noise=noise,
        seed=seed,
    )


CONFIG = {
    "name": "resnet20",
    "kwargs": {},
    "data": {"spec": "cifar10:x", "classes": list("0123456789"), "input_size": [3, 32, 32]},
    "train": {"epochs": 20, "weight_decay": 1e-4, "drop_path": 0.0, "cutout": 0},
}


# The four archetypal runs and their verdicts.
RUNS = [
    (still_improving, "still_improving"),
    (underfitting, "underfitting"),
    (overfitting, "overfitting"),
    (healthy, "healthy"),
]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(("curves", "verdict"), RUNS)
def test_each_kind_of_curve_gets_its_verdict(curves, verdict, seed):
    result = diagnose(curves(seed=seed), CONFIG)
    assert result.verdict == verdict, str(result)
    assert result.verdict in VERDICTS
    assert result.summary and result.explanation and result.advice


def test_noiseless_curves_too():
    for curves, verdict in [
        (still_improving, "still_improving"),
        (underfitting, "underfitting"),
        (overfitting, "overfitting"),
        (healthy, "healthy"),
    ]:
        assert diagnose(curves(noise=0.0)).verdict == verdict


def test_still_improving_advises_more_epochs():
    result = diagnose(still_improving(), CONFIG)
    assert "--epochs 40" in " ".join(result.advice)


def test_underfitting_names_bigger_registered_models():
    result = diagnose(underfitting(), CONFIG)
    advice = " ".join(result.advice)
    assert "--model resnet56" in advice and "--model wrn16_8" in advice
    assert "--epochs" in advice
    registered = set(cnnkit.list_models())
    for bigger in dg.CAPACITY_LADDER["resnet20"]:
        assert bigger in registered
    # ResNet-56 and WRN-16-8 have more parameters than ResNet-20 (853,018 / 10,961,370 vs 269,722).
    assert "instead of resnet20" in advice


def test_underfitting_with_regularization_on_suggests_weakening_it():
    config = {**CONFIG, "train": {"epochs": 30, "drop_path": 0.5, "dropout": 0.3}}
    advice = " ".join(diagnose(underfitting(), config).advice)
    assert "--drop-path 0.5" in advice and "--dropout 0.3" in advice


def test_overfitting_names_concrete_flags():
    result = diagnose(overfitting(), CONFIG)
    advice = " ".join(result.advice)
    for flag in (
        "--weight-decay 0.0002 (now 0.0001)",
        "--drop-path",
        "--dropblock",
        "--cutout 16",
        "--dropout",
        "--label-smoothing",
        "augmentation",
    ):
        assert flag in advice, flag
    assert "dev loss has risen" in result.explanation
    best = result.figures["best_dev_accuracy_epoch"]
    assert best is not None and best < 40


def test_overfitting_beats_still_improving_with_a_note():
    # Training loss still falls fast (tau 15 over 24 epochs), dev accuracy stuck at 60% and
    # dev loss climbing after epoch 8: more epochs would only widen the gap.
    e = exp(15)
    records = history(
        24,
        lambda t: 2.3 * e(t),
        lambda t: 1 - 0.9 * e(t),
        lambda t: 1.2 + 0.05 * max(0, t - 8),
        lambda t: 0.6,
        noise=0.01,
    )
    result = diagnose(records)
    assert result.verdict == "overfitting"
    assert any("still improving" in note for note in result.notes)


def test_underfitting_beats_overfitting_with_a_note():
    # Flat at 70% training accuracy, 45% dev, dev loss rising: bias first.
    records = history(
        30,
        lambda t: 0.9 + 0.5 * exp(2)(t),
        lambda t: 0.70,
        lambda t: 1.5 + 0.02 * max(0, t - 5),
        lambda t: 0.45,
    )
    result = diagnose(records)
    assert result.verdict == "underfitting"
    assert any("overfitting" in note for note in result.notes)


def test_still_improving_with_high_error_notes_possible_underfitting():
    e = exp(40)
    records = history(
        12,
        lambda t: 2.3 * e(t),
        lambda t: 0.1 + 0.5 * (1 - e(t)),
        lambda t: 2.3 * e(t),
        lambda t: 0.1 + 0.5 * (1 - e(t)),
    )
    result = diagnose(records)
    assert result.verdict == "still_improving"
    assert any("too small" in note for note in result.notes)


def test_mild_overconfidence_is_a_note_not_a_verdict():
    # Dev loss creeps up 30% while the gap stays at 1 point.
    e = exp(3)
    records = history(
        30,
        lambda t: 0.02 + 2.3 * e(t),
        lambda t: 0.998 - 0.9 * e(t),
        lambda t: 0.05 + 2.3 * e(t) + 0.001 * t,
        lambda t: 0.988 - 0.9 * e(t),
    )
    result = diagnose(records)
    assert result.verdict == "healthy"
    assert any("label-smoothing" in note for note in result.notes)


def test_one_noisy_last_epoch_does_not_flip_a_healthy_run():
    records = healthy()
    records[-1]["dev_accuracy"] -= 0.04
    records[-1]["dev_loss"] *= 1.3
    records[-1]["train_loss"] *= 0.6
    assert diagnose(records).verdict == "healthy"


@pytest.mark.parametrize("n", [1, 2])
def test_very_short_history(n):
    result = diagnose(healthy()[:n], CONFIG)
    assert result.verdict == "too_short"
    assert f"only {n} epoch" in result.summary
    assert "--epochs" in result.advice[0]
    assert "too short" in str(result)


def test_empty_history_is_an_error():
    with pytest.raises(ValueError, match="no epochs"):
        diagnose([])


def test_nan_dev_loss_is_skipped_and_reported():
    records = healthy()
    # Isolated non-finite dev losses the run recovered from: skipped, with a note (a dev loss
    # still non-finite at the last epoch is a divergence: see the tests below).
    for i in (4, 17, 28):
        records[i]["dev_loss"] = float("nan")
    result = diagnose(records)
    assert result.verdict == "healthy"
    assert any("dev loss is not finite" in n and "5, 18, 29" in n for n in result.notes)


def test_all_dev_values_nan_or_missing():
    records = healthy()
    for r in records:
        r["dev_loss"] = float("nan")
        del r["dev_accuracy"]
    result = diagnose(records)
    assert result.verdict == "healthy"
    assert any("No dev measurements" in n for n in result.notes)


def test_nan_training_loss_at_the_end():
    records = still_improving()
    records[-1]["train_loss"] = float("inf")
    result = diagnose(records)
    assert result.verdict in VERDICTS
    assert any("train loss is not finite" in n and "20" in n for n in result.notes)


def test_constant_curves():
    chance = history(10, lambda t: 2.3, lambda t: 0.1, lambda t: 2.3, lambda t: 0.1)
    assert diagnose(chance).verdict == "underfitting"  # without K, chance is unknown
    assert diagnose(chance, CONFIG).verdict == "stuck_at_chance"  # 10 classes: 1/K = 10%
    perfect = history(10, lambda t: 0.01, lambda t: 1.0, lambda t: 0.01, lambda t: 1.0)
    assert diagnose(perfect).verdict == "healthy"


def test_str_reads_as_a_report():
    result = diagnose(overfitting(), CONFIG)
    text = str(result)
    assert text.startswith("Diagnosis: overfitting:")
    assert "Advice:" in text and "--weight-decay" in text
    assert isinstance(result, Diagnosis)


def test_thresholds_are_named_constants_in_sensible_ranges():
    assert 0 < dg.TREND_FRACTION <= 0.5 and dg.MIN_TREND_EPOCHS >= 3
    assert 0 < dg.OVERFIT_GAP < dg.SEVERE_GAP < 1
    assert 0 < dg.UNDERFIT_TRAIN_ERROR < 0.5


# --------------------------------------------------------------------------- other metrics


def detection(kind, *, dev_loss=True):
    """A detector's 24 epochs: named training losses and dev box AP, but no training AP."""
    out = []
    for t in range(1, 25):
        if kind == "converged":
            loss, ap, dev = 0.4 + 1.5 * exp(3)(t), 0.38 - 0.3 * exp(3)(t), 0.5 + 1.5 * exp(3)(t)
        elif kind == "dev_ap_falls":  # dev AP peaks near epoch 10, then loses 0.4 points/epoch
            loss = 0.2 + 1.5 * exp(4)(t)
            ap = 0.38 - 0.3 * exp(3)(t) - 0.004 * max(0, t - 8)
            dev = 0.6 + 1.5 * exp(3)(t) + 0.01 * max(0, t - 8)
        elif kind == "dev_ap_flat":  # the loss still falls 17%, dev AP flat since epoch ~12
            loss, ap, dev = 2 * exp(30)(t), 0.38 - 0.3 * exp(3)(t), 0.5 + 1.5 * exp(3)(t)
        else:  # cut short: the loss still falls 17% over the last 6 epochs
            loss, ap, dev = 2 * exp(30)(t), 0.38 - 0.3 * exp(30)(t), 2.2 * exp(30)(t)
        record = {"epoch": t, "train_loss": loss, "train_loss_box_reg": loss / 3, "dev_box_ap": ap}
        if dev_loss:
            record["dev_loss"] = dev
        out.append(record)
    return out


@pytest.mark.parametrize("dev_loss", [True, False])
@pytest.mark.parametrize(
    ("kind", "verdict"),
    [
        ("converged", "healthy"),
        ("dev_ap_falls", "overfitting"),
        ("cut_short", "still_improving"),
        ("dev_ap_flat", "healthy"),
    ],
)
def test_without_a_training_metric_the_losses_and_dev_metric_decide(kind, verdict, dev_loss):
    result = diagnose(detection(kind, dev_loss=dev_loss), CONFIG, metric="box_ap")
    assert result.verdict == verdict, str(result)
    # Underfitting needs the training metric: the diagnosis says it could not check it...
    assert any("No training box ap" in n and "underfitting" in n for n in result.notes)
    # ...and never prints an unmeasured figure as "nan%".
    assert "nan" not in str(result).lower()
    assert "dev box ap" in result.explanation
    assert math.isnan(result.figures["final_train_box_ap"])
    if kind == "dev_ap_flat":  # a falling loss alone is no reason to train longer
        assert "the training loss fell by" in result.explanation
        assert "without raising the dev box ap" in result.explanation
        assert not any("--epochs" in a for a in result.advice), result.advice
    if verdict == "overfitting":
        assert 9 <= result.figures["best_dev_box_ap_epoch"] <= 11
        best = result.figures["best_dev_box_ap_epoch"]
        assert f"--epochs {best}" in " ".join(result.advice)


@pytest.mark.parametrize(("curves", "verdict"), RUNS)
def test_an_error_rate_reads_like_the_accuracy_it_mirrors(curves, verdict):
    # The same runs recorded as error rates (1 - accuracy, lower is better).
    records = [
        {
            "epoch": r["epoch"],
            "train_loss": r["train_loss"],
            "dev_loss": r["dev_loss"],
            "train_error": 1 - r["train_accuracy"],
            "dev_error": 1 - r["dev_accuracy"],
        }
        for r in curves()
    ]
    result = diagnose(records, CONFIG, metric="error", higher_is_better=False)
    assert result.verdict == verdict, str(result)
    reference = diagnose(curves(), CONFIG)
    assert result.figures["train_dev_gap"] == pytest.approx(reference.figures["train_dev_gap"])
    assert result.figures["final_dev_error"] == pytest.approx(
        1 - reference.figures["final_dev_accuracy"]
    )


def test_a_metric_no_record_holds_is_an_error_naming_the_ones_they_do():
    with pytest.raises(ValueError, match=r"train_top1 or dev_top1.*measure accuracy"):
        diagnose(healthy(), metric="top1")
    with pytest.raises(ValueError, match=r"measure box_ap"):
        diagnose(detection("converged"))


# --------------------------------------------------------------------------- diverged, chance


def _blown_up(records, key, epoch):
    for r in records:
        if r["epoch"] >= epoch:
            r[key] = float("nan")
    return records


@pytest.mark.parametrize(
    ("key", "epoch", "n"),
    [
        ("train_loss", 20, 20),  # the last epoch's training loss
        ("train_loss", 8, 20),  # from epoch 8 on
        ("dev_loss", 20, 20),  # the dev loss at the end of an otherwise fine run
        ("train_loss", 2, 2),  # a 2-epoch run is diverged, not "too short"
    ],
)
def test_non_finite_losses_are_diverged_not_too_short(key, epoch, n):
    records = _blown_up(still_improving()[:n], key, epoch)
    result = diagnose(records, CONFIG)
    assert result.verdict == "diverged", str(result)
    text = str(result)
    assert "--lr" in text and "--warmup-epochs" in text and "--precision fp32" in text
    assert "train longer" not in text.lower() and "--epochs" not in text


def test_a_run_stopped_as_diverged_is_diverged():
    # The engine stops before recording the non-finite epoch: the history itself looks fine.
    records = still_improving()[:5]
    assert diagnose(records, CONFIG).verdict == "still_improving"
    result = diagnose(records, CONFIG, diverged=True)
    assert result.verdict == "diverged"
    assert "stopped as diverged" in result.explanation


def test_divergence_advice_uses_the_run_s_lr():
    config = {**CONFIG, "train": {**CONFIG["train"], "lr": 0.4, "precision": "fp32"}}
    result = diagnose(_blown_up(still_improving(), "train_loss", 10), config)
    assert any("--lr 0.04" in a for a in result.advice)
    assert not any("--precision fp32" in a for a in result.advice)  # already fp32


def stuck(classes, noise=0.01, seed=0):
    # A network that never leaves the uniform guess: loss log K, accuracy 1/K (+ noise).
    k = classes
    return history(
        20,
        lambda t: math.log(k) + 0.3 * exp(1)(t),
        lambda t: 1 / k,
        lambda t: math.log(k) + 0.01,
        lambda t: 1 / k,
        noise=noise,
        seed=seed,
    )


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("classes", [2, 10, 100])
def test_chance_accuracy_is_stuck_not_too_small(classes, seed):
    config = {**CONFIG, "data": {**CONFIG["data"], "classes": [str(i) for i in range(classes)]}}
    result = diagnose(stuck(classes, seed=seed), config)
    assert result.verdict == "stuck_at_chance", str(result)
    text = str(result)
    assert "labels" in text and "--lr" in text and "--norm" in text
    assert "bigger" not in text.lower() and "resnet56" not in text


def test_chance_by_the_loss_when_no_accuracy_is_recorded():
    records = stuck(10)
    for r in records:
        del r["train_accuracy"], r["dev_accuracy"]
        r["dev_accuracy"] = float("nan")
    assert diagnose(records, CONFIG).verdict == "stuck_at_chance"


def test_underfitting_well_above_chance_stays_underfitting():
    # 45% on 10 classes is far above chance (10%): a model too small, not one that learned nothing.
    assert diagnose(underfitting(), CONFIG).verdict == "underfitting"
