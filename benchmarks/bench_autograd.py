"""Q2: training step with the closed-form energy gradient against autograd of the energy.

The hot path ``EnergyBlock.energy_grad`` (closed form, used by forward) is replaced, per model
instance, by ``energy_grad_autograd`` (autograd of the energy with the keys detached, graph kept
for training): what a straightforward implementation does. Both variants start from the same
weights; the first step's losses and parameter gradients are checked equal before timing. Steps
are interleaved and medians compared in one process.
"""

from __future__ import annotations

import torch
from common import (
    PAPER_BATCH,
    PAPER_SHAPE,
    batch,
    build,
    clone,
    finish,
    interleave,
    parser,
    peak_memory,
    setup,
    stats,
    table,
    target,
    train_step,
    use_autograd_energy_grad,
)

HEADLINE = "NRGPT_H_FF2W"


def check_equal(closed: torch.nn.Module, auto: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Max |difference| of loss and parameter gradients between the two variants (same weights)."""
    worst = 0.0
    _, la = closed(x, y)
    _, lb = auto(x, y)
    ga = torch.autograd.grad(la, list(closed.parameters()), allow_unused=True)
    gb = torch.autograd.grad(lb, list(auto.parameters()), allow_unused=True)
    worst = abs(la.item() - lb.item())
    for a, b in zip(ga, gb):
        if a is not None and b is not None:
            scale = max(a.abs().max().item(), 1e-12)
            worst = max(worst, (a - b).abs().max().item() / scale)
    return worst


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=None,
                   help="PRESET:N_EMBD items (default NRGPT_H_FF2W:128 NRGPT_H_FF2W:256 NRGPT_H_FF1:128 "
                        "NRGPT_P_FF2W:128)")
    p.add_argument("--batch", type=int, default=None, help=f"batch size (default {PAPER_BATCH})")
    p.add_argument("--block", type=int, default=PAPER_SHAPE["block_size"])
    args = p.parse_args()
    setup(args)
    cases = args.cases or (["NRGPT_H_FF2W:128", "NRGPT_H_FF1:128"] if args.quick else
                           ["NRGPT_H_FF2W:128", "NRGPT_H_FF2W:256", "NRGPT_H_FF1:128", "NRGPT_P_FF2W:128"])
    bsz = args.batch or (8 if args.quick else PAPER_BATCH)
    reps = args.reps or (2 if args.quick else 3)
    t = args.block

    results, rows, targets = [], [], []
    for case in cases:
        preset, d = case.split(":")
        shape = {**PAPER_SHAPE, "n_embd": int(d), "block_size": t}
        x, y = batch(shape["vocab_size"], bsz, t)
        closed = build(preset, **shape)
        auto = use_autograd_energy_grad(clone(closed))
        err = check_equal(closed, auto, x, y)
        steps = {"closed": train_step(closed, x, y), "autograd": train_step(auto, x, y)}
        times = interleave(steps, reps=reps, warmup=1)
        mem = {k: peak_memory(f) for k, f in steps.items()}
        tc, ta = stats(times["closed"]), stats(times["autograd"])
        speedup = ta["median"] / tc["median"]
        results.append({"preset": preset, "n_embd": int(d), "batch": bsz, "block": t, "closed_s": tc,
                        "autograd_s": ta, "speedup_closed_over_autograd": speedup,
                        "peak_step_bytes": mem, "max_rel_grad_diff": err})
        rows.append([preset, int(d), tc["median"], ta["median"], speedup, bsz * t / tc["median"],
                     bsz * t / ta["median"], mem["closed"] / 2**20, mem["autograd"] / 2**20, err])
        if preset == HEADLINE:
            targets.append(target(f"{HEADLINE} n_embd {d}: autograd step / closed-form step", speedup, ">=", 1.5))

    title = (f"Closed-form energy gradient vs autograd of the energy: training step, batch {bsz}, block {t}, "
             f"median of {reps} interleaved reps")
    tab = table(["model", "n_embd", "closed (s)", "autograd (s)", "speed-up", "closed tok/s", "autograd tok/s",
                 "closed mem (MiB)", "autograd mem (MiB)", "max rel. grad diff"], rows, title)
    finish("autograd_vs_closed", args, {"rows": results, "reps": reps}, [tab], targets)


if __name__ == "__main__":
    main()
