"""Profile: top ops by self CPU time of one training step (forward + backward + AdamW).

NRGPT_H_FF2W at the paper's Shakespeare shape (n_embd 128, 1 head, 8 steps, block 256, batch 16),
and GPT_Rec_parallel at the same shape for comparison. Two warm-up steps, then ``--steps``
profiled steps with ``torch.profiler`` (CPU activity); times are per step. The ops are also
grouped: matmuls (mm/addmm/bmm/matmul), fused attention (flash attention forward/backward), and
everything else.

``--shapes``: each matmul shape of the step, its rate inside the step (GFLOP per self CPU second, from the
profiler's shapes) against the same product alone (fresh contiguous operands, best of ``--reps``
interleaved calls), and the step's matmul time if every product ran at its rate alone. The profiler
does not record strides, so a product that the step takes on transposed operands is timed alone on
contiguous ones.
"""

from __future__ import annotations

import math

import torch
from common import DEVICE, PAPER_BATCH, PAPER_SHAPE, batch, build, finish, interleave, parser, setup, table, train_step
from torch.profiler import ProfilerActivity, profile

MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")
ATTENTION = ("flash_attention",)


def group(name: str) -> str:
    if name in ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm"):
        return "matmul"
    if any(a in name for a in ATTENTION):
        return "attention (flash, fwd+bwd)"
    if name.startswith("## Call CompiledFxGraph"):
        return "fused elementwise passes (nrgpt.kernels, compiled)"
    return "other"


def product_dims(name: str, shapes: list) -> tuple[int, int, int, int] | None:
    """(batch, m, k, n) of a matmul event from its input shapes, or None for an op that is not one."""
    if name == "aten::mm" and len(shapes) >= 2:
        (m, k), (_, n) = shapes[0], shapes[1]
        return 1, m, k, n
    if name in ("aten::addmm", "aten::addmm_") and len(shapes) >= 3:
        (m, k), (_, n) = shapes[1], shapes[2]
        return 1, m, k, n
    if name == "aten::bmm" and len(shapes) >= 2:
        (b, m, k), (_, _, n) = shapes[0], shapes[1]
        return b, m, k, n
    if name == "aten::baddbmm" and len(shapes) >= 3:
        (b, m, k), (_, _, n) = shapes[1], shapes[2]
        return b, m, k, n
    return None


def shape_rates(prof: profile, steps: int, reps: int) -> tuple[list[dict], str]:
    """Each matmul shape's rate in the step against the same product alone (see the module docstring)."""
    per_shape: dict[tuple[int, int, int, int], list[float]] = {}
    for e in prof.key_averages(group_by_input_shape=True):
        dims = product_dims(e.key, e.input_shapes)
        if dims is None or e.self_cpu_time_total <= 0:
            continue
        acc = per_shape.setdefault(dims, [0.0, 0.0])
        acc[0] += e.count / steps
        acc[1] += e.self_cpu_time_total / steps
    alone = {}
    for b, m, k, n in per_shape:
        a1, a2 = torch.randn(b, m, k, device=DEVICE), torch.randn(b, k, n, device=DEVICE)
        out = torch.empty(b, m, n, device=DEVICE)
        if b == 1:
            a1, a2, out = a1[0], a2[0], out[0]
        mul = torch.mm if b == 1 else torch.bmm
        alone[(b, m, k, n)] = lambda a1=a1, a2=a2, out=out, mul=mul: mul(a1, a2, out=out)
    times = interleave({str(d): fn for d, fn in alone.items()}, reps)
    rows, results, in_step_ms, at_alone_ms = [], [], 0.0, 0.0
    for dims, (calls, us) in sorted(per_shape.items(), key=lambda kv: -kv[1][1]):
        flop = 2 * math.prod(dims) * calls
        step_rate = flop / (us * 1e3)
        alone_s = min(times[str(dims)])
        alone_rate = 2 * math.prod(dims) / alone_s / 1e9
        in_step_ms += us / 1e3
        at_alone_ms += calls * alone_s * 1e3
        results.append({"b_m_k_n": dims, "calls_per_step": calls, "ms_per_step": us / 1e3,
                        "gflops_in_step": step_rate, "gflops_alone": alone_rate})
        rows.append(["x".join(map(str, dims)), calls, us / 1e3, step_rate, alone_rate, step_rate / alone_rate])
    rows.append(["all products", sum(c for c, _ in per_shape.values()), in_step_ms, None, None,
                 at_alone_ms / in_step_ms])
    tab = table(["b x m x k x n", "calls/step", "ms/step in the step", "GFLOP/s in the step", "GFLOP/s alone",
                 "in step / alone"], rows,
                f"matmul shapes: in the step against alone (best of {reps}); at their rates alone the products "
                f"would take {at_alone_ms:.0f} of their {in_step_ms:.0f} ms/step")
    return results, tab


def profile_step(preset: str, shape: dict, bsz: int, steps: int, top: int,
                 shape_reps: int = 0) -> tuple[dict, str]:
    x, y = batch(shape["vocab_size"], bsz, shape["block_size"])
    step = train_step(build(preset, **shape), x, y)
    step()
    step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=shape_reps > 0) as prof:
        for _ in range(steps):
            step()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    ops = [{"op": e.key, "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
            "percent": 100 * e.self_cpu_time_total / total, "calls_per_step": e.count / steps} for e in events]
    groups: dict[str, float] = {}
    for e in events:
        groups[group(e.key)] = groups.get(group(e.key), 0.0) + e.self_cpu_time_total
    rows = [[o["op"], o["self_cpu_ms_per_step"], o["percent"], o["calls_per_step"]] for o in ops[:top]]
    title = (f"{preset}: top {top} ops by self CPU time, one training step, n_embd {shape['n_embd']}, "
             f"batch {bsz}, block {shape['block_size']} (total self CPU {total / 1e3 / steps:.0f} ms/step, "
             f"mean of {steps} steps)")
    tab = table(["op", "self CPU (ms/step)", "% of total", "calls/step"], rows, title)
    grows = [[g, v / 1e3 / steps, 100 * v / total] for g, v in sorted(groups.items(), key=lambda kv: -kv[1])]
    gtab = table(["group", "self CPU (ms/step)", "% of total"], grows, f"{preset}: grouped")
    result = {"preset": preset, "total_self_cpu_ms_per_step": total / 1e3 / steps, "ops": ops[:50],
              "groups_ms_per_step": {g: v / 1e3 / steps for g, v in groups.items()}}
    text = tab + "\n\n" + gtab
    if shape_reps > 0:
        result["matmul_shapes"], stab = shape_rates(prof, steps, shape_reps)
        text += "\n\n" + stab
    return result, text


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=None, help="default NRGPT_H_FF2W GPT_Rec_parallel")
    p.add_argument("--steps", type=int, default=None, help="profiled steps (default 2; quick 1)")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--shapes", action="store_true",
                   help="also each matmul shape's rate in the step against the same product alone")
    args = p.parse_args()
    setup(args)
    presets = args.presets or (["NRGPT_H_FF2W"] if args.quick else ["NRGPT_H_FF2W", "GPT_Rec_parallel"])
    steps = args.steps or (1 if args.quick else 2)
    results, tabs = [], []
    for preset in presets:
        r, tab = profile_step(preset, dict(PAPER_SHAPE), PAPER_BATCH, steps, args.top,
                              shape_reps=(args.reps or 9) if args.shapes else 0)
        results.append(r)
        tabs.append(tab)
    finish("profile", args, {"profiles": results}, tabs)


if __name__ == "__main__":
    main()
