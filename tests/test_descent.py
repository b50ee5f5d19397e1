"""Propositions 2.1 and 2.2, numerically.

The update is a per-token partial descent: token A moves down E_A with the other tokens held at
their step-t states. With eta = c diag(gamma) (LayerNorm, RMSNorm; Prop. 2.1) or eta = U^T U + V - V^T
(no normalisation; Prop. 2.2) and a small step, each token's own move lowers its own energy at every
step. The summed energy need not fall while earlier tokens still move (arXiv v3: "asymptotically"),
so that is not asserted; it is asserted where the tokens do not interact (no attention energy), and
for the first token, whose energy depends on no other token.
"""

from __future__ import annotations

import pytest
import torch

from nrgpt import ModelConfig, build_model

from .conftest import randomize

CASES = [
    dict(norm="layernorm", eta="descent"),
    dict(norm="rmsnorm", eta="descent"),
    dict(norm="none", eta="psd"),
]
T = 8


def model_for(case, attention="lowrank", mask="strict", ff="ff2w", seed=0, eta_init=0.02):
    cfg = ModelConfig(model="nrgpt", vocab_size=13, block_size=T, n_embd=16, n_head=2, n_steps=12,
                      attention=attention, mask=mask, ff=ff, grad_mode="exact", ff_scale=False,
                      eta_per_step=True, eta_init=eta_init, **case)
    model = randomize(build_model(cfg).double(), std=0.25, seed=seed).eval()
    with torch.no_grad():
        if case["eta"] == "descent":  # positive c per step, all small
            model.block.eta.log_c.copy_(torch.log(torch.rand(cfg.n_steps, dtype=torch.float64) * 0.02 + 1e-3))
        if case["eta"] == "psd":  # a random small U and an antisymmetric part from V
            model.block.eta.U.mul_(0.3)
            model.block.eta.V.mul_(0.05)
    return model


def own_move_changes(model, idx):
    """For every step t and token A: E_A(g^(t) with g_A <- g_A^(t+1)) - E_A(g^(t))."""
    block = model.block
    x = model.embed(idx)
    changes = []
    for t in range(model.config.n_steps):
        g = block.norm(x)
        x_next = block(x, t)
        g_next = block.norm(x_next)
        before = block.energy(g)[0]
        moved = torch.empty_like(before)
        for a in range(idx.shape[1]):
            g_a = g.clone()
            g_a[:, a] = g_next[:, a]
            moved[:, a] = block.energy(g_a)[0][:, a]
        changes.append(moved - before)
        x = x_next
    return torch.stack(changes)  # (steps, B, T)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['norm']}-{c['eta']}")
@pytest.mark.parametrize("mask", ["strict", "inclusive"])
@pytest.mark.parametrize("seed", [0, 1])
def test_each_token_descends_its_own_energy(case, mask, seed):
    model = model_for(case, mask=mask, seed=seed)
    idx = torch.randint(0, 13, (3, T), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        changes = own_move_changes(model, idx)
    assert (changes < 0).all(), f"{(changes >= 0).sum().item()} token-steps rose; max {changes.max():.3e}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['norm']}-{c['eta']}")
@pytest.mark.parametrize("mask", ["strict", "inclusive"])
def test_first_token_energy_falls_monotonically(case, mask):
    model = model_for(case, mask=mask, seed=3)
    idx = torch.randint(0, 13, (4, T), generator=torch.Generator().manual_seed(3))
    traj = model.energy_trajectory(idx, n_steps=30)
    e1 = traj.energy[:, :, 0]
    assert (e1[1:] < e1[:-1]).all()


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['norm']}-{c['eta']}")
@pytest.mark.parametrize("ff", ["ff1", "ff2w", "dam"])
def test_energy_without_attention_falls_in_total(case, ff):
    model = model_for(case, attention="none", ff=ff, seed=4)
    idx = torch.randint(0, 13, (4, T), generator=torch.Generator().manual_seed(4))
    total = model.energy_trajectory(idx, n_steps=30).energy.sum(-1)  # (steps+1, B)
    assert (total[1:] < total[:-1]).all()


def test_a_large_step_can_break_descent():
    """The propositions are first-order: they need a small step. A huge c must be able to fail,
    or the tests above could not fail either."""
    model = model_for(CASES[0], seed=0)
    with torch.no_grad():
        model.block.eta.log_c.fill_(torch.log(torch.tensor(50.0)))
    idx = torch.randint(0, 13, (3, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        changes = own_move_changes(model, idx)
    assert (changes > 0).any()
