"""Q2: training step with the closed-form energy gradient against autograd of the energy.

Three variants of the same model (same weights), per instance:
  * closed: the default, ``EnergyBlock.energy_grad`` in closed form, its FF part with the
    hand-written backward of ``nrgpt.kernels``;
  * closed+autograd: the same closed form in ATen ops differentiated by autograd (nrgpt before
    issue 15; ``common.use_autograd_closed_form``);
  * autograd: ``energy_grad_autograd``, autograd of the energy with the keys detached, graph kept for
    training: what a straightforward implementation does.
The first step's losses and parameter gradients are checked equal before timing. Steps are
interleaved and medians compared in one process.
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
    use_autograd_closed_form,
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
        before = use_autograd_closed_form(clone(closed))
        auto = use_autograd_energy_grad(clone(closed))
        err = max(check_equal(closed, auto, x, y), check_equal(closed, before, x, y))
        steps = {"closed": train_step(closed, x, y), "closed+autograd": train_step(before, x, y),
                 "autograd": train_step(auto, x, y)}
        times = interleave(steps, reps=reps, warmup=1)
        mem = {k: peak_memory(f) for k, f in steps.items()}
        tc, tb, ta = stats(times["closed"]), stats(times["closed+autograd"]), stats(times["autograd"])
        speedup = ta["median"] / tc["median"]
        results.append({"preset": preset, "n_embd": int(d), "batch": bsz, "block": t, "closed_s": tc,
                        "closed_autograd_s": tb, "autograd_s": ta, "speedup_closed_over_autograd": speedup,
                        "speedup_closed_over_closed_autograd": tb["median"] / tc["median"],
                        "peak_step_bytes": mem, "max_rel_grad_diff": err})
        rows.append([preset, int(d), tc["median"], tb["median"], ta["median"], tb["median"] / tc["median"], speedup,
                     mem["closed"] / 2**20, mem["closed+autograd"] / 2**20, mem["autograd"] / 2**20, err])
        if preset == HEADLINE:
            targets.append(target(f"{HEADLINE} n_embd {d}: autograd step / closed-form step", speedup, ">=", 1.5))

    title = (f"Closed form with the hand-written backward vs the closed form under autograd vs autograd of the "
             f"energy: training step, batch {bsz}, block {t}, "
             f"median of {reps} interleaved reps")
    tab = table(["model", "n_embd", "closed (s)", "closed+autograd (s)", "autograd (s)",
                 "speed-up vs closed+autograd", "speed-up vs autograd", "closed mem (MiB)",
                 "closed+autograd mem (MiB)", "autograd mem (MiB)", "max rel. grad diff"], rows, title)
    finish("autograd_vs_closed", args, {"rows": results, "reps": reps}, [tab], targets)


if __name__ == "__main__":
    main()
