"""nrgpt's own training step in float32 against bfloat16 autocast: the measurement behind system.dtype 'auto'.

On a CPU that multiplies bfloat16 in hardware (AVX512-BF16 or AMX; ``nrgpt.device.native_bf16_cpu``)
``nrgpt train`` runs under bfloat16 autocast by default. This script times one training step (forward +
backward + AdamW) both ways on identical weights, interleaved, from the smallest shapes the tests and the
quickstart train to n_embd 512, and prints the speed-up of bfloat16 autocast. It runs on any CPU (where
bfloat16 is emulated it shows the slowdown that keeps 'auto' at float32 there).
"""

from __future__ import annotations

import torch
from common import batch, build, clone, finish, interleave, reps_of, start, stats, table, train_step

from nrgpt.device import native_bf16_cpu

SHAPES = [  # (preset, n_embd, n_head, n_steps, block, batch): where each comes from
    ("NRGPT_H_FF1", 32, 1, 4, 64, 16, "a toy model"),
    ("NRGPT_H_FF1", 64, 1, 4, 64, 16, "a toy model"),
    ("NRGPT_H_FF1", 96, 1, 4, 64, 16, "the quickstart"),
    ("GPT_Rec_parallel", 64, 1, 4, 64, 16, "a toy baseline"),
    ("NRGPT_H_FF1", 128, 1, 8, 256, 16, "the paper's Shakespeare shape"),
    ("NRGPT_H_FF2W", 128, 1, 8, 256, 16, "the paper's Shakespeare shape"),
    ("GPT_Rec_parallel", 128, 1, 8, 256, 16, "the paper's Shakespeare shape"),
    ("NRGPT_H_FF2W", 256, 1, 8, 256, 16, "n_embd 256"),
    ("NRGPT_H_FF2W", 512, 1, 8, 256, 8, "n_embd 512, batch 8"),
]


def main() -> None:
    args = start(__doc__)
    reps = reps_of(args, 5)
    shapes = SHAPES[:4] if args.quick else SHAPES
    rows, results = [], []
    for preset, n_embd, n_head, n_steps, block, bsz, what in shapes:
        model = build(preset, n_embd=n_embd, n_head=n_head, n_steps=n_steps, block_size=block, vocab_size=65)
        x, y = batch(65, bsz, block)
        times = interleave({"float32": train_step(model, x, y),
                            "bfloat16": train_step(clone(model), x, y, amp=torch.bfloat16)}, reps=reps, warmup=2)
        f, b = stats(times["float32"]), stats(times["bfloat16"])
        results.append({"preset": preset, "n_embd": n_embd, "n_steps": n_steps, "block": block, "batch": bsz,
                        "what": what, "float32_s": f, "bfloat16_s": b, "speedup": f["median"] / b["median"]})
        rows.append([what, preset, n_embd, f"{n_steps} / {block} / {bsz}", 1e3 * f["median"], 1e3 * b["median"],
                     f["median"] / b["median"]])
    native = "multiplies bfloat16 in hardware" if native_bf16_cpu() else "emulates bfloat16"
    tab = table(["shape", "model", "n_embd", "steps / block / batch", "float32 (ms)", "bf16 autocast (ms)",
                 "speed-up"], rows,
                f"nrgpt's training step, float32 against bfloat16 autocast, {args.threads} threads (this CPU "
                f"{native}); medians of {reps} interleaved steps")
    finish("precision", args, {"rows": results, "reps": reps, "native_bf16": native_bf16_cpu()}, [tab])


if __name__ == "__main__":
    main()
