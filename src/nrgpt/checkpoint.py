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

Loading: ``load_model`` (a run or checkpoint directory), ``load_run`` (with the dataset to use it with) and
``load_any`` (either, or a checkpoint file of the authors' code, ``nrgpt.reference``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .data import load_meta
from .errors import CheckpointError, ConfigError, DataError, first_line, read_parsed
from .model import LanguageModel, build_model, rename_legacy_weights
from .optim import optimizer_name
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
    info = read_parsed(path, json.loads, CheckpointError)
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


def torch_load_safely(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only, never code. A refused or
    unreadable file is a one-line CheckpointError that names what was refused and leaves out torch's advice
    to retry with ``weights_only=False`` (the one thing not to do with an untrusted file)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for corrupt, truncated or foreign files
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found:
            raise CheckpointError(f"{path} holds pickled code or objects ({found.group(1)}), not only tensors: "
                                  "nrgpt never runs code from a checkpoint; use a checkpoint that nrgpt or the "
                                  "reference code wrote") from None
        detail = str(e).split("WeightsUnpickler error:")[-1] if "WeightsUnpickler" in str(e) else str(e)
        raise CheckpointError(f"{path} is not a readable torch checkpoint (corrupt, truncated or another format: "
                              f"{first_line(detail.strip())})") from None


def load_state(ckpt: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The resume state in ``state.pt``, read with ``weights_only=True`` (tensors and plain containers only)."""
    path = Path(ckpt) / STATE
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: only a run's 'last' checkpoint can be resumed")
    return torch_load_safely(path, map_location)


_STATE_TYPES = {"iter": int, "best_val_loss": float, "elapsed": float, "optimizer": dict,
                "data_rng": torch.Tensor, "torch_rng": list, "cuda_rng": list}


def check_resume_state(state: Any, path: Path) -> dict[str, Any]:
    """A trainer's resume state (see ``Trainer.save``) with its keys and types checked; CheckpointError naming
    the first bad one."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not an nrgpt resume state (a dictionary); start over with --overwrite")
    for key, kind in _STATE_TYPES.items():
        if key not in state:
            raise CheckpointError(f"{path} lacks '{key}': it is not a complete nrgpt resume state")
        if not isinstance(state[key], kind) or (kind is int and isinstance(state[key], bool)):
            raise CheckpointError(f"{path}: '{key}' is of type {type(state[key]).__name__}, not {kind.__name__}")
    opt = state["optimizer"]
    if not isinstance(opt.get("state"), dict) or not isinstance(opt.get("param_groups"), list):
        raise CheckpointError(f"{path}: 'optimizer' is not an optimizer state (with 'state' and 'param_groups')")
    rngs = [state["data_rng"], *state["torch_rng"]]
    if not all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in rngs):
        raise CheckpointError(f"{path}: the random generator states are not byte tensors")
    return state


def check_optimizer_state(state: dict[str, Any], groups: list[dict[str, Any]], where: Path) -> None:
    """A saved optimizer state fits the optimizer of ``groups`` (its param_groups): the same optimizer
    (``train.optimizer``: Muon's groups are marked ``muon``), and every tensor of the state (AdamW's moments,
    Muon's momentum) but the step counts has the shape of its parameter (the groups' parameters one after
    another). CheckpointError otherwise (torch would fail at the first step after the resume, or not at all)."""
    written, ours = optimizer_name(state["optimizer"]["param_groups"]), optimizer_name(groups)
    if written != ours:
        raise CheckpointError(f"{where} was written with train.optimizer = '{written}', this run has '{ours}': resume "
                              f"with --optimizer {written}, or start over with --overwrite")
    params = [p for group in groups for p in group["params"]]
    saved = state["optimizer"]["state"]
    for index, param in enumerate(params):
        for name, value in saved.get(index, {}).items():
            if name != "step" and (not isinstance(value, torch.Tensor) or value.shape != param.shape):
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise CheckpointError(f"{where}: optimizer state '{name}' of parameter {index} has shape {shape}, the "
                                      f"parameter {tuple(param.shape)}: the state belongs to another model")


def load_matching(model: torch.nn.Module, weights: dict[str, torch.Tensor], where: Path) -> None:
    """Load ``weights`` into ``model``; CheckpointError naming the missing, unexpected or mis-shaped tensors.
    Names of older versions of the package are updated first (``rename_legacy_weights``)."""
    weights = dict(weights)
    rename_legacy_weights(weights)
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    shapes = [f"{k} {tuple(weights[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(set(own) & set(weights))
              if weights[k].shape != own[k].shape]
    problems = [f"{label}: {', '.join(items[:4])}{f' and {len(items) - 4} more' if len(items) > 4 else ''}"
                for label, items in (("missing", missing), ("unexpected", unexpected),
                                     ("shape (saved vs model)", shapes)) if items]
    if problems:
        raise CheckpointError(f"{where} does not match the model of its config ({'; '.join(problems)})")
    nonfinite = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if nonfinite:
        raise CheckpointError(f"{where} has non-finite values (NaN or inf) in {', '.join(nonfinite[:4])}: the run "
                              "diverged before it was saved; use another checkpoint")
    model.load_state_dict(weights)


def dataset_record(data_dir: str | Path) -> dict[str, Any]:
    """What a checkpoint remembers of its dataset: the absolute directory, the kind and the vocabulary size."""
    meta = load_meta(data_dir)
    return {"dir": str(Path(data_dir).resolve()), "kind": meta["kind"], "vocab_size": meta["vocab_size"]}


def load_model(run_or_ckpt: str | Path, device: str | torch.device = "cpu",
               which: str = "best") -> tuple[LanguageModel, RunConfig]:
    """The trained model (in eval mode, on ``device``) and its run config, from a run directory (its
    ``which`` checkpoint, 'best' or 'last'), a checkpoint directory or a directory of ``nrgpt export``."""
    model, config, _ = _load(run_or_ckpt, device, which)
    return model, config


def _load(run_or_ckpt: str | Path, device: str | torch.device, which: str) -> tuple[LanguageModel, RunConfig, dict]:
    from .hf.export import is_exported, load_exported

    if is_exported(run_or_ckpt):
        return load_exported(run_or_ckpt, device)
    ckpt = resolve(run_or_ckpt, which)
    info = read_info(ckpt)
    try:
        config = RunConfig.from_dict(info["config"], drop_unused=True)
    except ConfigError as e:
        raise CheckpointError(f"{ckpt / INFO} holds an invalid config: {e}") from None
    model = build_model(config.model)
    load_matching(model, load_weights(ckpt), ckpt / WEIGHTS)
    return model.to(device).eval(), config, info


def load_run(run_or_ckpt: str | Path, device: str | torch.device = "cpu", which: str = "best",
             data_dir: str | Path | None = None, require_data: bool = True) -> tuple[LanguageModel, RunConfig, str]:
    """``load_model`` plus the dataset to use it with: ``data_dir`` if given, else the run's ``data.dir`` as
    written when it exists from here, else the absolute directory recorded at training (so a run works from
    any working directory). DataError if the dataset's vocabulary is not the one the model was trained on, or
    if no dataset is found (unless ``require_data`` is false: the dataset is then None)."""
    model, config, info = _load(run_or_ckpt, device, which)
    trained = info.get("dataset")
    if data_dir is None:
        data_dir = config.data.dir
        if not Path(data_dir).is_dir() and trained and Path(trained["dir"]).is_dir():
            data_dir = trained["dir"]
        if not Path(data_dir).is_dir():
            if not require_data:
                return model, config, None
            raise DataError(f"the run's dataset {config.data.dir} is not found from {Path.cwd()}; pass --data-dir "
                            "with the prepared dataset it was trained on")
    meta = load_meta(data_dir)
    vocab = model.config.vocab_size
    expected = (trained["kind"], trained["vocab_size"]) if trained else None
    if meta["vocab_size"] > vocab or (expected and (meta["kind"], meta["vocab_size"]) != expected):
        trained_on = f"a {expected[0]} vocabulary of {expected[1]}" if expected else f"{vocab} tokens"
        raise DataError(f"the dataset {data_dir} ({meta['kind']}, vocabulary {meta['vocab_size']}) is not the "
                        f"model's: it was trained on {trained_on}; pass the --data-dir it was trained on")
    return model, config, str(data_dir)


def load_any(path: str | Path, device: str | torch.device = "cpu", which: str = "best",
             data_dir: str | None = None) -> tuple[LanguageModel, str | None]:
    """A model from a run / checkpoint directory (with its dataset directory: ``data_dir`` if given, checked
    against the model's vocabulary, else the run's when it is found) or a checkpoint file of the authors'
    code (``data_dir`` or no dataset)."""
    from .reference import load_reference_checkpoint  # it imports this module

    if Path(path).is_file():
        return load_reference_checkpoint(path, map_location=device), data_dir
    model, _, data_dir = load_run(path, device, which, data_dir, require_data=False)
    return model, data_dir
