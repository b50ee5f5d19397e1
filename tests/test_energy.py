"""The closed-form energy gradient against autograd of the energy, in float64."""

from __future__ import annotations

import itertools

import pytest
import torch

from nrgpt import EnergyBlock, ModelConfig
from nrgpt.config import NORMS

from .conftest import randomize

B, T, D, H = 2, 5, 8, 2
FF_ENERGIES = ("ff1", "ff2w", "ff2", "dam", "glu", "glu_step")  # the built-in ones


def per_token_partials(block: EnergyBlock, g: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
    """dE_A/dg_A with every other token (and the FF conditioning) held fixed: the diagonal blocks of the
    Jacobian of E."""
    jac = torch.autograd.functional.jacobian(lambda z: block.energy(z, cond=cond)[0], g)  # (B, T, B, T, D)
    idx_b, idx_t = torch.arange(B)[:, None], torch.arange(T)[None, :]
    return jac[idx_b, idx_t, idx_b, idx_t]


def make_block(**kw) -> EnergyBlock:
    cfg = ModelConfig(n_embd=D, n_head=H, block_size=T, n_steps=3, ff_mult=2, **kw)
    return randomize(EnergyBlock(cfg).double(), std=0.4).eval()


def random_g(block: EnergyBlock, seed: int = 1) -> torch.Tensor:
    x = torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 1.5
    return block.norm(x).detach()


@pytest.mark.parametrize(
    "attention,mask,ff,norm",
    list(itertools.product(("lowrank", "full", "diag_lowrank", "none"), ("strict", "inclusive"), FF_ENERGIES, NORMS)),
)
def test_energy_grad_matches_autograd(attention, mask, ff, norm):
    block = make_block(attention=attention, mask=mask, ff=ff, norm=norm, grad_mode="exact",
                       eta="identity", ff_scale=True)
    g = random_g(block)
    cond = random_g(block, seed=2) if block.ff.conditioning else None  # held fixed
    with torch.no_grad():
        closed = block.energy_grad(g, cond=cond)
    expected = per_token_partials(block, g, cond)
    rel = (closed - expected).norm() / expected.norm()
    assert rel < 1e-9, f"relative error {rel:.2e}"


@pytest.mark.parametrize("attention", ["lowrank", "full"])
def test_reference_grad_omits_exactly_the_key_side_self_term(attention):
    exact = make_block(attention=attention, mask="inclusive", grad_mode="exact")
    ref = make_block(attention=attention, mask="inclusive", grad_mode="reference")
    ref.load_state_dict(exact.state_dict())
    g = random_g(exact)
    attn = exact.attn
    q, k = attn.queries(g), attn.keys(g)
    p = torch.softmax((q @ k.transpose(-1, -2) * attn.beta).masked_fill(~attn.visibility(g, k), float("-inf")), -1)
    p_self = p.diagonal(dim1=-2, dim2=-1)  # p_AA, (B, H, T)
    b, t = g.shape[:2]
    if attention == "lowrank":
        w_k = attn.key.view(H, D // H, D)  # K_h
        self_term = torch.einsum("bhte,hed,h->btd", q * p_self[..., None], w_k, attn.alpha)
    else:
        w_h = attn.key.view(H, D, D)  # H_h; K_h^T q = H_h^T g_A
        self_term = torch.einsum("bhte,hed->btd", q * p_self[..., None], w_h)
    with torch.no_grad():
        diff = ref.energy_grad(g) - exact.energy_grad(g)
    torch.testing.assert_close(diff, self_term.detach(), rtol=1e-10, atol=1e-12)
    assert self_term.abs().max() > 1e-3  # the omitted term is not negligible here


def test_strict_mask_first_token_has_no_attention():
    block = make_block(attention="lowrank", mask="strict", ff="ff1", norm="layernorm", grad_mode="exact")
    g = random_g(block)
    with torch.no_grad():
        _, e_att, _ = block.energy(g)
        grad_att = block.attn.grad(g, block.attn.keys(g))
    assert torch.all(e_att[:, 0] == 0)
    assert torch.all(grad_att[:, 0] == 0)
    assert torch.all(e_att[:, 1:] != 0)


def test_attention_energy_by_hand():
    """One head, full form, two tokens, inclusive: E_2 = -log(exp(g2.H g1) + exp(g2.H g2))."""
    block = make_block(attention="full", mask="inclusive", ff="ff1", norm="none")
    block.attn.key.data = torch.randn(H * D, D, dtype=torch.float64) * 0.3
    g = torch.randn(1, 2, D, dtype=torch.float64)
    e = block.attn.energy(g, block.attn.keys(g))
    hs = block.attn.key.view(H, D, D)
    s = lambda a, b_, h: g[0, a] @ hs[h] @ g[0, b_]  # noqa: E731
    e1 = -sum(s(0, 0, h) for h in range(H))
    e2 = -sum(torch.logsumexp(torch.stack([s(1, 0, h), s(1, 1, h)]), 0) for h in range(H))
    torch.testing.assert_close(e[0], torch.stack([e1, e2]))


def test_ff_energies_by_hand():
    """ff2w at a point where everything is explicit: W1 = I-ish, small dims."""
    cfg = ModelConfig(n_embd=2, n_head=1, ff_mult=1, ff="ff2w", attention="none", ff_scale=False)
    block = EnergyBlock(cfg).double()
    with torch.no_grad():
        block.ff.fc1.weight.copy_(torch.eye(2))
        block.ff.fc1.bias.zero_()
        block.ff.fc2.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 3.0]]))
        block.ff.fc2.bias.copy_(torch.tensor([1.0, -1.0]))
    g = torch.tensor([[[1.0, -1.0]]], dtype=torch.float64)
    gelu = lambda z: z * 0.5 * (1 + torch.erf(torch.tensor(z) / 2**0.5))  # noqa: E731
    expected = -(1.0 * (2 * gelu(1.0) + 1) + (-1.0) * (3 * gelu(-1.0) - 1))
    torch.testing.assert_close(block.energy(g)[0][0, 0], expected.double())


@pytest.mark.parametrize("attention", ["lowrank", "full"])
@pytest.mark.parametrize("mask,grad_mode", [("strict", "exact"), ("inclusive", "reference"), ("strict", "reference")])
@pytest.mark.parametrize("ff", FF_ENERGIES[:4])
def test_autograd_path_equals_closed_form(attention, mask, grad_mode, ff):
    block = make_block(attention=attention, mask=mask, ff=ff, norm="bare_layernorm", grad_mode=grad_mode)
    g = random_g(block)
    torch.testing.assert_close(block.energy_grad_autograd(g), block.energy_grad(g), rtol=1e-10, atol=1e-12)


def test_autograd_path_refuses_the_exact_inclusive_gradient():
    block = make_block(attention="full", mask="inclusive", grad_mode="exact")
    with pytest.raises(ValueError, match="self term"):
        block.energy_grad_autograd(random_g(block))


@pytest.mark.parametrize("preset", ["NRGPT_H_FF2W", "NRGPT_H_FF1", "NRGPT_H_FF2", "NRGPT_P_FF2W", "NRGPT_P_DAM"])
def test_training_gradients_through_closed_form_equal_double_autograd(preset):
    """Backward through the closed-form update equals backward through autograd-of-the-energy."""
    from nrgpt import ModelConfig, build_model

    cfg = ModelConfig.preset(preset, vocab_size=9, block_size=6, n_embd=8, n_head=2, n_steps=2)
    model = randomize(build_model(cfg).double(), std=0.3)
    idx = torch.randint(0, 9, (2, 6))
    grads = []
    for path in ("closed", "autograd"):
        if path == "autograd":
            model.block.energy_grad = lambda g, cache=None, step=0, cond=None: model.block.energy_grad_autograd(g, cond)
        model.zero_grad()
        model(idx, targets=idx)[1].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-9, atol=1e-12, msg=name)
