"""Test-time depth: does a recurrent model evaluated with more (or fewer) steps than it was trained with
do better? (``nrgpt depth``, issue 14.)

A recurrent model applies shared weights ``n_steps`` times: NRGPT its energy block (with ``n_blocks`` > 1,
each block ``n_steps`` times in turn, so k steps means k per block), GPT_Rec and GPT_Rec_parallel their
one transformer block. ``AtSteps(model, k)`` is that model run with k steps instead, in the full forward
pass and in cached decoding alike; steps beyond the trained ones reuse the last per-step inference rate
(NRGPT with ``eta_per_step``). A deep GPT has n_steps distinct layers and no such curve.

``evaluate_at_steps`` scores ``AtSteps(model, k)`` the way ``nrgpt eval`` scores the model, so that at the
trained k it gives exactly the ordinary evaluation:

* ListOps (``ListOpsSamples``): greedy test accuracy (``nrgpt.evaluate.score_listops``), overall and per
  group, each group with its number of samples: ``per_reductions``, by the number of reduction steps the
  sample's chain takes, which is its number of function nodes (each step evaluates exactly one function:
  the op tokens of the prompt); ``per_depth``, by nesting depth (1: a function of numbers); ``per_op``,
  by root op (the op that produces the answer);
* language (batches (x, y), e.g. ``nrgpt.evaluate.SplitWindows``: the windows of ``split_loss``): the
  mean loss per target token and its perplexity.

``depth_curve`` evaluates a list of step counts (default ``default_steps``: from half to 8x the trained
number); ``nrgpt depth RUN`` writes it to ``depth.json`` and ``depth.png`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

from .argtypes import comma_list, integer
from .decoding import KVCache
from .errors import ConfigError
from .evaluate import ListOpsSamples, SplitWindows, load_listops_samples, mean_loss, score_listops
from .model import LanguageModel
from .plots import mark_x, new_figure, save_png, style_axes

MAX_FACTOR = 64  # `nrgpt depth` refuses step counts beyond MAX_FACTOR x the trained number
DEFAULT_FACTORS = (0.5, 0.75, 1, 1.5, 2, 3, 4, 6, 8)
LISTOPS_GROUPS = ("per_reductions", "per_depth", "per_op")

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


def require_recurrent(model: nn.Module) -> LanguageModel:
    """``model`` if it can run another number of steps; ConfigError for a deep GPT."""
    config = model.config
    if not config.is_recurrent:
        raise ConfigError(f"depth curves need a recurrent model (nrgpt, rgpt or rgpt_parallel); this one is a deep "
                          f"'{config.model}', whose {config.n_steps} layers are distinct")
    return model


def default_steps(trained: int) -> list[int]:
    """Step counts from half to 8x ``trained``, about geometric (x 1.5 or x 4/3 apart), ``trained`` among
    them: 8 -> 4, 6, 8, 12, 16, 24, 32, 48, 64."""
    return sorted({max(1, math.floor(f * trained + 0.5)) for f in DEFAULT_FACTORS})


class AtSteps(nn.Module):
    """``model`` run with ``n_steps`` steps (default: the trained number) in every forward pass and
    decoding step. It has the interface evaluation needs: ``logits, loss = m(idx, targets)``,
    ``forward_cached(idx, cache)`` and ``config``. ``step_options`` is what it passes to ``model.body``."""

    def __init__(self, model: LanguageModel, n_steps: int | None = None):
        super().__init__()
        self.model = require_recurrent(model)
        self.n_steps = model.config.n_steps if n_steps is None else n_steps

    @property
    def config(self):
        return self.model.config

    @property
    def grads_by_autograd(self) -> bool:
        return self.model.grads_by_autograd

    def step_options(self) -> dict[str, Any]:
        return {"n_steps": self.n_steps}

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        return self.model(idx, targets, **self.step_options())

    def forward_cached(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Last-position logits for new tokens appended to the cached context."""
        return self.model.forward_cached(idx, cache, **self.step_options())


def evaluate_at_steps(model: LanguageModel, data: ListOpsSamples | Batches, n_steps: int, *,
                      batch_size: int = 32) -> dict[str, Any]:
    """``AtSteps(model, n_steps)`` scored on ``data`` (in eval mode).

    ListOps samples: {"steps", "accuracy", "exact_chain", "terminated", "groups"}, where groups maps each
    of per_reductions, per_depth and per_op to {group: {"n": samples, "accuracy": ...}} (``batch_size``
    prompts decoded at a time). Language batches (x, y), iterated once: {"steps", "loss", "perplexity",
    "tokens"}, the loss per target token averaged over all of them.
    """
    at = AtSteps(model, n_steps)
    if isinstance(data, ListOpsSamples):
        r = score_listops(at, data, batch_size=batch_size)
        groups = {name: {key: {"n": r["group_sizes"][name][key], "accuracy": r[name][key]}
                         for key in r[name]} for name in LISTOPS_GROUPS}  # in score_listops' order
        return {"steps": n_steps, "accuracy": r["overall"], "exact_chain": r["exact_chain"],
                "terminated": r["terminated"], "groups": groups}
    loss, tokens = mean_loss(at, data)
    perplexity = math.exp(loss) if loss < 700 else math.inf  # exp overflows a float beyond ~709
    return {"steps": n_steps, "loss": loss, "perplexity": perplexity, "tokens": tokens}


def depth_curve(model: LanguageModel, data: ListOpsSamples | Batches, steps: Sequence[int] | None = None, *,
                batch_size: int = 32) -> list[dict[str, Any]]:
    """``evaluate_at_steps`` for each number of steps (default ``default_steps`` of the trained number).
    Language ``data`` is iterated once per step count, so it must be re-iterable (a list, ``SplitWindows``)."""
    steps = default_steps(model.config.n_steps) if steps is None else steps
    return [evaluate_at_steps(model, data, k, batch_size=batch_size) for k in steps]


# --------------------------------------------------------------------------------------- figure and table


def depth_figure(result: dict[str, Any]) -> Figure:
    """The metric against the number of steps (log scale), the trained number marked; for ListOps the overall
    accuracy and one line per number of reduction steps. ``result``: the contents of ``depth.json``."""
    points, trained = result["points"], result["trained_steps"]
    steps = [p["steps"] for p in points]
    fig, axes = new_figure(1, 1, panel_size=(6.5, 4.2), title=f"{result['name']}: test-time depth")
    ax = axes[0, 0]
    if result["metric"] == "accuracy":
        ax.plot(steps, [p["accuracy"] for p in points], "o-", color="black", lw=2, label="all samples")
        groups = points[0]["groups"]["per_reductions"]
        colors = [f"C{i % 10}" for i in range(len(groups))]
        for color, (key, group) in zip(colors, groups.items()):
            ax.plot(steps, [p["groups"]["per_reductions"][key]["accuracy"] for p in points], "s--", ms=3, lw=1,
                    color=color, label=f"{key} reduction step{'s' if key != '1' else ''} (n={group['n']})")
        style_axes(ax, xlabel="inference steps", ylabel=f"{result['split']} accuracy (greedy)")
        ax.set_ylim(-0.03, 1.03)
    else:
        ax.plot(steps, [p["loss"] for p in points], "o-", color="black",
                label=f"{result['split']} loss ({points[0]['tokens']:,} targets)")
        style_axes(ax, xlabel="inference steps", ylabel=f"{result['split']} loss (nats per token)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(steps, [str(k) for k in steps])
    ax.xaxis.set_minor_locator(NullLocator())
    mark_x(ax, trained, f"trained steps ({trained})")
    ax.legend(fontsize="small")
    return fig


def depth_table(result: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Headers and rows of the curve: steps (the trained number marked) and the metric(s); for ListOps also
    the accuracy per number of reduction steps (the header gives the group size)."""
    points, trained = result["points"], result["trained_steps"]
    labels = [f"{p['steps']} (trained)" if p["steps"] == trained else p["steps"] for p in points]
    if result["metric"] == "accuracy":
        groups = points[0]["groups"]["per_reductions"]
        headers = ["steps", "accuracy", *(f"{k} red. (n={g['n']})" for k, g in groups.items())]
        rows = [[label, p["accuracy"], *(p["groups"]["per_reductions"][k]["accuracy"] for k in groups)]
                for label, p in zip(labels, points)]
        return headers, rows
    return ["steps", "loss", "perplexity"], [[label, p["loss"], p["perplexity"]] for label, p in zip(labels, points)]


# ------------------------------------------------------------------------------------------ `nrgpt depth`


def depth_data(data_dir: str | Path, block_size: int, samples: int | None = None,
               batch_size: int = 32) -> ListOpsSamples | SplitWindows:
    """What ``nrgpt depth`` evaluates: the first ``samples`` (None: all) test samples of a ListOps dataset,
    else the first ``samples`` validation windows of ``split_loss`` (``batch_size`` at a time)."""
    from .data import load_meta

    if load_meta(data_dir)["kind"] == "listops":
        return load_listops_samples(data_dir, "test", samples)
    return SplitWindows(data_dir, block_size, "val", batch_size, samples)


def checked_steps(steps: Sequence[int] | None, trained: int) -> list[int]:
    """The step counts to evaluate, sorted without repeats (default ``default_steps``); ConfigError beyond
    MAX_FACTOR x ``trained``."""
    if steps is None:
        return default_steps(trained)
    limit = MAX_FACTOR * trained
    if max(steps) > limit:
        raise ConfigError(f"--steps {max(steps)} is more than {MAX_FACTOR}x the {trained} trained steps; use at "
                          f"most {limit}")
    return sorted(set(steps))


def main(args: argparse.Namespace) -> int:
    from .checkpoint import load_any
    from .device import pick_device
    from .tables import markdown_table

    model, data_dir = load_any(args.run, pick_device(args.device), args.checkpoint, args.data)
    require_recurrent(model)
    steps = checked_steps(args.steps, model.config.n_steps)
    if data_dir is None:
        raise ConfigError(f"no dataset found for {args.run}: pass --data DIR (the prepared dataset it was trained "
                          "on)")
    data = depth_data(data_dir, model.config.block_size, args.samples, args.batch_size)
    listops = isinstance(data, ListOpsSamples)
    path = Path(args.run)
    out = Path(args.out) if args.out else (Path("depth") / path.stem if path.is_file() else path / "depth")
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "name": path.stem if path.is_file() else path.name, "run": str(path), "checkpoint": args.checkpoint,
        "model": model.config.model, "trained_steps": model.config.n_steps, "n_blocks": model.config.n_blocks,
        "data": str(data_dir), "kind": "listops" if listops else "language", "split": "test" if listops else "val",
        "samples": len(data.records) if listops else args.samples, "metric": "accuracy" if listops else "loss",
        "points": depth_curve(model, data, steps, batch_size=args.batch_size),
    }
    (out / "depth.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    save_png(depth_figure(result), out / "depth.png")
    print(markdown_table(*depth_table(result)), end="")
    print(f"wrote {out}/: depth.json, depth.png")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """``nrgpt depth``: a recurrent checkpoint's accuracy or loss against the number of inference steps."""
    from .runconfig import DEVICES

    p = subparsers.add_parser(
        "depth", help="test-time depth: ListOps accuracy or validation loss against the number of inference steps",
        description="Evaluate a recurrent checkpoint (NRGPT, GPT_Rec, GPT_Rec_parallel) with each number of "
                    "inference steps: ListOps greedy test accuracy, overall and per number of reduction steps, "
                    "or the validation loss; write depth.json and depth.png and print the table.")
    p.add_argument("run", help="run directory, checkpoint directory or reference-code checkpoint file")
    p.add_argument("--steps", metavar="K1,K2,...", type=comma_list(integer(1), "4,8,16"), default=None,
                   help=f"numbers of steps to evaluate (default: from half to 8x the trained number; at most "
                        f"{MAX_FACTOR}x)")
    p.add_argument("--data", help="the prepared dataset (default: the run's)")
    p.add_argument("--samples", type=integer(1), default=None,
                   help="evaluate the first N ListOps test samples or validation windows (default: all)")
    p.add_argument("--batch-size", type=integer(1), default=32,
                   help="prompts decoded / windows evaluated at a time (default 32, as nrgpt eval)")
    p.add_argument("--out", help="output directory (default: RUN/depth, or depth/NAME for a .pt file)")
    p.add_argument("--checkpoint", "--which", choices=("best", "last"), default="best",
                   help="which checkpoint of a run directory (default: best)")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.set_defaults(func=main)
