"""Q4: generation with the per-step cache against full recomputation.

NRGPT_H_FF2W (n_embd 128, 8 steps, 1 head) with block_size = context, at contexts 64, 256 and 1024
and batch 1 and 8. A prompt of context - n_new tokens is continued by n_new tokens greedily, with
``use_cache=True`` (one prefill of the prompt, then one token at a time) and ``use_cache=False``
(a full forward of the context for every token); the outputs must be identical. Reported:
  * end-to-end: tokens/s of each and their ratio. The cached run includes its prefill, so the
    ratio is bounded by about n_new (full: n_new forwards of ~context tokens; cached: one such
    forward plus n_new - 1 single-token steps);
  * per token: the full recomputation's time per token (its total / n_new) against the median
    cached decode step (each timed separately after a separate prefill): the steady-state speed-up.
    On a GPU the cached steps are CUDA-graph replays (``generate``'s default there).
    The fastest decode step is shown too (a contention-free figure on a shared machine).
Variants are interleaved and medians taken.
"""

from __future__ import annotations

import torch
from common import build, finish, interleave, parser, setup, stats, table, target, timed

from nrgpt.decoding import GraphedDecode, KVCache

PRESET = "NRGPT_H_FF2W"


def decode_loop(model: torch.nn.Module, prompt: torch.Tensor, n_new: int) -> tuple[float, list[float], torch.Tensor]:
    """Greedy decoding by hand with a cache: (prefill seconds, per-token decode seconds, tokens).
    On a GPU the steps are replayed as a CUDA graph, as ``generate`` does there (the capture, with
    the first step, is left out of the per-token times)."""
    model.eval()
    graph = prompt.is_cuda
    cache = KVCache(model.config.block_size, static=graph or model.compiled_decode is not None)
    out = [prompt]
    with torch.no_grad():
        t_prefill = timed(lambda: out.append(model.forward_cached(prompt, cache).argmax(-1, keepdim=True)))
        step = lambda nxt: model.forward_cached(nxt, cache)  # noqa: E731
        if graph:
            cache.begin(1, prompt.device)
            graphed = GraphedDecode(model, out[-1], cache)
            cache.advance(1)
            out.append(graphed.first.argmax(-1, keepdim=True))

            def step(nxt: torch.Tensor) -> torch.Tensor:
                cache.begin(1, nxt.device)
                logits = graphed(nxt)
                cache.advance(1)
                return logits

        per_token = []
        for _ in range(n_new + 1 - len(out)):  # out holds the prompt and the tokens so far
            nxt = out[-1]
            per_token.append(timed(lambda nxt=nxt: out.append(step(nxt).argmax(-1, True))))
    return t_prefill, per_token, torch.cat(out, dim=1)


def measure(model: torch.nn.Module, prompt: torch.Tensor, n_new: int, reps: int, warmup: int):
    """Interleaved timings of cached generate, full-recomputation generate and the hand decode loop."""
    outs = {}

    def run(use_cache: bool) -> None:
        outs[use_cache] = model.generate(prompt, n_new, greedy=True, use_cache=use_cache)

    def manual() -> None:
        outs["manual"] = decode_loop(model, prompt, n_new)

    times = interleave({"cached": lambda: run(True), "full": lambda: run(False), "decode": manual},
                       reps=reps, warmup=warmup)
    return times, outs


def main() -> None:
    p = parser(__doc__.splitlines()[0], gpu=True)
    p.add_argument("--contexts", type=int, nargs="+", default=None, help="context lengths (default 64 256 1024)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated per run (default 32)")
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--preset", default=PRESET)
    p.add_argument("--compile", action="store_true",
                   help="model.compile_decode(): compiled one-token steps (compilation left out of the times)")
    args = p.parse_args()
    setup(args)
    contexts = args.contexts or [64, 256, 1024]
    n_new = args.new_tokens or (16 if args.quick else 32)
    reps = args.reps or (1 if args.quick else 3)

    results, rows, targets = [], [], []
    for ctx in contexts:
        model = build(args.preset, n_embd=args.n_embd, n_head=1, n_steps=8, block_size=ctx, vocab_size=65).eval()
        if args.compile:
            model.compile_decode()
        for bsz in args.batches:
            g = torch.Generator().manual_seed(ctx + bsz)
            prompt = torch.randint(0, 65, (bsz, ctx - n_new), generator=g).to(model.lm_head.weight.device)
            cold = args.quick and ctx >= 1024 and not args.compile  # skip the slow warm-up (compiling needs it)
            times, outs = measure(model, prompt, n_new, reps, warmup=0 if cold else 1)
            identical = torch.equal(outs[True], outs[False])
            identical_manual = torch.equal(outs[True], outs["manual"][2])
            assert identical, f"cached and full greedy outputs differ (context {ctx}, batch {bsz})"
            assert identical_manual, f"hand decode loop differs from generate (context {ctx}, batch {bsz})"
            prefill, per_token, _ = outs["manual"]
            tc, tf = stats(times["cached"]), stats(times["full"])
            decode = stats(per_token)["median"]
            full_per_token = tf["median"] / n_new
            e2e = tf["median"] / tc["median"]
            per_tok_speedup = full_per_token / decode
            results.append({"context": ctx, "batch": bsz, "n_new": n_new, "prompt": ctx - n_new,
                            "cached_s": tc, "full_s": tf, "prefill_s": prefill, "decode_s_per_token": stats(per_token),
                            "full_s_per_token": full_per_token, "end_to_end_speedup": e2e,
                            "per_token_speedup": per_tok_speedup, "identical": identical})
            rows.append([ctx, bsz, bsz * n_new / tc["median"], bsz * n_new / tf["median"], e2e, 1e3 * prefill,
                         1e3 * decode, 1e3 * min(per_token), 1e3 * full_per_token, per_tok_speedup, identical])
            want = {256: 30, 1024: 100}.get(ctx)
            if want:
                targets.append(target(f"context {ctx}, batch {bsz}: per-token speed-up (full / cached decode)",
                                      per_tok_speedup, ">=", want,
                                      f"end-to-end incl. prefill {e2e:.1f}x (bounded by ~{n_new}x)"))

    how = f"{args.device}, compiled decoding" if args.compile else args.device
    title = (f"Generation ({how}), {args.preset} n_embd {args.n_embd}, 8 steps, {n_new} new tokens after "
             f"a prompt of context - {n_new}, greedy; median of {reps} interleaved reps")
    tab = table(["context", "batch", "cached tok/s", "full tok/s", "end-to-end speed-up", "prefill (ms)",
                 "decode (ms/token)", "decode best (ms)", "full (ms/token)", "per-token speed-up", "identical"],
                rows, title)
    finish("generation_compiled" if args.compile else "generation", args,
           {"rows": results, "reps": reps, "preset": args.preset, "compiled": args.compile}, [tab], targets)


if __name__ == "__main__":
    main()
