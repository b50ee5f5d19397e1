"""Causal softmax attention spelled out in blocks of query rows, with its backward written by hand.

For queries q_A, keys k_B and values v_B (per batch row and head), a scale c and the strict (B < A) or
inclusive (B <= A) causal mask,

    S = c q k^T + M,   P = softmax_rows(S),   O = P v           (M: 0 where B is visible to A, -inf elsewhere)

and for an upstream gradient dO, with D_A = sum_B P_AB dP_AB (softmax's backward),

    dP = dO v^T,   dS = P * (dP - D),   dq = c dS k,   dk = c dS^T q,   dv = P^T dO.

The rows are taken in blocks of ``block_rows``: block [r0, r1) needs only keys 0 .. r1-1, so the masked
upper triangle is mostly never computed (at 4 blocks 62.5% of the T x T square, against 100% for one
dense product). Each block is two batched products forward and four backward, and P, the only T x T
tensor, is kept for the backward. On a CPU this runs 1.3-2x faster than ``scaled_dot_product_attention``'s
flash kernel forward + backward in float32 and bfloat16 at the paper's shapes (docs/performance.md); on
a GPU the fused kernels are faster and ``layers.causal_attention`` keeps them.

Dropout on the attention weights is applied as in the reference: O = (P * R / (1 - p)) v with R a
Bernoulli(1 - p) mask, kept for the backward. A row with no visible key (the first token under the
strict mask) gets zeros, as in ``layers.causal_attention``.
"""

from __future__ import annotations

import torch


def block_bounds(t: int, block_rows: int) -> list[tuple[int, int]]:
    """Row blocks [r0, r1) covering 0 .. t-1, each of ``block_rows`` rows except perhaps the last."""
    return [(r0, min(r0 + block_rows, t)) for r0 in range(0, t, block_rows)]


def _block_rows(t: int) -> int:
    """64 rows (4 blocks at the paper's context 256), 1/8 of the context from 512 on: measured on CPUs."""
    return max(64, t // 8)


def _mask_bias(t: int, strict: bool, like: torch.Tensor) -> torch.Tensor:
    """M of the module docstring, (t, t). Under the strict mask row 0 sees key 0 here (its weights
    are zeroed after the softmax) so that no row is all -inf."""
    bias = torch.full((t, t), float("-inf"), dtype=like.dtype, device=like.device)
    bias.triu_(0 if strict else 1)
    if strict:
        bias[0, 0] = 0.0
    return bias


class CausalAttention(torch.autograd.Function):
    """O = softmax(c q k^T + M) v on (N, T, d) tensors (N = batch x heads), in row blocks."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, strict: bool, scale: float,
                dropout: float) -> torch.Tensor:
        t = q.shape[-2]
        bias = _mask_bias(t, strict, q)
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        saved = []
        for r0, r1 in block_bounds(t, _block_rows(t)):
            p = torch.softmax(torch.baddbmm(bias[r0:r1, :r1], q[:, r0:r1], k[:, :r1].mT, alpha=scale), dim=-1)
            if strict and r0 == 0:
                p[:, 0].zero_()
            if dropout > 0:
                keep = torch.rand(p.shape, device=p.device) >= dropout
                out[:, r0:r1] = torch.bmm(p * keep / (1.0 - dropout), v[:, :r1])
                saved += [p, keep]
            else:
                torch.bmm(p, v[:, :r1], out=out[:, r0:r1])
                saved.append(p)
        ctx.strict, ctx.scale, ctx.dropout, ctx.same_kv = strict, scale, dropout, v is k
        ctx.save_for_backward(q, k, v, *saved)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, k, v, *saved = ctx.saved_tensors
        grad = grad.contiguous()
        t, p_drop = q.shape[-2], ctx.dropout
        dq, dk = torch.empty_like(q), torch.zeros_like(k)
        dv = dk if ctx.same_kv else torch.zeros_like(v)
        per_block = 2 if p_drop > 0 else 1
        for i, (r0, r1) in enumerate(block_bounds(t, _block_rows(t))):
            p = saved[per_block * i]
            do = grad[:, r0:r1]
            dp = torch.bmm(do, v[:, :r1].mT)
            if p_drop > 0:
                keep = saved[per_block * i + 1]
                dp.mul_(keep).div_(1.0 - p_drop)
                dv[:, :r1].baddbmm_((p * keep / (1.0 - p_drop)).mT, do)
            else:
                dv[:, :r1].baddbmm_(p.mT, do)
            ds = torch._softmax_backward_data(dp, p, -1, p.dtype)
            torch.bmm(ds, k[:, :r1], out=dq[:, r0:r1])
            dk[:, :r1].baddbmm_(ds.mT, q[:, r0:r1], alpha=ctx.scale)
        dq.mul_(ctx.scale)
        return dq, dk, None if ctx.same_kv else dv, None, None, None


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype x's products run in: autocast's where it is on for x's device, else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def explicit_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, strict: bool, scale: float,
                              dropout: float = 0.0) -> torch.Tensor:
    """softmax(scale q k^T + M) v for (B, H, T, d) tensors of one length T (training, prefill), in
    ``compute_dtype(q)``; forward and backward see that one dtype, as under autocast's own kernels."""
    b, h, t, _ = q.shape
    rows, dtype = b * h, compute_dtype(q)

    def flat(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(rows, t, x.shape[-1]).to(dtype)

    kf = flat(k)
    vf = kf if v is k else flat(v)
    with torch.autocast(q.device.type, enabled=False):
        out = CausalAttention.apply(flat(q), kf, vf, strict, scale, dropout)
    return out.view(b, h, t, v.shape[-1])
