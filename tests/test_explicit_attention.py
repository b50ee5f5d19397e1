"""The row-blocked causal attention with its hand-written backward (nrgpt.explicit_attention)."""

import pytest
import torch
import torch.nn.functional as F

from nrgpt import explicit_attention, layers
from nrgpt.explicit_attention import block_bounds, explicit_causal_attention
from nrgpt.layers import causal_attention


def dense(q, k, v, strict, scale):
    """The attention written out over the whole T x T square, differentiated by autograd."""
    t = q.shape[-2]
    visible = torch.ones(t, t, dtype=torch.bool).tril(-1 if strict else 0)
    p = torch.softmax((q @ k.mT * scale).masked_fill(~visible, float("-inf")), dim=-1)
    return torch.nan_to_num(p, nan=0.0) @ v  # the strict mask's first row sees nothing: zeros


def inputs(b, h, t, d, dv=None, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    # (B, T, H, d) transposed to (B, H, T, d), as the models' heads are: not contiguous for H > 1
    make = lambda n: torch.randn(b, t, h, n, generator=gen, dtype=dtype).transpose(1, 2).requires_grad_()  # noqa: E731
    return make(d), make(d), make(dv or d)


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 3 rows, so that short sequences cross several block edges (and end in a short one)."""
    monkeypatch.setattr(explicit_attention, "_block_rows", lambda t: 3)


def test_blocks_cover_the_rows_once():
    assert block_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert block_bounds(3, 64) == [(0, 3)]
    assert explicit_attention._block_rows(256) == 64 and explicit_attention._block_rows(1024) == 128


@pytest.mark.parametrize("strict", [False, True], ids=["inclusive", "strict"])
@pytest.mark.parametrize("shape", [(2, 1, 8, 4), (1, 2, 7, 3), (1, 1, 1, 2)],
                         ids=["one-head", "two-heads", "one-token"])
def test_values_and_gradients_match_autograd_of_the_dense_form(small_blocks, strict, shape):
    q, k, v = inputs(*shape, dv=5)
    for values in (v, k):  # separate values, and NRGPT's values = keys (one tensor, its two gradients summed)
        out = explicit_causal_attention(q, k, values, strict=strict, scale=0.7)
        want = dense(q, k, values, strict, 0.7)
        torch.testing.assert_close(out, want, rtol=0, atol=1e-13)
        up = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v), up, allow_unused=True)
        exp = torch.autograd.grad(want, (q, k, v), up, allow_unused=True)
        for a, b in zip(got, exp):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda q, k, v: explicit_causal_attention(q, k, v, strict=strict, scale=0.7),
                                    (q, k, v))


def test_the_default_blocks_agree_with_sdpa_across_a_block_edge():
    q, k, v = inputs(2, 2, 70, 4)  # blocks [0, 64) and [64, 70)
    for strict in (False, True):
        torch.testing.assert_close(explicit_causal_attention(q, k, v, strict=strict, scale=0.5),
                                   causal_attention(q, k, v, strict=strict, scale=0.5), rtol=0, atol=1e-13)


def test_dropout_drops_weights_and_its_gradient_matches_the_same_mask(small_blocks):
    q, k, v = inputs(1, 2, 7, 3, seed=1)

    def run(q, k, v):
        torch.manual_seed(5)  # the same Bernoulli masks on every call, so gradcheck sees one function
        return explicit_causal_attention(q, k, v, strict=False, scale=0.7, dropout=0.4)

    assert torch.autograd.gradcheck(run, (q, k, v))
    dropped = run(q, k, v)
    assert not torch.allclose(dropped, dense(q, k, v, False, 0.7))
    # where no weight was dropped (row 0 has one key; it is kept or zeroed), the row is scaled by 1 / 0.6
    row0 = dropped[..., 0, :] * 0.6
    kept = row0.abs().sum(-1) > 0
    torch.testing.assert_close(row0[kept], v[..., 0, :][kept])


@pytest.mark.parametrize("native", [True, False], ids=["bf16-hardware", "bf16-emulated"])
def test_bfloat16_on_a_cpu_goes_through_it_under_autocast_and_as_a_dtype_where_the_cpu_multiplies_it(
        native, monkeypatch):
    """The explicit form where the CPU multiplies bfloat16 in hardware; elsewhere (emulated bfloat16, where it
    is 1.8-2.9x slower) the flash kernel. Both give the float32 result to bfloat16's rounding."""
    monkeypatch.setattr(layers, "native_bf16_cpu", lambda: native)
    q, k, v = (x.detach().float().requires_grad_() for x in inputs(2, 2, 80, 16, seed=2))
    exact = causal_attention(q, k, k, strict=True, scale=0.25)
    up = torch.randn_like(exact)
    want = torch.autograd.grad(exact, (q, k), up)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = causal_attention(q, k, k, strict=True, scale=0.25)
    explicit = low.grad_fn.next_functions[0][0].name().startswith("CausalAttention")
    assert low.dtype == torch.bfloat16 and explicit == native
    assert (low.float() - exact).norm() <= 0.02 * exact.norm()
    for a, b in zip(torch.autograd.grad(low.float(), (q, k), up), want):
        assert a.dtype == torch.float32 and (a - b).norm() <= 0.05 * b.norm()
    as_dtype = causal_attention(q.bfloat16(), k.bfloat16(), k.bfloat16(), strict=True, scale=0.25)
    torch.testing.assert_close(as_dtype, low)
    # float32 stays on scaled_dot_product_attention, whose CPU flash kernel is as fast there
    assert "CausalAttention" not in causal_attention(q, k, k, strict=False, scale=0.25).grad_fn.name()


def test_a_float32_result_equals_sdpa_to_rounding():
    q, k, v = (x.detach().float() for x in inputs(4, 1, 256, 32, seed=3))
    torch.testing.assert_close(explicit_causal_attention(q, k, v, strict=False, scale=32 ** -0.5),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True), rtol=1e-5, atol=1e-6)
