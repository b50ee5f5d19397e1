"""Optimizer step time: AdamW, nrgpt's Muon (``train.optimizer = 'muon'``) and ``torch.optim.Muon``.

One ``step()`` over a model's parameters with fixed random gradients, interleaved; medians per step, and the
share of one training step (forward + backward + AdamW) of the same model and batch. ``torch.optim.Muon``
(its Newton-Schulz iteration in bfloat16) takes the same hidden matrices, with the same fused AdamW on the
rest. Shapes: the quickstart (NRGPT_H_FF1, n_embd 96, 4 steps, context 64, batch 48) and the paper's
Shakespeare shape (NRGPT_H_FF2W, n_embd 128, 8 steps, context 256, batch 16).
"""

from __future__ import annotations

import torch
from common import PAPER_BATCH, PAPER_SHAPE, batch, build, finish, interleave, reps_of, start, stats, table, train_step

from nrgpt.optim import hidden_matrices, make_optimizer
from nrgpt.runconfig import TrainConfig

SHAPES = [
    ("the quickstart", "NRGPT_H_FF1", dict(n_embd=96, n_head=1, n_steps=4, block_size=64, vocab_size=65), 48),
    ("the paper's Shakespeare shape", "NRGPT_H_FF2W", PAPER_SHAPE, PAPER_BATCH),
]


def torch_muon(model: torch.nn.Module) -> torch.optim.Optimizer:
    """torch.optim.Muon on the hidden matrices (a stack of matrices, such as eta's, is left to AdamW: it takes
    2-D parameters only), fused AdamW on the rest, as one ``step``."""
    muon = [p for p in hidden_matrices(model) if p.dim() == 2]
    ids = {id(p) for p in muon}
    adamw = torch.optim.AdamW([p for p in model.parameters() if id(p) not in ids], lr=1e-3, fused=True)
    inner = torch.optim.Muon(muon, lr=1e-3, adjust_lr_fn="match_rms_adamw")

    class Both:
        def step(self) -> None:
            inner.step()
            adamw.step()

    return Both()


def main() -> None:
    args = start(__doc__)
    reps = reps_of(args, 20)
    rows, results = [], []
    for what, preset, shape, bsz in SHAPES[:1] if args.quick else SHAPES:
        model = build(preset, **shape)
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        opts = {"AdamW (fused)": make_optimizer(model, TrainConfig(optimizer="adamw"), torch.device("cpu")),
                "nrgpt Muon": make_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu")),
                "torch.optim.Muon": torch_muon(model)}
        times = interleave({name: opt.step for name, opt in opts.items()}, reps=reps, warmup=2)
        x, y = batch(shape["vocab_size"], bsz, shape["block_size"])
        step = stats(interleave({"step": train_step(build(preset, **shape), x, y)}, reps=max(3, reps // 4))["step"])
        for name, ts in times.items():
            s = stats(ts)
            results.append({"shape": what, "preset": preset, "optimizer": name, "step_s": s,
                            "training_step_s": step})
            rows.append([what, name, 1e3 * s["median"], 100 * s["median"] / step["median"]])
    tab = table(["shape", "optimizer", "step (ms)", "% of a training step"], rows,
                f"Optimizer step, {args.threads} threads; medians of {reps} interleaved steps")
    finish("optimizer", args, {"rows": results, "reps": reps}, [tab])


if __name__ == "__main__":
    main()
