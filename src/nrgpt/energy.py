"""NRGPT's energy and its closed-form gradient: the whole model in one block.

Token A's energy is E_A = E_A^AT + s E_A^FF (eq. 7; s = 1 unless ``ff_scale``), a function of the
normalised states g = norm(x). One step of inference moves every token down its own energy,

    x_A <- x_A - eta dE_A/dg_A                                                     (eq. 6)

where the derivative is the per-token partial one: the other tokens are held fixed. Because E_A
only involves tokens B <= A, no token ever sees a later one.

Attention energy (eq. 11), per head h with query map Q_h and key map K_h, scores
s_AB = beta (Q_h g_A) . (K_h g_B):

    E_A^AT = -sum_h (alpha_h / beta) log sum_{B < A (or <= A)} exp(s_AB)
    dE_A^AT/dg_A = -sum_h alpha_h [ Q_h^T sum_B p_AB K_h g_B  +  p_AA K_h^T Q_h g_A ]

with p_AB = softmax_B(s_AB). The second term exists only under the inclusive mask (B = A is a
key as well as the query). 'lowrank': Q_h = W_Q^h, K_h = W_K^h (head size D/H), so
J_h = W_K^T W_Q and beta = 1/sqrt(D/H), trained alpha_h (the paper). 'full': Q_h = I,
K_h = H_h (D x D), beta = 1, alpha_h = 1 (the reference code, whose update drops the p_AA term:
``grad_mode='reference'``).

Feed-forward energies (eq. 14, 24), h = W1 g + b1, sigma = exact GELU:

    ff1   E = -||sigma(h)||^2                      dE/dg = -2 W1^T (sigma(h) * sigma'(h))
    ff2w  E = -g . (W2 sigma(h) + b2)              dE/dg = -(W2 sigma(h) + b2) - W1^T (sigma'(h) * W2^T g)
    ff2   E = -||sigma(W2 sigma(h) + b2)||^2       dE/dg = -2 W1^T (sigma'(h) * W2^T (sigma(u) * sigma'(u)))
          (u = W2 sigma(h) + b2; W1 is D x D, W2 is mD x D)
    dam   E = -sum F(h), F = ReLU^2 / 2 (eq. 16)   dE/dg = -W1^T ReLU(h)
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels
from .config import ModelConfig
from .layers import InferenceRate, KVCache, Norm, causal_attention


class AttentionEnergy(nn.Module):
    """E^AT of eq. 11 and its per-token gradient, all heads in one matmul."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.form, self.n_head, self.dim = config.attention, config.n_head, config.n_embd
        self.strict = config.mask == "strict"
        self.self_term = config.mask == "inclusive" and config.grad_mode == "exact"
        self.dropout = config.dropout
        d = config.n_embd
        if self.form == "lowrank":
            self.head_dim = config.head_size
            self.beta = self.head_dim**-0.5
            self.query = nn.Parameter(torch.randn(d, d) * 0.02)  # rows: heads' W_Q stacked
            self.key = nn.Parameter(torch.randn(d, d) * 0.02)  # rows: heads' W_K stacked
            self.alpha = nn.Parameter(torch.ones(config.n_head))
        else:
            self.head_dim, self.beta = d, 1.0
            self.key = nn.Parameter(torch.randn(config.n_head * d, d) * 0.02)  # H_1; ...; H_H

    def _split(self, y: torch.Tensor) -> torch.Tensor:
        b, t, _ = y.shape
        return y.view(b, t, self.n_head, self.head_dim).transpose(1, 2)

    def queries_keys(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q_A = Q_h g_A and k_B = K_h g_B, each (B, H, T, head_dim)."""
        k = self._split(g @ self.key.T)
        if self.form == "lowrank":
            return self._split(g @ self.query.T), k
        return g.unsqueeze(1).expand(-1, self.n_head, -1, -1), k

    def _alpha(self) -> torch.Tensor:
        return self.alpha.view(1, -1, 1, 1)

    @staticmethod
    def _project(o: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        """sum_h M_h^T o_h for per-head vectors o (B, H, T, d), M_h stacked in ``weight`` (None: M_h = I)."""
        if weight is None:
            return o.sum(1)
        b, _, t, _ = o.shape
        return o.transpose(1, 2).reshape(b, t, -1) @ weight

    def scores(self, g: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Masked scores s_AB (B, H, T, T), -inf where B is not visible to A. Queries come from g,
        keys from ``context`` (default g)."""
        q, k = self.queries_keys(g)
        if context is not None:
            k = self.queries_keys(context)[1]
        s = (q @ k.transpose(-1, -2)) * self.beta
        t = g.shape[1]
        visible = torch.ones(t, t, dtype=torch.bool, device=g.device).tril(-1 if self.strict else 0)
        return s.masked_fill(~visible, float("-inf"))

    def energy(self, g: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """E_A^AT for every token, (B, T), queries from g and keys from ``context`` (default g).
        A token with no visible key (strict mask, A = 1) has energy 0."""
        s = self.scores(g, context)
        empty = torch.isinf(s).all(-1, keepdim=True)  # rows with no key: keep log-sum-exp finite
        lse = torch.logsumexp(s.masked_fill(empty, 0.0), dim=-1).masked_fill(empty.squeeze(-1), 0.0)
        if self.form == "lowrank":
            lse = lse * self.alpha.view(1, -1, 1)
        return -lse.sum(1) / self.beta

    def grad(self, g: torch.Tensor, cache: KVCache | None = None, step: int = 0) -> torch.Tensor:
        """dE_A^AT/dg_A for the new tokens g (B, T, D); with a cache, past tokens' keys come from it.

        In training, dropout (rate ``config.dropout``) is applied to the attention weights and to the
        result, as the reference code does; in eval mode this is the exact gradient.
        """
        q, k = self.queries_keys(g)
        visible = None
        if cache is not None:
            k, _ = cache.update(step, k)
            visible = cache.visible(self.strict)
        p = self.dropout if self.training else 0.0
        if self.self_term:
            grad = self._grad_with_self_term(q, k, p, cache if visible is not None else None)
        else:
            o = causal_attention(q, k, k, strict=self.strict, scale=self.beta, dropout=p, visible=visible)
            grad = -self._project(o * self._alpha(), self.query) if self.form == "lowrank" else -self._project(o, None)
        return F.dropout(grad, p) if p > 0 else grad

    def _grad_with_self_term(
        self, q: torch.Tensor, k: torch.Tensor, dropout: float, static: KVCache | None = None
    ) -> torch.Tensor:
        """Exact gradient under the inclusive mask: needs p_AA, so the weights are formed explicitly.
        ``static``: a static decoding step of that cache (one query at ``static.position``)."""
        tq, tk = q.shape[-2], k.shape[-2]
        s = (q @ k.transpose(-1, -2)) * self.beta
        if static is not None:
            visible = static.visible(strict=False)
        else:
            visible = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
        p = torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1)
        if dropout > 0:
            p = F.dropout(p, dropout)
        o = p @ k
        if static is not None:
            p_self = p.index_select(-1, static.position).squeeze(-1)
        else:
            p_self = p[..., torch.arange(tq, device=q.device), torch.arange(tk - tq, tk, device=q.device)]
        qs = q * p_self.unsqueeze(-1)
        if self.form == "lowrank":
            a = self._alpha()
            return -(self._project(o * a, self.query) + self._project(qs * a, self.key))
        return -(self._project(o, None) + self._project(qs, self.key))


class FFEnergy(nn.Module):
    """The feed-forward energies E^FF (eq. 14, 16, 24), each a sum over tokens of a scalar of g_A."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.kind = config.ff
        d, m = config.n_embd, config.ff_mult * config.n_embd
        first = d if self.kind == "ff2" else m
        self.fc1 = nn.Linear(d, first)
        if self.kind == "ff2w":
            self.fc2 = nn.Linear(m, d)
        elif self.kind == "ff2":
            self.fc2 = nn.Linear(d, m)

    def energy(self, g: torch.Tensor) -> torch.Tensor:
        """E_A^FF for every token, (B, T)."""
        h = self.fc1(g)
        if self.kind == "ff1":
            return -F.gelu(h).pow(2).sum(-1)
        if self.kind == "ff2w":
            return -(g * self.fc2(F.gelu(h))).sum(-1)
        if self.kind == "ff2":
            return -F.gelu(self.fc2(F.gelu(h))).pow(2).sum(-1)
        return -0.5 * F.relu(h).pow(2).sum(-1)

    def grad(self, g: torch.Tensor) -> torch.Tensor:
        """dE_A^FF/dg_A in closed form, (B, T, D), with the hand-written backward of ``nrgpt.kernels``."""
        w1, b1 = self.fc1.weight, self.fc1.bias
        if self.kind == "dam":
            return kernels.dam_grad(g, w1, b1)
        if self.kind == "ff1":
            return kernels.ff1_grad(g, w1, b1)
        if self.kind == "ff2w":
            return kernels.ff2w_grad(g, w1, b1, self.fc2.weight, self.fc2.bias)
        return kernels.ff2_grad(g, w1, b1, self.fc2.weight, self.fc2.bias)


class EnergyBlock(nn.Module):
    """The shared NRGPT block: g = norm(x), E = E^AT + s E^FF, x <- x - eta^(t) dE/dg (eq. 6-7)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = Norm(config.norm, config.n_embd)
        self.attn = AttentionEnergy(config) if config.attention != "none" else None
        self.ff = FFEnergy(config)
        self.ff_scale = nn.Parameter(torch.ones(1)) if config.ff_scale else None
        self.eta = InferenceRate(config, self.norm)
        self.compiled_grad = None  # set by compile_steps

    def compile_steps(self, **options) -> None:
        """Use ``torch.compile(energy_grad)`` for whole-sequence calls (training, evaluation): it fuses
        the elementwise work around the matmuls (the GELU and its first and second derivatives) into a
        few kernels. Only the gradient is compiled: it does not depend on the step index, so one graph
        serves every step; cached decoding (shapes change every token) stays eager."""
        self.compiled_grad = torch.compile(self.energy_grad, **options)

    def _s(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.ff_scale is None else self.ff_scale * t

    def energy(
        self, g: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(E, E^AT, s E^FF), each (B, T): every token's energy at normalised states g (B, T, D).

        ``context`` (default g) supplies the attention keys: E_A(g_A; context_B for B != A).
        """
        e_ff = self._s(self.ff.energy(g))
        e_att = self.attn.energy(g, context) if self.attn is not None else torch.zeros_like(e_ff)
        return e_att + e_ff, e_att, e_ff

    def energy_grad_autograd(self, g: torch.Tensor) -> torch.Tensor:
        """dE_A/dg_A by autograd of the energy, as a straightforward implementation computes it:
        only the query side of each token is differentiated (the keys stay in the graph for training). This equals
        ``energy_grad`` wherever the update has no key-side self term (strict mask, or
        grad_mode='reference'); it is kept as a cross-check and as the benchmarks' baseline."""
        if self.attn is not None and self.attn.self_term:
            raise ValueError("energy_grad_autograd has no key-side self term; use energy_grad for "
                             "mask='inclusive' with grad_mode='exact'")
        create_graph = torch.is_grad_enabled() and g.requires_grad  # training: keep the graph
        with torch.enable_grad():
            if not g.requires_grad:
                g = g.detach().requires_grad_(True)
            q = g.view_as(g)  # its own node: only the query side of every token flows through it
            e = self.energy(q, context=g)[0].sum()
            return torch.autograd.grad(e, q, create_graph=create_graph)[0]

    def energy_grad(self, g: torch.Tensor, cache: KVCache | None = None, step: int = 0) -> torch.Tensor:
        """dE_A/dg_A for every token (B, T, D), in closed form (no autograd)."""
        grad = self._s(self.ff.grad(g))
        return grad if self.attn is None else grad + self.attn.grad(g, cache, step)

    def forward(self, x: torch.Tensor, step: int = 0, cache: KVCache | None = None) -> torch.Tensor:
        """One step of energy descent (eq. 6)."""
        g = self.norm(x)
        if cache is None and self.compiled_grad is not None:
            return x - self.eta(self.compiled_grad(g), step)
        return x - self.eta(self.energy_grad(g, cache, step), step)
