"""The built-in feed-forward energies, each with its closed-form gradient (h = W1 g + b1, sigma = exact GELU).

    ff1   E = -||sigma(h)||^2                      dE/dg = -2 W1^T (sigma(h) * sigma'(h))
    ff2w  E = -g . (W2 sigma(h) + b2)              dE/dg = -(W2 sigma(h) + b2) - W1^T (sigma'(h) * W2^T g)   (eq. 24)
    ff2   E = -||sigma(u)||^2, u = W2 sigma(h) + b2 dE/dg = -2 W1^T (sigma'(h) * W2^T (sigma(u) * sigma'(u)))
          (W1 is D x D, W2 is mD x D)
    dam   E = -sum F(h), F = ReLU^2 / 2            dE/dg = -W1^T ReLU(h)                                   (eq. 14-16)
    glu   E = -sum_i F(w_i . g)(v_i . c + b_i)     dE/dg = -W^T (GELU(W g) * (V c + b)),  F' = GELU
          a gated MLP whose down projection is the transpose of its up projection W (CEM); c is held fixed:
          the token's normalised input embedding ('glu', one energy for the whole trajectory) or its
          normalised state at the start of the step ('glu_step', CEM's conditional form).

Each ``grad`` is the closed form above, computed by the hand-written forward and backward of
``nrgpt.kernels`` (stacked products, fused elementwise passes); an energy without a ``grad`` gets autograd's.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels import dam_grad, ff1_grad, ff2_grad, ff2w_grad, gelu
from .base import FFEnergy, register_energy


def gelu_integral(z: torch.Tensor) -> torch.Tensor:
    """F(z) = int_0^z GELU = ((z^2 - 1) Phi(z) + z phi(z) + 1/2) / 2, so that F' = GELU and F(0) = 0."""
    cdf = 0.5 * (1.0 + torch.erf(z * 0.5**0.5))
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    return 0.5 * ((z * z - 1.0) * cdf + z * pdf + 0.5)


@register_energy("ff1")
class FF1(FFEnergy):
    """E_A = -||GELU(W1 g_A + b1)||^2 (NRGPT_H_FF1)."""

    def __init__(self, config):
        super().__init__(config)
        self.fc1 = nn.Linear(self.dim, self.hidden)

    def energy(self, g: torch.Tensor) -> torch.Tensor:
        return -F.gelu(self.fc1(g)).pow(2).sum(-1)

    def grad(self, g: torch.Tensor) -> torch.Tensor:
        return ff1_grad(g, self.fc1.weight, self.fc1.bias)


@register_energy("ff2w")
class FF2W(FFEnergy):
    """E_A = -g_A . (W2 GELU(W1 g_A + b1) + b2) (eq. 24, NRGPT_H_FF2W)."""

    def __init__(self, config):
        super().__init__(config)
        self.fc1 = nn.Linear(self.dim, self.hidden)
        self.fc2 = nn.Linear(self.hidden, self.dim)

    def energy(self, g: torch.Tensor) -> torch.Tensor:
        return -(g * self.fc2(F.gelu(self.fc1(g)))).sum(-1)

    def grad(self, g: torch.Tensor) -> torch.Tensor:
        return ff2w_grad(g, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)


@register_energy("ff2")
class FF2(FFEnergy):
    """E_A = -||GELU(W2 GELU(W1 g_A + b1) + b2)||^2, W1 D x D, W2 mD x D (NRGPT_H_FF2)."""

    def __init__(self, config):
        super().__init__(config)
        self.fc1 = nn.Linear(self.dim, self.dim)
        self.fc2 = nn.Linear(self.dim, self.hidden)

    def energy(self, g: torch.Tensor) -> torch.Tensor:
        return -F.gelu(self.fc2(F.gelu(self.fc1(g)))).pow(2).sum(-1)

    def grad(self, g: torch.Tensor) -> torch.Tensor:
        return ff2_grad(g, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)


@register_energy("dam")
class DenseAssociativeMemory(FFEnergy):
    """E_A = -sum_mu F(W1 g_A + b1)_mu, F = ReLU^2 / 2 (eq. 14-16); with b1 = 0 it is the Energy
    Transformer's Hopfield energy -1/2 sum_mu ReLU(xi_mu . g_A)^2."""

    def __init__(self, config):
        super().__init__(config)
        self.fc1 = nn.Linear(self.dim, self.hidden)

    def energy(self, g: torch.Tensor) -> torch.Tensor:
        return -0.5 * F.relu(self.fc1(g)).pow(2).sum(-1)

    def grad(self, g: torch.Tensor) -> torch.Tensor:
        return dam_grad(g, self.fc1.weight, self.fc1.bias)


@register_energy("glu")
class GatedEnergy(FFEnergy):
    """E_A = -sum_i F(w_i . g_A)(v_i . c_A + b_i), F' = GELU, conditioned on the token's normalised
    input embedding c_A = norm(x_A^(0)) (held fixed): a gated MLP with a tied projection."""

    conditioning = "input"

    def __init__(self, config):
        super().__init__(config)
        self.up = nn.Linear(self.dim, self.hidden, bias=False)  # W, rows w_i: up and (transposed) down projection
        self.gate = nn.Linear(self.dim, self.hidden)  # V, b

    def energy(self, g: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return -(gelu_integral(self.up(g)) * self.gate(c)).sum(-1)

    def grad(self, g: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return -((gelu(self.up(g)) * self.gate(c)) @ self.up.weight)


@register_energy("glu_step")
class StepGatedEnergy(GatedEnergy):
    """``glu`` conditioned on the token's normalised state at the start of the step, c_A = g_A^(t) (CEM's
    conditional energy: a new energy every step, each descended with c held fixed)."""

    conditioning = "step"
