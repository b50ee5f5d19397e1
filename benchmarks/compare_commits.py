"""Training step and greedy generation of NRGPT at the paper shape, to compare two checkouts side by side:

    for i in 1 2 3; do
        PYTHONPATH=<old checkout>/src python benchmarks/compare_commits.py; python benchmarks/compare_commits.py
    done

Prints seconds: the training step (forward + backward + AdamW, batch 16, block 256, min of 5) per model, and
greedy generation of 240 tokens from a 16-token prompt on the default path (min of 3). 2 threads.
"""

from __future__ import annotations

import time

import torch

from nrgpt import ModelConfig, build_model


def best_of(reps: int, fn) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    torch.set_num_threads(2)
    x = torch.randint(0, 65, (16, 257), generator=torch.Generator().manual_seed(0))
    results = {}
    for preset in ("NRGPT_H_FF2W", "NRGPT_H_FF1"):
        cfg = ModelConfig.preset(preset, vocab_size=65, block_size=256, n_embd=128, n_head=1, n_steps=8)
        torch.manual_seed(0)
        model = build_model(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step(model=model, opt=opt) -> None:
            opt.zero_grad()
            model(x[:, :-1], x[:, 1:])[1].backward()
            opt.step()

        best_of(3, step)  # warm-up
        results[f"train {preset}"] = best_of(5, step)
        if preset == "NRGPT_H_FF2W":
            model.eval()
            model.generate(x[:1, :16], 20, greedy=True)
            prompt = x[:1, :16]
            results["generate 240 tokens"] = best_of(3, lambda m=model, p=prompt: m.generate(p, 240, greedy=True))
    print(", ".join(f"{k}: {v:.3f} s" for k, v in results.items()))


if __name__ == "__main__":
    main()
