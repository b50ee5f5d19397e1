"""The one-token decoding step in C (``nrgpt.native``) against the eager step it replaces.

NRGPT_H_FF2W (8 steps, 1 head, block 256) at n_embd 128-768 and 1-4 rows (``nrgpt.native.MAX_BATCH``;
beyond it both would be the eager step). For each shape: an 8-token prefill, then 32 one-token
``forward_cached`` steps, timed as a whole (the eager prefill included, so the ratios understate the
steps' own), with the C step and with ``nrgpt.native.enabled = False``, interleaved; medians per step.
The logits of both paths are checked equal (to 1e-4, float32).
"""

from __future__ import annotations

from functools import partial

import torch
from common import build, finish, interleave, parser, reps_of, setup, stats, table

from nrgpt import native
from nrgpt.decoding import KVCache

PREFILL, STEPS = 8, 32


def decode(model: torch.nn.Module, idx: torch.Tensor, use_c: bool) -> torch.Tensor:
    """The last logits of STEPS one-token steps after a prefill, with or without the C step."""
    native.enabled = use_c
    try:
        cache = KVCache(model.config.block_size)
        with torch.inference_mode():
            model.forward_cached(idx[:, :PREFILL], cache)
            for i in range(PREFILL, PREFILL + STEPS):
                logits = model.forward_cached(idx[:, i:i + 1], cache)
    finally:
        native.enabled = True
    return logits


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--n-embd", type=int, nargs="+", default=None, help="widths (default 128 256 512 768)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    args = p.parse_args()
    setup(args)
    widths = args.n_embd or ([128, 256] if args.quick else [128, 256, 512, 768])
    reps = reps_of(args, 5)
    if native.library(torch.float32, wait=True) is None:
        print("bench_native.py: skipped: the C step cannot be built here (see the warning above)")
        return
    rows, results = [], []
    for d in widths:
        model = build("NRGPT_H_FF2W", n_embd=d, n_head=1, n_steps=8, block_size=256, vocab_size=65).eval()
        for bsz in args.batches:
            idx = torch.randint(0, 65, (bsz, PREFILL + STEPS), generator=torch.Generator().manual_seed(d + bsz))
            torch.testing.assert_close(decode(model, idx, True), decode(model, idx, False), rtol=1e-4, atol=1e-4)
            times = interleave({"c": partial(decode, model, idx, True), "eager": partial(decode, model, idx, False)},
                               reps=reps)
            c, eager = (stats([t / STEPS for t in times[k]]) for k in ("c", "eager"))
            served = bsz <= native.MAX_BATCH
            results.append({"n_embd": d, "batch": bsz, "c_s_per_step": c, "eager_s_per_step": eager,
                            "speedup": eager["median"] / c["median"], "served": served})
            rows.append([d, bsz, 1e3 * c["median"], 1e3 * eager["median"], eager["median"] / c["median"],
                         "yes" if served else "no (eager)"])
    tab = table(["n_embd", "rows", "C step (ms)", "eager step (ms)", "speed-up", "C serves it"], rows,
                f"One-token steps, NRGPT_H_FF2W, 8 steps, after an {PREFILL}-token prefill; median ms per step "
                f"of {reps} interleaved reps of {STEPS} steps, {args.threads} threads")
    finish("native_step", args, {"rows": results, "reps": reps}, [tab])


if __name__ == "__main__":
    main()
