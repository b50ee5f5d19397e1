"""The ``nrgpt`` command (also ``python -m nrgpt``).

    nrgpt quickstart                                   # prepare, train on the CPU, sample, evaluate
    nrgpt prepare shakespeare|listops|import-listops|corpus ...
    nrgpt train --preset shakespeare-nrgpt --set train.lr=1e-3 --max-iters 2000
    nrgpt sample runs/quickstart --prompt "ROMEO:"
    nrgpt eval runs/quickstart

Commands come from the modules in ``COMMAND_MODULES``: each has ``register(subparsers)``, which adds its
subparser with ``set_defaults(func=...)``; ``func(args)`` returns the exit status. A user error (bad
configuration, missing data or checkpoint) prints one line, ``nrgpt: error: ...``, and exits with 2.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import shutil
import sys
from pathlib import Path

import yaml

from .config import ConfigError
from .data import DataError
from .reference import CheckpointError
from .train import DivergenceError

# The modules that add subcommands, in the order `nrgpt --help` lists them. Add yours here.
COMMAND_MODULES = ("nrgpt.cli", "nrgpt.train", "nrgpt.sample", "nrgpt.sweep", "nrgpt.report", "nrgpt.dynamics",
                   "nrgpt.hf.export")

EVAL_TASKS = ("loss", "listops", "quality")
USER_ERRORS = (ConfigError, DataError, CheckpointError)


# ------------------------------------------------------------------------------------------- prepare


def _listops_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"listops override {item!r} must look like key=value, e.g. n_train=1000")
        out[key.strip()] = yaml.safe_load(value)
    return out


def prepare(args: argparse.Namespace) -> int:
    from . import data

    out = args.out or f"data/{args.dataset.replace('import-', '')}"
    if args.dataset == "shakespeare":
        path = data.prepare_shakespeare_char(out, source=args.source)
    elif args.dataset == "listops":
        path = data.prepare_listops(out, preset=args.preset, seed=args.seed, **_listops_overrides(args.set))
    elif args.dataset == "import-listops":
        path = data.import_listops(out, args.train_txt, args.test_txt)
    else:
        inputs = [*args.inputs, *args.hf]
        if not inputs:
            raise ConfigError("prepare corpus needs input files, directories or --hf NAME")
        path = data.prepare_corpus(out, inputs, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                                   val_fraction=args.val_fraction, workers=args.workers, text_field=args.text_field)
    meta = data.load_meta(path)
    print(f"prepared {path}: {meta['kind']} tokens, vocabulary {meta['vocab_size']}, "
          f"{meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens")
    return 0


def _register_prepare(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("prepare", help="prepare a dataset directory (default out: data/<name>)")
    kinds = p.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    shakespeare = kinds.add_parser("shakespeare", help="Tiny Shakespeare as characters (out: data/shakespeare)")
    shakespeare.add_argument("--source", help="tinyshakespeare.txt (default: search $NRGPT_DATA_DIR, ./data/raw, "
                                              "../shared/data, then download)")
    listops = kinds.add_parser("listops", help="generate ListOps (out: data/listops)")
    listops.add_argument("--preset", default="reference", help="reference (the authors' dataset) or paper")
    listops.add_argument("--seed", type=int, default=0)
    listops.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="override a generation parameter, e.g. --set n_train=1000 --set 'ops=[max, min]'")
    imported = kinds.add_parser("import-listops", help="import ListOps train/test text files (out: data/listops)")
    imported.add_argument("train_txt")
    imported.add_argument("test_txt")
    corpus = kinds.add_parser("corpus", help="tokenise text/jsonl files or a Hugging Face dataset (out: data/corpus)")
    corpus.add_argument("inputs", nargs="*", help=".txt/.jsonl files or directories of them")
    corpus.add_argument("--hf", action="append", default=[], metavar="NAME", help="a Hugging Face dataset name")
    corpus.add_argument("--tokenizer", choices=("bpe", "gpt2", "char"), default="bpe")
    corpus.add_argument("--vocab-size", type=int, default=4096, help="for --tokenizer bpe (default 4096)")
    corpus.add_argument("--val-fraction", type=float, default=0.005)
    corpus.add_argument("--workers", type=int, default=None, help="tokenising processes (default: all CPUs)")
    corpus.add_argument("--text-field", default="text", help="the text field of .jsonl / HF records")
    for kind in (shakespeare, listops, imported, corpus):
        kind.add_argument("--out", help="output directory")
    p.set_defaults(func=prepare)


# ---------------------------------------------------------------------------------------------- eval


def evaluate_loss(args: argparse.Namespace) -> dict[str, float]:
    """Mean loss and perplexity over the whole split."""
    from .checkpoint import load_model
    from .train import pick_device, split_loss

    model, config = load_model(args.run, device=pick_device(args.device), which=args.checkpoint)
    loss, tokens = split_loss(model, args.data_dir or config.data.dir, args.split, args.batch_size)
    return {f"{args.split}_loss": loss, "perplexity": math.exp(loss), "tokens": tokens}


def evaluate(args: argparse.Namespace) -> int:
    if args.harness:
        from .hf.harness import harness_task

        results = harness_task(args)
    elif args.task == "loss":
        results = evaluate_loss(args)
    else:
        if importlib.util.find_spec("nrgpt.evaluate") is None:
            raise ConfigError(f"--task {args.task} is not available yet (it needs the module nrgpt.evaluate)")
        results = importlib.import_module("nrgpt.evaluate").run_task(args)
    for key, value in results.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    return 0


def _register_eval(subparsers: argparse._SubParsersAction) -> None:
    from .runconfig import DEVICES

    p = subparsers.add_parser("eval", help="evaluate a trained run (loss over a whole split, ...)")
    p.add_argument("run", help="run directory (uses its best checkpoint) or checkpoint directory")
    p.add_argument("--task", choices=EVAL_TASKS, default="loss",
                   help="loss: mean loss and perplexity over the whole split; listops, quality: nrgpt.evaluate")
    p.add_argument("--split", choices=("val", "train"), default="val")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--checkpoint", choices=("best", "last"), default="best")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--data-dir", help="the dataset, if not the run's data.dir")
    p.add_argument("--harness", metavar="TASKS", help="run lm-evaluation-harness tasks instead (listops, perplexity; "
                                                      "comma-separated) on the model exported (extra: hf)")
    if importlib.util.find_spec("nrgpt.evaluate") is not None:
        importlib.import_module("nrgpt.evaluate").add_arguments(p)
    p.set_defaults(func=evaluate)


# ---------------------------------------------------------------------------------------- quickstart


def quickstart(args: argparse.Namespace) -> int:
    from . import data
    from .checkpoint import load_model
    from .runconfig import resolve_config
    from .sample import generate_text
    from .train import split_loss, train

    config = resolve_config("quickstart", args.overrides)
    if not (Path(config.data.dir) / "meta.json").is_file():
        print(f"preparing Tiny Shakespeare characters in {config.data.dir}")
        data.prepare_shakespeare_char(config.data.dir)
    result = train(config, resume=args.resume, overwrite=not args.resume)
    if result["status"] == "interrupted":
        print(f"interrupted at iter {result['iters']} (checkpoint saved); continue by running the same command "
              "with --resume", file=sys.stderr)
        return 130
    model, config = load_model(config.out_dir)
    loss, tokens = split_loss(model, config.data.dir, "val", 64)
    tokenizer = data.load_tokenizer(config.data.dir)
    width = shutil.get_terminal_size().columns
    print("=" * width)
    for text in generate_text(model, tokenizer, args.prompt, num_samples=2, max_new_tokens=400, temperature=0.8,
                              seed=0):
        print(text)
        print("-" * width)
    print(f"trained {result['iters']} iterations in {result['wall_time_s'] / 60:.1f} min; validation loss "
          f"{loss:.4f} over the whole split ({tokens:,} tokens; best checkpoint of {config.out_dir})")
    print(f"next: nrgpt sample {config.out_dir} --prompt 'ROMEO:'  |  nrgpt eval {config.out_dir}  |  "
          "nrgpt train --preset shakespeare-nrgpt")
    return 0


def _register_quickstart(subparsers: argparse._SubParsersAction) -> None:
    from .runconfig import add_arguments

    p = subparsers.add_parser("quickstart", help="prepare Tiny Shakespeare, train NRGPT on the CPU for a few "
                                                 "minutes, sample and evaluate (run dir: runs/quickstart)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted quickstart")
    p.add_argument("--prompt", default="", help="prompt for the printed samples")
    add_arguments(p, preset=False)
    p.set_defaults(func=quickstart)


def register(subparsers: argparse._SubParsersAction) -> None:
    """This module's commands: quickstart, prepare, eval."""
    _register_quickstart(subparsers)
    _register_prepare(subparsers)
    _register_eval(subparsers)


# ---------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nrgpt", description="NRGPT: train, sample and evaluate energy-based "
                                                                "GPTs and their baselines.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"nrgpt: error: {e}", file=sys.stderr)
        return 2
    except DivergenceError as e:
        print(f"nrgpt: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("nrgpt: interrupted", file=sys.stderr)
        return 130
