"""Q3: achieved FLOP/s of a training step against the machine's measured float32 matmul peak.

FLOP counting (matmuls only; elementwise ops, norms, softmax and the optimizer are not counted):
  * forward: every matmul of the forward pass counted exactly, 2*m*n*k, from the code. For NRGPT
    the forward *is* the closed-form gradient of ``src/nrgpt/energy.py``: e.g. per step for 'ff2w'
    h = W1 g, W2 sigma(h), W2^T g and W1^T (...) (four N x D x 4D matmuls), the keys K g, the
    causal attention, and the eta matmul. Causal attention counts only the visible (query, key)
    pairs, T(T+1)/2 per row block (inclusive) or T(T-1)/2 (strict), 2 matmuls of 2*hd FLOPs each
    per pair: the convention of FlashAttention, and what the CPU flash kernel executes (it skips
    blocks above the diagonal).
  * backward: 2x forward (each matmul C = A B needs dA and dB; every operand here requires grad).
    Step FLOPs = 3x forward. The analytic non-attention count is cross-checked against
    ``torch.utils.flop_counter.FlopCounterMode`` on the real forward + backward (which does not
    see the CPU flash-attention op).
  * peak: best-of-N ``torch.mm`` of square float32 matrices at several sizes with the same thread
    count, measured before and after the step timings; the higher is used.
"""

from __future__ import annotations

import torch
from common import (
    COMPILED,
    PAPER_BATCH,
    PAPER_SHAPE,
    TRAIN_PRESETS,
    batch,
    build,
    finish,
    interleave,
    matmul_peak,
    parser,
    setup,
    stats,
    table,
    target,
    train_step,
)
from torch.utils.flop_counter import FlopCounterMode

from nrgpt import ModelConfig, kernels

BASELINE = "GPT_Rec_parallel"
STEP_RATIO_TARGETS = {"NRGPT_H_FF2W": 1.5, "NRGPT_H_FF1": 1.0}  # step time / the baseline's, at most (issue 15)
PEAK_FRACTION_TARGET = 0.70  # every NRGPT variant's training step, at least this fraction of the matmul peak


def forward_flops(cfg: ModelConfig, b: int, t: int) -> dict[str, float]:
    """Matmul FLOPs of one forward pass, split into 'sdpa' (fused causal attention) and 'other'."""
    n, d, m, v, h, s = b * t, cfg.n_embd, cfg.ff_mult * cfg.n_embd, cfg.vocab_size, cfg.n_head, cfg.n_steps
    inclusive_pairs = b * t * (t + 1) / 2
    other = 2 * n * d * v  # lm_head
    sdpa = 0.0
    if cfg.model != "nrgpt":
        hd = d // h
        per_block = 2 * n * d * 3 * d + 2 * n * d * d + 2 * 2 * n * d * m  # qkv, proj, MLP
        return {"sdpa": s * 4 * inclusive_pairs * h * hd, "other": other + s * per_block}
    step = 0.0
    # feed-forward energy gradient (FFEnergy.grad)
    if cfg.ff == "ff2w":
        step += 4 * 2 * n * d * m  # fc1(g), fc2(gelu h), g @ W2, (...) @ W1
    elif cfg.ff in ("ff1", "dam"):
        step += 2 * 2 * n * d * m  # fc1(g), (...) @ W1
    else:  # ff2: fc1 is D x D
        step += 2 * (2 * n * d * d) + 2 * (2 * n * d * m)
    # attention energy gradient (AttentionEnergy.grad)
    if cfg.attention != "none":
        hd = d if cfg.attention == "full" else d // h
        step += 2 * n * d * (h * hd)  # keys
        if cfg.attention == "lowrank":
            step += 2 * n * d * d + 2 * n * d * d  # queries, projection back with W_Q^T
        if cfg.mask == "inclusive" and cfg.grad_mode == "exact":  # explicit dense softmax path
            step += 2 * (2 * b * h * t * t * hd) + 2 * n * (h * hd) * d
        else:
            pairs = inclusive_pairs if cfg.mask == "inclusive" else b * t * (t - 1) / 2
            sdpa += s * 4 * pairs * h * hd
    # inference rate
    if cfg.eta in ("free", "psd"):
        step += 2 * n * d * d + (2 * d**3 if cfg.eta == "psd" else 0)
    return {"sdpa": sdpa, "other": other + s * step}


def counted_flops(model: torch.nn.Module, b: int, t: int) -> float:
    """FLOPs FlopCounterMode sees in forward + backward (batch b; excludes CPU flash attention).

    The kernels' fused elementwise passes run eagerly while counting (the same products; elementwise
    work is not counted): torch.compile fails under FlopCounterMode, and a failed compilation would
    leave them eager for the timings that follow in this process."""
    x, y = batch(model.config.vocab_size, b, t, seed=1)
    enabled, kernels.Fused.enabled = kernels.Fused.enabled, False
    try:
        with FlopCounterMode(display=False) as counter:
            _, loss = model(x, y)
            loss.backward()
    finally:
        kernels.Fused.enabled = enabled
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="n_embd values (default 128 256 512)")
    p.add_argument("--batch", type=int, default=None, help=f"batch size (default {PAPER_BATCH})")
    p.add_argument("--block", type=int, default=PAPER_SHAPE["block_size"])
    p.add_argument("--presets", nargs="+", default=list(TRAIN_PRESETS))
    p.add_argument("--peak-sizes", type=int, nargs="+", default=None, help="torch.mm sizes (default 1024 2048 4096)")
    args = p.parse_args()
    setup(args)
    sizes = args.sizes or ([128, 256] if args.quick else [128, 256, 512])
    bsz = args.batch or (8 if args.quick else PAPER_BATCH)
    reps = args.reps or (2 if args.quick else 3)
    peak_sizes = tuple(args.peak_sizes or ([1024, 2048] if args.quick else [1024, 2048, 4096]))
    peak_reps = 3 if args.quick else 5
    t = args.block

    peak_before = matmul_peak(peak_sizes, peak_reps)
    rows_raw = []
    for d in sizes:
        shape = {**PAPER_SHAPE, "n_embd": d, "block_size": t}
        x, y = batch(shape["vocab_size"], bsz, t)
        models = {name: build(name, **shape) for name in args.presets}
        steps = {name: train_step(mdl, x, y) for name, mdl in models.items()}
        times = interleave(steps, reps=reps, warmup=1)
        for name, mdl in models.items():
            fwd = forward_flops(mdl.config, bsz, t)
            check = None if name.endswith(COMPILED) else counted_flops(mdl, 1, t) * bsz / (3 * fwd["other"])
            rows_raw.append({"n_embd": d, "preset": name, "batch": bsz, "block": t, "step_s": stats(times[name]),
                             "forward_flops": fwd, "step_flops": 3 * (fwd["sdpa"] + fwd["other"]),
                             "flop_counter_check": check})
        del models, steps
    peak_after = matmul_peak(peak_sizes, peak_reps)
    peak = max(peak_before["peak_gflops"], peak_after["peak_gflops"])

    rows, targets = [], []
    by_key = {(r["n_embd"], r["preset"]): r for r in rows_raw}
    for r in rows_raw:
        base = by_key.get((r["n_embd"], BASELINE))
        fastest = min((b for b in (base, by_key.get((r["n_embd"], BASELINE + COMPILED))) if b),
                      key=lambda b: b["step_s"]["median"], default=None)
        sec = r["step_s"]["median"]
        r["achieved_gflops"] = r["step_flops"] / sec / 1e9
        r["fraction_of_peak"] = r["achieved_gflops"] / peak
        r["time_ratio_vs_" + BASELINE] = sec / base["step_s"]["median"] if base else None
        r["flop_ratio_vs_" + BASELINE] = r["step_flops"] / base["step_flops"] if base else None
        rows.append([r["n_embd"], r["preset"], r["step_flops"] / 1e9, r["flop_counter_check"], sec,
                     r["achieved_gflops"], 100 * r["fraction_of_peak"], r["flop_ratio_vs_" + BASELINE],
                     r["time_ratio_vs_" + BASELINE]])
        d, name = r["n_embd"], r["preset"]
        bound = STEP_RATIO_TARGETS.get(name.removesuffix(COMPILED))
        if fastest is not None and bound is not None:  # against the baseline at its fastest (eager or compiled)
            targets.append(target(f"n_embd {d}: {name} step / fastest {fastest['preset']} step",
                                  sec / fastest["step_s"]["median"], "<=", bound,
                                  f"FLOP ratio {r['flop_ratio_vs_' + BASELINE]:.2f}"))
        if name.startswith("NRGPT"):
            targets.append(target(f"n_embd {d}: {name} fraction of matmul peak", r["fraction_of_peak"], ">=",
                                  PEAK_FRACTION_TARGET))

    peak_rows = [[n, peak_before["gflops_per_size"][n], peak_after["gflops_per_size"][n]] for n in
                 peak_before["gflops_per_size"]]
    peak_tab = table(["torch.mm size", "GFLOP/s (before)", "GFLOP/s (after)"], peak_rows,
                     f"Measured float32 matmul peak, {torch.get_num_threads()} threads, best of {peak_reps}: "
                     f"{peak:.0f} GFLOP/s")
    tab = table(["n_embd", "model", "step GFLOP", "counter check", "step (s)", "GFLOP/s", "% of peak",
                 f"FLOPs / {BASELINE}", f"time / {BASELINE}"], rows,
                f"Achieved FLOP/s of a training step, batch {bsz}, block {t}; median of {reps} interleaved reps "
                "(counter check = FlopCounterMode / analytic for the non-attention matmuls, should be 1)")
    finish("flops", args, {"peak_gflops": peak, "peak_before": peak_before, "peak_after": peak_after,
                           "rows": rows_raw, "reps": reps}, [peak_tab, tab], targets)


if __name__ == "__main__":
    main()
