"""Checkpoints: a directory per checkpoint, written atomically, read without unpickling code.

A run directory holds ``last/`` (written at every evaluation and when the run stops) and ``best/``
(the lowest validation loss so far). A checkpoint directory holds

    model.safetensors   the weights (``safetensors``)
    checkpoint.json     the run's resolved configuration, the iteration and the losses
    state.pt            (``last`` only) what resuming needs: optimizer state, iteration, best validation
                        loss, elapsed time, the data generator's state and every rank's torch RNG
                        states; read with ``torch.load(weights_only=True)``, which loads tensors and
                        plain containers only

Atomic writes: a checkpoint is written in full to ``<name>.tmp``, then the old one is renamed to
``<name>.old``, the new one to ``<name>``, and ``<name>.old`` is removed. A crash at any point leaves a
complete checkpoint under ``<name>`` or (between the two renames) ``<name>.old``, which ``find`` uses.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .model import LanguageModel, build_model
from .reference import CheckpointError
from .runconfig import RunConfig

WEIGHTS, INFO, STATE = "model.safetensors", "checkpoint.json", "state.pt"
FORMAT = "nrgpt-checkpoint-1"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(path: str | Path, model: torch.nn.Module, config: RunConfig, info: dict[str, Any],
                    state: dict[str, Any] | None = None) -> Path:
    """Write model weights, ``info`` (iteration, losses: JSON-ready values) with the run config, and
    optionally the resume ``state`` (tensors and plain containers) to the directory ``path``, atomically."""
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, tmp / WEIGHTS)
    record = {"format": FORMAT, **info, "config": config.to_dict()}
    (tmp / INFO).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    if state is not None:
        torch.save(state, tmp / STATE)
    for name in os.listdir(tmp):
        _fsync(tmp / name)
    _fsync(tmp)
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync(path.parent)
    shutil.rmtree(old, ignore_errors=True)
    return path


def find(path: str | Path) -> Path | None:
    """The complete checkpoint at ``path``: ``path`` itself, or ``path.old`` left by a crash mid-save."""
    path = Path(path)
    for candidate in (path, path.with_name(path.name + ".old")):
        if (candidate / INFO).is_file():
            return candidate
    return None


def resolve(run_or_ckpt: str | Path, which: str = "best") -> Path:
    """A checkpoint directory from a checkpoint directory or a run directory (its ``which`` checkpoint,
    'best' or 'last', falling back to the other); CheckpointError if there is none."""
    path = Path(run_or_ckpt)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: give a run directory or a checkpoint directory")
    if (path / INFO).is_file():
        return path
    order = (which, "last" if which == "best" else "best")
    for name in order:
        found = find(path / name)
        if found is not None:
            return found
    raise CheckpointError(f"{path} holds no checkpoint (no {INFO} in it, in {path}/best or in {path}/last)")


def read_info(ckpt: str | Path) -> dict[str, Any]:
    """checkpoint.json of a checkpoint directory."""
    path = Path(ckpt) / INFO
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT or "config" not in info:
        raise CheckpointError(f"{path} is not an nrgpt checkpoint (format {FORMAT!r})")
    return info


def load_weights(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in ``model.safetensors``."""
    path = Path(ckpt) / WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} cannot be read: {e}") from None


def load_state(ckpt: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The resume state in ``state.pt``, read with ``weights_only=True``."""
    path = Path(ckpt) / STATE
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: only a run's 'last' checkpoint can be resumed")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or foreign files
        raise CheckpointError(f"{path} cannot be read: {type(e).__name__}: {e}") from None


def load_model(run_or_ckpt: str | Path, device: str | torch.device = "cpu",
               which: str = "best") -> tuple[LanguageModel, RunConfig]:
    """The trained model (in eval mode, on ``device``) and its run config, from a run directory (its
    ``which`` checkpoint, 'best' or 'last'), a checkpoint directory or a directory of ``nrgpt export``."""
    from .hf.export import is_exported, load_exported

    if is_exported(run_or_ckpt):
        return load_exported(run_or_ckpt, device)[:2]
    ckpt = resolve(run_or_ckpt, which)
    config = RunConfig.from_dict(read_info(ckpt)["config"])
    model = build_model(config.model_config())
    try:
        model.load_state_dict(load_weights(ckpt))
    except RuntimeError as e:
        raise CheckpointError(f"{ckpt / WEIGHTS} does not match its config: {str(e).splitlines()[0]}") from None
    return model.to(device).eval(), config
