"""``nrgpt sample``: text from a trained run, through its dataset's tokenizer.

    nrgpt sample runs/quickstart --prompt "ROMEO:" --num-samples 3 --max-new-tokens 300 --temperature 0.8

A prompt longer than the model's block is cropped to its last ``block_size`` tokens (with a notice);
characters or tokens outside the vocabulary are an error naming them. Sampling is seeded, so the same
command prints the same text. ``--early-exit TOL`` (NRGPT) decodes with energy-based early exit: a token
stops descending once ||dE_A/dg_A|| < TOL (or, with ``--early-exit-on energy``, once its energy changes by
less than TOL (1 + |E_A|) in a step), after at most ``--steps`` steps. ``--steps N`` alone decodes a
recurrent model with N steps per block instead of the trained number (test-time depth, ``nrgpt depth``).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from .argtypes import default_of, integer, number, seed
from .checkpoint import load_run
from .config import ConfigError
from .data import Tokenizer, load_tokenizer
from .device import pick_device
from .energy import EXIT_RULES
from .model import LanguageModel
from .runconfig import DEVICES


def _note(message: str) -> None:
    print(f"nrgpt: note: {message}", file=sys.stderr)


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, greedy: bool,
                   num_samples: int, max_new_tokens: int) -> None:
    """ConfigError naming the first impossible sampling option."""
    if not greedy and not (temperature > 0 and math.isfinite(temperature)):
        raise ConfigError(f"--temperature = {temperature} must be a finite number > 0 (or use --greedy)")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"--top-k = {top_k} must be >= 1")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"--top-p = {top_p} must be in (0, 1]")
    if num_samples < 1 or max_new_tokens < 0:
        raise ConfigError(f"--num-samples = {num_samples} must be >= 1 and --max-new-tokens = {max_new_tokens} >= 0")


def generate_text(model: LanguageModel, tokenizer: Tokenizer, prompt: str = "", *, num_samples: int = 1,
                  max_new_tokens: int = 500, temperature: float = 0.8, top_k: int | None = None,
                  top_p: float | None = None, greedy: bool = False, seed: int = 0, tol: float | None = None,
                  n_steps: int | None = None, exit_on: str = "grad",
                  notice: Callable[[str], None] = _note) -> list[str]:
    """``num_samples`` continuations of ``prompt`` (each returned with its prompt, cropped to the block).

    An empty prompt starts from the end-of-sequence token (token 0 if the vocabulary has none), which is
    then not part of the text. DataError if the prompt holds symbols outside the vocabulary. ``tol``
    and ``exit_on`` (NRGPT: early exit) and ``n_steps``: ``generate``'s step options.
    """
    check_sampling(temperature, top_k, top_p, greedy, num_samples, max_new_tokens)
    ids = tokenizer.encode(prompt) if prompt else []
    block = model.config.block_size
    if len(ids) > block:
        notice(f"the prompt has {len(ids)} tokens, more than the model's block_size {block}; "
              f"using its last {block} tokens")
        ids = ids[-block:]
    start = ids or [tokenizer.eos_id if tokenizer.eos_id is not None else 0]
    device = next(model.parameters()).device
    idx = torch.tensor([start] * num_samples, dtype=torch.long, device=device)
    generator = torch.Generator(device).manual_seed(seed)
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy,
                         generator=generator, tol=tol, n_steps=n_steps, exit_on=exit_on)
    keep = len(start) - len(ids)
    return [tokenizer.decode(row[keep:].tolist()) for row in out]


def _prompt(args: argparse.Namespace) -> str:
    if args.prompt_file is None:
        return args.prompt
    try:
        return Path(args.prompt_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--prompt-file {args.prompt_file} cannot be read: {e}") from None


def main(args: argparse.Namespace) -> int:
    check_sampling(args.temperature, args.top_k, args.top_p, args.greedy, args.num_samples, args.max_new_tokens)
    prompt = _prompt(args)
    if args.early_exit_on != "grad" and args.early_exit is None:
        raise ConfigError("--early-exit-on says what the early-exit tolerance applies to: give --early-exit TOL too")
    model, _, data_dir = load_run(args.run, pick_device(args.device), args.checkpoint, args.data_dir)
    if args.steps is not None and not model.config.is_recurrent:
        raise ConfigError(f"--steps needs a recurrent model (nrgpt, rgpt or rgpt_parallel); {args.run} holds a deep "
                          f"{model.config.model!r}, whose {model.config.n_steps} layers are distinct")
    if args.early_exit is not None and not model.config.is_energy_model:
        raise ConfigError(f"--early-exit needs an NRGPT model; {args.run} holds a {model.config.model!r} model, "
                          "which has no energy descent")
    tokenizer = load_tokenizer(data_dir)
    tokenizer.encode(prompt)  # unknown symbols: an error before any compilation
    if args.compile:
        model.compile_decode()
    texts = generate_text(model, tokenizer, prompt, num_samples=args.num_samples,
                          max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, greedy=args.greedy, seed=args.seed, tol=args.early_exit,
                          n_steps=args.steps, exit_on=args.early_exit_on)
    for i, text in enumerate(texts):
        if i:
            print("-" * 40)
        print(text)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("sample", help="generate text from a trained run",
                              description="Generate text from a run directory or checkpoint directory.")
    p.add_argument("run", help="run directory (uses its best checkpoint) or checkpoint directory")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="", help="text to continue (default: start from nothing)")
    prompt.add_argument("--prompt-file", help="read the prompt from this UTF-8 file")
    p.add_argument("-n", "--num-samples", type=integer(1), default=default_of(generate_text, "num_samples"))
    p.add_argument("--max-new-tokens", type=integer(0), default=default_of(generate_text, "max_new_tokens"))
    p.add_argument("--temperature", type=number(), default=default_of(generate_text, "temperature"))
    p.add_argument("--top-k", type=integer(), default=None)
    p.add_argument("--top-p", type=number(), default=None)
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--seed", type=seed, default=default_of(generate_text, "seed"))
    p.add_argument("--early-exit", metavar="TOL", type=number(0), default=None,
                   help="NRGPT: early-exit decoding, a token stops descending once its gradient norm (or, with "
                        "--early-exit-on energy, its energy change) is below TOL")
    p.add_argument("--early-exit-on", choices=sorted(EXIT_RULES), default="grad",
                   help="grad (default): the tolerance is on ||dE_A/dg_A||; energy: on |dE_A| / (1 + |E_A|) "
                        "over a step")
    p.add_argument("--steps", "--early-exit-steps", dest="steps", type=integer(1), default=None,
                   help="recurrent models: steps per block at decoding (default: the trained number); under "
                        "--early-exit the most a token may take")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best",
                   help="which checkpoint of a run directory (default: best)")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--data-dir", help="the dataset (for its tokenizer), if not the run's data.dir")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decoding step (CPU: about 3x faster per token after ~30 s of "
                        "compilation; worth it for long or many samples)")
    p.set_defaults(func=main)
