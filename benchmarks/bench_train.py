"""Q1: training-step throughput (tokens/s; forward + backward + AdamW step) and peak step memory.

Models NRGPT_H_FF2W, NRGPT_H_FF1, GPT_Rec_parallel and GPT at the paper's Shakespeare shape
(n_embd 128, 1 head, 8 steps, block 256, batch 16, vocab 65) and at n_embd 256 and 512. At each
shape the models' steps are interleaved (rotating order) and the median step time is taken;
ratios are against GPT_Rec_parallel measured in the same rounds. Memory: see
``common.peak_memory`` (profiler allocation high-water mark of one step, one extra step per model).
"""

from __future__ import annotations

import torch
from common import (
    PAPER_BATCH,
    PAPER_SHAPE,
    TRAIN_PRESETS,
    batch,
    build,
    finish,
    interleave,
    param_bytes,
    parser,
    peak_memory,
    setup,
    stats,
    table,
    target,
    train_step,
)

BASELINE = "GPT_Rec_parallel"
MEMORY_TARGET = 1.5  # NRGPT's peak step memory at most this multiple of the baseline's (issue 15)


def main() -> None:
    p = parser(__doc__.splitlines()[0], gpu=True)
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="n_embd values (default 128 256 512)")
    p.add_argument("--batch", type=int, default=None, help=f"batch size (default {PAPER_BATCH})")
    p.add_argument("--block", type=int, default=PAPER_SHAPE["block_size"], help="sequence length")
    p.add_argument("--presets", nargs="+", default=list(TRAIN_PRESETS))
    p.add_argument("--no-memory", action="store_true", help="skip the profiled memory step")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="bfloat16: forward under bf16 autocast, as `nrgpt train` does on a GPU")
    args = p.parse_args()
    setup(args)
    sizes = args.sizes or ([128, 256] if args.quick else [128, 256, 512])
    bsz = args.batch or (8 if args.quick else PAPER_BATCH)
    reps = args.reps or (2 if args.quick else 3)
    t = args.block

    results, rows, targets = [], [], []
    for d in sizes:
        shape = {**PAPER_SHAPE, "n_embd": d, "block_size": t}
        x, y = batch(shape["vocab_size"], bsz, t)
        models = {name: build(name, **shape) for name in args.presets}
        amp = torch.bfloat16 if args.dtype == "bfloat16" else None
        steps = {name: train_step(m, x, y, amp=amp) for name, m in models.items()}
        times = interleave(steps, reps=reps, warmup=1)
        mem = {} if args.no_memory else {name: peak_memory(steps[name]) for name in args.presets}
        base = stats(times[BASELINE])["median"] if BASELINE in times else None
        for name in args.presets:
            s = stats(times[name])
            r = {
                "n_embd": d, "batch": bsz, "block": t, "preset": name,
                "params": sum(q.numel() for q in models[name].parameters()),
                "param_bytes": param_bytes(models[name]),
                "step_s": s, "tokens_per_s": bsz * t / s["median"],
                "time_ratio_vs_" + BASELINE: s["median"] / base if base else None,
                "peak_step_bytes": mem.get(name),
            }
            results.append(r)
        base_mem = mem.get(BASELINE)
        for r in results[-len(args.presets):]:
            m = r["peak_step_bytes"]
            if m is not None and base_mem and r["preset"].startswith("NRGPT"):
                targets.append(target(f"n_embd {d}: {r['preset']} peak step memory / {BASELINE}'s", m / base_mem,
                                      "<=", MEMORY_TARGET))
            rows.append([
                r["n_embd"], r["preset"], r["params"] / 1e6, r["step_s"]["median"], r["tokens_per_s"],
                r["time_ratio_vs_" + BASELINE],
                "-" if m is None else m / 2**20,
                "-" if m is None or not base_mem else m / base_mem,
            ])
        del models, steps

    title = (f"Training step (forward + backward + AdamW), {args.device}, {args.dtype}, batch {bsz}, block {t}, "
             "1 head, 8 steps; "
             f"median of {reps} interleaved reps")
    tab = table(["n_embd", "model", "params (M)", "step (s)", "tokens/s", f"time / {BASELINE}",
                 "peak step mem (MiB)", f"mem / {BASELINE}"], rows, title)
    finish("train_step", args, {"rows": results, "reps": reps, "device": args.device, "dtype": args.dtype}, [tab],
           targets)


if __name__ == "__main__":
    main()
