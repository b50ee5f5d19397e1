"""The models: NRGPT and its GPT baselines, sharing embedding, head, loss and decoding.

A token's path (NRGPT): token + position embedding -> x^(0); n_steps applications of the one
``EnergyBlock`` (x^(t+1) = x^(t) - eta^(t) dE/dg, eq. 6; with ``n_blocks`` > 1, each of the blocks
n_steps times in turn) -> final LayerNorm -> linear head -> logits. The baselines replace the block loop
by n_steps distinct transformer blocks ('gpt'), or one sequential ('rgpt') or parallel ('rgpt_parallel',
eq. 5) block applied n_steps times. Decoding (``forward_cached``, ``generate``, ``compile_decode``) is
``nrgpt.decoding``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import ConfigError, ModelConfig
from .decoding import KVCache, compile_decode, decode, forward_cached, generate
from .energy import DescentStep, EnergyBlock, descent, first_graph_step, truncated_state
from .layers import TransformerBlock
from .native import descend as descend_in_c
from .native import serves as served_in_c


class LanguageModel(nn.Module):
    """Embedding, final norm, head and loss shared by every model; subclasses define ``body``.

    ``grads_by_autograd``: the forward pass takes autograd of an energy (an energy without a closed-form
    ``grad``), so decoding and evaluation must run under ``torch.no_grad``, not ``torch.inference_mode``
    (``nrgpt.decoding.without_graph``)."""

    grads_by_autograd = False

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd)
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size)
        self.compiled_decode = None  # set by compile_decode

    def _init_weights(self) -> None:
        """Linear and Embedding weights N(0, 0.02), biases 0 (the reference code's initialisation)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def embed(self, idx: torch.Tensor, start: int | torch.Tensor = 0) -> torch.Tensor:
        """Token plus position embeddings of ``idx`` (B, T) placed at positions start.. ; ``start``
        may be a (1,) device tensor (one token, static decoding)."""
        if isinstance(start, torch.Tensor):
            return self.tok_emb(idx) + self.pos_emb(start)
        t = idx.shape[1]
        if start + t > self.config.block_size:
            raise ValueError(
                f"sequence of {start + t} tokens is longer than the model's block_size "
                f"{self.config.block_size}; crop it to the last {self.config.block_size} tokens"
            )
        pos = torch.arange(start, start + t, device=idx.device)
        return self.tok_emb(idx) + self.pos_emb(pos)

    def body(self, x: torch.Tensor, cache: KVCache | None = None, n_steps: int | None = None,
             backprop_steps: int = 0) -> torch.Tensor:
        """The states after the model's steps from the embeddings x; ``n_steps`` (recurrent models only)
        runs another number of steps than the trained one; ``backprop_steps`` = k > 0: only the last k
        steps record an autograd graph (truncated backpropagation; ``nrgpt.energy.truncated_state``)."""
        raise NotImplementedError

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, **steps: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """logits (B, T, vocab) and the mean cross-entropy against ``targets`` (ignore_index -1). ``steps``
        go to ``body``: ``n_steps`` and ``backprop_steps`` (recurrent models; training with a random
        number of steps, ``train.steps_distribution``, passes both), for NRGPT also the early-exit ``tol``
        and ``exit_on``."""
        logits = self.lm_head(self.ln_f(self.body(self.embed(idx), **steps)))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, loss

    forward_cached = forward_cached  # model.forward_cached(idx, cache): last-position logits
    decode = decode
    compile_decode = compile_decode
    generate = generate  # model.generate(idx, max_new_tokens, temperature, top_k, top_p, greedy, ...)

    def compile_steps(self, **options) -> None:
        """``torch.compile`` the unit applied at every step (``system.compile``), in place; see the
        blocks' ``compile_steps``. Compiling per step rather than the unrolled model compiles one graph
        whatever n_steps is."""
        for block in self.step_blocks():
            block.compile_steps(**options)

    def step_blocks(self) -> list[nn.Module]:
        raise NotImplementedError

    def num_params(self, include_embeddings: bool = True) -> int:
        """Trained parameters: the count the paper reports (embeddings and head included)."""
        n = sum(p.numel() for p in self.parameters())
        if not include_embeddings:
            n -= self.tok_emb.weight.numel() + self.pos_emb.weight.numel()
        return n


@dataclass
class Trajectory:
    """Inference dynamics of NRGPT: states and every token's energy after each step.

    states (S+1, B, T, D) are x^(0..S); energy, attn_energy, ff_energy and grad_norm (S+1, B, T)
    are E_A, E_A^AT, s E_A^FF and ||dE_A/dg_A|| evaluated at g^(t) = norm(x^(t)); logits (B, T, V)
    are read from x^(S).
    """

    states: torch.Tensor
    energy: torch.Tensor
    attn_energy: torch.Tensor
    ff_energy: torch.Tensor
    grad_norm: torch.Tensor
    logits: torch.Tensor


class NRGPT(LanguageModel):
    """eNeRgy-GPT: one ``EnergyBlock`` applied n_steps times (section 2); ``n_blocks`` distinct blocks,
    each applied n_steps times in turn, with ``n_blocks`` > 1 (recursive blocks)."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.blocks = nn.ModuleList(EnergyBlock(config) for _ in range(config.n_blocks))
        self.grads_by_autograd = any(block.grads_by_autograd for block in self.blocks)
        self.native_decoding = served_in_c(self.blocks)  # one-token steps in C (nrgpt.native)
        self._init_weights()
        self.register_load_state_dict_pre_hook(lambda module, sd, prefix, *args: rename_legacy_weights(sd, prefix))

    @property
    def block(self) -> EnergyBlock:
        """The first energy block: for NRGPT (``n_blocks`` = 1) the only one."""
        return self.blocks[0]

    def step_blocks(self) -> list[nn.Module]:
        return list(self.blocks)

    def descent(self, x: torch.Tensor, cache: KVCache | None = None, n_steps: int | None = None,
                tol: float | None = None, backprop_steps: int = 0, exit_on: str = "grad") -> Iterator[DescentStep]:
        """``nrgpt.energy.descent`` over this model's blocks: ``n_steps`` per block (default: the trained
        number; may be more or fewer), early exit at ``tol`` on the gradient norm or the energy change
        (``exit_on``: 'grad' or 'energy'), activation checkpointing in training when ``checkpoint_steps`` is
        set, a graph for the last ``backprop_steps`` steps only."""
        return descent(self.blocks, x, self.config.n_steps if n_steps is None else n_steps, cache=cache, tol=tol,
                       exit_on=exit_on, backprop_steps=backprop_steps,
                       checkpoint_steps=self.config.checkpoint_steps and self.training and torch.is_grad_enabled())

    def body(self, x: torch.Tensor, cache: KVCache | None = None, n_steps: int | None = None,
             tol: float | None = None, backprop_steps: int = 0, exit_on: str = "grad") -> torch.Tensor:
        if (cache is not None and self.native_decoding and n_steps is None and tol is None
                and not torch.compiler.is_compiling()):
            out = descend_in_c(self, x, cache)
            if out is not None:
                return out
        for step in self.descent(x, cache, n_steps, tol, backprop_steps, exit_on):
            x = step.x_next
        return x

    def run(self, idx: torch.Tensor, n_steps: int | None = None,
            tol: float | None = None, exit_on: str = "grad") -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, T, V) and every token's number of steps taken (B, T) under early exit at ``tol``
        (``exit_on``: on the gradient norm or the energy change; ``nrgpt.energy.descent``)."""
        x = self.embed(idx)
        taken = torch.zeros(idx.shape, dtype=torch.long, device=idx.device)
        for step in self.descent(x, None, n_steps, tol, exit_on=exit_on):
            x = step.x_next
            taken += 1 if step.active is None else step.active
        return self.lm_head(self.ln_f(x)), taken

    @torch.no_grad()
    def energy_trajectory(self, idx: torch.Tensor, n_steps: int | None = None,
                          on_step: Callable[[DescentStep], None] | None = None) -> Trajectory:
        """Run ``n_steps`` (default: the trained number; may be larger) steps per block and record
        everything; ``on_step`` is called with every ``DescentStep``. Each gradient is computed once (the
        step's own); the last state's energy and gradient are those of the last block."""
        x0 = x = self.embed(idx)
        states, parts, norms = [x], [], []
        for step in self.descent(x, None, n_steps):
            parts.append(step.energy())
            norms.append(step.grad.norm(dim=-1))
            if on_step is not None:
                on_step(step)
            x = step.x_next
            states.append(x)
        block = self.blocks[-1] if len(states) > 1 else self.blocks[0]
        g = block.norm(x)
        cond = block.norm(x0) if block.input_conditioned else None
        parts.append(block.energy(g, cond=cond))
        norms.append(block.energy_grad(g, cond=cond).norm(dim=-1))
        energy, attn, ff = (torch.stack(p) for p in zip(*parts))
        logits = self.lm_head(self.ln_f(x))
        return Trajectory(torch.stack(states), energy, attn, ff, torch.stack(norms), logits)


def rename_legacy_weights(state_dict: dict, prefix: str = "") -> None:
    """Rename, in place, the weights of NRGPT checkpoints of earlier versions, which kept the one block at
    ``block.``, to ``blocks.0.`` (recursive blocks). A no-op for other state dicts."""
    old = prefix + "block."
    for key in [k for k in state_dict if k.startswith(old)]:
        state_dict[prefix + "blocks.0." + key[len(old):]] = state_dict.pop(key)


class GPT(LanguageModel):
    """The baselines: 'gpt' (n_steps distinct sequential blocks, nanoGPT), 'rgpt' (one sequential
    block applied n_steps times) and 'rgpt_parallel' (one GPT-J parallel block applied n_steps times)."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        parallel = config.model == "rgpt_parallel"
        n_blocks = config.n_steps if config.model == "gpt" else 1
        self.blocks = nn.ModuleList(TransformerBlock(config, parallel) for _ in range(n_blocks))
        self._init_weights()

    def step_blocks(self) -> list[nn.Module]:
        return list(self.blocks)

    def body(self, x: torch.Tensor, cache: KVCache | None = None, n_steps: int | None = None,
             backprop_steps: int = 0) -> torch.Tensor:
        """The blocks in turn ('gpt'), or the one block ``n_steps`` times (default: the trained number; the
        recurrent baselines may run more or fewer; a step t beyond the trained ones uses cache slot t);
        only the last ``backprop_steps`` record a graph (0: all)."""
        n = self.config.n_steps if n_steps is None else n_steps
        if n != self.config.n_steps and not self.config.is_recurrent:
            raise ValueError(f"a deep 'gpt' has {self.config.n_steps} distinct layers and cannot run {n} "
                             "steps; only the recurrent models (nrgpt, rgpt, rgpt_parallel) can")
        ckpt = self.config.checkpoint_steps and self.training and torch.is_grad_enabled()
        first_graph = first_graph_step(n, backprop_steps)
        x0 = x
        for t in range(n):
            block = self.blocks[t % len(self.blocks)]
            if t == first_graph > 0:
                x = truncated_state(x, x0)
            if t < first_graph:
                with torch.no_grad():
                    x = block(x, t, cache)
            elif ckpt:
                x = checkpoint(block, x, t, cache, use_reentrant=False)
            else:
                x = block(x, t, cache)
        return x


def build_model(config: ModelConfig) -> LanguageModel:
    """The model named by ``config.model``, freshly initialised."""
    if config.vocab_size is None:
        raise ConfigError("model.vocab_size is not set: give it, or take a dataset's (RunConfig.model_config)")
    return NRGPT(config) if config.is_energy_model else GPT(config)
