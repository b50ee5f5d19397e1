"""The C one-token decoding step (``nrgpt.native``) against the eager descent it replaces."""

from __future__ import annotations

import warnings

import pytest
import torch

from nrgpt import ModelConfig, build_model, native
from nrgpt.decoding import KVCache

from .conftest import randomize


@pytest.fixture(autouse=True, scope="module")
def built():
    """The C step built before these tests (on a new machine its first build runs in the background)."""
    for dtype in (torch.float32, torch.float64):
        native.library(dtype, wait=True)


SMALL = dict(vocab_size=11, block_size=12, n_embd=16, n_head=2, n_steps=3)
# every part descent.c knows, each at least once, under both masks and grad modes
SERVED = [
    dict(preset="NRGPT_H_FF2W"),  # full attention, inclusive, reference, ff_scale, 'free' eta, bare LayerNorm
    dict(preset="NRGPT_H_FF2W", grad_mode="exact", eta_per_step=True),
    dict(preset="NRGPT_H_FF1", mask="strict", n_blocks=2),
    dict(preset="NRGPT_H_FF2", norm="rmsnorm"),
    dict(preset="NRGPT_P_FF2W"),  # lowrank attention with alpha, 'descent' eta, LayerNorm
    dict(preset="NRGPT_P_FF2W", mask="inclusive", grad_mode="exact", eta="diag_lowrank", eta_rank=3),
    dict(preset="NRGPT_P_FF1", mask="inclusive", grad_mode="reference", eta="identity"),
    dict(preset="NRGPT_P_DAM", attention="none"),
    dict(preset="NRGPT_P_PSD", eta_per_step=True),  # no norm, 'psd' eta
]
IDS = ["-".join(str(v) for v in s.values()) for s in SERVED]


def model_for(settings: dict, dtype: torch.dtype, seed: int = 0):
    settings = dict(settings)
    cfg = ModelConfig.preset(settings.pop("preset"), **SMALL, **settings)
    return randomize(build_model(cfg), std=0.2, seed=seed).to(dtype).eval()


def decode_steps(model, idx: torch.Tensor, prefill: int, use_native: bool):
    """Last-position logits of each one-token step after a prefill, and the cache's keys at the end."""
    was, native.enabled = native.enabled, use_native
    try:
        cache = KVCache(model.config.block_size)
        with torch.inference_mode():
            model.forward_cached(idx[:, :prefill], cache)
            logits = [model.forward_cached(idx[:, i:i + 1], cache) for i in range(prefill, idx.shape[1])]
    finally:
        native.enabled = was
    return torch.stack(logits), cache


@pytest.mark.parametrize("settings", SERVED, ids=IDS)
def test_native_step_equals_the_eager_descent_in_float64(settings):
    model = model_for(settings, torch.float64)
    assert model.native_decoding
    idx = torch.randint(0, 11, (native.MAX_BATCH, 12), generator=torch.Generator().manual_seed(1))
    eager, eager_cache = decode_steps(model, idx, 4, use_native=False)
    fast, fast_cache = decode_steps(model, idx, 4, use_native=True)
    assert fast_cache.packed is not None  # the C step ran
    assert eager_cache.packed is None
    torch.testing.assert_close(fast, eager, rtol=1e-11, atol=1e-11)
    for slot, keys in eager_cache.keys.items():  # the keys it wrote for later tokens
        torch.testing.assert_close(fast_cache.keys[slot][:, :, :12], keys[:, :, :12], rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("settings", SERVED[:2] + SERVED[4:6], ids=IDS[:2] + IDS[4:6])
def test_native_generation_gives_the_eager_tokens_in_float32(settings):
    model = model_for(settings, torch.float32, seed=2)
    prompt = torch.randint(0, 11, (2, 3), generator=torch.Generator().manual_seed(3))
    n_new = model.config.block_size + 5  # past the block: the window slides and the cache is rebuilt
    fast = model.generate(prompt, n_new, greedy=True)
    native.enabled = False
    try:
        eager = model.generate(prompt, n_new, greedy=True)
    finally:
        native.enabled = True
    assert torch.equal(fast, eager)
    idx = torch.cat([prompt, fast], 1)[:, :12]
    torch.testing.assert_close(decode_steps(model, idx, 3, True)[0], decode_steps(model, idx, 3, False)[0],
                               rtol=1e-5, atol=1e-5)


def test_native_step_sees_weights_changed_in_place():
    """The weights are read where they are: a training step between two generations is seen."""
    model = model_for(SERVED[0], torch.float64)
    idx = torch.randint(0, 11, (1, 8), generator=torch.Generator().manual_seed(4))
    before = decode_steps(model, idx, 3, True)[0]
    with torch.no_grad():
        model.blocks[0].ff.fc1.weight.mul_(1.5)
    after = decode_steps(model, idx, 3, True)[0]
    torch.testing.assert_close(after, decode_steps(model, idx, 3, False)[0], rtol=1e-11, atol=1e-11)
    assert not torch.allclose(after, before)


def test_what_native_does_not_serve_decodes_eagerly():
    diag = model_for(dict(preset="NRGPT_P_DLR"), torch.float64)  # diag_lowrank attention: not in descent.c
    glu = model_for(dict(preset="NRGPT_P_GLU"), torch.float64)
    assert not diag.native_decoding and not glu.native_decoding
    model = model_for(SERVED[0], torch.float64)
    idx = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(5))
    cache = KVCache(12)
    with torch.no_grad():
        model.forward_cached(idx[:, :3], cache)
        model.forward_cached(idx[:, 3:4], cache, n_steps=4)  # a step option: eager
        assert cache.packed is None
        model.train()
        model.forward_cached(idx[:, 4:5], cache)  # training mode (dropout): eager
        assert cache.packed is None
    model.eval()
    wide = KVCache(12)
    with torch.no_grad():
        model.forward_cached(idx[:1].expand(native.MAX_BATCH + 1, -1)[:, :3], wide)
        model.forward_cached(idx[:1].expand(native.MAX_BATCH + 1, -1)[:, 3:4], wide)  # more rows: eager
    assert wide.packed is None
    model.forward_cached(idx[:, 5:6], cache)  # and now it serves the step
    assert cache.packed is not None


def test_a_new_machine_decodes_eagerly_while_the_c_step_builds(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_libraries", {})
    monkeypatch.setattr(native, "_builds", {})
    monkeypatch.setenv("NRGPT_CACHE_DIR", str(tmp_path))  # an empty cache
    model = model_for(SERVED[0], torch.float64)
    idx = torch.randint(0, 11, (1, 7), generator=torch.Generator().manual_seed(7))
    first, cache = decode_steps(model, idx, 3, True)
    assert native.library(torch.float64, wait=True) is not None and list(tmp_path.rglob("*.so"))
    again, later = decode_steps(model, idx, 3, True)
    assert later.packed is not None  # built: the C step serves the steps now
    torch.testing.assert_close(first, again, rtol=1e-11, atol=1e-11)


def test_without_a_compiler_decoding_warns_once_and_stays_eager(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_compilers", lambda: ["/bin/false"])
    monkeypatch.setattr(native, "_libraries", {})
    monkeypatch.setattr(native, "_builds", {})
    monkeypatch.setenv("NRGPT_CACHE_DIR", str(tmp_path))
    model = model_for(SERVED[0], torch.float64)
    idx = torch.randint(0, 11, (1, 7), generator=torch.Generator().manual_seed(6))
    with pytest.warns(UserWarning, match="cannot build the C decoding step"):  # once, by this thread
        logits, cache = decode_steps(model, idx, 3, True)  # starts the build in the background; eager meanwhile
        assert native.library(torch.float64, wait=True) is None
    assert cache.packed is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = decode_steps(model, idx, 3, True)[0]
    torch.testing.assert_close(again, decode_steps(model, idx, 3, False)[0], rtol=0, atol=0)
    torch.testing.assert_close(logits, again, rtol=0, atol=0)
