"""Profile: top ops by self CPU time of one training step (forward + backward + AdamW).

NRGPT_H_FF2W at the paper's Shakespeare shape (n_embd 128, 1 head, 8 steps, block 256, batch 16),
and GPT_Rec_parallel at the same shape for comparison. Two warm-up steps, then ``--steps``
profiled steps with ``torch.profiler`` (CPU activity); times are per step. The ops are also
grouped: matmuls (mm/addmm/bmm/matmul), fused attention (flash attention forward/backward), and
everything else.
"""

from __future__ import annotations

from common import PAPER_BATCH, PAPER_SHAPE, batch, build, finish, parser, setup, table, train_step
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


def profile_step(preset: str, shape: dict, bsz: int, steps: int, top: int) -> tuple[dict, str]:
    x, y = batch(shape["vocab_size"], bsz, shape["block_size"])
    step = train_step(build(preset, **shape), x, y)
    step()
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
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
    return {"preset": preset, "total_self_cpu_ms_per_step": total / 1e3 / steps, "ops": ops[:50],
            "groups_ms_per_step": {g: v / 1e3 / steps for g, v in groups.items()}}, tab + "\n\n" + gtab


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=None, help="default NRGPT_H_FF2W GPT_Rec_parallel")
    p.add_argument("--steps", type=int, default=None, help="profiled steps (default 2; quick 1)")
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args()
    setup(args)
    presets = args.presets or (["NRGPT_H_FF2W"] if args.quick else ["NRGPT_H_FF2W", "GPT_Rec_parallel"])
    steps = args.steps or (1 if args.quick else 2)
    results, tabs = [], []
    for preset in presets:
        r, tab = profile_step(preset, dict(PAPER_SHAPE), PAPER_BATCH, steps, args.top)
        results.append(r)
        tabs.append(tab)
    finish("profile", args, {"profiles": results}, tabs)


if __name__ == "__main__":
    main()
