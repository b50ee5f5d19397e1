"""Decoding: the cache, one-token steps (growing, static, CUDA-graphed, compiled), sampling and batched
greedy decoding. Every model decodes through this module.

Causality makes decoding incremental: a token's state at every step depends only on earlier tokens, so
when a token is appended nothing already computed changes. The cache keeps, for every application of a
block (a step of NRGPT, a layer or step of the baselines), each past token's keys (NRGPT: what
``AttentionEnergy.keys`` returns at that step; baselines: keys and values), and a new token costs
O(n_steps * T * D) instead of a full recomputation. Once the context fills the block, the window slides:
positions shift, so the cache is rebuilt from the cropped window (the same tokens a full recomputation
would produce).

The cache contract, between this module and a model:
  * ``forward_cached(model, idx, cache)`` calls ``cache.begin(n)`` for the n new tokens, then
    ``model.decode(idx, cache)``, then ``cache.advance(n)``;
  * ``model.decode`` runs ``model.body`` on the new tokens' embeddings (placed at ``cache.length``, or at
    the device tensor ``cache.position`` in a static step), and every cached block, at its slot, calls
    ``cache.update(slot, k[, v])`` to store the new tokens' keys (values) and get all of them so far, and
    ``cache.visible(strict)`` for the static step's visibility mask (None otherwise);
  * a block's keys for a token never change once written (causality), so nothing else is stored.

On a GPU a one-token step is too small to keep the device busy: its time is the launching of a few
hundred small kernels. There the steps run on a shape-static cache (``KVCache(static=True)``) and the
step is captured once as a CUDA graph and replayed for every further token; ``compile_decode`` compiles
the static step instead (on a CPU, where dispatch dominates).

Other depths and early exit: ``decode`` (and so ``forward_cached``, ``generate`` and
``greedy_continuations``) passes its keyword options to ``model.body``: ``n_steps`` for every recurrent
model (a step beyond the trained ones fills a further cache slot), and for NRGPT the early-exit ``tol`` and
``exit_on`` (a token stops once ||dE_A/dg_A|| < tol, or once its energy changes by less than tol (1 + |E_A|);
its frozen state keeps serving as a key).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn


class KVCache:
    """Keys (and values) of past tokens, one slot per application of a block (step or layer).

    Buffers are allocated once with room for ``capacity`` tokens; ``length`` is the number of
    tokens already stored. A token's keys at a step never change once written, because a token
    only ever sees earlier tokens (the model is causal).

    ``static=True`` makes every one-token decoding step shape-static, so that it can be captured
    once as a CUDA graph and replayed: the new token's keys are written at ``position`` (a device
    tensor) and attention runs over all ``capacity`` slots with the visibility mask ``visible``,
    instead of over the first ``length + 1`` slots.
    """

    def __init__(self, capacity: int, static: bool = False):
        self.capacity = capacity
        self.length = 0
        self.static = static
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.position: torch.Tensor | None = None  # static decoding: the new token's index, (1,)
        self._slots: torch.Tensor | None = None  # static decoding: 0..capacity-1
        self._static_step = False
        self._n_new = 0  # tokens of the current step (between begin and advance)
        self.packed = None  # nrgpt.native: the model's weights and these buffers for its C step

    def begin(self, n_tokens: int, device: torch.device) -> None:
        """Prepare to take ``n_tokens`` new tokens (called before the model body runs on them)."""
        if self.length + n_tokens > self.capacity:
            raise ValueError(f"KV cache is full ({self.capacity} tokens); crop the context")
        self._static_step = self.static and n_tokens == 1 and self.length > 0
        self._n_new = n_tokens
        if self._static_step:
            if self.position is None:
                self.position = torch.zeros(1, dtype=torch.long, device=device)
                self._slots = torch.arange(self.capacity, device=device)
            self.position.fill_(self.length)

    def _append(self, store: dict[int, torch.Tensor], slot: int, new: torch.Tensor) -> torch.Tensor:
        b, h, t, d = new.shape
        if slot not in store:  # static: zeros, since masked-out slots still enter p @ v as 0 * slot
            store[slot] = (new.new_zeros if self.static else new.new_empty)(b, h, self.capacity, d)
        if self._static_step:
            return store[slot].index_copy_(2, self.position, new)
        end = self.length + t
        if end > self.capacity:
            raise ValueError(f"KV cache is full ({self.capacity} tokens); crop the context")
        store[slot][:, :, self.length : end] = new
        return store[slot][:, :, :end]

    def update(self, slot: int, k: torch.Tensor, v: torch.Tensor | None = None):
        """Store the new tokens' k (and v) for ``slot``; return all keys (and values) so far."""
        k_all = self._append(self.keys, slot, k)
        if v is None:
            return k_all, k_all
        return k_all, self._append(self.values, slot, v)

    def stored_keys(self, slot: int) -> torch.Tensor:
        """All keys of ``slot`` so far, the current step's new tokens included (after their ``update``): the
        first ``length`` + new slots, or in a static step all ``capacity`` slots (``visible`` masks them)."""
        keys = self.keys[slot]
        return keys if self._static_step else keys[:, :, : self.length + self._n_new]

    @property
    def static_step(self) -> bool:
        """Whether the current step is a static decoding step (see the class docstring)."""
        return self._static_step

    def visible(self, strict: bool) -> torch.Tensor | None:
        """In a static decoding step, which of the ``capacity`` slots the new token attends to
        (B < A if ``strict``, else B <= A), shape (1, capacity); otherwise None."""
        if not self._static_step:
            return None
        return (self._slots < self.position if strict else self._slots <= self.position)[None]

    def advance(self, n_tokens: int) -> None:
        self.length += n_tokens
        self._static_step = False
        self._n_new = 0



def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token (B, 1) from last-position logits (B, V): argmax, or a sample after temperature,
    top-k (keep the k largest) and top-p (keep the smallest set whose probability reaches p)."""
    if greedy:
        return logits.argmax(-1, keepdim=True)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (got {temperature}); use greedy=True for argmax")
    logits = logits.float() / temperature
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1 (got {top_k})")
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (got {top_p})")
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) >= top_p  # mass before this token already >= p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)


def without_graph(model) -> contextlib.AbstractContextManager:
    """The context decoding and evaluation run ``model`` in: ``torch.inference_mode`` (no version counters or
    view tracking, ~13% faster per token on a CPU than ``no_grad``), or ``torch.no_grad`` where its forward
    takes autograd of an energy (``model.grads_by_autograd``), which inference tensors cannot enter."""
    return torch.no_grad() if getattr(model, "grads_by_autograd", False) else torch.inference_mode()


@torch.no_grad()
def forward_cached(model, idx: torch.Tensor, cache: KVCache, **descent: Any) -> torch.Tensor:
    """Logits of the last position for new tokens ``idx`` appended to the cached context (the contract
    above); ``descent``: the step options of ``model.body`` (``n_steps``; NRGPT also ``tol``)."""
    cache.begin(idx.shape[1], idx.device)
    if cache.static_step and model.compiled_decode is not None and not descent:
        logits = model.compiled_decode(idx.clone(memory_format=torch.contiguous_format), cache)  # fixed strides
    else:
        logits = model.decode(idx, cache, **descent)
    cache.advance(idx.shape[1])
    return logits


@torch.no_grad()
def decode(model, idx: torch.Tensor, cache: KVCache, **descent: Any) -> torch.Tensor:
    """The work of ``forward_cached`` between ``cache.begin`` and ``cache.advance``: in a static step
    (``KVCache(static=True)``) it only launches device work, so it can be captured as a CUDA graph."""
    start = cache.position if cache.static_step else cache.length
    x = model.body(model.embed(idx, start), cache, **descent)
    return model.lm_head(model.ln_f(x[:, -1]))


def compile_decode(model, **options) -> None:
    """``torch.compile`` the one-token decoding step (static shapes, so one graph per batch size and block)
    and make ``generate`` decode on a static cache with it. On a CPU this fuses the step's few hundred
    small ops, whose dispatch dominates decoding; the compilation (tens of seconds) pays for itself over
    long generations. On a GPU ``generate``'s CUDA graph does this job.

    On a CPU, unless ``options`` choose a backend, mode or options, inductor writes the step's wrapper in
    C++ (``cpp_wrapper``): no Python between its kernels, about 2x faster per token."""
    if not options.keys() & {"backend", "mode", "options"} and model.lm_head.weight.device.type == "cpu":
        options["options"] = {"cpp_wrapper": True}
    model.compiled_decode = torch.compile(model.decode, dynamic=False, **options)


class GraphedDecode:
    """One static decoding step of ``model`` on ``cache`` captured as a CUDA graph (``descent``: the step
    options of ``model.body``, fixed in the graph).

    Construction runs the step for ``idx`` (B, 1) once eagerly (on a side stream, as capture
    requires; its logits are ``first``), then captures it; calling replays it for new tokens. The
    cache's buffers and position are read and written in place, so the caller does
    ``cache.begin(1, ...)`` before and ``cache.advance(1)`` after each call, as ``forward_cached`` does.
    """

    def __init__(self, model, idx: torch.Tensor, cache: KVCache, **descent: Any):
        self.idx = idx.clone()
        side = torch.cuda.Stream(idx.device)
        side.wait_stream(torch.cuda.current_stream(idx.device))
        with torch.cuda.stream(side):
            self.first = model.decode(self.idx, cache, **descent)
        torch.cuda.current_stream(idx.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model.decode(self.idx, cache, **descent)

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        self.idx.copy_(idx)
        self.graph.replay()
        return self.logits


def generate(
    model,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    cuda_graph: bool | None = None,
    n_steps: int | None = None,
    tol: float | None = None,
    exit_on: str = "grad",
) -> torch.Tensor:
    """Append ``max_new_tokens`` tokens to ``idx`` (B, T); returns (B, T + max_new_tokens).

    With ``use_cache`` (default) each new token runs through the model once; without it the whole
    (cropped) context is recomputed for every token. Both give the same tokens. ``cuda_graph``
    (default: on for a model on a CUDA device) replays the one-token step as a CUDA graph; after
    ``model.compile_decode()`` the one-token steps run compiled instead (but not with step options).

    Step options (see the module docstring): ``n_steps`` (recurrent models) decodes with that many steps
    instead of the trained number, and ``tol`` (NRGPT) with early exit, a token frozen once
    ||dE_A/dg_A|| < tol (``exit_on='grad'``) or once its energy changes by less than tol (1 + |E_A|) in a
    step (``exit_on='energy'``), after at most ``n_steps`` steps per block.
    """
    if tol is not None and not model.config.is_energy_model:
        raise ValueError(f"early-exit decoding (tol) needs an NRGPT model; this is a {model.config.model!r}")
    descent = {name: value for name, value in (("n_steps", n_steps), ("tol", tol)) if value is not None}
    if tol is not None:
        descent["exit_on"] = exit_on
    was_training = model.training
    model.eval()
    block = model.config.block_size
    if cuda_graph is None:
        cuda_graph = idx.is_cuda and model.compiled_decode is None
    if cuda_graph and not idx.is_cuda:
        raise ValueError("cuda_graph=True needs the model and idx on a CUDA device")
    cache, graphed = None, None
    # The result is cloned outside ``without_graph``: an ordinary tensor, one a training step can use.
    with without_graph(model):
        try:
            for _ in range(max_new_tokens):
                if not use_cache:
                    logits = model(idx[:, -block:], **descent)[0][:, -1]
                elif cache is None or cache.length >= block:
                    cache, graphed = KVCache(block, static=cuda_graph or model.compiled_decode is not None), None
                    logits = forward_cached(model, idx[:, -block:], cache, **descent)
                elif cuda_graph:
                    cache.begin(1, idx.device)
                    if graphed is None:
                        graphed = GraphedDecode(model, idx[:, -1:], cache, **descent)
                        logits = graphed.first
                    else:
                        logits = graphed(idx[:, -1:])
                    cache.advance(1)
                else:
                    logits = forward_cached(model, idx[:, -1:], cache, **descent)
                nxt = sample_next(logits, temperature, top_k, top_p, greedy, generator)
                idx = torch.cat([idx, nxt.to(idx.dtype)], dim=1)
        finally:
            model.train(was_training)
    return idx.clone()


def greedy_continuations(model: nn.Module, prompts: Sequence[Sequence[int]], eos_id: int | None,
                         max_new_tokens: int, batch_size: int = 64, **descent: Any) -> list[list[int]]:
    """Greedy continuation of every prompt, ending with ``eos_id`` where the model emitted it.

    ``model`` needs ``config.block_size`` and ``forward_cached(idx, cache)`` (last-position logits).
    Prompts of equal length are decoded together, ``batch_size`` at a time, so no padding is needed and
    the result equals decoding each prompt alone. A prompt gets at most ``max_new_tokens`` tokens, and no
    more than fit the block (the last generated token is never fed back, so a prompt of L tokens can be
    continued by block_size - L + 1 tokens). A batch stops as soon as all its rows have emitted ``eos_id``
    (rows that finished earlier keep decoding, and their tokens after ``eos_id`` are dropped). ``descent``
    is passed to ``model.forward_cached`` (another number of steps, early-exit decoding).
    """
    block = model.config.block_size
    too_long = [len(p) for p in prompts if not 0 < len(p) <= block]
    if too_long:
        raise ValueError(f"prompts must have 1 to block_size = {block} tokens; got one of {too_long[0]}")
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, prompt in enumerate(prompts):
        by_length[len(prompt)].append(i)
    device = next(model.parameters(), torch.empty(0)).device
    out: list[list[int]] = [[] for _ in prompts]
    with without_graph(model):
        for length, members in sorted(by_length.items()):
            budget = min(max_new_tokens, block - length + 1)
            for start in range(0, len(members) if budget > 0 else 0, batch_size):
                rows = members[start:start + batch_size]
                cache = KVCache(block)
                logits = model.forward_cached(torch.tensor([prompts[i] for i in rows], device=device), cache, **descent)
                new, done = [], torch.zeros(len(rows), dtype=torch.bool, device=device)
                for step in range(budget):
                    nxt = logits.argmax(-1)
                    new.append(nxt)
                    if eos_id is not None:
                        done |= nxt == eos_id
                    if step == budget - 1 or bool(done.all()):
                        break
                    logits = model.forward_cached(nxt[:, None], cache, **descent)
                for i, row in zip(rows, torch.stack(new, 1).tolist()):
                    out[i] = row[: row.index(eos_id) + 1] if eos_id in row else row
    return out
