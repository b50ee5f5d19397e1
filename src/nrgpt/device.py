"""Where a model runs: the torch device of ``system.device``, the autocast dtype of ``system.dtype``, and how
the process's CPU memory is handed out."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

import torch

from .errors import ConfigError


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """``system.device`` as a torch device ('auto': cuda, then mps, then cpu); ConfigError if unavailable."""
    has_mps = torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("system.device = 'cuda' but CUDA is not available here; use --device cpu or auto")
    if name == "mps" and not has_mps:
        raise ConfigError("system.device = 'mps' but MPS is not available here; use --device cpu or auto")
    return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``system.dtype`` (None: plain float32). 'auto' is bfloat16 where the hardware
    multiplies it: a GPU that supports it, or a CPU with AVX512-BF16 or AMX (``native_bf16_cpu``)."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
        return torch.bfloat16 if device.type == "cpu" and native_bf16_cpu() else None
    return torch.bfloat16 if name == "bfloat16" else None


def resolved_dtype(name: str, device: torch.device) -> str:
    """``system.dtype`` as it trains on ``device``: 'auto' resolved to 'bfloat16' or 'float32' (what a run's
    config.json and a sweep's sweep.toml record, so that a resume or shard elsewhere keeps the precision)."""
    return "bfloat16" if autocast_dtype(name, device) else "float32"


def native_bf16_cpu() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX tiles). There bfloat16 autocast
    trains NRGPT 1.2-1.4x (the quickstart) to 2.4x (n_embd 512) faster than float32, and 0.9-1.0x as fast at
    n_embd 32-64 (docs/performance.md); elsewhere it is emulated and slower. torch's own probes, private:
    False where they are absent."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def available_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_threads(threads: int) -> None:
    """ConfigError if ``system.threads`` asks for more CPU threads than this machine gives the process (torch
    would try to start them all, and can crash)."""
    cpus = available_cpus()
    if threads > cpus:
        raise ConfigError(f"system.threads = {threads} is more than the {cpus} CPUs this process may use; use 0 "
                          f"(torch's default) or a number from 1 to {cpus}")


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep the memory of freed CPU tensors for the next ones; True if it now does.

    PyTorch's CPU tensors come from malloc, and by default glibc returns a large block to the system when
    it is freed: blocks above its mmap threshold (at most 32 MiB) are unmapped, and the free top of the
    heap beyond its trim threshold is released. A training step frees and allocates buffers of tens of MiB
    many times over (NRGPT_H_FF2W at the paper's shape: 16 MiB N x 8D tensors, 16 per step), and every
    page of a block the system hands back is faulted in again on its first write: 18,000-34,000 minor page
    faults per step. Here every block comes from the heap (``M_MMAP_MAX`` = 0) and the heap is never
    trimmed (``M_TRIM_THRESHOLD``), so a freed block is reused as it is. The process then holds on to its
    peak memory until it exits, which a training run reaches every step anyway. A no-op (False) where the C
    library is not glibc. ``nrgpt train`` calls it for a run on a CPU."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
