"""The optimizers ``nrgpt train`` builds (``train.optimizer``): AdamW, or Muon on the hidden matrices.

AdamW decays the parameters of >= 2 dimensions (matrices, embeddings) and not the others (biases, norms,
scalars such as alpha, ff_scale, log_c).

Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers"; Liu et al. 2025, "Muon is scalable for LLM
training") replaces each hidden matrix's update by the nearest semi-orthogonal matrix to its momentum. For a
hidden matrix W (m x n; a stack of them, such as eta's (H, D, D), per matrix) with gradient G:

    B <- mu B + G,    M = G + mu B (Nesterov),    O = NS_5(M),
    W <- W (1 - lr lambda) - lr 0.2 sqrt(max(m, n)) O                                          (M)

NS_5 is five steps of the quintic Newton-Schulz iteration X <- a X + (b A + c A^2) X, A = X X^T, from
X = M / ||M||_F, with (a, b, c) = (3.4445, -4.7750, 2.0315): it drives every singular value of X into about
[0.7, 1.2] while keeping the singular vectors, so O ~ U V^T for M = U S V^T. The factor 0.2 sqrt(max(m, n))
gives O the root-mean-square of a typical AdamW update, so Muon takes AdamW's learning rate and weight decay
and shares its schedule. The embeddings, the output layer and every vector stay with AdamW, as Muon's
authors prescribe.

The iteration runs in bfloat16 on a GPU, as its authors run it, and in float32 (float64 for float64
parameters) on a CPU, where most CPUs emulate bfloat16 products: ``torch.optim.Muon``, which always iterates
in bfloat16, takes 42.8 ms a step at the quickstart's model on an AVX2 CPU against 7.3 ms here, 29% against 5%
of a training step (``benchmarks/bench_optim.py``).
"""

from __future__ import annotations

import math

import torch

from .runconfig import TrainConfig

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


def orthogonalize(m: torch.Tensor, steps: int = NS_STEPS, eps: float = 1e-7) -> torch.Tensor:
    """NS_5(M) of (M) for a matrix or a stack of matrices (..., m, n), in M's dtype: about U V^T of M = U S V^T."""
    a, b, c = NS_COEFFICIENTS
    wide = m.shape[-2] <= m.shape[-1]
    x = m if wide else m.mT  # iterate on the smaller Gram matrix X X^T
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.mT


class MuonAdamW(torch.optim.AdamW):
    """AdamW over the parameter groups without the key ``muon`` (or with it False), Muon (M) over those with
    ``muon=True`` (their ``momentum`` key; the group's lr and weight_decay as AdamW's). One
    optimizer and one state dict: a Muon parameter's state is its ``momentum_buffer`` and ``step`` (the count
    of its updates, which AdamW's loading expects of every state), an AdamW parameter's AdamW's own."""

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch.optim.Optimizer.step
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        held = []
        for group in self.param_groups:
            if not group.get("muon", False):
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                self._muon_update(p, group)
                held.append((p, p.grad))
                p.grad = None  # AdamW skips a parameter without a gradient
        try:
            super().step()
        finally:
            for p, grad in held:
                p.grad = grad
        return loss

    def _muon_update(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["momentum_buffer"] = torch.zeros_like(p)
        state["step"] += 1
        buf = state["momentum_buffer"]
        buf.mul_(group["momentum"]).add_(p.grad)
        m = p.grad.add(buf, alpha=group["momentum"])  # Nesterov
        ns_dtype = torch.bfloat16 if p.device.type == "cuda" else torch.promote_types(p.dtype, torch.float32)
        o = orthogonalize(m.to(ns_dtype)).to(p.dtype)
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(o, alpha=-group["lr"] * 0.2 * math.sqrt(max(p.shape[-2], p.shape[-1])))


def optimizer_name(param_groups: list) -> str:
    """'muon' or 'adamw': the ``train.optimizer`` that made these param groups (a live optimizer's or a saved
    state's)."""
    return "muon" if any(isinstance(g, dict) and g.get("muon", False) for g in param_groups) else "adamw"


def hidden_matrices(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters Muon takes: those of >= 2 dimensions other than the embeddings (``nn.Embedding``) and
    the output layer (``model.lm_head``)."""
    outside = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    outside |= {id(p) for p in model.lm_head.parameters()}
    return [p for p in model.parameters() if p.requires_grad and p.dim() >= 2 and id(p) not in outside]


def make_optimizer(model: torch.nn.Module, tc: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """``tc.optimizer``'s optimizer over the model's trainable parameters: AdamW with weight decay on those of
    >= 2 dimensions, or MuonAdamW with Muon on ``hidden_matrices`` (decayed as well). AdamW's fused kernel on
    CUDA and on CPUs (on a CPU one pass over all parameters: 0.2 against 1.1 ms per step at the quickstart's
    124k parameters, 0.8 against 10.6 ms at 1.7M)."""
    params = [p for p in model.parameters() if p.requires_grad]
    muon = {id(p) for p in hidden_matrices(model)} if tc.optimizer == "muon" else set()
    groups = [
        {"params": [p for p in params if id(p) in muon], "weight_decay": tc.weight_decay,
         "muon": True, "momentum": tc.muon_momentum},
        {"params": [p for p in params if p.dim() >= 2 and id(p) not in muon], "weight_decay": tc.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    kind = MuonAdamW if muon else torch.optim.AdamW
    return kind([g for g in groups if g["params"]], lr=tc.lr, betas=(tc.beta1, tc.beta2),
                fused=device.type in ("cuda", "cpu") or None)
