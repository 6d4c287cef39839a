"""The learning-rate range test: schedule, smoothing, stopping rule, suggestion, and the CLI."""

from __future__ import annotations

import math
import re

import pytest

from cnnkit.cli.lr_find import LEFT_OUT
from cnnkit.cli.main import main
from cnnkit.train.lr_find import (
    Smoother,
    descent,
    exploded,
    rate_schedule,
    smooth,
    steepest,
    suggest,
    suggestion_curve,
    zero_phase,
)

TINY = ["--model-arg", "depth=8", "--model-arg", "widths=[4,8,16]", "--image-size", "16",
        "--train-subset", "64", "--batch-size", "32", "--threads", "1", "--quiet"]  # fmt: skip


def test_schedule_is_exponential_from_start_to_end():
    # 1e-4 to 1 in 5 steps: one decade per step.
    assert rate_schedule(1e-4, 1.0, 5) == pytest.approx([1e-4, 1e-3, 1e-2, 1e-1, 1.0], rel=1e-12)
    # 2 to 32 in 11 steps: ratio 16 ** (1/10) per step; step 5 is 2 * sqrt(16) = 8.
    rates = rate_schedule(2.0, 32.0, 11)
    assert rates[0] == pytest.approx(2.0) and rates[-1] == pytest.approx(32.0)
    assert rates[5] == pytest.approx(8.0)
    assert rates[1] / rates[0] == pytest.approx(2 ** 0.4)  # fmt: skip


def test_smoothing_is_an_ema_with_bias_correction():
    # beta 0.5 by hand: avg 0 -> 0.5*4=2 -> 0.5*2+0.5*8=5 -> 0.5*5+0.5*2=3.5;
    # corrections 1-0.5, 1-0.25, 1-0.125: 4, 6.666.., 4.
    assert smooth([4.0, 8.0, 2.0], beta=0.5) == pytest.approx([4.0, 20 / 3, 4.0])
    # fast.ai's 0.98: the first value is the loss itself (no pull towards 0); a constant stays.
    s = Smoother()
    assert s.add(2.5) == pytest.approx(2.5)
    assert s.add(2.5) == pytest.approx(2.5)
    assert s.add(5.5) == pytest.approx((0.98 * 0.98 * 0.02 * 2.5 + 0.98 * 0.02 * 2.5 + 0.02 * 5.5)
                                       / (1 - 0.98**3))  # fmt: skip


def test_stopping_rule_on_a_hand_made_loss_sequence():
    losses = [2.0, 1.5, 1.0, 0.5, 0.6, 1.0, 2.5, 30.0, 1e4]
    smoothed = smooth(losses, beta=0.0)  # beta 0: the loss itself, to read the rule plainly
    best, stop = math.inf, None
    for i, (raw, s) in enumerate(zip(losses, smoothed, strict=True)):
        best = min(best, s)
        if exploded(raw, s, best):
            stop = i
            break
    assert stop == 6  # 2.5 > 4 * 0.5; 1.0 (2x the minimum) is not yet an explosion
    assert exploded(math.nan, 1.0, 1.0) and exploded(math.inf, 1.0, 1.0)
    assert not exploded(1.9, 1.9, 0.5)


def test_steepest_point_of_a_synthetic_curve():
    # loss = 2 - tanh(log10(lr) + 3) for lr in 1e-6..1: steepest (derivative -1/cosh^2) at
    # 1e-3; then a rise after 1e-1 (to 4x the minimum, where the test stops) that must not count.
    rates = rate_schedule(1e-6, 1.0, 201)
    losses = [2 - math.tanh(math.log10(r) + 3) + (3 * (math.log10(r) + 1) ** 2 if r > 0.1
              else 0) for r in rates]  # fmt: skip
    assert rates[steepest(rates, losses)] == pytest.approx(1e-3)
    # The two-way average does not shift it (within one step, 10 ** 0.03).
    assert rates[steepest(rates, zero_phase(losses, 0.9))] == pytest.approx(1e-3, rel=0.08)
    # The one-way average of the stopping rule lags: its steepest point is > 0.5 decade late.
    assert rates[steepest(rates, smooth(losses))] > 10**-2.5
    # A curve that only rises: the steepest point is its minimum, the first rate.
    assert steepest(rates[:5], [1.0, 2.0, 3.0, 4.0, 5.0]) == 0


# 241 rates over 1e-6..1: 40 steps a decade, rate 10 ** (-6 + i / 40) at step i.
RATES = rate_schedule(1e-6, 1.0, 241)


def _valley(rate: float) -> float:
    """Flat at 3 up to 1e-4, a cosine fall to 1 at 1e-1 (point-symmetric about its steepest
    point, 10 ** -2.5), then the mirror image rising: a symmetric average moves neither."""
    x = math.log10(rate)
    if x <= -4:
        return 3.0
    if x <= -1:
        return 2 + math.cos(math.pi * (x + 4) / 3)
    return 2 - math.cos(math.pi * (x + 1) / 3)


def _step(rate: float) -> int:
    return round((math.log10(rate) + 6) * 40)


def test_suggestion_is_the_geometric_middle_of_the_descent():
    losses = [_valley(r) for r in RATES]
    steep, bottom = descent(RATES, suggestion_curve(losses))
    # Steepest at 10 ** -2.5 (step 140), bottom at 10 ** -1 (step 200; one step of slack: the
    # average is one-sided at the end of the range).
    assert steep == _step(10**-2.5) and abs(bottom - _step(0.1)) <= 1
    # Midway on a log scale: sqrt(10 ** -2.5 * 10 ** -1) = 10 ** -1.75, step 170.
    assert suggest(RATES, losses) == _step(10**-1.75)
    # A ripple on the flat start (local minima at 10 ** -5.6, -5.1, -4.6) does not end the
    # descent: it has not made half its fall there.
    rippled = [v + (0.1 * math.sin(4 * math.pi * math.log10(r)) if r < 1e-4 else 0)
               for v, r in zip(losses, RATES, strict=True)]  # fmt: skip
    assert suggest(RATES, rippled) == _step(10**-1.75)


def test_a_second_lower_dip_past_the_first_bottom_is_not_the_descent():
    # The valley up to 10 ** -0.5, then a jump to 3 and a fall to 0.3 at 10 ** -0.2 (as batch
    # norm's networks can do at rates far past the useful ones): lower than the first bottom
    # and 9x steeper than the first descent. The suggestion stays with the first descent.
    def loss(rate):
        x = math.log10(rate)
        if x <= -0.5:
            return _valley(rate)
        if x <= -0.4:
            return _valley(10**-0.5) + (x + 0.5) / 0.1 * (3 - _valley(10**-0.5))
        if x <= -0.2:
            return 3 - (x + 0.4) / 0.2 * 2.7
        return 0.3 + (x + 0.2) / 0.2 * 0.7

    losses = [loss(r) for r in RATES]
    steep, bottom = descent(RATES, suggestion_curve(losses))
    # The jump 0.5 decade on lifts the average's bottom a little early: 3 steps of slack.
    assert steep == _step(10**-2.5) and abs(bottom - _step(0.1)) <= 3
    assert abs(suggest(RATES, losses) - _step(10**-1.75)) <= 2
    # The rule it replaced (steepest point up to the global minimum) took the second dip.
    assert RATES[steepest(RATES, zero_phase(losses, 0.9))] > 10**-0.5


def test_the_exploding_tail_does_not_move_the_suggestion():
    # The last three losses explode (as when the stopping rule ends the test), 38 steps past
    # the bottom: capped at the first loss, they leave the suggestion where it was.
    losses = [_valley(r) for r in RATES]
    exploding = losses[:-3] + [50.0, 1e3, 1e4]
    assert descent(RATES, suggestion_curve(exploding)) == descent(RATES, suggestion_curve(losses))
    assert suggest(RATES, exploding) == _step(10**-1.75)
    # Uncapped, the two-way average would carry 1e4 back and move the bottom by > 0.5 decade.
    assert RATES[descent(RATES, zero_phase(exploding, 0.9))[1]] < 10**-1.5


def test_a_curve_that_never_falls_suggests_its_first_rate():
    assert descent(RATES[:5], [1.0, 2.0, 3.0, 4.0, 5.0]) == (0, 0)
    assert suggest(RATES[:5], [1.0, 2.0, 3.0, 4.0, 5.0]) == 0
    assert suggest(RATES[:3], [2.0, 2.0, 2.0]) == 0


def test_suggestion_ignores_the_non_finite_tail():
    rates = rate_schedule(1e-4, 1.0, 20)
    losses = [2.0 - 0.1 * i for i in range(19)] + [math.nan]
    assert 0 <= suggest(rates, losses) < 19


def test_cli_writes_only_the_plot_and_prints_the_flags(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["lr-find", *TINY, "--steps", "12", "--start", "1e-3", "--end", "1e3",
                 "--lr-batch", "64"]) == 0  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lr_find.png"]
    assert (tmp_path / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    found = re.search(r"suggested: --lr (\S+) --lr-batch 64 \((\S+) at batch 32:", out)
    assert found, out
    # The printed --lr is the rate per a batch of 64: twice the rate at the batch of 32 used.
    assert float(found.group(1)) == pytest.approx(2 * float(found.group(2)), rel=0.01)
    assert 1e-3 <= float(found.group(2)) <= 1e3


def test_cli_stops_when_the_loss_explodes(capsys, tmp_path):
    # Rates up to 1e8 with SGD: the loss explodes well before the 40 steps.
    out = tmp_path / "plot.png"
    assert main(["lr-find", *TINY, "--steps", "40", "--start", "1e-2", "--end", "1e8",
                 "--out", str(out)]) == 0  # fmt: skip
    text = capsys.readouterr().out
    steps = int(re.search(r"range test: (\d+) steps, stopped: loss", text).group(1))
    assert steps < 40 and out.is_file()


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        (["--start", "1", "--end", "0.1"], r"--start 1 must be below --end 0\.1"),
        (["--start", "0"], "--start must be a positive number"),
        (["--end", "-1"], "--end must be a positive number"),
        (["--end", "inf"], "--end must be a positive number"),
        (["--steps", "5"], "--steps must be an integer in 10..1000"),
        (["--out", "plot.txt"], "ending in .png"),
        (["--out", "."], "is a directory"),
        (["--out", "nowhere/x.png"], "no such directory"),
        (["--batch-size", "0"], "--batch-size must be a positive integer"),
        (["--model", "resnet21"], "unknown model 'resnet21'"),
    ],
)
def test_bad_input_is_one_line_and_status_2(capsys, tmp_path, monkeypatch, argv, pattern):
    monkeypatch.chdir(tmp_path)
    assert main(["lr-find", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(pattern, err), err
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_write_into_a_run_directory(capsys, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "metrics.json").write_text("{}")
    assert main(["lr-find", "--out", str(tmp_path / "curves.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "run directory" in err, err
    assert not (tmp_path / "curves.png").exists()


def test_train_only_flags_are_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["lr-find", "--epochs", "3"])
    assert exc.value.code == 2
    assert "--epochs" in capsys.readouterr().err


def _flags(command: str, capsys) -> set[str]:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    # The option column: "  --flag ..." or "  -h, --help" at the start of a line.
    return set(re.findall(r"^ {2}(?:-\w, )?(--[a-z][a-z-]*)", capsys.readouterr().out, re.M))


def test_takes_every_train_flag_but_those_left_out(capsys):
    train, lr_find = _flags("train", capsys), _flags("lr-find", capsys)
    # Each flag left out is one `cnnkit train` has (a misspelt name would leave the flag in).
    assert train >= LEFT_OUT
    own = {"--start", "--end", "--steps", "--out", "--quiet"}
    assert lr_find - own == train - LEFT_OUT - own
    assert {"--lr-batch", "--stream", "--in-memory", "--seed"} <= lr_find


@pytest.mark.parametrize("command", ["train", "lr-find"])
def test_stream_and_in_memory_exclude_each_other(capsys, command):
    with pytest.raises(SystemExit) as exc:
        main([command, "--stream", "--in-memory"])
    assert exc.value.code == 2
    assert "not allowed with argument --stream" in capsys.readouterr().err
