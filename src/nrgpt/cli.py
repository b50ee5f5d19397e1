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
import errno
import importlib
import importlib.util
import math
import os
import shutil
import sys
import tempfile
import traceback
import warnings
from pathlib import Path
from typing import NoReturn

import yaml

from .argtypes import integer, number, seed
from .errors import ConfigError, DivergenceError, UserError, first_line

# The modules that add subcommands, in the order `nrgpt --help` lists them. Add yours here.
COMMAND_MODULES = ("nrgpt.cli", "nrgpt.train", "nrgpt.sample", "nrgpt.sweep", "nrgpt.report", "nrgpt.dynamics",
                   "nrgpt.depth", "nrgpt.hf.export")

EVAL_TASKS = ("loss", "listops", "quality")


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
        path = data.prepare_shakespeare_char(out, source=args.source, train_fraction=args.train_fraction)
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
    shakespeare.add_argument("--train-fraction", type=number(0, 1, strict=True), default=1.0,
                             help="keep only this fraction of the training split, the start of every 10,000 "
                                  "characters (default 1; the validation split and vocabulary are unchanged)")
    listops = kinds.add_parser("listops", help="generate ListOps (out: data/listops)")
    listops.add_argument("--preset", default="reference", help="reference (the authors' dataset) or paper")
    listops.add_argument("--seed", type=seed, default=0)
    listops.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="override a generation parameter, e.g. --set n_train=1000 --set 'ops=[max, min]'")
    imported = kinds.add_parser("import-listops", help="import ListOps train/test text files (out: data/listops)")
    imported.add_argument("train_txt")
    imported.add_argument("test_txt")
    corpus = kinds.add_parser("corpus", help="tokenise text/jsonl files or a Hugging Face dataset (out: data/corpus)")
    corpus.add_argument("inputs", nargs="*", help=".txt/.jsonl files or directories of them")
    corpus.add_argument("--hf", action="append", default=[], metavar="NAME", help="a Hugging Face dataset name")
    corpus.add_argument("--tokenizer", choices=("bpe", "gpt2", "char"), default="bpe")
    corpus.add_argument("--vocab-size", type=integer(2), default=4096, help="for --tokenizer bpe (default 4096)")
    corpus.add_argument("--val-fraction", type=number(0, 1, strict=True), default=0.005)
    corpus.add_argument("--workers", type=integer(1), default=None, help="tokenising processes (default: all CPUs)")
    corpus.add_argument("--text-field", default="text", help="the text field of .jsonl / HF records")
    for kind in (shakespeare, listops, imported, corpus):
        kind.add_argument("--out", help="output directory")
    p.set_defaults(func=prepare)


# ---------------------------------------------------------------------------------------------- eval


def evaluate_loss(args: argparse.Namespace) -> dict[str, float]:
    """Mean loss and perplexity over the whole split."""
    from .checkpoint import load_run
    from .device import pick_device
    from .evaluate import split_loss

    model, _, data_dir = load_run(args.run, pick_device(args.device), args.checkpoint, args.data_dir)
    loss, tokens = split_loss(model, data_dir, args.split, args.batch_size)
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
    p.add_argument("--batch-size", type=integer(1), default=32)
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
    from .evaluate import split_loss
    from .runconfig import resolve_config
    from .sample import generate_text
    from .train import train

    config = resolve_config("quickstart", args.overrides)
    if args.resume and args.overwrite:
        raise ConfigError("--resume continues the quickstart run and --overwrite starts it over: give one of them")
    if not (Path(config.data.dir) / "meta.json").is_file():
        print(f"preparing Tiny Shakespeare characters in {config.data.dir}")
        data.prepare_shakespeare_char(config.data.dir)
    tokenizer = data.load_tokenizer(config.data.dir)
    tokenizer.encode(args.prompt)  # a prompt it cannot encode is an error now, not after the training
    result = train(config, resume=args.resume, overwrite=args.overwrite)
    if result["status"] == "interrupted":
        print(f"interrupted at iter {result['iters']} (checkpoint saved); continue by running the same command "
              "with --resume", file=sys.stderr)
        return 130
    model, config = load_model(config.out_dir)
    loss, tokens = split_loss(model, config.data.dir, "val", 64)
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
    p.add_argument("--overwrite", action="store_true", help="start over, replacing the run in the output directory")
    p.add_argument("--prompt", default="", help="prompt for the printed samples")
    add_arguments(p, preset=False)
    p.set_defaults(func=quickstart)


def register(subparsers: argparse._SubParsersAction) -> None:
    """This module's commands: quickstart, prepare, eval."""
    _register_quickstart(subparsers)
    _register_prepare(subparsers)
    _register_eval(subparsers)


# ---------------------------------------------------------------------------------------------- main


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``nrgpt COMMAND: error: ...; see nrgpt COMMAND --help``, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nrgpt", description="NRGPT: train, sample and evaluate energy-based GPTs and their "
                                                "baselines.")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an unexpected error (default: one line and a log file)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def _format_warning(message: Warning | str, category: type[Warning], *args: object, **kwargs: object) -> str:
    """Warnings as one line, ``nrgpt: warning: ...``, without Python's source line."""
    return f"nrgpt: warning: {message}\n"


def _os_error(e: OSError) -> str:
    """An operating-system error as one line: what failed, on which path, and what to do."""
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    hint = {errno.ENOSPC: "free some space or write elsewhere", errno.EROFS: "write somewhere writable",
            errno.EACCES: "check the permissions or write elsewhere", errno.EISDIR: "give a file, not a directory",
            errno.ENOTDIR: "a part of the path is a file, not a directory", errno.ENOENT: "check the path",
            errno.EEXIST: "a file is in the way: remove it or choose another path",
            errno.EDQUOT: "free some space or write elsewhere"}.get(e.errno, "check the path and the disk")
    return f"{e.strerror or first_line(e)}{f': {where}' if where else ''} ({hint})"


def _internal_error(e: BaseException) -> str:
    """Write the traceback of an unexpected error to a log file; return the one line that points to it."""
    text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    try:
        fd, path = tempfile.mkstemp(prefix="nrgpt-error-", suffix=".log")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f"nrgpt {' '.join(sys.argv[1:])}\n\n{text}")
        where = f"the traceback is in {path}"
    except OSError:
        where = "rerun with --debug for the traceback"
    return f"internal error ({type(e).__name__}: {first_line(e)}); {where}; please report it"


def main(argv: list[str] | None = None) -> int:
    """Run one command; every failure ends in one line on stderr and a non-zero exit status: 2 for a problem
    with the input or the machine (what is wrong and how to fix it), 1 for a diverged run or an internal
    error (with the path of a log holding its traceback; ``--debug`` shows it instead), 130 when interrupted."""
    args = build_parser().parse_args(argv)
    format_warning, warnings.formatwarning = warnings.formatwarning, _format_warning
    try:
        return args.func(args)
    except UserError as e:
        message, code = first_line(e, 1000), 2
    except DivergenceError as e:
        message, code = str(e), 1
    except BrokenPipeError:  # the reader of our output went away (``nrgpt sample ... | head``): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:
        message, code = _os_error(e), 2
    except KeyboardInterrupt:
        print("nrgpt: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        message, code = _internal_error(e), 1
    finally:
        warnings.formatwarning = format_warning
    print(f"nrgpt: error: {message}", file=sys.stderr)
    return code
