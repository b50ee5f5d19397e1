"""Energies as parts: the registry, check_energy on every energy, user-defined energies end to end, the
variants after NRGPT, and the one descent loop."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nrgpt
from nrgpt import ConfigError, ModelConfig, build_model
from nrgpt.energies import ATTENTION_ENERGIES, FF_ENERGIES, AttentionEnergy, FFEnergy, register_energy
from nrgpt.energies.feedforward import gelu_integral
from nrgpt.testing import check_energy

from .conftest import randomize

BUILTIN_FF = ("ff1", "ff2w", "ff2", "dam", "glu", "glu_step")
BUILTIN_ATTENTION = ("lowrank", "full", "diag_lowrank", "none")
VARIANTS = ("NRGPT_P_DLR", "NRGPT_P_GLU", "NRGPT_P_GLU_STEP", "NRGPT_P_PRECOND", "NRGPT_P_REC")
SMALL = dict(vocab_size=11, block_size=8, n_embd=16, n_head=2, n_steps=3)


# ------------------------------------------------------------------------------- user-defined energies
# The docs/model.md examples: a log-cosh FF energy with and without its closed form, and an attention
# energy without one.


@register_energy("logcosh")
class LogCosh(FFEnergy):
    """E_A = -sum_i log cosh(w_i . g_A + b_i); dE/dg = -W^T tanh(W g + b)."""

    def __init__(self, config):
        super().__init__(config)
        self.fc = nn.Linear(self.dim, self.hidden)

    def energy(self, g):
        h = self.fc(g)
        return -(F.softplus(2 * h) - h - math.log(2)).sum(-1)  # log cosh h, overflow-free

    def grad(self, g):
        return -(torch.tanh(self.fc(g)) @ self.fc.weight)


@register_energy("logcosh_autograd")
class LogCoshAutograd(LogCosh):
    grad = FFEnergy.grad  # no closed form: autograd of energy


@register_energy("dot_autograd")
class DotAttention(AttentionEnergy):
    """E_A = -log sum_{B visible} exp(g_A . W g_B), one head, no closed form."""

    def __init__(self, config):
        super().__init__(config)
        self.w = nn.Linear(self.dim, self.dim, bias=False)

    def keys(self, g):
        return self.w(g).unsqueeze(1)  # (B, 1, T, D)

    def energy(self, g, keys, visible=None):
        s = g.unsqueeze(1) @ keys.transpose(-1, -2)
        return -self.logsumexp(s, self.visibility(g, keys, visible)).sum(1)


@register_energy("wrong_grad")
class WrongGrad(LogCosh):
    def grad(self, g):
        return 2 * super().grad(g)


@register_energy("peeks_ahead")
class PeeksAhead(DotAttention):
    def keys(self, g):  # token B's key depends on the next token: not causal
        return self.w(g.roll(-2, dims=1)).unsqueeze(1)


# ------------------------------------------------------------------------------------------- registry


def test_registry_lists_built_in_and_user_energies_and_config_selects_them():
    assert set(BUILTIN_FF) | {"logcosh"} <= set(FF_ENERGIES)
    assert set(BUILTIN_ATTENTION) - {"none"} <= set(ATTENTION_ENERGIES)
    with pytest.raises(ConfigError, match=r"model.ff = 'nope'.*ff2w.*logcosh"):
        ModelConfig(ff="nope")
    with pytest.raises(ConfigError, match=r"model.attention = 'nope'.*diag_lowrank.*none"):
        ModelConfig(attention="nope")
    model = build_model(ModelConfig.preset("NRGPT_P_FF2W", ff="logcosh", attention="dot_autograd", **SMALL))
    assert isinstance(model.block.ff, LogCosh) and isinstance(model.block.attn, DotAttention)
    assert nrgpt.register_energy is register_energy


def test_register_energy_rejects_what_it_cannot_register():
    with pytest.raises(TypeError, match="FFEnergy or AttentionEnergy"):
        register_energy("plain")(nn.Linear)
    with pytest.raises(ValueError, match="reserved"):
        register_energy("none")(DotAttention)
    with pytest.raises(ValueError, match="identifier"):
        register_energy("two words")
    with pytest.raises(ValueError, match="'ff2w' is a built-in energy"):
        register_energy("ff2w")(LogCosh)


def test_attention_without_closed_form_needs_the_query_side_gradient():
    with pytest.raises(ConfigError, match="no closed-form grad.*mask = 'strict'"):
        ModelConfig.preset("NRGPT_P_FF2W", attention="dot_autograd", mask="inclusive", grad_mode="exact")
    ModelConfig.preset("NRGPT_P_FF2W", attention="dot_autograd", mask="inclusive", grad_mode="reference")


# ---------------------------------------------------------------------------------------- check_energy


@pytest.mark.parametrize("attention,ff,mask,grad_mode", [
    *((a, f, "strict", "exact") for a in BUILTIN_ATTENTION for f in BUILTIN_FF),
    *((a, f, "inclusive", m) for a in BUILTIN_ATTENTION for f in ("ff2w", "glu_step") for m in ("exact", "reference")),
])
def test_check_energy_passes_on_every_built_in_energy(attention, ff, mask, grad_mode):
    report = check_energy(ModelConfig.preset("NRGPT_P_FF2W", attention=attention, ff=ff, mask=mask,
                                             grad_mode=grad_mode))
    for checked in ("closed form", "causality", "descent", "cached decoding"):
        assert checked in report


@pytest.mark.parametrize("preset", [*VARIANTS, "NRGPT_H_FF2W", "NRGPT_H_FF1", "NRGPT_H_FF2", "NRGPT_P_PSD"])
def test_check_energy_passes_on_every_preset(preset):
    report = check_energy(ModelConfig.preset(preset))
    assert "relative error" in report and "every own move lowers E_A" in report


def test_check_energy_on_user_energies_with_and_without_closed_form():
    closed = check_energy(ModelConfig.preset("NRGPT_P_FF2W", ff="logcosh"))
    assert "ff 'logcosh' grad = autograd of energy" in closed
    fallback = check_energy(ModelConfig.preset("NRGPT_P_FF2W", ff="logcosh_autograd", attention="dot_autograd"))
    assert "ff 'logcosh_autograd' has none" in fallback and "attention 'dot_autograd' has none" in fallback
    reference = check_energy(ModelConfig.preset("NRGPT_H_FF2W", attention="dot_autograd"))  # inclusive, reference
    assert "mask 'strict'" in reference  # descent is checked where autograd gives the exact gradient


def test_check_energy_names_a_wrong_closed_form_and_by_how_much():
    with pytest.raises(AssertionError, match=r"closed form failed: ff energy 'wrong_grad'.*relative error of 1\.0"):
        check_energy(ModelConfig.preset("NRGPT_P_FF2W", ff="wrong_grad"))


def test_check_energy_catches_an_energy_that_sees_later_tokens():
    with pytest.raises(AssertionError, match="causality failed: changing a token changed earlier"):
        check_energy(ModelConfig.preset("NRGPT_P_FF2W", attention="peeks_ahead"))


def test_check_energy_catches_a_step_too_large_for_descent(monkeypatch):
    """The descent check can fail: with c = 1e3 instead of 1e-3 the own moves overshoot."""
    monkeypatch.setattr(ModelConfig, "replace", _scaled_eta_replace(ModelConfig.replace))
    with pytest.raises(AssertionError, match="per-token descent failed.*raised its energy by"):
        check_energy(ModelConfig.preset("NRGPT_P_FF2W"))


def _scaled_eta_replace(replace):
    def scaled(self, **overrides):
        if overrides.get("eta_init") == 1e-3:
            overrides["eta_init"] = 1e3
        return replace(self, **overrides)

    return scaled


# ------------------------------------------------------------------ a user's energy: train, decode, record


def _tiny_dataset(path):
    from nrgpt.data import prepare_shakespeare_char

    source = path.with_suffix(".txt")
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_text(("to be or not to be that is the question\n" * 200), encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "not the usual Tiny Shakespeare"
        return prepare_shakespeare_char(path, source=source)


@pytest.mark.parametrize("ff,attention", [("logcosh", "lowrank"), ("logcosh_autograd", "dot_autograd")])
def test_a_user_energy_trains_decodes_and_records_dynamics(tmp_path, ff, attention):
    from nrgpt.checkpoint import load_model
    from nrgpt.decoding import greedy_continuations
    from nrgpt.dynamics import EarlyExit, evaluate_early_exit, record_dynamics, summarize_dynamics
    from nrgpt.runconfig import resolve_config
    from nrgpt.train import train

    data = _tiny_dataset(tmp_path / "data")
    config = resolve_config(None, [
        "model.preset=NRGPT_P_FF2W", f"model.ff={ff}", f"model.attention={attention}", "model.n_embd=16",
        "model.n_head=1", "model.n_steps=2", "model.block_size=16", "train.batch_size=8", "train.max_iters=30",
        "train.warmup_iters=2", "train.lr=1e-2", "train.min_lr=1e-3", "train.eval_interval=15", "train.eval_iters=2",
        "log.interval=5", "log.progress=false", "system.device=cpu", f"data.dir={data}", f"out_dir={tmp_path / 'run'}",
    ])
    result = train(config, quiet=True)
    model, _ = load_model(tmp_path / "run")
    assert result["status"] == "finished" and result["best_val_loss"] < math.log(model.config.vocab_size) - 0.5
    assert type(model.block.ff).name == ff
    prompt = torch.tensor([[1, 2, 3]])
    cached = model.generate(prompt, 20, greedy=True)  # past the block of 16: the window slides
    assert torch.equal(cached, model.generate(prompt, 20, greedy=True, use_cache=False))
    # batched greedy decoding (ListOps evaluation) and early exit, which run without a graph, too
    assert model.grads_by_autograd == (ff == "logcosh_autograd")  # decoding then runs under no_grad
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8]]
    continued = greedy_continuations(model, prompts, eos_id=None, max_new_tokens=4, batch_size=2)
    assert continued == [model.generate(torch.tensor([p]), 4, greedy=True)[0, len(p):].tolist() for p in prompts]
    batches = [(torch.tensor([[1, 2, 3, 4]]), torch.tensor([[2, 3, 4, 5]]))]
    assert evaluate_early_exit(EarlyExit(model, tol=0.0), batches)["avg_steps"] == model.config.n_steps
    dyn = record_dynamics(model.double(), torch.randint(0, model.config.vocab_size, (2, 16)), n_steps=6)
    assert dyn.energy.shape == (7, 2, 16) and dyn.own_move_change.shape == (6, 2, 16)
    assert summarize_dynamics(dyn)["steps"] == 6


# ----------------------------------------------------------------------------------- the variants


@pytest.mark.parametrize("preset", VARIANTS)
def test_each_variant_trains_a_few_steps(preset):
    torch.manual_seed(0)
    model = build_model(ModelConfig.preset(preset, **SMALL)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    idx = torch.randint(0, SMALL["vocab_size"], (4, SMALL["block_size"] + 1))
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = model(idx[:, :-1], idx[:, 1:])[1]
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_diag_lowrank_attention_scores_are_g_b_j_g_a_with_the_diagonal():
    cfg = ModelConfig.preset("NRGPT_P_DLR", n_embd=4, n_head=2, block_size=3)
    attn = randomize(build_model(cfg).block.attn.double(), std=0.5)
    g = torch.randn(1, 3, 4, dtype=torch.float64)
    q, k = attn.queries(g), attn.keys(g)
    wq, wk = attn.query.view(2, 2, 4), attn.key.view(2, 2, 4)
    for h in range(2):
        j = torch.diag(attn.diag[h]) + wk[h].T @ wq[h]  # J_h = diag(d_h) + W_K^T W_Q
        torch.testing.assert_close(q[0, h] @ k[0, h].T, g[0] @ j.T @ g[0].T)  # (A, B): g_B^T J_h g_A
    lowrank = build_model(cfg.replace(attention="lowrank")).block.attn.double()
    lowrank.load_state_dict({n: p for n, p in attn.state_dict().items() if n != "diag"})
    attn.diag.data.zero_()  # d = 0: the low-rank energy
    torch.testing.assert_close(attn.energy(g, attn.keys(g)), lowrank.energy(g, lowrank.keys(g)))


def test_gated_energy_by_hand():
    """F' = GELU for F(z) = ((z^2 - 1) Phi + z phi + 1/2) / 2, F(0) = 0; E = -sum_i F(w_i.g)(v_i.c + b_i)."""
    z = torch.linspace(-4, 4, 41, dtype=torch.float64, requires_grad=True)
    (dz,) = torch.autograd.grad(gelu_integral(z).sum(), z)
    torch.testing.assert_close(dz, F.gelu(z.detach()))
    assert gelu_integral(torch.zeros(1)).item() == 0.0
    cfg = ModelConfig.preset("NRGPT_P_GLU", n_embd=2, n_head=1, ff_mult=1, attention="none")
    ff = build_model(cfg).block.ff.double()
    with torch.no_grad():
        ff.up.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        ff.gate.weight.copy_(torch.tensor([[0.5, 0.0], [1.0, 1.0]]))
        ff.gate.bias.copy_(torch.tensor([0.1, -0.2]))
    g, c = torch.tensor([[[1.0, -1.0]]], dtype=torch.float64), torch.tensor([[[2.0, 3.0]]], dtype=torch.float64)
    big_f = lambda v: gelu_integral(torch.tensor(v, dtype=torch.float64))  # noqa: E731
    expected = -(big_f(1.0) * (0.5 * 2 + 0.1) + big_f(-2.0) * (2 + 3 - 0.2))
    torch.testing.assert_close(ff.energy(g, c)[0, 0], expected)


def test_gated_energy_conditioning_input_embedding_or_step_state():
    cfg = ModelConfig.preset("NRGPT_P_GLU", **SMALL)
    model = randomize(build_model(cfg).double(), std=0.2).eval()
    idx = torch.randint(0, 11, (2, 8))
    x0 = model.embed(idx)
    steps = list(model.descent(x0))
    c0 = model.block.norm(x0)
    assert all(torch.equal(s.cond, c0) for s in steps)  # 'glu': one conditioning for the whole trajectory
    step_model = build_model(cfg.replace(ff="glu_step")).double().eval()
    step_model.load_state_dict(model.state_dict())
    assert all(s.cond is s.g for s in step_model.descent(x0))  # 'glu_step': the state at the step's start


def test_lightweight_preconditioner_is_diag_softplus_plus_u_u_t_and_positive_definite():
    cfg = ModelConfig.preset("NRGPT_P_PRECOND", n_embd=6, eta_rank=2, eta_init=0.5)
    eta = build_model(cfg).block.eta
    assert eta.U.shape == (1, 6, 2)
    torch.testing.assert_close(F.softplus(eta.d[0]), torch.full((6,), 0.5))
    with torch.no_grad():
        eta.d.normal_()
        eta.U.normal_()
    m = eta.matrix()
    torch.testing.assert_close(m, torch.diag(F.softplus(eta.d[0])) + eta.U[0] @ eta.U[0].T)
    assert torch.linalg.eigvalsh(m).min() > 0


def test_recursive_blocks_apply_each_block_n_steps_times_in_turn():
    cfg = ModelConfig.preset("NRGPT_P_REC", **{**SMALL, "n_steps": 2})
    model = randomize(build_model(cfg), std=0.2).eval()
    assert len(model.blocks) == 2 and model.block is model.blocks[0]
    idx = torch.randint(0, 11, (2, 8))
    with torch.no_grad():
        x = model.embed(idx)
        for block in model.blocks:
            for t in range(2):
                x = block(x, t)
        torch.testing.assert_close(model(idx)[0], model.lm_head(model.ln_f(x)), rtol=0, atol=0)
    assert model.energy_trajectory(idx).states.shape[0] == 2 * 2 + 1


def test_weights_saved_with_one_block_at_block_load():
    model = build_model(ModelConfig.preset("NRGPT_H_FF2W", **SMALL))
    old = {k.replace("blocks.0.", "block."): v for k, v in randomize(model).state_dict().items()}
    fresh = build_model(ModelConfig.preset("NRGPT_H_FF2W", **SMALL))
    fresh.load_state_dict(old)
    torch.testing.assert_close(fresh.block.ff.fc1.weight, old["block.ff.fc1.weight"])


# ------------------------------------------------------------------------------------- the descent loop


def test_energy_trajectory_computes_each_gradient_once():
    model = randomize(build_model(ModelConfig.preset("NRGPT_P_FF2W", **SMALL)), std=0.2).eval()
    calls = []
    inner = model.block.energy_grad
    model.block.energy_grad = lambda *a, **k: calls.append(1) or inner(*a, **k)
    traj = model.energy_trajectory(torch.randint(0, 11, (2, 8)), n_steps=5)
    assert len(calls) == 5 + 1 and traj.grad_norm.shape[0] == 6  # one per step, one at the final state


def test_early_exit_is_a_tolerance_of_the_same_loop():
    model = randomize(build_model(ModelConfig.preset("NRGPT_P_FF2W", **SMALL)), std=0.2).eval()
    idx = torch.randint(0, 11, (2, 8))
    with torch.no_grad():
        logits, steps = model.run(idx, tol=0.0)
        torch.testing.assert_close(logits, model(idx)[0], rtol=0, atol=0)
        assert (steps == SMALL["n_steps"]).all()
        tol = float(model.energy_trajectory(idx).grad_norm[:-1].median())
        logits, steps = model.run(idx, tol=tol)
        block, x = model.block, model.embed(idx)  # by hand: a token stops for good at its first small gradient
        active = torch.ones(2, 8, dtype=torch.bool)
        expected = torch.zeros(2, 8, dtype=torch.long)
        for t in range(SMALL["n_steps"]):
            active &= block.energy_grad(block.norm(x)).norm(dim=-1) >= tol
            x = torch.where(active[..., None], block(x, t), x)
            expected += active
        assert torch.equal(steps, expected) and 0 < steps.sum() < steps.numel() * SMALL["n_steps"]
        torch.testing.assert_close(logits, model.lm_head(model.ln_f(x)), rtol=0, atol=0)


def test_the_user_energy_example_in_docs_model_md_runs(monkeypatch):
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "model.md").read_text(encoding="utf-8")
    code = re.search(r"```python\n(import math.*?)```", text, re.S).group(1)
    monkeypatch.setitem(FF_ENERGIES, "logcosh", LogCosh)  # restored afterwards: the example registers its own
    monkeypatch.setitem(ATTENTION_ENERGIES, "dot", DotAttention)
    namespace: dict = {}
    exec(compile(code, "docs/model.md", "exec"), namespace)
    assert isinstance(namespace["model"].block.attn, ATTENTION_ENERGIES["dot"])
    assert FF_ENERGIES["logcosh"] is not LogCosh
