"""Training step and greedy generation of NRGPT at the paper shape, to compare two checkouts side by side:

    for i in 1 2 3; do
        PYTHONPATH=<old checkout>/src python benchmarks/compare_commits.py; python benchmarks/compare_commits.py
    done

Prints seconds: the training step (forward + backward + AdamW, batch 16, block 256, min of 5) per model, and
greedy generation of 240 tokens from a 16-token prompt on the default path (min of 3). 2 threads.

Wall times on a shared 2-core machine spread by 15% between runs of one checkout. `--ops` prints what does
not spread: every ATen op, compiled graph and backward node of one training step (NRGPT_H_FF2W,
NRGPT_H_FF1 and GPT_Rec_parallel at a small shape) with its number of calls, one per line, so that

    PYTHONPATH=<old checkout>/src python benchmarks/compare_commits.py --ops > old.txt
    python benchmarks/compare_commits.py --ops > new.txt; diff old.txt new.txt

shows whether two checkouts run the same kernels. `--against <old checkout>/src` imports the old checkout's
package as `nrgpt_old` beside this one and interleaves their training steps in one process (30 rounds,
alternating which goes first), so that both see the same machine: it prints each one's min and median and
the median of the per-round speed-ups, for the training steps and for greedy generation of 240 tokens.
With `--bf16` as well, the training steps run under bf16 autocast (and generation is left out).
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

from nrgpt import ModelConfig, build_model


def best_of(reps: int, fn) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def training_step(preset: str, batch: int, block: int, n_embd: int, package=None, amp: torch.dtype | None = None):
    """A model of `preset` (built by `package`, default this checkout's nrgpt) and a function that runs one
    forward + backward + AdamW step on fixed tokens (the forward under `amp` autocast if given)."""
    x = torch.randint(0, 65, (batch, block + 1), generator=torch.Generator().manual_seed(0))
    config_cls, build = (ModelConfig, build_model) if package is None else (package.ModelConfig, package.build_model)
    cfg = config_cls.preset(preset, vocab_size=65, block_size=block, n_embd=n_embd, n_head=1, n_steps=8)
    torch.manual_seed(0)
    model = build(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
            loss = model(x[:, :-1], x[:, 1:])[1]
        loss.backward()
        opt.step()

    return model, x, step


def op_counts() -> None:
    from torch.profiler import profile

    torch.set_num_threads(1)
    for preset in ("NRGPT_H_FF2W", "NRGPT_H_FF1", "GPT_Rec_parallel"):
        _, _, step = training_step(preset, batch=4, block=64, n_embd=64)
        step()
        step()
        with profile() as prof:
            step()
        for event in sorted(prof.key_averages(), key=lambda e: e.key):
            if event.key.startswith("aten::") or "Compiled" in event.key or "Backward" in event.key:
                print(preset, event.key, event.count)


def import_old(src: str):
    """The nrgpt package under `src` (a checkout's src/), imported as `nrgpt_old`."""
    init = Path(src) / "nrgpt" / "__init__.py"
    if not init.is_file():
        sys.exit(f"--against {src}: no nrgpt/__init__.py there; pass the old checkout's src/ folder")
    spec = importlib.util.spec_from_file_location("nrgpt_old", init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["nrgpt_old"] = module
    spec.loader.exec_module(module)
    return module


def alternate(tasks: dict[str, object], rounds: int) -> dict[str, list[float]]:
    """Seconds of each call of the two ``tasks`` ('old', 'new'), alternating which goes first."""
    times = {name: [] for name in tasks}
    for r in range(rounds):
        for name in ("old", "new") if r % 2 == 0 else ("new", "old"):
            start = time.perf_counter()
            tasks[name]()
            times[name].append(time.perf_counter() - start)
    return times


def report(what: str, times: dict[str, list[float]]) -> None:
    speedup = statistics.median(o / n for o, n in zip(times["old"], times["new"]))
    print(f"{what}: old min {min(times['old']):.3f} s, median {statistics.median(times['old']):.3f} s; "
          f"new min {min(times['new']):.3f} s, median {statistics.median(times['new']):.3f} s; "
          f"new vs old {speedup:.3f}x (median of {len(times['old'])} rounds)")


def interleaved(src: str, amp: torch.dtype | None, rounds: int = 30, generation_rounds: int = 10) -> None:
    torch.set_num_threads(2)
    old = import_old(src)
    for preset in ("NRGPT_H_FF2W", "NRGPT_H_FF1", "GPT_Rec_parallel"):
        built = {"old": training_step(preset, 16, 256, 128, old, amp),
                 "new": training_step(preset, 16, 256, 128, amp=amp)}
        steps = {name: step for name, (_, _, step) in built.items()}
        for step in steps.values():
            best_of(3, step)  # warm-up
        report(f"train {preset}" + (" (bf16 autocast)" if amp else ""), alternate(steps, rounds))
        if preset == "NRGPT_H_FF2W" and amp is None:
            decode = {}
            for name, (model, x, _) in built.items():
                model.eval()
                model.generate(x[:1, :16], 20, greedy=True)  # warm-up
                decode[name] = lambda m=model, p=x[:1, :16]: m.generate(p, 240, greedy=True)
            same = torch.equal(*(run() for run in decode.values()))
            report(f"generate 240 tokens NRGPT_H_FF2W (same tokens: {'yes' if same else 'no'})",
                   alternate(decode, generation_rounds))


def timings() -> None:
    torch.set_num_threads(2)
    results = {}
    for preset in ("NRGPT_H_FF2W", "NRGPT_H_FF1"):
        model, x, step = training_step(preset, batch=16, block=256, n_embd=128)
        best_of(3, step)  # warm-up
        results[f"train {preset}"] = best_of(5, step)
        if preset == "NRGPT_H_FF2W":
            model.eval()
            model.generate(x[:1, :16], 20, greedy=True)
            prompt = x[:1, :16]
            results["generate 240 tokens"] = best_of(3, lambda m=model, p=prompt: m.generate(p, 240, greedy=True))
    print(", ".join(f"{k}: {v:.3f} s" for k, v in results.items()))


if __name__ == "__main__":
    if "--ops" in sys.argv[1:]:
        op_counts()
    elif "--against" in sys.argv[1:]:
        interleaved(sys.argv[sys.argv.index("--against") + 1], torch.bfloat16 if "--bf16" in sys.argv[1:] else None)
    else:
        timings()
