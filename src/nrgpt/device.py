"""Where a model runs: the torch device of ``system.device`` and the autocast dtype of ``system.dtype``."""

from __future__ import annotations

import os

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
    """The autocast dtype of ``system.dtype`` (None: plain float32); 'auto' is bfloat16 on a GPU that has it."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if name == "bfloat16" else None


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
