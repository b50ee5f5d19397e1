"""Training step and greedy generation of NRGPT at the paper shape, for comparing two checkouts side by side:

    for i in 1 2 3; do PYTHONPATH=<old checkout>/src python benchmarks/compare_commits.py; python benchmarks/compare_commits.py; done

Prints a dict of seconds: training step (forward + backward + AdamW, batch 16, block 256, min of 5) per model
and greedy generation of 240 tokens from a 16-token prompt on the default path (min of 3).
"""

from __future__ import annotations

import time

import torch

from nrgpt import ModelConfig, build_model

torch.set_num_threads(2)
res = {}
for preset in ("NRGPT_H_FF2W", "NRGPT_H_FF1"):
    cfg = ModelConfig.preset(preset, vocab_size=65, block_size=256, n_embd=128, n_head=1, n_steps=8)
    torch.manual_seed(0); m = build_model(cfg); opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    x = torch.randint(0, 65, (16, 257), generator=torch.Generator().manual_seed(0))
    def step():
        opt.zero_grad(); loss = m(x[:, :-1], x[:, 1:])[1]; loss.backward(); opt.step()
    for _ in range(3): step()
    ts = []
    for _ in range(5):
        t = time.perf_counter(); step(); ts.append(time.perf_counter() - t)
    res[f"train {preset}"] = min(ts)
    if preset == "NRGPT_H_FF2W":
        m.eval(); p = x[:1, :16]
        m.generate(p, 20, greedy=True)
        ts = []
        for _ in range(3):
            t = time.perf_counter(); m.generate(p, 240, greedy=True); ts.append(time.perf_counter() - t)
        res["generate FF2W 240 tok"] = min(ts)
print(res)
