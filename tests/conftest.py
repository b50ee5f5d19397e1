"""Shared test helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NRGPT_SHARED_DIR", REPO.parent / "shared"))
FIXTURES = SHARED / "fixtures" / "reference-checkpoints"


def randomize(module: torch.nn.Module, std: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Add N(0, std) noise to every parameter so that every nonlinearity matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return module


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is not available on this machine")
    return path
