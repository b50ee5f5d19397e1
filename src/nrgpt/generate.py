"""Autoregressive sampling with a per-step cache.

Causality makes decoding incremental: a token's state at every step depends only on earlier
tokens, so when a token is appended nothing already computed changes. The cache keeps, for every
step t, each past token's keys at that step (NRGPT: K_h g_B^(t); baselines: keys and values), and a
new token costs O(n_steps * T * D) instead of a full recomputation. Once the context fills the
block, the window slides: positions shift, so the cache is rebuilt from the cropped window (the
same tokens a full recomputation would produce).

On a GPU a one-token step is too small to keep the device busy: its time is the launching of a few
hundred small kernels. There the steps run on a shape-static cache (``KVCache(static=True)``) and
the step is captured once as a CUDA graph and replayed for every further token.
"""

from __future__ import annotations

import torch

from .layers import KVCache


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


class GraphedDecode:
    """One static decoding step of ``model`` on ``cache`` captured as a CUDA graph.

    Construction runs the step for ``idx`` (B, 1) once eagerly (on a side stream, as capture
    requires; its logits are ``first``), then captures it; calling replays it for new tokens. The
    cache's buffers and position are read and written in place, so the caller does
    ``cache.begin(1, ...)`` before and ``cache.advance(1)`` after each call, as ``forward_cached`` does.
    """

    def __init__(self, model, idx: torch.Tensor, cache: KVCache):
        self.idx = idx.clone()
        side = torch.cuda.Stream(idx.device)
        side.wait_stream(torch.cuda.current_stream(idx.device))
        with torch.cuda.stream(side):
            self.first = model.decode(self.idx, cache)
        torch.cuda.current_stream(idx.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model.decode(self.idx, cache)

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        self.idx.copy_(idx)
        self.graph.replay()
        return self.logits


@torch.no_grad()
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
) -> torch.Tensor:
    """Append ``max_new_tokens`` tokens to ``idx`` (B, T); returns (B, T + max_new_tokens).

    With ``use_cache`` (default) each new token runs through the model once; without it the whole
    (cropped) context is recomputed for every token. Both give the same tokens. ``cuda_graph``
    (default: on for a model on a CUDA device) replays the one-token step as a CUDA graph; after
    ``model.compile_decode()`` the one-token steps run compiled instead.
    """
    was_training = model.training
    model.eval()
    block = model.config.block_size
    if cuda_graph is None:
        cuda_graph = idx.is_cuda and model.compiled_decode is None
    if cuda_graph and not idx.is_cuda:
        raise ValueError("cuda_graph=True needs the model and idx on a CUDA device")
    cache, graphed = None, None
    try:
        for _ in range(max_new_tokens):
            if not use_cache:
                logits = model(idx[:, -block:])[0][:, -1]
            elif cache is None or cache.length >= block:
                cache, graphed = KVCache(block, static=cuda_graph or model.compiled_decode is not None), None
                logits = model.forward_cached(idx[:, -block:], cache)
            elif cuda_graph:
                cache.begin(1, idx.device)
                if graphed is None:
                    graphed = GraphedDecode(model, idx[:, -1:], cache)
                    logits = graphed.first
                else:
                    logits = graphed(idx[:, -1:])
                cache.advance(1)
            else:
                logits = model.forward_cached(idx[:, -1:], cache)
            nxt = sample_next(logits, temperature, top_k, top_p, greedy, generator)
            idx = torch.cat([idx, nxt.to(idx.dtype)], dim=1)
    finally:
        model.train(was_training)
    return idx
