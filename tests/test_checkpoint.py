"""Checkpoints: round trip, atomic replacement (a crash mid-write leaves the previous one loadable),
safe loading (weights_only), and finding a run's checkpoint."""

from __future__ import annotations

import os

import pytest
import torch

from nrgpt import CheckpointError, ModelConfig, build_model, checkpoint
from nrgpt.runconfig import resolve_config

CONFIG = resolve_config(None, ["model.n_embd=16", "model.n_steps=2", "model.block_size=8", "model.vocab_size=11"])


def model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(CONFIG.model_config())


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_round_trip(tmp_path):
    m = model(0)
    opt = torch.optim.AdamW(m.parameters())
    m(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))[1].backward()
    opt.step()
    state = {"iter": 7, "optimizer": opt.state_dict(), "rng": [torch.get_rng_state()], "best_val_loss": 1.5}
    checkpoint.save_checkpoint(tmp_path / "last", m, CONFIG, {"iter": 7, "val_loss": 1.5}, state)
    assert sorted(os.listdir(tmp_path)) == ["last"]
    loaded, config = checkpoint.load_model(tmp_path / "last")
    assert same_weights(loaded, m) and config == CONFIG and not loaded.training
    back = checkpoint.load_state(tmp_path / "last")
    assert back["iter"] == 7 and torch.equal(back["rng"][0], state["rng"][0])
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert checkpoint.read_info(tmp_path / "last")["config"] == CONFIG.to_dict()


@pytest.mark.parametrize("crash_at", ["weights", "state", "first_rename", "second_rename"])
def test_crash_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch, crash_at):
    old, new = model(0), model(1)
    checkpoint.save_checkpoint(tmp_path / "last", old, CONFIG, {"iter": 1}, {"iter": 1})

    class Crash(Exception):
        pass

    def crash(*args, **kwargs):
        raise Crash

    if crash_at == "weights":
        monkeypatch.setattr(checkpoint, "save_file", crash)
    elif crash_at == "state":
        monkeypatch.setattr(checkpoint.torch, "save", crash)
    else:
        real, calls = os.replace, []

        def replace(src, dst):
            calls.append(src)
            if len(calls) == (1 if crash_at == "first_rename" else 2):
                raise Crash
            real(src, dst)

        monkeypatch.setattr(checkpoint.os, "replace", replace)
    with pytest.raises(Crash):
        checkpoint.save_checkpoint(tmp_path / "last", new, CONFIG, {"iter": 2}, {"iter": 2})
    monkeypatch.undo()

    found = checkpoint.find(tmp_path / "last")
    assert checkpoint.read_info(found)["iter"] == 1 and checkpoint.load_state(found)["iter"] == 1
    assert same_weights(checkpoint.load_model(tmp_path)[0], old)  # the run directory resolves to it
    checkpoint.save_checkpoint(tmp_path / "last", new, CONFIG, {"iter": 2}, {"iter": 2})  # and saving recovers
    assert sorted(os.listdir(tmp_path)) == ["last"]
    assert same_weights(checkpoint.load_model(tmp_path / "last")[0], new)


def test_state_is_loaded_without_unpickling_code(tmp_path):
    checkpoint.save_checkpoint(tmp_path / "last", model(0), CONFIG, {"iter": 1}, {"iter": 1})
    torch.save({"iter": 1, "evil": ModelConfig()}, tmp_path / "last" / checkpoint.STATE)  # an arbitrary object
    with pytest.raises(CheckpointError, match=r"pickled code or objects \(nrgpt.config.ModelConfig\)") as e:
        checkpoint.load_state(tmp_path / "last")
    assert "weights_only" not in str(e.value) and "\n" not in str(e.value)  # no advice to load it unsafely


def test_resolve_prefers_best_and_falls_back(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.resolve(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        checkpoint.resolve(tmp_path)
    checkpoint.save_checkpoint(tmp_path / "last", model(0), CONFIG, {"iter": 2})
    assert checkpoint.resolve(tmp_path) == tmp_path / "last"
    checkpoint.save_checkpoint(tmp_path / "best", model(1), CONFIG, {"iter": 1})
    assert checkpoint.resolve(tmp_path) == tmp_path / "best"
    assert checkpoint.resolve(tmp_path, "last") == tmp_path / "last"
    (tmp_path / "best" / checkpoint.WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="cannot be read"):
        checkpoint.load_model(tmp_path)
