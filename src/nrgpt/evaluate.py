"""Task metrics: ListOps accuracy (Figure 3), over-fitting along training, generation quality (Tables 4, 6).

ListOps accuracy
----------------
Every sample ``expr = step = ... = answer`` is cut after its first ``=``; the model continues the prompt
greedily (cached decoding, batched) until it emits the end-of-sequence token or runs out of room
(``max_new_tokens``, and the model's block). Scores, each a fraction of the samples:

* ``overall``: the final answer is right: the continuation ended with ``<eos>`` and what follows its
  last ``=`` (the whole continuation if it has none) is exactly the answer token;
* ``exact_chain``: the whole continuation (every reduction step and the answer) equals the target;
* ``terminated``: the continuation ended with ``<eos>`` within the budget;
* ``per_op``: ``overall`` over the samples grouped by their ROOT op (the op evaluated last, which
  produces the answer); ``per_op_present``: over the samples that use an op anywhere (a sample counts
  for each op it uses, so these groups overlap); ``per_depth``: by nesting depth (``tree_depth``: 1 for
  a function of numbers); ``per_reductions``: by number of reduction steps, i.e. of function nodes (the
  record's ``n_funcs``: each step of the chain evaluates exactly one function, so it is also the number
  of op tokens of the prompt and of ``=`` in the sample); ``group_sizes``: the samples in each group;
* ``heldout``: over the samples that contain a held-out argument tuple (generalisation; for a dataset
  made by ``nrgpt prepare listops`` that is every test sample and no training sample), and
  ``in_distribution`` over those that contain none; None where there are no such samples or the
  dataset does not know (imported data).

Batched decoding groups the prompts by token count, so a batch needs no padding and each row computes
exactly what it would alone. The default budget of new tokens is the token count of the longest evaluated
sample plus its ``<eos>``, minus that of the shortest prompt: it depends on the evaluated set, never on a
sample's own target.

Language
--------
The mean validation loss and perplexity over a whole split is ``split_loss`` (``nrgpt eval
--task loss``): ``mean_loss`` over the ``SplitWindows`` of the split (consecutive windows of block_size
tokens, every token but the first a target once). ``overfitting_curve`` reads the train-validation gap
along training from a run's ``metrics.jsonl``; ``generation_quality_for_model`` samples texts and scores
them with ``nrgpt.metrics.generation_quality``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .argtypes import default_of, integer, number, seed
from .config import ConfigError
from .data import DataError, Tokenizer, TokenStream, listops_sample_info, load_tokenizer, read_listops_test
from .decoding import greedy_continuations
from .model import LanguageModel
from .rundir import read_metrics

LISTOPS_SPLITS = {"test": "test", "val": "test", "train": "train"}


# ------------------------------------------------------------------------------------------------ ListOps


@dataclass
class ListOpsSamples:
    """ListOps samples to score: the records of ``listops_sample_info`` (prompt, target, answer, ops,
    depth, heldout, line) and the dataset's tokenizer."""

    records: list[dict[str, Any]]
    tokenizer: Tokenizer
    split: str = "test"


def load_listops_samples(data_dir: str | Path, split: str = "test", max_samples: int | None = None) -> ListOpsSamples:
    """The first ``max_samples`` (None: all) samples of a prepared ListOps split: 'test' (alias 'val':
    ``test.jsonl``) or 'train' (``train.txt``, described with the held-out tuples of ``listops.json``)."""
    if split not in LISTOPS_SPLITS:
        raise DataError(f"unknown ListOps split {split!r}: use test (or val) or train")
    data_dir = Path(data_dir)
    tokenizer = load_tokenizer(data_dir)
    if tokenizer.kind != "listops" or tokenizer.eos_id is None:
        raise DataError(f"{data_dir} is not a ListOps dataset (its tokenizer is {tokenizer.kind!r})")
    limit = None if max_samples is None else max(max_samples, 0)
    if LISTOPS_SPLITS[split] == "test":
        records = read_listops_test(data_dir)[:limit]
    else:
        info_path = data_dir / "listops.json"
        heldout = json.loads(info_path.read_text(encoding="utf-8")).get("heldout") if info_path.is_file() else None
        lines = [line for line in (data_dir / "train.txt").read_text(encoding="utf-8").splitlines() if line.strip()]
        records = [listops_sample_info(line, heldout) for line in lines[:limit]]
    if not records:
        raise DataError(f"the {split} split of {data_dir} has no ListOps samples")
    return ListOpsSamples(records, tokenizer, LISTOPS_SPLITS[split])


def root_op(line: str) -> str:
    """The op at the root of a sample (``median_10 ( ... ) = ...`` -> 'median'); '-' for a bare number."""
    first = line.split()[0]
    return first.rsplit("_", 1)[0] if "_" in first else "-"


def score_continuation(tokens: list[str], eos: str, record: dict[str, Any]) -> dict[str, Any]:
    """Score one decoded continuation (tokens after the prompt, ``eos`` included if emitted) against its
    record: terminated, the predicted answer (None unless terminated and a single token follows the last
    ``=``), correct and exact_chain."""
    terminated = bool(tokens) and tokens[-1] == eos
    body = tokens[:-1] if terminated else tokens
    last = len(body) - body[::-1].index("=") if "=" in body else 0
    answer = body[last] if terminated and len(body) - last == 1 else None
    return {"terminated": terminated, "answer": answer, "correct": answer == record["answer"],
            "exact_chain": terminated and body == record["target"].split()}


def _mean(flags: Iterable[bool]) -> float | None:
    flags = list(flags)
    return sum(flags) / len(flags) if flags else None


# The groupings of ``score_listops``: name -> the keys of the groups a record belongs to.
LISTOPS_GROUPS: dict[str, Callable[[dict[str, Any]], Iterable[Any]]] = {
    "per_op": lambda r: [root_op(r["line"])],
    "per_op_present": lambda r: r["ops"],
    "per_depth": lambda r: [r["depth"]],
    "per_reductions": lambda r: [r["n_funcs"]],
}


def _group_order(key: str) -> tuple:
    """Numeric group keys in numeric order ('2' before '10'), then the others alphabetically."""
    return (0, int(key), "") if key.isdigit() else (1, 0, key)


def _grouped(scored: list[tuple[dict[str, Any], dict[str, Any]]], keys) -> dict[str, list[bool]]:
    groups: dict[str, list[bool]] = defaultdict(list)
    for record, score in scored:
        for key in keys(record):
            groups[str(key)].append(score["correct"])
    return {key: groups[key] for key in sorted(groups, key=_group_order)}


def score_listops(model: nn.Module, samples: ListOpsSamples, *, batch_size: int = 64,
                  max_new_tokens: int | None = None, return_predictions: bool = False) -> dict[str, Any]:
    """Greedy-decode and score ListOps samples (see the module docstring for every key).

    Returns n, overall, exact_chain, terminated, per_op (by root op), per_op_present, per_depth,
    per_reductions, group_sizes (per grouping and group), heldout, n_heldout, in_distribution,
    n_in_distribution, max_new_tokens, seconds and samples_per_s; with ``return_predictions`` also
    ``predictions`` (per sample: line, continuation text and its scores).
    """
    tok, records = samples.tokenizer, samples.records
    eos = tok.decode([tok.eos_id])
    prompts = [tok.encode(r["prompt"]) for r in records]
    if max_new_tokens is None:
        max_new_tokens = max(len(r["line"].split()) + 1 for r in records) - min(len(p) for p in prompts)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        continuations = greedy_continuations(model, prompts, tok.eos_id, max_new_tokens, batch_size)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    decoded = [tok.decode(c).split() for c in continuations]
    scored = [(r, score_continuation(c, eos, r)) for r, c in zip(records, decoded)]
    heldout = [s["correct"] for r, s in scored if r.get("heldout")]
    in_dist = [s["correct"] for r, s in scored if r.get("heldout") == []]
    groups = {name: _grouped(scored, keys) for name, keys in LISTOPS_GROUPS.items()}
    result: dict[str, Any] = {
        "split": samples.split, "n": len(scored),
        "overall": _mean(s["correct"] for _, s in scored),
        "exact_chain": _mean(s["exact_chain"] for _, s in scored),
        "terminated": _mean(s["terminated"] for _, s in scored),
        **{name: {k: _mean(v) for k, v in g.items()} for name, g in groups.items()},
        "group_sizes": {name: {k: len(v) for k, v in g.items()} for name, g in groups.items()},
        "heldout": _mean(heldout), "n_heldout": len(heldout),
        "in_distribution": _mean(in_dist), "n_in_distribution": len(in_dist),
        "max_new_tokens": max_new_tokens, "seconds": seconds, "samples_per_s": len(scored) / max(seconds, 1e-9),
    }
    if return_predictions:
        result["predictions"] = [{"line": r["line"], "continuation": " ".join(c), **s}
                                 for (r, s), c in zip(scored, decoded)]
    return result


def listops_accuracy(model: nn.Module, data_dir: str | Path, split: str = "test", batch_size: int = 64,
                     max_samples: int | None = None, max_new_tokens: int | None = None,
                     return_predictions: bool = False) -> dict[str, Any]:
    """ListOps accuracy of ``model`` on the first ``max_samples`` samples of a split of ``data_dir``:
    ``score_listops`` of ``load_listops_samples``."""
    samples = load_listops_samples(data_dir, split, max_samples)
    return score_listops(model, samples, batch_size=batch_size, max_new_tokens=max_new_tokens,
                         return_predictions=return_predictions)


# ----------------------------------------------------------------------------------------------- language


@dataclass
class SplitWindows:
    """The batches (x, y) of ``TokenStream.iter_sequential`` over a split, ``batch_size`` windows of
    ``block_size`` tokens at a time, cut after the first ``max_windows`` windows (None: the whole split).
    Iterable any number of times, each time reading the same windows."""

    data_dir: str | Path
    block_size: int
    split: str = "val"
    batch_size: int = 32
    max_windows: int | None = None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        left = self.max_windows
        for x, y in TokenStream(self.data_dir, self.split).iter_sequential(self.batch_size, self.block_size):
            if left is not None:
                if left <= 0:
                    return
                x, y, left = x[:left], y[:left], left - len(x)
            yield x, y


@torch.no_grad()
def mean_loss(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, int]:
    """Mean loss per target token over batches (x, y) (each batch's mean loss weighted by its number of
    targets, summed in float64), and the number of targets. Runs in eval mode."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    try:
        for x, y in batches:
            _, loss = model(x.to(device), y.to(device))
            total += loss.double() * y.numel()
            count += y.numel()
    finally:
        model.train(was_training)
    return (total / count).item(), count


def split_loss(model: LanguageModel, data_dir: str | Path, split: str = "val",
               batch_size: int = 32) -> tuple[float, int]:
    """Mean loss per target token over the whole split (every token but the first predicted once), and
    the number of targets: ``mean_loss`` over its ``SplitWindows``."""
    return mean_loss(model, SplitWindows(data_dir, model.config.block_size, split, batch_size))



def overfitting_curve(run_dir: str | Path) -> dict[str, list[float]]:
    """The evaluations recorded in ``run_dir/metrics.jsonl`` (records with ``val_loss``), in order:
    ``iter``, ``train_loss``, ``val_loss`` and ``gap`` = val_loss - train_loss (the over-fitting measure)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{path} does not exist: give a run directory written by `nrgpt train`")
    evals = [r for r in read_metrics(run_dir) if "val_loss" in r and "train_loss" in r]
    if not evals:
        raise DataError(f"{path} has no evaluation records (with train_loss and val_loss) yet")
    curve: dict[str, list[float]] = {"iter": [], "train_loss": [], "val_loss": [], "gap": []}
    for r in evals:
        curve["iter"].append(r["iter"])
        curve["train_loss"].append(r["train_loss"])
        curve["val_loss"].append(r["val_loss"])
        curve["gap"].append(r["val_loss"] - r["train_loss"])
    return curve


def generation_quality_for_model(model: LanguageModel | str | Path, tokenizer: Tokenizer | None = None, *,
                                 n_samples: int = 16, max_new_tokens: int = 200, prompt: str = "",
                                 seed: int = 0, temperature: float = 0.8, top_k: int | None = None,
                                 top_p: float | None = None, perplexity_model: Any = None,
                                 sbert_model: Any = None) -> dict[str, Any]:
    """Sample ``n_samples`` continuations of ``prompt`` and score them with
    ``nrgpt.metrics.generation_quality`` (the prompt is removed from each text before scoring).

    ``model`` is a model (then ``tokenizer`` is required) or a run / checkpoint directory (its best
    checkpoint, and its dataset's tokenizer unless ``tokenizer`` is given). The result holds the metrics,
    the sampling settings and the texts.
    """
    from .metrics import generation_quality
    from .sample import generate_text

    if not isinstance(model, nn.Module):
        from .checkpoint import load_model

        model, config = load_model(model)
        tokenizer = tokenizer or load_tokenizer(config.data.dir)
    if tokenizer is None:
        raise ConfigError("generation_quality_for_model needs the tokenizer of the model's dataset")
    texts = generate_text(model, tokenizer, prompt, num_samples=n_samples, max_new_tokens=max_new_tokens,
                          temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    texts = [t[len(prompt):] if prompt and t.startswith(prompt) else t for t in texts]
    quality = generation_quality(texts, perplexity_model=perplexity_model, sbert_model=sbert_model)
    settings = {"n_samples": n_samples, "max_new_tokens": max_new_tokens, "prompt": prompt, "seed": seed,
                "temperature": temperature, "top_k": top_k, "top_p": top_p}
    return {**quality, "settings": settings, "texts": texts}


# ----------------------------------------------------------------------------------------- `nrgpt eval`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``nrgpt eval --task listops|quality``."""
    g = parser.add_argument_group("listops and quality tasks")
    g.add_argument("--max-samples", type=integer(1), default=None, help="listops: score only the first N samples")
    quality = generation_quality_for_model
    g.add_argument("--num-samples", type=integer(1), default=default_of(quality, "n_samples"),
                   help="quality: texts to sample (default %(default)s)")
    g.add_argument("--max-new-tokens", type=integer(1), default=None,
                   help="listops: token budget per sample (default: the longest sample); quality: text length "
                        "(default 200)")
    g.add_argument("--prompt", default="", help="quality: prompt of every sample (default: none)")
    g.add_argument("--temperature", type=number(0, strict=True), default=default_of(quality, "temperature"),
                   help="quality: sampling temperature (default %(default)s)")
    g.add_argument("--top-k", type=integer(1), default=None, help="quality: sample from the k most likely tokens")
    g.add_argument("--seed", type=seed, default=default_of(quality, "seed"), help="quality: sampling seed")
    g.add_argument("--reference-lm", default=None, metavar="NAME_OR_PATH",
                   help="quality: causal LM that scores the samples' perplexity, a local Hugging Face model "
                        "directory or a cached model name (default: gpt2 from the local cache, if there)")
    g.add_argument("--json", help="also write the full results to this JSON file")


def _flat(results: dict[str, Any]) -> dict[str, Any]:
    """One printable value per key: groups expanded to key_group, lists and None dropped."""
    flat: dict[str, Any] = {}
    for key, value in results.items():
        if isinstance(value, dict):
            flat.update({f"{key}_{k}": v for k, v in value.items() if not isinstance(v, (dict, list))})
        elif value is not None and not isinstance(value, list):
            flat[key] = value
    return flat


def _load_reference_lm(name_or_path: str) -> Any:
    """The reference LM as a (model, tokenizer) pair, loaded before any sampling so that a bad name
    costs no work (one line, exit 2). Without the ``eval`` extra the name is passed on, and perplexity
    is reported missing like the other metrics."""
    from .metrics import MissingExtraError, _load_causal_lm

    try:
        return _load_causal_lm(name_or_path, "cpu", False)
    except MissingExtraError:
        return name_or_path
    except (OSError, ValueError) as err:
        raise ConfigError(f"--reference-lm {name_or_path!r} is not a loadable Hugging Face causal LM "
                          f"({type(err).__name__}); give a local model directory (with its tokenizer) or the "
                          "name of a model in the local cache") from None


def run_task(args: argparse.Namespace) -> dict[str, Any]:
    """``nrgpt eval --task listops`` (split val = the test samples) or ``--task quality``; returns the
    printable results and writes all of them to ``--json`` if given."""
    from .checkpoint import load_run
    from .device import pick_device

    reference_lm = _load_reference_lm(args.reference_lm) if args.task == "quality" and args.reference_lm else None
    model, _, data_dir = load_run(args.run, pick_device(args.device), args.checkpoint, args.data_dir)
    if args.task == "listops":
        results = listops_accuracy(model, data_dir, args.split, args.batch_size, args.max_samples,
                                   args.max_new_tokens)
    else:
        length = args.max_new_tokens or default_of(generation_quality_for_model, "max_new_tokens")
        results = generation_quality_for_model(
            model, load_tokenizer(data_dir), n_samples=args.num_samples, max_new_tokens=length,
            prompt=args.prompt, seed=args.seed, temperature=args.temperature, top_k=args.top_k,
            perplexity_model=reference_lm)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return _flat(results)

