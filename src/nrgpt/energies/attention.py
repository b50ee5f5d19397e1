"""The built-in attention energies: one log-sum-exp form (eq. 11) with three choices of J_h.

Per head h, queries q_A = Q_h g_A and keys k_B = K_h g_B give scores s_AB = beta q_A . k_B = beta g_B^T J_h g_A
with J_h = K_h^T Q_h, and

    E_A^AT = -sum_h (alpha_h / beta) log sum_{B visible to A} exp(s_AB)                               (eq. 11)
    dE_A^AT/dg_A = -sum_h alpha_h [ Q_h^T sum_B p_AB k_B  +  p_AA K_h^T q_A ],   p_AB = softmax_B(s_AB)

The second term exists only under the inclusive mask (token A is one of its own keys); grad_mode
'reference' omits it, as the reference code does. The first term is a causal attention whose values are
its keys, so all heads are one fused attention call between two matmuls.

    lowrank       Q_h = W_Q^h, K_h = W_K^h (head size D/H), beta = 1/sqrt(D/H), trained alpha_h (the paper)
    full          Q_h = I, K_h = H_h (D x D), beta = 1, no alpha (the reference code)
    diag_lowrank  J_h = diag(d_h) + W_K^hT W_Q^h: q = [W_Q^h g, d_h * g], k = [W_K^h g, g], so the full-rank
                  diagonal interaction costs D parameters per head and runs in the same fused kernel (CEM)
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import causal_attention
from .base import AttentionEnergy, register_energy


class LogSumExpAttention(AttentionEnergy):
    """E^AT of eq. 11 for maps Q_h, K_h given by a subclass (``queries``, ``keys`` and their adjoints
    sum_h Q_h^T o_h, sum_h K_h^T v_h), with its closed-form gradient."""

    beta = 1.0

    def __init__(self, config):
        super().__init__(config)
        self.register_parameter("alpha", None)  # per-head weights alpha_h where a subclass trains them

    def queries(self, g: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def query_adjoint(self, o: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def key_adjoint(self, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _split(self, y: torch.Tensor, head_dim: int) -> torch.Tensor:
        b, t, _ = y.shape
        return y.view(b, t, self.n_head, head_dim).transpose(1, 2)

    @staticmethod
    def _merge(o: torch.Tensor) -> torch.Tensor:
        """(B, H, T, d) -> (B, T, H d): per-head vectors side by side, for one matmul with stacked maps."""
        b, _, t, _ = o.shape
        return o.transpose(1, 2).reshape(b, t, -1)

    def _weighted(self, o: torch.Tensor) -> torch.Tensor:
        return o if self.alpha is None else o * self.alpha.view(1, -1, 1, 1)

    def energy(self, g: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        s = (self.queries(g) @ keys.transpose(-1, -2)) * self.beta
        lse = self.logsumexp(s, self.visibility(g, keys, visible))
        if self.alpha is not None:
            lse = lse * self.alpha.view(1, -1, 1)
        return -lse.sum(1) / self.beta

    def grad(self, g: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        """The closed form. In training, dropout (``config.dropout``) is applied to the attention weights
        and to the result, as the reference code does; in eval mode this is the exact gradient."""
        q = self.queries(g)
        p = self.dropout if self.training else 0.0
        if self.self_term:
            grad = self._grad_with_self_term(q, keys, visible, p)
        else:
            o = causal_attention(q, keys, keys, strict=self.strict, scale=self.beta, dropout=p, visible=visible)
            grad = -self.query_adjoint(self._weighted(o))
        return F.dropout(grad, p) if p > 0 else grad

    def _grad_with_self_term(self, q: torch.Tensor, k: torch.Tensor, visible: torch.Tensor | None,
                             dropout: float) -> torch.Tensor:
        """Both terms under the inclusive mask: p_AA is needed, so the weights are formed explicitly."""
        tq, tk = q.shape[-2], k.shape[-2]
        mask = self.visibility(q, k, visible)
        p = torch.softmax(((q @ k.transpose(-1, -2)) * self.beta).masked_fill(~mask, float("-inf")), dim=-1)
        if dropout > 0:
            p = F.dropout(p, dropout)
        if visible is not None:  # a static step: the query is the last visible slot
            p_self = (p * (visible & ~F.pad(visible[..., 1:], (0, 1), value=False))).sum(-1)
        else:
            p_self = p[..., torch.arange(tq, device=q.device), torch.arange(tk - tq, tk, device=q.device)]
        return -(self.query_adjoint(self._weighted(p @ k)) + self.key_adjoint(self._weighted(q * p_self[..., None])))


@register_energy("lowrank")
class LowRankAttention(LogSumExpAttention):
    """J_h = W_K^hT W_Q^h, head size D/H, beta = 1/sqrt(D/H), trained alpha_h (eq. 10-12)."""

    def __init__(self, config):
        super().__init__(config)
        d = config.n_embd
        self.head_dim = config.head_size
        self.beta = self.head_dim**-0.5
        self.query = nn.Parameter(torch.randn(d, d) * 0.02)  # rows: the heads' W_Q stacked
        self.key = nn.Parameter(torch.randn(d, d) * 0.02)  # rows: the heads' W_K stacked
        self.alpha = nn.Parameter(torch.ones(config.n_head))

    def queries(self, g: torch.Tensor) -> torch.Tensor:
        return self._split(F.linear(g, self.query), self.head_dim)

    def keys(self, g: torch.Tensor) -> torch.Tensor:
        return self._split(F.linear(g, self.key), self.head_dim)

    def query_adjoint(self, o: torch.Tensor) -> torch.Tensor:
        return self._merge(o) @ self.query

    def key_adjoint(self, v: torch.Tensor) -> torch.Tensor:
        return self._merge(v) @ self.key


@register_energy("full")
class FullAttention(LogSumExpAttention):
    """Q_h = I, K_h = H_h (D x D), beta = 1, no alpha: s_AB = g_A . H_h g_B (the reference code)."""

    def __init__(self, config):
        super().__init__(config)
        self.key = nn.Parameter(torch.randn(config.n_head * config.n_embd, config.n_embd) * 0.02)  # H_1; ...; H_H

    def queries(self, g: torch.Tensor) -> torch.Tensor:
        return g.unsqueeze(1).expand(-1, self.n_head, -1, -1)

    def keys(self, g: torch.Tensor) -> torch.Tensor:
        return self._split(F.linear(g, self.key), self.dim)

    def query_adjoint(self, o: torch.Tensor) -> torch.Tensor:
        return o.sum(1)

    def key_adjoint(self, v: torch.Tensor) -> torch.Tensor:
        return self._merge(v) @ self.key


@register_energy("diag_lowrank")
class DiagLowRankAttention(LowRankAttention):
    """J_h = diag(d_h) + W_K^hT W_Q^h: queries [W_Q^h g, d_h * g], keys [W_K^h g, g] (d_h starts at 0,
    so training starts from the low-rank energy)."""

    def __init__(self, config):
        super().__init__(config)
        self.diag = nn.Parameter(torch.zeros(config.n_head, config.n_embd))

    def queries(self, g: torch.Tensor) -> torch.Tensor:
        return torch.cat([super().queries(g), self.diag[None, :, None] * g[:, None]], dim=-1)

    def keys(self, g: torch.Tensor) -> torch.Tensor:
        return torch.cat([super().keys(g), g[:, None].expand(-1, self.n_head, -1, -1)], dim=-1)

    def query_adjoint(self, o: torch.Tensor) -> torch.Tensor:
        low, diag = o.split([self.head_dim, self.dim], dim=-1)
        return super().query_adjoint(low) + (diag * self.diag[None, :, None]).sum(1)

    def key_adjoint(self, v: torch.Tensor) -> torch.Tensor:
        low, full = v.split([self.head_dim, self.dim], dim=-1)
        return super().key_adjoint(low) + full.sum(1)
