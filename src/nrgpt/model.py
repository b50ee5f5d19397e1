"""The models: NRGPT and its GPT baselines, sharing embedding, head, loss and decoding.

A token's path (NRGPT): token + position embedding -> x^(0); n_steps applications of the one
``EnergyBlock`` (x^(t+1) = x^(t) - eta^(t) dE/dg, eq. 6) -> final LayerNorm -> linear head -> logits.
The baselines replace the block loop by n_steps distinct transformer blocks ('gpt'), or one
sequential ('rgpt') or parallel ('rgpt_parallel', eq. 5) block applied n_steps times.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig
from .energy import EnergyBlock
from .generate import generate
from .layers import KVCache, TransformerBlock


class LanguageModel(nn.Module):
    """Embedding, final norm, head and loss shared by every model; subclasses define ``body``."""

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

    def body(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        raise NotImplementedError

    def _apply_step(self, block: nn.Module, x: torch.Tensor, t: int, cache: KVCache | None) -> torch.Tensor:
        """block(x, t, cache), recomputed in the backward pass when ``checkpoint_steps`` is set."""
        if self.config.checkpoint_steps and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, t, cache, use_reentrant=False)
        return block(x, t, cache)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """logits (B, T, vocab) and the mean cross-entropy against ``targets`` (ignore_index -1)."""
        logits = self.lm_head(self.ln_f(self.body(self.embed(idx))))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def forward_cached(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits of the last position for new tokens ``idx`` appended to the cached context."""
        cache.begin(idx.shape[1], idx.device)
        if cache.static_step and self.compiled_decode is not None:
            logits = self.compiled_decode(idx.clone(memory_format=torch.contiguous_format), cache)  # fixed strides
        else:
            logits = self.decode(idx, cache)
        cache.advance(idx.shape[1])
        return logits

    @torch.no_grad()
    def decode(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """The work of ``forward_cached`` between ``cache.begin`` and ``cache.advance``: in a static
        step (``KVCache(static=True)``) it only launches device work, so it can be captured as a CUDA
        graph (``generate``)."""
        start = cache.position if cache.static_step else cache.length
        x = self.body(self.embed(idx, start), cache)
        return self.lm_head(self.ln_f(x[:, -1]))

    def compile_decode(self, **options) -> None:
        """``torch.compile`` the one-token decoding step (static shapes, so one graph per batch size and
        block) and make ``generate`` decode on a static cache with it. On a CPU this fuses the step's
        few hundred small ops, whose dispatch dominates decoding; the compilation (tens of seconds)
        pays for itself over long generations. On a GPU ``generate``'s CUDA graph does this job.

        On a CPU, unless ``options`` choose a backend, mode or options, inductor writes the step's
        wrapper in C++ (``cpp_wrapper``): no Python between its kernels, about 2x faster per token."""
        if not options.keys() & {"backend", "mode", "options"} and self.lm_head.weight.device.type == "cpu":
            options["options"] = {"cpp_wrapper": True}
        self.compiled_decode = torch.compile(self.decode, dynamic=False, **options)

    def compile_steps(self, **options) -> None:
        """``torch.compile`` the unit applied at every step (``system.compile``), in place; see the
        blocks' ``compile_steps``. Compiling per step rather than the unrolled model compiles one graph
        whatever n_steps is."""
        for block in self.step_blocks():
            block.compile_steps(**options)

    def step_blocks(self) -> list[nn.Module]:
        raise NotImplementedError

    generate = generate  # model.generate(idx, max_new_tokens, temperature, top_k, top_p, greedy, ...)

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
    """eNeRgy-GPT: one ``EnergyBlock`` applied n_steps times (section 2)."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.block = EnergyBlock(config)
        self._init_weights()

    def step_blocks(self) -> list[nn.Module]:
        return [self.block]

    def body(self, x: torch.Tensor, cache: KVCache | None = None, n_steps: int | None = None) -> torch.Tensor:
        for t in range(self.config.n_steps if n_steps is None else n_steps):
            x = self._apply_step(self.block, x, t, cache)
        return x

    @torch.no_grad()
    def energy_trajectory(self, idx: torch.Tensor, n_steps: int | None = None) -> Trajectory:
        """Run ``n_steps`` (default: the trained number; may be larger) steps and record everything."""
        steps = self.config.n_steps if n_steps is None else n_steps
        x = self.embed(idx)
        states, parts, norms = [x], [], []
        for t in range(steps + 1):
            g = self.block.norm(x)
            parts.append(self.block.energy(g))
            norms.append(self.block.energy_grad(g).norm(dim=-1))
            if t < steps:
                x = self.block(x, t)
                states.append(x)
        energy, attn, ff = (torch.stack(p) for p in zip(*parts))
        logits = self.lm_head(self.ln_f(x))
        return Trajectory(torch.stack(states), energy, attn, ff, torch.stack(norms), logits)


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

    def body(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        for t in range(self.config.n_steps):
            x = self._apply_step(self.blocks[t % len(self.blocks)], x, t, cache)
        return x


def build_model(config: ModelConfig) -> LanguageModel:
    """The model named by ``config.model``, freshly initialised."""
    return NRGPT(config) if config.is_energy_model else GPT(config)
