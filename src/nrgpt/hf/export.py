"""``nrgpt export``: a trained run as a standard Hugging Face model directory, and the way back.

    nrgpt export runs/quickstart hf/quickstart            # best checkpoint; --checkpoint last
    nrgpt export runs/listops-cpu hf/listops --tasks      # + lm-evaluation-harness tasks in hf/listops/tasks

The directory holds

    config.json              ``NRGPTConfig`` (model_type 'nrgpt', auto_map to the two files below)
    configuration_nrgpt.py   written from ``nrgpt.hf.configuration``
    modeling_nrgpt.py        written from ``nrgpt.hf.modeling``
    nrgpt_*.py               the nrgpt modules the model is built from (``nrgpt_model.py``, ...), copied
                             from the installed package with their relative imports renamed
    model.safetensors        the weights (``model.`` + the nrgpt state-dict keys)
    generation_config.json   end-of-sequence and padding ids
    tokenizer.json, tokenizer_config.json   the dataset's tokenizer (``nrgpt.hf.tokenizer``)
    nrgpt_run.json, meta.json, vocab.json   what nrgpt itself reads back: the run's config, iteration
                             and losses, and the dataset's tokenizer files

so ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` works where only ``torch`` and
``transformers`` are installed, and ``nrgpt.load_model(DIR)`` (hence ``nrgpt sample|eval|dynamics DIR``)
reads it without ``transformers``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import CheckpointError, ConfigError, read_parsed

RUN_FILE = "nrgpt_run.json"
FORMAT = "nrgpt-export-1"
PREFIX = "model."  # NRGPTForCausalLM.model
HF_MODULES = {"configuration": "configuration_nrgpt", "modeling": "modeling_nrgpt"}
AUTO_MAP = {"AutoConfig": "configuration_nrgpt.NRGPTConfig", "AutoModelForCausalLM": "modeling_nrgpt.NRGPTForCausalLM"}
HF_EXTRA = "pip install 'nrgpt[hf]' (transformers and lm-eval)"
def require_hf(what: str) -> None:
    """ConfigError naming the extra to install unless ``transformers`` is importable."""
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        raise ConfigError(f"{what} needs transformers: {HF_EXTRA}")


# ------------------------------------------------------------------------------------------ the code


def _package() -> Path:
    return Path(__file__).resolve().parents[1]


def _file(module: str) -> Path:
    """The source of an nrgpt module given by its dotted name inside the package ('model', 'energies.base')."""
    path = _package().joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _imports(module: str) -> list[tuple[ast.ImportFrom, list[str]]]:
    """Each relative import of ``module`` with the dotted names of the nrgpt modules it imports."""
    path = _file(module)
    base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and not getattr(node, "level", 0):
            roots = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(r == "nrgpt" or r.startswith("nrgpt.") for r in roots):
                raise ConfigError(f"cannot bundle {path.name}: it imports nrgpt by name")
        elif isinstance(node, ast.ImportFrom):
            if node.module is None:  # transformers copies only the files of ``from .x import y``
                raise ConfigError(f"cannot bundle {path.name}: 'from . import' (write 'from .x import y')")
            found.append((node, [".".join([*base[:len(base) - node.level + 1], node.module])]))
    return found


def _core_modules() -> list[str]:
    """The nrgpt modules ``nrgpt.hf.modeling`` and ``configuration`` need, following relative imports."""
    todo = [m for name in HF_MODULES for _, targets in _imports(f"hf.{name}") for m in targets]
    found: list[str] = []
    while todo:
        name = todo.pop()
        if name not in found and name not in (f"hf.{m}" for m in HF_MODULES):
            found.append(name)
            todo.extend(m for _, targets in _imports(name) for m in targets)
    return sorted(found)


def _rewritten(module: str, names: dict[str, str]) -> str:
    """The source of ``module`` with every relative import turned into a sibling import of the flat file names
    ``names`` (dotted module -> file stem): the bundled files all sit in one directory."""
    lines = _file(module).read_text(encoding="utf-8").splitlines(keepends=True)
    for node, targets in sorted(_imports(module), key=lambda item: -item[0].lineno):
        indent = lines[node.lineno - 1][: node.col_offset]
        aliases = ", ".join(a.name + (f" as {a.asname}" if a.asname else "") for a in node.names)
        lines[node.lineno - 1: node.end_lineno] = [f"{indent}from .{names[targets[0]]} import {aliases}\n"]
    return "".join(lines)


def write_code(out_dir: Path) -> list[str]:
    """Write the modeling code into ``out_dir`` (see the module docstring); returns the file names."""
    core = _core_modules()
    names = {**{m: "nrgpt_" + m.replace(".", "_") for m in core}, **{f"hf.{k}": v for k, v in HF_MODULES.items()}}
    written = []
    for module, stem in names.items():
        (out_dir / f"{stem}.py").write_text(_rewritten(module, names), encoding="utf-8")
        written.append(f"{stem}.py")
    return sorted(written)


# ---------------------------------------------------------------------------------------- the export


def export_model(run: str | Path, out_dir: str | Path, which: str = "best", data_dir: str | Path | None = None) -> Path:
    """Export the ``which`` checkpoint of a run (or a checkpoint directory) to ``out_dir``."""
    require_hf("nrgpt export")
    from transformers import GenerationConfig

    from ..checkpoint import load_run, read_info, resolve
    from ..data import load_meta
    from .configuration import NRGPTConfig
    from .modeling import NRGPTForCausalLM
    from .tokenizer import save_hf_tokenizer

    out = Path(out_dir)
    if out.exists() and not (out.is_dir() and (is_exported(out) or not any(out.iterdir()))):
        raise ConfigError(f"{out} is not empty and not an nrgpt export: export to a new or empty directory "
                          "(nothing of yours is overwritten)")
    ckpt = resolve(run, which)
    info = read_info(ckpt)
    nrgpt_model, run_config, data_dir = load_run(ckpt, "cpu", which, data_dir)
    data_dir = Path(data_dir)
    meta = load_meta(data_dir)
    cfg = nrgpt_model.config
    if meta["vocab_size"] != cfg.vocab_size:
        raise ConfigError(f"{data_dir} has a vocabulary of {meta['vocab_size']} but the model {cfg.vocab_size}: "
                          "give the run's dataset with --data-dir")
    out.mkdir(parents=True, exist_ok=True)
    special = save_hf_tokenizer(data_dir, meta["kind"], out)
    config = NRGPTConfig(nrgpt=cfg.to_dict(), tokenizer_kind=meta["kind"], architectures=["NRGPTForCausalLM"],
                         auto_map=AUTO_MAP, **special)
    model = NRGPTForCausalLM(config)
    model.model.load_state_dict(nrgpt_model.state_dict())
    model.generation_config = GenerationConfig(**{k: v for k, v in special.items() if k != "start_id"})
    model.save_pretrained(out)
    write_code(out)
    record = {**info, "format": FORMAT, "checkpoint": str(ckpt)}
    (out / RUN_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    shutil.copyfile(data_dir / "meta.json", out / "meta.json")
    if meta["kind"] in ("char", "listops"):
        shutil.copyfile(data_dir / "vocab.json", out / "vocab.json")
    return out


# ------------------------------------------------------------------------------------------ the way back


def is_exported(path: str | Path) -> bool:
    """Whether ``path`` is a directory written by ``export_model`` (or looks like one)."""
    path = Path(path)
    return (path / RUN_FILE).is_file() or (
        (path / "config.json").is_file() and (path / "model.safetensors").is_file()
        and not (path / "checkpoint.json").is_file())


def _read_json(path: Path) -> dict[str, Any]:
    data = read_parsed(path, json.loads, CheckpointError, fix="export the run again",
                       missing=f"{path} is missing: export the run again (nrgpt export RUN_DIR OUT_DIR)")
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object: export the run again")
    return data


def load_exported(path: str | Path, device: str | torch.device = "cpu"):
    """The nrgpt model (eval mode, on ``device``), the run config and the export record (the checkpoint's
    info) of an exported directory, read without ``transformers``. The config's ``data.dir`` is the run's
    dataset if it exists here, else the exported directory itself (which holds the tokenizer).
    CheckpointError for a damaged directory."""
    from ..config import ModelConfig
    from ..model import build_model
    from ..runconfig import RunConfig

    path = Path(path)
    hf_config = _read_json(path / "config.json")
    record = _read_json(path / RUN_FILE)
    if hf_config.get("model_type") != "nrgpt" or not isinstance(hf_config.get("nrgpt"), dict):
        raise CheckpointError(f"{path / 'config.json'} is not an exported nrgpt model (model_type 'nrgpt')")
    if record.get("format") != FORMAT or "config" not in record:
        raise CheckpointError(f"{path / RUN_FILE} is not an nrgpt export record (format {FORMAT!r})")
    try:
        run_config = RunConfig.from_dict(record["config"], drop_unused=True)
        model = build_model(ModelConfig.from_dict(hf_config["nrgpt"], drop_unused=True))
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path} holds an invalid model config: {e}") from None
    try:
        weights = load_file(path / "model.safetensors")
    except FileNotFoundError:
        raise CheckpointError(f"{path / 'model.safetensors'} is missing: export the run again") from None
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path / 'model.safetensors'} cannot be read: {e}") from None
    state = {k[len(PREFIX):]: v for k, v in weights.items() if k.startswith(PREFIX)}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path / 'model.safetensors'} does not match config.json: "
                              f"{' '.join(str(e).split())[:300]}") from None
    if not Path(run_config.data.dir).is_dir():
        run_config = dataclasses.replace(run_config, data=dataclasses.replace(run_config.data, dir=str(path)))
    return model.to(device).eval(), run_config, record


# --------------------------------------------------------------------------------------- nrgpt export


def main(args: argparse.Namespace) -> int:
    out = export_model(args.run, args.out, args.checkpoint, args.data_dir)
    print(f"exported {args.run} to {out}: AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)")
    if args.tasks:
        from .harness import write_tasks

        tasks = write_tasks(out, args.data_dir, out / "tasks")
        print(f"lm-evaluation-harness tasks {', '.join(tasks)} in {out / 'tasks'} (see its README.md)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="write a run as a Hugging Face model directory (extra: hf)",
                              description="Export a run's checkpoint as a Hugging Face causal-LM directory "
                                          "(config, code, safetensors weights, generation config, tokenizer).")
    p.add_argument("run", help="run directory (uses its best checkpoint) or checkpoint directory")
    p.add_argument("out", help="output directory")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best",
                   help="which checkpoint of a run directory (default: best)")
    p.add_argument("--data-dir", help="the dataset (for its tokenizer and tasks), if not the run's data.dir")
    p.add_argument("--tasks", action="store_true",
                   help="also write lm-evaluation-harness tasks for the run's dataset into OUT/tasks")
    p.set_defaults(func=main)
