"""The hand-written backward of ``nrgpt.kernels`` against finite differences and against autograd, in float64."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from torch.func import functional_call

from nrgpt import EnergyBlock, ModelConfig, build_model, kernels

from .conftest import randomize

N, D, M = 6, 4, 8


def _params(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g, dtype=torch.float64) * 0.8).requires_grad_() for s in shapes]


# kind -> (function, parameter shapes); g is (2, 3, D)
FUNCTIONS = {
    "ff1": (kernels.ff1_grad, [(M, D), (M,)]),
    "dam": (kernels.dam_grad, [(M, D), (M,)]),
    "ff2w": (kernels.ff2w_grad, [(M, D), (M,), (D, M), (D,)]),
    "ff2": (kernels.ff2_grad, [(D, D), (D,), (M, D), (M,)]),
}


@pytest.fixture(params=[True, False], ids=["compiled", "eager"])
def fused(request, monkeypatch):
    """Run with the fused elementwise passes compiled (the default for large inputs) and eager."""
    monkeypatch.setattr(kernels.Fused, "enabled", request.param)
    monkeypatch.setattr(kernels.Fused, "min_elements", 0)
    return request.param


@pytest.mark.parametrize("kind", FUNCTIONS)
def test_gradcheck_input_and_every_parameter(kind, fused):
    fn, shapes = FUNCTIONS[kind]
    g, *params = _params((2, 3, D), *shapes)
    assert torch.autograd.gradcheck(fn, (g, *params))


def _autograd_energy(kind, g, w1, b1, w2=None, b2=None):
    """E^FF summed over tokens, written independently of the package (eq. 14, 16, 24)."""
    gelu = torch.nn.functional.gelu
    h = g @ w1.T + b1
    if kind == "ff1":
        return -gelu(h).pow(2).sum()
    if kind == "dam":
        return -0.5 * torch.relu(h).pow(2).sum()
    if kind == "ff2w":
        return -(g * (gelu(h) @ w2.T + b2)).sum()
    return -gelu(gelu(h) @ w2.T + b2).pow(2).sum()


@pytest.mark.parametrize("kind", FUNCTIONS)
def test_forward_and_backward_equal_double_autograd(kind, fused):
    """dE/dg equals autograd of the energy, and a loss of dE/dg has the same gradients as autograd's
    double backward, to float64 round-off."""
    fn, shapes = FUNCTIONS[kind]
    g, *params = _params((2, 3, D), *shapes, seed=1)
    upstream = torch.randn(2, 3, D, dtype=torch.float64)
    out = fn(g, *params)
    ref = torch.autograd.grad(_autograd_energy(kind, g, *params), g, create_graph=True)[0]
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    mine = torch.autograd.grad((out * upstream).sum(), [g, *params])
    theirs = torch.autograd.grad((ref * upstream).sum(), [g, *params])
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("kind", FUNCTIONS)
def test_without_a_graph_the_closed_form_is_the_same_gradient(kind):
    """Decoding and evaluation (no autograd graph) take ATen's closed form instead of the Functions: the
    same dE/dg to float64 round-off, and no graph attached."""
    fn, shapes = FUNCTIONS[kind]
    g, *params = _params((2, 3, D), *shapes, seed=2)
    ref = torch.autograd.grad(_autograd_energy(kind, g, *params), g)[0]
    with torch.no_grad():
        out = fn(g, *params)
    assert out.grad_fn is None and out.shape == g.shape
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


BLOCK_OPTIONS = [  # every FF kind under every norm, with the eta forms and ff_scale cycled through
    dict(ff=ff, norm=norm, eta=eta, ff_scale=scale, attention=att, mask=mask, grad_mode="exact")
    for (ff, norm), eta, scale, (att, mask) in zip(
        itertools.product(FUNCTIONS, ("layernorm", "rmsnorm", "bare_layernorm", "none")),
        itertools.cycle(("free", "descent", "psd", "identity", "descent")),
        itertools.cycle((True, False, False)),
        itertools.cycle((("full", "inclusive"), ("lowrank", "strict"), ("none", "strict"))),
    )
]


@pytest.mark.parametrize("options", BLOCK_OPTIONS, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_gradcheck_of_a_whole_step(options):
    """x -> x - eta dE/dg(norm(x)) (eq. 6): gradcheck with respect to x and every parameter of the block."""
    cfg = ModelConfig(n_embd=D, n_head=2, block_size=3, n_steps=2, ff_mult=2, eta_per_step=True, **options)
    block = randomize(EnergyBlock(cfg).double(), std=0.3)
    names = [n for n, _ in block.named_parameters()]
    x = torch.randn(2, 3, D, dtype=torch.float64, requires_grad=True)

    def step(x, *params):
        return functional_call(block, dict(zip(names, params)), (x, 1))

    assert torch.autograd.gradcheck(step, (x, *[p.detach().requires_grad_() for p in block.parameters()]))


@pytest.mark.parametrize("preset", ["NRGPT_H_FF2W", "NRGPT_H_FF1", "NRGPT_H_FF2", "NRGPT_P_DAM"])
def test_fifty_training_steps_match_the_autograd_path(preset):
    """50 AdamW steps in float64: the loss curve with the hand-written backward equals the one with
    autograd of the energy (``energy_grad_autograd``, double backward) to 1e-6. (At this size the
    fused passes run eagerly; their compiled form is checked against it above.)"""
    cfg = ModelConfig.preset(preset, vocab_size=11, block_size=8, n_embd=8, n_head=2, n_steps=3, mask="strict")
    torch.manual_seed(0)
    models = [build_model(cfg).double() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    block = models[1].block
    block.energy_grad = lambda g, cache=None, step=0, cond=None: block.energy_grad_autograd(g, cond)
    data = torch.randint(0, 11, (4, 9), generator=torch.Generator().manual_seed(0))
    curves = []
    for model in models:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        curve = []
        for _ in range(50):
            opt.zero_grad(set_to_none=True)
            loss = model(data[:, :-1], data[:, 1:])[1]
            loss.backward()
            opt.step()
            curve.append(loss.item())
        curves.append(torch.tensor(curve, dtype=torch.float64))
    assert curves[0][-1] < curves[0][0] - 0.1  # it trains
    assert (curves[0] - curves[1]).abs().max() < 1e-6


def test_failed_compilation_falls_back_to_eager_with_one_warning(monkeypatch):
    monkeypatch.setattr(kernels.Fused, "min_elements", 0)

    def broken_compile(fn, **kw):
        def run(*args):
            raise RuntimeError("no C++ compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    fused = kernels.Fused(kernels._ff1_forward)
    z, b = torch.randn(5, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    with pytest.warns(UserWarning, match="running its elementwise work eagerly"):
        first = fused(z, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = fused(z, b)
    torch.testing.assert_close(first, kernels._ff1_forward(z, b), rtol=0, atol=0)
    torch.testing.assert_close(second, first, rtol=0, atol=0)


def test_compiled_elementwise_pass_does_not_recompile_per_call_or_shape(monkeypatch):
    from torch._dynamo.utils import counters

    monkeypatch.setattr(kernels.Fused, "min_elements", 0)
    fused = kernels.Fused(kernels._ff2w_backward)
    b = torch.randn(8)
    compiles = []
    for n in (5, 7, 9, 11, 13, 64):
        before = counters["stats"]["unique_graphs"]
        for _ in range(2):
            fused(torch.randn(n, 16), b, torch.randn(n, 16))
        compiles.append(counters["stats"]["unique_graphs"] - before)
    assert sum(compiles) <= 2, compiles  # one static graph for the first shape, one dynamic for the rest
    assert compiles[2:] == [0, 0, 0, 0], compiles


@pytest.mark.parametrize("kind", FUNCTIONS)
def test_under_autocast_the_gradients_are_float32_and_close(kind):
    """bf16 autocast (the GPU training path; here its CPU twin): the backward runs outside autocast, so
    the Function keeps one dtype for both directions; the gradients come back float32, close to float32's."""
    fn, shapes = FUNCTIONS[kind]
    g, *params = (p.detach().float().requires_grad_() for p in _params((4, 16, D), *shapes, seed=2))
    exact = torch.autograd.grad(fn(g, *params).square().sum(), [g, *params])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fn(g, *params)
    assert out.dtype == torch.bfloat16
    low = torch.autograd.grad(out.float().square().sum(), [g, *params])
    for a, b in zip(low, exact):
        assert a.dtype == torch.float32
        assert (a - b).norm() <= 0.05 * b.norm()


def test_small_cpu_gelus_run_with_onednn_off_and_the_flag_comes_back():
    state = lambda h: torch.tensor(torch.backends.mkldnn.enabled)  # noqa: E731 - what the call saw
    small, large = torch.randn(4, 64), torch.randn(kernels.Fused.min_elements)
    assert not kernels._aten(state, small) and kernels._aten(state, large)
    assert torch.backends.mkldnn.enabled

    def fails(h):
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        kernels._aten(fails, small)
    assert torch.backends.mkldnn.enabled
    h, v = torch.randn(3, 512), torch.randn(3, 512)  # ATen's kernel and oneDNN's agree to float32 rounding
    torch.testing.assert_close(kernels.gelu(h), torch.nn.functional.gelu(h), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kernels._aten_gelu_backward(v, h), torch.ops.aten.gelu_backward(v, h),
                               rtol=1e-6, atol=1e-6)
