"""NRGPT's energy block and the descent loop: the whole model is eq. 6 run on E = E^AT + s E^FF.

Token A's energy is E_A = E_A^AT + s E_A^FF (eq. 7; s = 1 unless ``ff_scale``), a function of the
normalised states g = norm(x). One step of inference moves every token down its own energy,

    x_A <- x_A - eta dE_A/dg_A                                                     (eq. 6)

where the derivative is the per-token partial one: the other tokens are held fixed. Because E_A only
involves tokens B <= A, no token ever sees a later one. The two parts are ``nrgpt.energies`` classes
chosen by ``ModelConfig.attention`` and ``ModelConfig.ff`` when the block is built; each holds its
equation, its ``energy`` and its closed-form ``grad`` (docs/model.md lists them).

``descent`` is eq. 6 written once: an iterator over the steps of one or more blocks (recursive blocks:
each applied n_steps times in turn) that yields what each step computed. The forward pass, cached
decoding, ``NRGPT.energy_trajectory``, the dynamics recorder, early exit (a tolerance on the gradient
norm or on the energy change), activation checkpointing and truncated backpropagation (a graph for the
last k steps only) all run it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig
from .decoding import KVCache
from .energies import ATTENTION_ENERGIES, FF_ENERGIES, NO_ATTENTION, partial_grad
from .layers import InferenceRate, Norm


class EnergyBlock(nn.Module):
    """One NRGPT block: g = norm(x), E = E^AT + s E^FF, x <- x - eta^(t) dE/dg (eq. 6-7).

    A conditioned FF energy (``FFEnergy.conditioning``) also sees c: norm(x^(0)) ('input', given by the
    descent loop) or g itself ('step'); ``cond`` arguments default to g for 'step'.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = Norm(config.norm, config.n_embd)
        self.attn = None if config.attention == NO_ATTENTION else ATTENTION_ENERGIES[config.attention](config)
        self.ff = FF_ENERGIES[config.ff](config)
        self.ff_scale = nn.Parameter(torch.ones(1)) if config.ff_scale else None
        self.eta = InferenceRate(config, self.norm)
        self.input_conditioned = self.ff.conditioning == "input"
        self.state_conditioned = self.ff.conditioning == "step"
        # an energy without a closed-form grad: its gradient is autograd of the energy (no inference_mode)
        self.grads_by_autograd = not self.ff.has_closed_form() or not (self.attn is None or
                                                                       self.attn.has_closed_form())
        self.compiled_grad = None  # set by compile_steps

    def compile_steps(self, **options) -> None:
        """Use ``torch.compile(energy_grad)`` for whole-sequence calls (training, evaluation): it fuses
        the elementwise work around the matmuls (the GELU and its first and second derivatives) into a
        few kernels. Only the gradient is compiled: it does not depend on the step index, so one graph
        serves every step; cached decoding (shapes change every token) stays eager."""
        self.compiled_grad = torch.compile(self.energy_grad, **options)

    def _s(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.ff_scale is None else self.ff_scale * t

    def condition(self, g: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor | None:
        """The FF energy's conditioning at normalised states g: ``cond`` if given, g for 'step', None
        for an unconditioned energy."""
        if cond is not None or not self.state_conditioned:
            return cond
        return g

    def _ff_inputs(self, g: torch.Tensor, cond: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        cond = self.condition(g, cond)
        if self.input_conditioned and cond is None:
            raise ValueError(f"the {self.ff.name!r} energy is conditioned on the input embedding: pass "
                             "cond = block.norm(x0)")
        return (g,) if cond is None else (g, cond)

    def energy(
        self, g: torch.Tensor, context: torch.Tensor | None = None, cond: torch.Tensor | None = None,
        cache: KVCache | None = None, slot: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(E, E^AT, s E^FF), each (B, T): every token's energy at normalised states g (B, T, D).

        ``context`` (default g) supplies the attention keys: E_A(g_A; context_B for B != A). With a cache
        (decoding), the keys are those stored in its slot ``slot`` this step, the new tokens' included.
        """
        e_ff = self._s(self.ff.energy(*self._ff_inputs(g, cond)))
        if self.attn is None:
            return e_ff, torch.zeros_like(e_ff), e_ff
        if cache is None:
            e_att = self.attn.energy(g, self.attn.keys(g if context is None else context))
        else:
            e_att = self.attn.energy(g, cache.stored_keys(slot), cache.visible(self.attn.strict))
        return e_att + e_ff, e_att, e_ff

    def energy_grad(
        self, g: torch.Tensor, cache: KVCache | None = None, step: int = 0, cond: torch.Tensor | None = None
    ) -> torch.Tensor:
        """dE_A/dg_A for the tokens g (B, T, D), each part's ``grad`` (closed form where it has one).
        With a cache, the past tokens' keys come from its slot ``step``."""
        grad = self._s(self.ff.grad(*self._ff_inputs(g, cond)))
        if self.attn is None:
            return grad
        keys, visible = self.attn.keys(g), None
        if cache is not None:
            keys, _ = cache.update(step, keys)
            visible = cache.visible(self.attn.strict)
        return grad + self.attn.grad(g, keys, visible)

    def energy_grad_autograd(self, g: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """dE_A/dg_A by autograd of the whole energy, as a straightforward implementation computes it:
        only the query side of each token is differentiated (the keys stay in the graph for training).
        This equals ``energy_grad`` wherever the update has no key-side self term (strict mask, or
        grad_mode='reference'); it is kept as a cross-check and as the benchmarks' baseline."""
        if self.attn is not None and self.attn.self_term:
            raise ValueError("energy_grad_autograd has no key-side self term; use energy_grad for "
                             "mask='inclusive' with grad_mode='exact'")
        cond = self.condition(g, cond)
        return partial_grad(lambda q: self.energy(q, context=g, cond=cond)[0], g)

    def move(
        self, x: torch.Tensor, step: int = 0, cache: KVCache | None = None, slot: int | None = None,
        cond: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """One step's work at states x: (g, the FF conditioning, dE/dg, eta^(step) dE/dg). ``slot``
        (default ``step``) is the cache slot; ``cond`` the 'input' conditioning."""
        g = self.norm(x)
        cond = self.condition(g, cond)
        if cache is None and self.compiled_grad is not None:
            grad = self.compiled_grad(g, cond=cond)
        else:
            grad = self.energy_grad(g, cache, step if slot is None else slot, cond)
        return g, cond, grad, self.eta(grad, step)

    def forward(self, x: torch.Tensor, step: int = 0, cache: KVCache | None = None,
                cond: torch.Tensor | None = None) -> torch.Tensor:
        """One step of energy descent (eq. 6)."""
        return x - self.move(x, step, cache, cond=cond)[3]


@dataclass
class DescentStep:
    """What one step of eq. 6 computed. ``index`` counts the steps of all blocks (the cache slot); ``x``
    and ``x_next`` are the states before and after, ``g = norm(x)``, ``cond`` the FF conditioning,
    ``grad`` = dE_A/dg_A at g, ``active`` (B, T) the tokens that moved (None: all)."""

    index: int
    block: EnergyBlock
    x: torch.Tensor
    g: torch.Tensor
    cond: torch.Tensor | None
    grad: torch.Tensor
    x_next: torch.Tensor
    active: torch.Tensor | None

    def energy(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(E, E^AT, s E^FF) at this step's g, computed on request."""
        return self.block.energy(self.g, cond=self.cond)


def first_graph_step(n_total: int, backprop_steps: int) -> int:
    """The first of ``n_total`` steps that records an autograd graph when only the last ``backprop_steps``
    do (truncated backpropagation); 0 (every step) when ``backprop_steps`` is 0 or >= ``n_total``."""
    return max(0, n_total - backprop_steps) if backprop_steps > 0 else 0


def truncated_state(x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """The state entering the first recorded step of truncated backpropagation: the value x^(S-k), with
    the gradient reaching x^(0) as if the truncated steps were the identity, x^(0) + sg(x^(S-k) - x^(0))
    (a Jacobian-free backward through them), so that the embeddings keep learning."""
    return x0 + (x - x0).detach()


class ExitRule:
    """Early exit (``descent``'s ``tol``): ``keep_moving`` says, at each step, which tokens still move (B, T);
    a token that stops once stays stopped. ``new_block`` is called as each block begins."""

    def __init__(self, tol: float):
        self.tol = tol

    def new_block(self) -> None:
        pass

    def keep_moving(self, block: EnergyBlock, g: torch.Tensor, cond: torch.Tensor | None, grad: torch.Tensor,
                    cache: KVCache | None, slot: int) -> torch.Tensor:
        raise NotImplementedError


class GradientNormExit(ExitRule):
    """Token A keeps moving at step t while ||dE_A/dg_A^(t)|| >= tol."""

    def keep_moving(self, block: EnergyBlock, g: torch.Tensor, cond: torch.Tensor | None, grad: torch.Tensor,
                    cache: KVCache | None, slot: int) -> torch.Tensor:
        return grad.norm(dim=-1) >= self.tol


class EnergyChangeExit(ExitRule):
    """Token A keeps moving at step t > 0 while its energy changed by at least the noise floor over the last
    step, |E_A^(t) - E_A^(t-1)| >= tol (1 + |E_A^(t-1)|) (the settling criterion of ``nrgpt.dynamics``).
    Every token takes the first step, and the first of each later block it reaches (each block has its own
    energy). Where descent is guaranteed (Prop. 2.1, 2.2) the energy falls step by step, so a small change
    means that the token has settled. It costs one evaluation of the energy per step."""

    def new_block(self) -> None:
        self.last = None

    def keep_moving(self, block: EnergyBlock, g: torch.Tensor, cond: torch.Tensor | None, grad: torch.Tensor,
                    cache: KVCache | None, slot: int) -> torch.Tensor:
        energy = block.energy(g, cond=cond, cache=cache, slot=slot)[0]
        last, self.last = self.last, energy
        if last is None:
            return torch.ones_like(energy, dtype=torch.bool)
        return (energy - last).abs() >= self.tol * (1 + last.abs())


EXIT_RULES = {"grad": GradientNormExit, "energy": EnergyChangeExit}  # descent's exit_on


def descent(
    blocks: Sequence[EnergyBlock], x: torch.Tensor, n_steps: int, *, cache: KVCache | None = None,
    tol: float | None = None, exit_on: str = "grad", checkpoint_steps: bool = False, backprop_steps: int = 0,
) -> Iterator[DescentStep]:
    """Run eq. 6 from x^(0) = ``x``: each block in turn, ``n_steps`` steps each; yield every step.

    ``tol`` (early exit): a token stops for good once ||dE_A/dg_A|| < tol (``exit_on`` 'grad') or once its
    energy changes by less than tol (1 + |E_A|) in a step ('energy', ``EnergyChangeExit``); its state is
    kept, and it keeps serving as a key (with that state) for later tokens. The freeze depends only on the
    token's own gradient or energy, which depend on tokens B <= A, so causality holds.
    ``checkpoint_steps``: recompute each step's activations in the backward pass instead of storing them
    (same results). ``backprop_steps`` = k > 0 (truncated backpropagation): of the len(blocks) x n_steps
    steps, counted across blocks, only the last k record an autograd graph; the earlier ones run under
    ``torch.no_grad``, and the state entering the first recorded step is ``truncated_state`` (gradient to
    x^(0) through the identity). The FF conditioning norm(x^(0)) keeps its graph.
    """
    x0 = x
    if exit_on not in EXIT_RULES:
        raise ValueError(f"exit_on={exit_on!r}: early exit is on one of {sorted(EXIT_RULES)}")
    rule = None if tol is None else EXIT_RULES[exit_on](tol)
    active = None if tol is None else torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    index, first_graph = 0, first_graph_step(len(blocks) * n_steps, backprop_steps)
    for block in blocks:
        cond = block.norm(x0) if block.input_conditioned else None
        if rule is not None:
            rule.new_block()
        for t in range(n_steps):
            graph = index >= first_graph
            if index == first_graph > 0:
                x = truncated_state(x, x0)
            with contextlib.nullcontext() if graph else torch.no_grad():
                if checkpoint_steps and graph:
                    g, c, grad, delta = checkpoint(block.move, x, t, cache, index, cond, use_reentrant=False)
                else:
                    g, c, grad, delta = block.move(x, t, cache, index, cond)
                if active is None:
                    x_next = x - delta
                else:
                    active = active & rule.keep_moving(block, g, c, grad, cache, index)
                    x_next = torch.where(active[..., None], x - delta, x)
            yield DescentStep(index, block, x, g, c, grad, x_next, active)
            x, index = x_next, index + 1
