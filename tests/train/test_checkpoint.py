"""Saving/loading models (JSON + safetensors), the resume state (weights-only torch.load) and
the atomic writes under both."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import cnnkit
from cnnkit import atomic
from cnnkit.models import registry
from cnnkit.train import checkpoint
from cnnkit.train.checkpoint import load_model, load_weights, read_config, save_model
from cnnkit.train.state import load_state, save_state

TINY = "_test_checkpoint_tiny"


class Tiny(nn.Module):
    """Conv + BN + a head whose weight is tied to an embedding (shared storage)."""

    def __init__(self, num_classes: int = 3, in_chans: int = 1, width: int = 4, tie: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, num_classes)
        self.embed = nn.Linear(width, num_classes)
        if tie:
            self.head.weight = self.embed.weight
        # A non-contiguous buffer: safetensors needs it made contiguous.
        self.register_buffer("proj", torch.arange(12.0).reshape(3, 4).t())

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.head(x) + self.embed(x)


@pytest.fixture
def tiny_name():
    registry.register_model(TINY, Tiny, family="test", input_size=(1, 8, 8), width=4)
    yield TINY
    registry._REGISTRY.pop(TINY, None)


def _trained_like(model: nn.Module) -> nn.Module:
    # Non-default values everywhere, so that a load that silently kept the fresh
    # initialization (or the BN running statistics) would be caught.
    torch.manual_seed(1)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5)  # positive: BN variances must stay valid
    model.bn.num_batches_tracked.fill_(7)
    return model


def test_round_trip_restores_architecture_weights_and_extra_sections(tmp_path, tiny_name):
    model = _trained_like(cnnkit.create_model(tiny_name, num_classes=5))
    data = {"spec": "digits", "classes": list("abcde"), "mean": [0.5], "std": [0.25]}
    cnnkit.save_model(model, tmp_path / "run", data=data, train={"epochs": 3})
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["cnnkit_version"] == cnnkit.__version__
    assert config["name"] == tiny_name and config["family"] == "test"
    assert config["builder"] == "Tiny"
    assert config["kwargs"] == {"num_classes": 5, "in_chans": 1, "width": 4, "tie": True}
    assert config["data"] == data and config["train"] == {"epochs": 3}

    loaded = cnnkit.load_model(tmp_path / "run")
    assert not loaded.training
    assert loaded.cnnkit_config == model.cnnkit_config
    ref, got = model.state_dict(), loaded.state_dict()
    assert ref.keys() == got.keys()
    for key in ref:
        assert torch.equal(ref[key], got[key]), key
    x = torch.randn(2, 1, 8, 8)
    model.eval()
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    # The tie survives: one parameter, two names.
    assert loaded.head.weight is loaded.embed.weight
    # load_model also accepts the config file itself.
    assert isinstance(load_model(tmp_path / "run" / "config.json"), Tiny)


def test_tied_tensors_are_stored_once(tmp_path, tiny_name):
    model = cnnkit.create_model(tiny_name)
    save_model(model, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as fh:
        stored = set(fh.keys())
        aliases = json.loads(fh.metadata()[checkpoint.ALIASES_KEY])
    names = set(model.state_dict())
    assert len(stored) == len(names) - 1
    ((alias, target),) = aliases.items()
    assert {alias, target} == {"head.weight", "embed.weight"}
    weights = cnnkit.load_weights(tmp_path)
    assert set(weights) == names
    assert torch.equal(weights["head.weight"], model.embed.weight.detach())
    assert torch.equal(weights["proj"], model.proj)  # the non-contiguous buffer


def test_overlapping_views_are_copied_not_aliased(tmp_path):
    base = torch.arange(10.0)
    state = {"a": base, "b": base[2:6], "c": base[:5].view(5, 1)}
    tensors, aliases = checkpoint._dedup_state_dict(state)
    assert aliases == {}
    save_file(tensors, str(tmp_path / "w.safetensors"))  # would raise on shared memory
    back = load_weights(tmp_path / "w.safetensors")
    for k in state:
        assert torch.equal(back[k], state[k])


def test_resnet20_round_trip(tmp_path):
    if "resnet20" not in cnnkit.list_models():
        pytest.skip("resnet20 not registered yet")
    model = _trained_like_any(cnnkit.create_model("resnet20", num_classes=10, in_chans=1))
    save_model(model, tmp_path)
    loaded = load_model(tmp_path)
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)
    # 269,722 parameters for 3-channel input (He et al. 2016); 1 channel drops 2*16*9 of them.
    assert cnnkit.count_parameters(loaded) == 269_722 - 2 * 16 * 9


def _trained_like_any(model: nn.Module) -> nn.Module:
    torch.manual_seed(2)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5)
    return model


def test_model_without_config_is_a_type_error(tmp_path):
    with pytest.raises(TypeError, match="create_model"):
        save_model(nn.Linear(2, 3), tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


def test_explicit_config_for_a_hand_built_model(tmp_path, tiny_name):
    model = Tiny(num_classes=2)
    save_model(model, tmp_path, config={"name": tiny_name, "kwargs": {"num_classes": 2}})
    assert load_model(tmp_path).head.out_features == 2


def test_extra_section_may_not_replace_the_architecture(tmp_path, tiny_name):
    with pytest.raises(ValueError, match="kwargs"):
        save_model(cnnkit.create_model(tiny_name), tmp_path, kwargs={})


def _saved(tmp_path: Path, name: str) -> Path:
    run = tmp_path / "run"
    save_model(_trained_like(cnnkit.create_model(name)), run)
    return run


def _edit_config(run: Path, **changes) -> None:
    config = json.loads((run / "config.json").read_text())
    config.update(changes)
    (run / "config.json").write_text(json.dumps(config))


def test_unknown_model_name(tmp_path, tiny_name):
    run = _saved(tmp_path, tiny_name)
    _edit_config(run, name="resnet_does_not_exist")
    with pytest.raises(ValueError, match=r"config\.json.*'name'.*resnet_does_not_exist"):
        load_model(run)


def test_kwargs_rejected_by_current_code(tmp_path, tiny_name):
    run = _saved(tmp_path, tiny_name)
    _edit_config(run, kwargs={"num_classes": 3, "in_chans": 1, "width": 4, "heads": 2})
    with pytest.raises(ValueError, match=r"config\.json.*'kwargs'.*heads"):
        load_model(run)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"name": "x", "kwargs": ', "malformed JSON"),
        ("[1, 2]", "JSON object"),
        ('{"kwargs": {}}', "'name'"),
        ('{"name": "x", "kwargs": [1]}', "'kwargs'"),
        ('{"name": "x", "kwargs": {}, "data": 3}', "'data'"),
    ],
)
def test_malformed_config(tmp_path, text, match):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match=match) as info:
        load_model(tmp_path)
    assert "config.json" in str(info.value)


def test_missing_files(tmp_path, tiny_name):
    with pytest.raises(ValueError, match="nowhere: no such run directory"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty/config\.json: no such file"):
        load_model(tmp_path / "empty")
    run = _saved(tmp_path, tiny_name)
    (run / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="model.safetensors"):
        load_model(run)


def _rewrite_weights(run: Path, edit) -> None:
    state = load_weights(run)
    state.pop("head.weight")  # keep the alias bookkeeping out of the way
    edit(state)
    save_file({k: v.contiguous() for k, v in state.items()}, str(run / "model.safetensors"))


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda s: s.pop("bn.running_var"), r"missing tensors .*bn\.running_var"),
        (lambda s: s.update(extra=torch.zeros(2)), r"unexpected tensors .*extra"),
        (
            lambda s: s.update({"conv.weight": torch.zeros(4, 1, 5, 5)}),
            r"shape mismatch .*conv\.weight: saved \[4, 1, 5, 5\], model \[4, 1, 3, 3\]",
        ),
    ],
)
def test_weights_not_matching_the_architecture(tmp_path, tiny_name, edit, match):
    run = _saved(tmp_path, tiny_name)

    def full_edit(state):
        state["head.weight"] = state["embed.weight"].clone()
        edit(state)

    _rewrite_weights(run, full_edit)
    with pytest.raises(ValueError, match=match) as info:
        load_model(run)
    assert "model.safetensors" in str(info.value)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_truncated_or_corrupt_safetensors(tmp_path, tiny_name, damage):
    run = _saved(tmp_path, tiny_name)
    file = run / "model.safetensors"
    raw = file.read_bytes()
    if damage == "truncate":
        file.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        file.write_bytes(b"\xff" * 64 + raw[64:])
    else:
        file.write_bytes(b"")
    with pytest.raises(ValueError, match=r"model\.safetensors.*(truncated|corrupt)"):
        load_model(run)


def test_other_version_warns_but_loads(tmp_path, tiny_name):
    run = _saved(tmp_path, tiny_name)
    _edit_config(run, cnnkit_version="0.0.1")
    with pytest.warns(UserWarning, match="0.0.1"):
        model = load_model(run)
    assert isinstance(model, Tiny)


def test_read_config_returns_the_sections(tmp_path, tiny_name):
    model = cnnkit.create_model(tiny_name)
    save_model(model, tmp_path, data={"classes": ["a", "b", "c"]})
    assert read_config(tmp_path)["data"]["classes"] == ["a", "b", "c"]


def test_non_json_extra_is_a_type_error(tmp_path, tiny_name):
    with pytest.raises(TypeError, match="data"):
        save_model(cnnkit.create_model(tiny_name), tmp_path, data={"x": object()})


# --------------------------------------------------------------------------- atomicity


def test_crash_during_model_save_keeps_the_previous_files(tmp_path, tiny_name, monkeypatch):
    run = _saved(tmp_path, tiny_name)
    before = {p.name: p.read_bytes() for p in run.iterdir()}

    def crash(src, dst):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(atomic.os, "replace", crash)
    model = cnnkit.create_model(tiny_name)
    with pytest.raises(OSError, match="simulated"):
        save_model(model, run)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # no temp file left
    load_model(run)


def test_crash_during_state_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    save_state(path, {"epoch": 1, "w": torch.ones(3)})
    calls = []

    def crash(src, dst):
        calls.append((src, dst))
        raise OSError("simulated crash")

    monkeypatch.setattr(atomic.os, "replace", crash)
    with pytest.raises(OSError):
        save_state(path, {"epoch": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    assert calls and Path(calls[0][1]) == path and Path(calls[0][0]).parent == tmp_path
    assert os.listdir(tmp_path) == ["last.ckpt"]
    state = load_state(path)
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.ones(3))


def test_sigkill_while_writing_leaves_a_loadable_checkpoint(tmp_path):
    # A child process rewrites a ~16 MB checkpoint in a loop; killing it at an arbitrary
    # moment must leave under the final name a complete checkpoint (old or new).
    path = tmp_path / "last.ckpt"
    script = textwrap.dedent(
        f"""
        import sys, torch
        from cnnkit.train.state import save_state
        for step in range(10_000):
            save_state({str(path)!r}, {{"step": step, "w": torch.full((4_000_000,), float(step))}})
            if step == 0:
                print("saved", flush=True)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(Path(cnnkit.__file__).parents[1])}
    for delay in (0.05, 0.23, 0.41):
        child = subprocess.Popen(
            [sys.executable, "-c", script], stdout=subprocess.PIPE, env=env, text=True
        )
        try:
            assert child.stdout.readline().strip() == "saved"
            time.sleep(delay)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        state = load_state(path)
        assert torch.all(state["w"] == state["step"])
        leftovers = [p.name for p in tmp_path.iterdir() if p.name != "last.ckpt"]
        assert all(name.startswith(".last.ckpt.") for name in leftovers)


# --------------------------------------------------------------------------- resume state


def test_state_round_trip_with_rng_states(tmp_path):
    state = {
        "epoch": 4,
        "model": {"w": torch.randn(3, 3)},
        "optimizer": {"state": {0: {"momentum_buffer": torch.ones(2)}}, "param_groups": []},
        "rng": {"torch": torch.get_rng_state(), "python": list(range(5))},
        "sampler": {"position": 17, "seed": None},
        "lr": 0.1,
    }
    save_state(tmp_path / "last.ckpt", state)
    back = load_state(tmp_path / "last.ckpt")
    assert back["epoch"] == 4 and back["sampler"] == {"position": 17, "seed": None}
    assert torch.equal(back["rng"]["torch"], state["rng"]["torch"])
    assert torch.equal(back["model"]["w"], state["model"]["w"])


def test_state_must_be_a_dict(tmp_path):
    with pytest.raises(TypeError):
        save_state(tmp_path / "x.ckpt", [1, 2])
    torch.save([1, 2], tmp_path / "list.ckpt")
    with pytest.raises(ValueError, match="expected a dict"):
        load_state(tmp_path / "list.ckpt")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing"])
def test_truncated_or_corrupt_state(tmp_path, damage):
    path = tmp_path / "last.ckpt"
    save_state(path, {"w": torch.randn(1000)})
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        path.write_bytes(os.urandom(len(raw)))
    else:
        path.unlink()
    with pytest.raises(ValueError, match=r"refusing to unpickle .*last\.ckpt"):
        load_state(path)


class _Payload:
    """Unpickling this object calls ``action(*args)``: how malicious pickles run code."""

    def __init__(self, action, args):
        self.action, self.args = action, args

    def __reduce__(self):
        return self.action, self.args


def _payloads(marker: Path):
    return {
        "os.system": _Payload(os.system, (f"touch '{marker}'",)),
        "builtins.open": _Payload(open, (str(marker), "w")),
    }


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("kind", ["os.system", "builtins.open"])
@pytest.mark.parametrize("container", ["raw pickle", "torch.save archive"])
def test_pickle_with_a_payload_is_refused_and_never_runs(tmp_path, kind, container):
    marker = tmp_path / "payload-ran"
    payload = _payloads(marker)[kind]
    # The payload is live: plain pickle.loads runs it (so the refusal below is meaningful).
    pickle.loads(pickle.dumps(payload))
    assert marker.exists()
    marker.unlink()

    path = tmp_path / "last.ckpt"
    if container == "raw pickle":
        path.write_bytes(pickle.dumps({"epoch": 1, "model": payload}))
    else:
        torch.save({"epoch": 1, "model": payload}, path)
    with pytest.raises(ValueError, match=r"refusing to unpickle .*last\.ckpt.*could run code"):
        load_state(path)
    assert not marker.exists()


def test_temp_files_of_killed_writers_are_cleaned_up_later(tmp_path):
    path = tmp_path / "last.ckpt"
    stale, fresh = tmp_path / ".last.ckpt.abc.tmp", tmp_path / ".last.ckpt.def.tmp"
    stale.write_bytes(b"partial")
    fresh.write_bytes(b"partial")
    old = time.time() - atomic.STALE_TMP_SECONDS - 5
    os.utime(stale, (old, old))
    save_state(path, {"epoch": 1})
    # The stale one goes; a recent one may belong to a writer still running.
    assert sorted(p.name for p in tmp_path.iterdir()) == [".last.ckpt.def.tmp", "last.ckpt"]
