"""Building blocks shared by NRGPT and the GPT baselines.

- ``Norm``: g = norm(x), eq. 17 (LayerNorm, RMSNorm), the reference code's bias-only LayerNorm, or none.
- ``InferenceRate``: the matrix eta of the update x <- x - eta dE/dg (eq. 6) in its four forms.
- ``causal_attention``: softmax attention with the strict (B < A) or inclusive (B <= A) causal mask,
  on ``scaled_dot_product_attention`` so the fused kernels are used where they exist, except for
  bfloat16 / float16 on a CPU that multiplies bfloat16 in hardware, where ``explicit_attention`` is 1.5-4x
  faster (on a CPU that emulates bfloat16 it is 1.8-2.9x slower than the flash kernel).
- ``SelfAttention``, ``MLP``, ``TransformerBlock``: the baselines' nanoGPT-style layers.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .device import native_bf16_cpu
from .explicit_attention import compute_dtype, explicit_causal_attention

if TYPE_CHECKING:
    from .decoding import KVCache

LN_EPS = 1e-5
_REDUCED = (torch.bfloat16, torch.float16)


class Norm(nn.Module):
    """g = gamma * (x - mu) / sqrt(mean((x - mu)^2) + eps) + delta (eq. 17).

    kind: 'layernorm' (mu = mean, trained gamma and delta), 'rmsnorm' (mu = 0, delta = 0, eq. 25),
    'bare_layernorm' (LayerNorm with gamma fixed at 1 as a buffer and a trained delta: the reference
    code), 'none' (g = x). ``gamma`` is diag(Gamma) of Prop. 2.1 (ones where it is not trained).
    """

    def __init__(self, kind: str, dim: int):
        super().__init__()
        self.kind, self.dim = kind, dim
        if kind in ("layernorm", "rmsnorm"):
            self.weight = nn.Parameter(torch.ones(dim))
        else:
            self.register_buffer("weight", torch.ones(dim), persistent=kind == "bare_layernorm")
        self.bias = nn.Parameter(torch.zeros(dim)) if kind in ("layernorm", "bare_layernorm") else None
        self._norm = _NORMS[kind]  # chosen here, not on every call

    @property
    def gamma(self) -> torch.Tensor:
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._norm(self, x)


def _layer_norm(n: Norm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (n.dim,), n.weight, n.bias, LN_EPS)


def _rms_norm(n: Norm, x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (n.dim,), n.weight, LN_EPS)


def _no_norm(n: Norm, x: torch.Tensor) -> torch.Tensor:
    return x


_NORMS = {"layernorm": _layer_norm, "bare_layernorm": _layer_norm, "rmsnorm": _rms_norm, "none": _no_norm}


class InferenceRate(nn.Module):
    """The inference rate eta of eq. 6, applied to a batch of energy gradients (..., D).

    kind: 'free' a trained D x D matrix (reference code; initialised N(0, 0.02) like its Linear);
    'descent' eta = c diag(gamma), c = exp(log_c) > 0 (Prop. 2.1); 'psd' eta = U^T U + V - V^T
    (Prop. 2.2, eq. 19; initialised at U = sqrt(c) I, V = 0); 'diag_lowrank' eta = diag(softplus(d)) + U U^T,
    U of rank r = ``eta_rank`` (a lightweight preconditioner: positive definite at O(D r) cost, so Prop. 2.2's
    argument applies; initialised at softplus(d) = c, U ~ N(0, 0.02)); 'identity' eta = I.
    With ``per_step`` there is one eta per step (eta^(t), leading dimension n_steps); steps beyond
    the trained number reuse the last one.
    """

    def __init__(self, config: ModelConfig, gamma_source: Norm):
        super().__init__()
        self.kind = config.eta
        self.gamma_source = [gamma_source]  # a list so the norm is not registered twice
        d, s = config.n_embd, config.n_steps if config.eta_per_step else 1
        self.n = s
        if self.kind == "free":
            self.weight = nn.Parameter(torch.randn(s, d, d) * 0.02)
        elif self.kind == "descent":
            self.log_c = nn.Parameter(torch.full((s,), math.log(config.eta_init)))
        elif self.kind == "psd":
            self.U = nn.Parameter(torch.eye(d).repeat(s, 1, 1) * math.sqrt(config.eta_init))
            self.V = nn.Parameter(torch.zeros(s, d, d))
        elif self.kind == "diag_lowrank":
            self.d = nn.Parameter(torch.full((s, d), math.log(math.expm1(config.eta_init))))  # softplus(d) = c
            self.U = nn.Parameter(torch.randn(s, d, config.eta_rank) * 0.02)
        self.apply_rate = getattr(self, "_" + self.kind)  # chosen once: eta^(t) grad for step t

    def matrix(self, step: int = 0) -> torch.Tensor:
        """eta^(step) as a D x D matrix (for analysis; ``forward`` never forms it for 'descent')."""
        d = self.gamma_source[0].dim
        gamma = self.gamma_source[0].gamma
        eye = torch.eye(d, device=gamma.device, dtype=gamma.dtype)
        return self(eye, step).T

    def forward(self, grad: torch.Tensor, step: int = 0) -> torch.Tensor:
        return self.apply_rate(grad, min(step, self.n - 1))

    def _free(self, grad: torch.Tensor, t: int) -> torch.Tensor:
        return F.linear(grad, self.weight[t])

    def _descent(self, grad: torch.Tensor, t: int) -> torch.Tensor:
        return grad * (self.log_c[t].exp() * self.gamma_source[0].gamma)

    def _psd(self, grad: torch.Tensor, t: int) -> torch.Tensor:
        u, v = self.U[t], self.V[t]
        return F.linear(grad, u.T @ u + v - v.T)

    def _diag_lowrank(self, grad: torch.Tensor, t: int) -> torch.Tensor:
        u = self.U[t]
        return grad * F.softplus(self.d[t]) + (grad @ u) @ u.T

    def _identity(self, grad: torch.Tensor, t: int) -> torch.Tensor:
        return grad


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, strict: bool, scale: float, dropout: float = 0.0,
    visible: torch.Tensor | None = None,
) -> torch.Tensor:
    """sum_B softmax_B(scale q_A.k_B) v_B over B < A (strict) or B <= A (inclusive).

    q: (B, H, Tq, d), k and v: (B, H, Tk, d) with Tk >= Tq; the queries are the last Tq tokens of
    the Tk keys. A row with no key (the first token under the strict mask) gets zeros. ``visible``
    (1, Tk): a static decoding step (see ``KVCache``), one query seeing the keys where it is True.
    """
    if visible is not None:  # spelled out: for one query, 4 small kernels beat a fused attention kernel
        s = (q @ k.transpose(-1, -2)) * scale
        return torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1) @ v
    tq, tk = q.shape[-2], k.shape[-2]
    if tq == 1:  # one new token: it sees every cached key (and itself unless strict)
        if strict:
            if tk == 1:
                return torch.zeros_like(q[..., :1].expand(*q.shape[:-1], v.shape[-1]))
            k, v = k[..., :-1, :], v[..., :-1, :]
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scale)
    if tq != tk:
        raise ValueError("prefill with a non-empty cache is not supported; reset the cache")
    if q.device.type == "cpu" and compute_dtype(q) in _REDUCED and native_bf16_cpu():
        # where the CPU multiplies bfloat16 in hardware, its flash attention is the slower one in these dtypes
        return explicit_causal_attention(q, k, v, strict=strict, scale=scale, dropout=dropout)
    if not strict:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=scale)
    # strict: token A+1 attends 0..A, i.e. an inclusive causal attention of queries 1.. on keys ..T-1;
    # the first token has no keys and gets a zero row.
    out = F.scaled_dot_product_attention(
        q[..., 1:, :], k[..., :-1, :], v[..., :-1, :], is_causal=True, dropout_p=dropout, scale=scale
    )
    return F.pad(out, (0, 0, 1, 0))


# ---------------------------------------------------------------------------------------- baselines
class SelfAttention(nn.Module):
    """Multi-head causal self-attention (inclusive mask), heads concatenated, output projection."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head, self.dropout = config.n_head, config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, slot: int = 0) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)
        visible = None
        if cache is not None:
            k, v = cache.update(slot, k, v)
            visible = cache.visible(strict=False)
        y = causal_attention(
            q, k, v, strict=False, scale=(d // self.n_head) ** -0.5,
            dropout=self.dropout if self.training else 0.0, visible=visible,
        )
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(b, t, d)))


class MLP(nn.Module):
    """Linear(D, mD) -> ReLU -> Linear(mD, D) -> dropout (the reference baselines' feed-forward)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden = config.ff_mult * config.n_embd
        self.fc = nn.Linear(config.n_embd, hidden)
        self.proj = nn.Linear(hidden, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.relu(self.fc(x))))


class TransformerBlock(nn.Module):
    """Sequential x + att(ln1 x), then + ff(ln2 x) (eq. 4); or parallel x + att(ln1 x) + ff(ln2 x) (eq. 5)."""

    def __init__(self, config: ModelConfig, parallel: bool):
        super().__init__()
        self.parallel = parallel
        self.ln1, self.ln2 = nn.LayerNorm(config.n_embd), nn.LayerNorm(config.n_embd)
        self.attn, self.mlp = SelfAttention(config), MLP(config)
        self.compiled = None  # set by compile_steps

    def compile_steps(self, **options) -> None:
        """Use ``torch.compile`` of the block for whole-sequence calls; cached decoding stays eager."""
        self.compiled = torch.compile(self.step, **options)

    def forward(self, x: torch.Tensor, slot: int = 0, cache: KVCache | None = None) -> torch.Tensor:
        if cache is None and self.compiled is not None:
            return self.compiled(x)
        return self.step(x, slot, cache)

    def step(self, x: torch.Tensor, slot: int = 0, cache: KVCache | None = None) -> torch.Tensor:
        a = self.attn(self.ln1(x), cache, slot)
        if self.parallel:
            return x + a + self.mlp(self.ln2(x))
        x = x + a
        return x + self.mlp(self.ln2(x))
