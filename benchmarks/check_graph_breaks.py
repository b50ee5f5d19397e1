"""Graph breaks: ``torch._dynamo.explain`` on the NRGPT block forward (and the whole model forward).

For each NRGPT preset, the EnergyBlock forward ``block(x, step)`` in training and eval mode, and the
full model forward with a loss, are traced by dynamo (no compilation); the number of graphs and of
graph breaks, and the break reasons, are reported. Required: 0 graph breaks.
"""

from __future__ import annotations

import torch
from common import build, finish, parser, setup, table, target

PRESETS = ("NRGPT_H_FF2W", "NRGPT_H_FF1", "NRGPT_P_FF2W")


def explain(fn, *inputs) -> dict:
    torch._dynamo.reset()
    ex = torch._dynamo.explain(fn)(*inputs)
    return {"graphs": ex.graph_count, "graph_breaks": ex.graph_break_count,
            "reasons": [str(b.reason) for b in ex.break_reasons]}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=list(PRESETS))
    args = p.parse_args()
    setup(args)
    shape = dict(n_embd=64, n_head=1, n_steps=8, block_size=64, vocab_size=65)
    results, rows = [], []
    for preset in args.presets:
        model = build(preset, **shape)
        x = torch.randn(2, 64, 64)
        idx = torch.randint(0, 65, (2, 64))
        checks = {}
        model.train()
        checks["block forward (train)"] = explain(model.block, x, 3)
        model.eval()
        checks["block forward (eval)"] = explain(model.block, x, 3)
        model.train()
        checks["model forward + loss (train)"] = explain(model, idx, idx)
        for what, r in checks.items():
            results.append({"preset": preset, "what": what, **r})
            rows.append([preset, what, r["graphs"], r["graph_breaks"], "; ".join(r["reasons"])[:200] or "-"])
    total = sum(r["graph_breaks"] for r in results)
    block_breaks = sum(r["graph_breaks"] for r in results if r["what"].startswith("block"))
    tab = table(["model", "traced", "graphs", "graph breaks", "reasons"], rows,
                f"torch._dynamo.explain (torch {torch.__version__})")
    finish("graph_breaks", args, {"rows": results, "total_graph_breaks": total},
           [tab], [target("graph breaks in the NRGPT block forward", block_breaks, "<=", 0)])


if __name__ == "__main__":
    main()
