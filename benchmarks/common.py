"""Shared helpers for the benchmark scripts: timing, tables, JSON, machine description, models.

Every script measures its variants side by side in one process: the repetitions of the variants
are interleaved (variant order rotated each round) and the median is taken, so a slow phase of the
shared machine hits every variant alike and the ratios stay meaningful even when absolute times
drift.
"""

from __future__ import annotations

import os

# Quieten the profiler's C++ logging (must be set before torch is imported).
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
os.environ.setdefault("KINETO_LOG_LEVEL", "5")

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from nrgpt import ModelConfig, build_model  # noqa: E402
from nrgpt.device import keep_freed_memory  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PAPER_SHAPE = dict(n_embd=128, n_head=1, n_steps=8, block_size=256, vocab_size=65)
PAPER_BATCH = 16
TRAIN_PRESETS = ("NRGPT_H_FF2W", "NRGPT_H_FF1", "GPT_Rec_parallel", "GPT",
                 "NRGPT_H_FF2W+compile", "NRGPT_H_FF1+compile", "GPT_Rec_parallel+compile")
COMPILED = "+compile"  # a preset name with this suffix: the model with ``compile_steps()`` (system.compile)


# ------------------------------------------------------------------------------------ arguments
def parser(description: str, gpu: bool = False) -> argparse.ArgumentParser:
    """The shared options; ``gpu``: the script also runs on a CUDA device (``--device cuda``)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="smaller shapes / fewer repetitions (~2 min for all)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per variant (default per script)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory for the JSON results")
    p.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                   help="cpu: time by the process's CPU time, robust to other processes sharing the machine "
                        "(use with --threads 1: with more threads it also counts threads waiting for work)")
    p.add_argument("--malloc", default="keep", choices=("keep", "default"),
                   help="keep (default): malloc keeps freed memory for reuse, as `nrgpt train` on a CPU sets it "
                        "(nrgpt.device.keep_freed_memory; for everything the process runs, the authors' code "
                        "included); default: glibc's own behaviour, which page-faults on large buffers")
    if gpu:
        p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                       help="where models and data live (default cpu; cuda: timings synchronise the device)")
    return p


DEVICE = torch.device("cpu")  # set by setup(--device); build() and batch() put models and data there
CLOCK = time.perf_counter  # set by setup(--clock)
MALLOC_KEEPS_FREED = False  # set by setup(--malloc)


def setup(args: argparse.Namespace) -> None:
    global DEVICE, CLOCK, MALLOC_KEEPS_FREED
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    device = getattr(args, "device", "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine; use --device cpu")
    DEVICE = torch.device(device)
    MALLOC_KEEPS_FREED = args.malloc == "keep" and DEVICE.type == "cpu" and keep_freed_memory()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)


def start(doc: str) -> argparse.Namespace:
    """The shared options of a script without options of its own (described by its docstring's first
    line), parsed and set up."""
    args = parser(doc.splitlines()[0]).parse_args()
    setup(args)
    return args


def reps_of(args: argparse.Namespace, default: int) -> int:
    """Timed repetitions: --reps, else 3 with --quick, else the script's default."""
    return args.reps or (3 if args.quick else default)


def command_line() -> str:
    """The command that ran this script, relative to the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(Path(__file__).resolve().parent.parent)
    except ValueError:
        pass
    return shlex.join(["python", str(script), *sys.argv[1:]])


# ------------------------------------------------------------------------------------ machine
def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    gpu = {"gpu": torch.cuda.get_device_name(DEVICE)} if DEVICE.type == "cuda" else {}
    return {**gpu,
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "malloc_keeps_freed_memory": MALLOC_KEEPS_FREED,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


# ------------------------------------------------------------------------------------ timing
def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def timed(fn: Callable[[], Any]) -> float:
    """Seconds of ``fn()`` by ``CLOCK`` (wall unless --clock cpu); on a GPU the device is synchronised
    before and after."""
    sync()
    t0 = CLOCK()
    fn()
    sync()
    return CLOCK() - t0


def interleave(variants: dict[str, Callable[[], Any]], reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each variant: ``warmup`` untimed calls each, then ``reps`` rounds in
    which every variant runs once, the order rotated each round."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            times[name].append(timed(variants[name]))
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def stats(xs: list[float]) -> dict[str, Any]:
    return {"median": median(xs), "min": min(xs), "max": max(xs), "n": len(xs), "all": xs}


# ------------------------------------------------------------------------------------ models
def build(preset: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """The preset's model; ``NAME+compile``: with its steps compiled (what ``--compile`` trains)."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig.preset(preset.removesuffix(COMPILED), **overrides)).to(DEVICE)
    if preset.endswith(COMPILED):
        model.compile_steps()
    return model


def clone(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model)


def batch(vocab: int, b: int, t: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (b, t + 1), generator=g).to(DEVICE)
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()


def use_autograd_energy_grad(model: torch.nn.Module) -> torch.nn.Module:
    """Replace the closed-form hot path by autograd of the energy (per instance)."""
    block = model.block
    block.energy_grad = lambda g, cache=None, step=0, cond=None: block.energy_grad_autograd(g, cond)
    return model


def use_autograd_closed_form(model: torch.nn.Module) -> torch.nn.Module:
    """Replace the hand-written backward of the FF gradient (``nrgpt.kernels``) by the same closed form
    written in ATen ops and differentiated by autograd (per instance): nrgpt before issue 15."""
    ff = model.block.ff
    gelu_grad = torch.ops.aten.gelu_backward  # v * gelu'(h); autograd differentiates it by gelu's double backward

    def grad(g: torch.Tensor) -> torch.Tensor:
        w1, h = ff.fc1.weight, ff.fc1(g)
        if ff.name == "dam":
            return -(F.relu(h) @ w1)
        if ff.name == "ff1":
            return -2.0 * (gelu_grad(F.gelu(h), h) @ w1)
        if ff.name == "ff2w":
            return -(ff.fc2(F.gelu(h)) + gelu_grad(g @ ff.fc2.weight, h) @ w1)
        u = ff.fc2(F.gelu(h))
        return -2.0 * (gelu_grad(gelu_grad(F.gelu(u), u) @ ff.fc2.weight, h) @ w1)

    ff.grad = grad
    return model


def train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float = 1e-3,
               amp: torch.dtype | None = None, fused: bool | None = None) -> Callable[[], torch.Tensor]:
    """A closure doing one training step: forward (under ``amp`` autocast if given), loss, backward,
    AdamW step (``fused`` default: fused on a GPU and on a CPU, as ``nrgpt train`` does; the authors'
    nanoGPT-based code fuses on a GPU only). Returns the loss tensor, not ``.item()``, so that a GPU step
    has no host synchronisation of its own (``timed`` synchronises)."""
    model.train()
    if fused is None:
        fused = x.device.type in ("cuda", "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=fused)

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
            _, loss = model(x, y)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# ------------------------------------------------------------------------------------ memory
def peak_memory(fn: Callable[[], Any]) -> int:
    """Peak bytes of tensors allocated during ``fn()`` and alive at the same time.

    On a GPU: the CUDA caching allocator's peak of allocated bytes during ``fn()`` less what was
    allocated before it. On the CPU:

    Method: run ``fn`` once under ``torch.profiler`` with ``profile_memory=True``. Every CPU
    allocation/free then reports, besides its size, the allocator's running total of bytes
    allocated since profiling began and not yet freed (frees of older tensors are not counted).
    The maximum of that running total is the step's high-water mark of live tensor memory:
    activations saved for backward, gradients (set to None before the step), optimizer
    temporaries. It excludes what existed before (parameters, AdamW states) and allocator
    overhead/fragmentation, and it is deterministic, unlike RSS deltas.
    """
    if DEVICE.type == "cuda":
        sync()
        before = torch.cuda.memory_allocated(DEVICE)
        torch.cuda.reset_peak_memory_stats(DEVICE)
        fn()
        sync()
        return torch.cuda.max_memory_allocated(DEVICE) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    peak = 0
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        ef = e.extra_fields
        if type(ef).__name__ == "_ExtraFields_Allocation" and str(ef.device).startswith("cpu"):
            peak = max(peak, ef.total_allocated)
        stack.extend(e.children)
    return peak


# ------------------------------------------------------------------------------------ matmul peak
def matmul_peak(sizes: tuple[int, ...], reps: int) -> dict[str, Any]:
    """Best-of-``reps`` float32 GFLOP/s of square torch.mm at each size (current thread count; on a
    GPU with TF32 as the caller left it)."""
    per_size = {}
    for n in sizes:
        a, b = torch.randn(n, n, device=DEVICE), torch.randn(n, n, device=DEVICE)
        c = torch.empty(n, n, device=DEVICE)
        torch.mm(a, b, out=c)  # warm-up
        best = min(timed(lambda a=a, b=b, c=c: torch.mm(a, b, out=c)) for _ in range(reps))
        per_size[str(n)] = 2 * n**3 / best / 1e9
    return {"gflops_per_size": per_size, "peak_gflops": max(per_size.values()), "reps": reps}


# ------------------------------------------------------------------------------------ output
def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if abs(v) >= 100:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.3g}"
    return str(v)


def table(headers: list[str], rows: list[list[Any]], title: str | None = None) -> str:
    """A GitHub-markdown table (also readable as plain text)."""
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda cs: "| " + " | ".join(c.ljust(w) for c, w in zip(cs, widths)) + " |"  # noqa: E731
    out = [] if title is None else [f"**{title}**", ""]
    out += [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)]
    return "\n".join(out)


def target(name: str, value: float, op: str, threshold: float, note: str = "") -> dict[str, Any]:
    met = value <= threshold if op == "<=" else value >= threshold
    return {"name": name, "value": value, "op": op, "threshold": threshold, "met": bool(met), "note": note}


def targets_table(targets: list[dict[str, Any]]) -> str:
    rows = [[t["name"], t["value"], f"{t['op']} {t['threshold']}", "MET" if t["met"] else "MISSED", t["note"]]
            for t in targets]
    return table(["target", "measured", "required", "status", "note"], rows)


def finish(name: str, args: argparse.Namespace, results: dict[str, Any], tables: list[str],
           targets: list[dict[str, Any]] | None = None) -> Path:
    """Print the tables and targets, write ``<out>/<name>.json``; returns its path."""
    targets = targets or []
    text = "\n\n".join(tables + ([targets_table(targets)] if targets else []))
    print(text, flush=True)
    payload = {
        "benchmark": name,
        "command": command_line(),
        "quick": bool(getattr(args, "quick", False)),
        "clock": getattr(args, "clock", "wall"),
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine_info(),
        "results": results,
        "targets": targets,
        "markdown": text,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"\nwrote {path}", flush=True)
    return path
