"""Reports of a run or a sweep (``nrgpt report DIR``): one self-contained HTML page (PNG figures embedded
as base64 data URIs) and one Markdown page (figures beside it in ``report_files/``).

A run directory (it has ``metrics.jsonl``) gets its loss curves, final metrics and config, and its
test-time depth curve when ``nrgpt depth`` has written ``depth/depth.json`` (``nrgpt.depth``). A sweep
directory (it has ``sweep.toml``; see ``nrgpt.sweep``) gets, from its finished runs:

* ListOps (Figure 3 of the paper): test accuracy against total parameters per model, the logistic fit of
  each model (``nrgpt.fits.fit_logistic``) with a star where it crosses 80% (the paper's "transition to
  learning"), the table of crossings, and the best validation / final training loss against parameters;
* language (Figure 4): best validation loss against total parameters per model, every run as a
  transparent dot, a line through the best run of each size and a band over the better half of the runs
  of each size (the paper's "top 50%"), the train-validation gap of the best run of each size, and
  Tables 4/6: the best configuration of each model with its generation-quality metrics;
* for ListOps runs that logged their accuracy while training, the time to learn: the iteration at which
  each seed first reached 50% and 80%, per grid point (``learning_time_table``);
* every run's evaluations against iterations (validation loss, and the ListOps accuracy where logged),
  and for language runs the over-fitting view (Figure 4's claim): the train-validation gap against the
  training loss, and a table of the best-validation iteration, the rise after it and the gap at the
  training loss that every run reached (``nrgpt.fits.gap_at_train_loss``), so runs are compared at equal fit;
* the table of all runs.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from .config import ConfigError
from .fits import LogisticFit, at_first_reaching, fit_logistic, gap_at_train_loss
from .plots import new_figure, png_bytes
from .rundir import METRICS_JSONL, read_metrics
from .tables import RESULT, SPEC, best_table, collect_results, format_cell, markdown_table, run_kind

LEVEL = 0.8  # accuracy that marks the "transition to learning" (Figure 3)
LEARNING_LEVELS = (0.5, LEVEL)  # logged accuracies whose first iteration the learning-time table gives
# Crossings of 80% reported by the paper (Figure 3), for comparison.
PAPER_CROSSINGS = {"GPT_Rec_parallel": 2.3e4, "NRGPT_H_FF1": 2.4e4, "NRGPT_H_FF2W": 2.98e4}
RUN_TABLE_COLUMNS = (
    "slug", "status", "n_params", "iters", "minutes", "best_val_loss", "best_iter", "final_train_loss",
    "final_val_loss", "gap", "accuracy", "accuracy_heldout",
)


class ReportError(ConfigError):
    """The directory is neither a run nor a sweep, or holds nothing to report."""


# ----------------------------------------------------------------------------------------------- page


@dataclass
class Table:
    """A table of a report; cells are formatted by ``format_cell``."""

    headers: list[str]
    rows: list[list[Any]]


@dataclass
class Image:
    """A figure of a report: PNG bytes, a file stem unique within the report, and a caption."""

    name: str
    png: bytes
    caption: str


Block = str | Table | Image  # a str is a Markdown paragraph; lines starting with '#' are headings


def html_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """An HTML table; cells go through ``format_cell`` and are escaped."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(format_cell(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_markdown(title: str, blocks: list[Block], files_dir: str) -> str:
    """The Markdown page; figures are linked as ``files_dir/<name>.png``."""
    parts = [f"# {title}\n"]
    for block in blocks:
        if isinstance(block, Table):
            parts.append(markdown_table(block.headers, block.rows))
        elif isinstance(block, Image):
            parts.append(f"![{block.caption}]({files_dir}/{block.name}.png)\n\n*{block.caption}*\n")
        else:
            parts.append(block + "\n")
    return "\n".join(parts)


_STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
          "table{border-collapse:collapse;font-size:0.85em;margin:1em 0}"
          "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}th{background:#eee}"
          "img{max-width:100%}figcaption{font-style:italic;color:#444}")


def render_html(title: str, blocks: list[Block]) -> str:
    """The self-contained HTML page; figures are embedded as base64 data URIs."""
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    for block in blocks:
        if isinstance(block, Table):
            parts.append(html_table(block.headers, block.rows))
        elif isinstance(block, Image):
            data = base64.b64encode(block.png).decode("ascii")
            parts.append(f"<figure><img alt='{html.escape(block.caption)}' src='data:image/png;base64,{data}'>"
                         f"<figcaption>{html.escape(block.caption)}</figcaption></figure>")
        elif block.startswith("#"):
            level = len(block) - len(block.lstrip("#"))
            parts.append(f"<h{level + 1}>{html.escape(block.lstrip('#').strip())}</h{level + 1}>")
        else:
            parts.append(f"<p>{html.escape(block)}</p>")
    return "\n".join(parts) + "\n</body></html>\n"


def write_report(path: str | Path, out_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` (+ ``report_files/``) for a run or sweep directory into
    ``out_dir`` (default: the directory itself); returns the two paths."""
    path = Path(path)
    if (path / SPEC).is_file():
        title, blocks = f"Sweep {path.name}", sweep_blocks(path)
    elif (path / "metrics.jsonl").is_file():
        title, blocks = f"Run {path.name}", run_blocks(path)
    else:
        raise ReportError(f"{path} is neither a run directory (no metrics.jsonl) nor a sweep directory (no {SPEC})")
    out = Path(out_dir) if out_dir is not None else path
    files = out / "report_files"
    files.mkdir(parents=True, exist_ok=True)
    for block in blocks:
        if isinstance(block, Image):
            (files / f"{block.name}.png").write_bytes(block.png)
    md, page = out / "report.md", out / "report.html"
    md.write_text(render_markdown(title, blocks, files.name), encoding="utf-8")
    page.write_text(render_html(title, blocks), encoding="utf-8")
    return page, md


# ----------------------------------------------------------------------------------------------- a run


def loss_curve_figure(run_dir: Path) -> Figure:
    """The training batch loss of every log step and the evaluated train/validation losses of a run."""
    from .evaluate import overfitting_curve

    steps = [r for r in read_metrics(run_dir) if "loss" in r]
    fig, axes = new_figure(panel_size=(7, 4))
    ax = axes[0, 0]
    ax.plot([r["iter"] for r in steps], [r["loss"] for r in steps], lw=0.8, alpha=0.5, label="training batch loss")
    curve = overfitting_curve(run_dir)
    for key, style in (("train_loss", "o-"), ("val_loss", "s-")):
        ax.plot(curve["iter"], curve[key], style, ms=3, label=key.replace("_", " "))
    ax.set(xlabel="iteration", ylabel="cross-entropy loss (nats)")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def label_colors(labels: Iterable[str]) -> dict[str, str]:
    """One matplotlib cycle colour per distinct label, in order of first appearance."""
    return {label: f"C{i % 10}" for i, label in enumerate(dict.fromkeys(labels))}


def color_legend(ax: Any, colors: dict[str, str]) -> None:
    """A legend of one line per label in its colour (the plotted lines themselves carry no labels)."""
    for label, color in colors.items():
        ax.plot([], [], color=color, label=label)
    ax.legend(fontsize="small")


def evaluation_curves_figure(runs: Sequence[tuple[str, Path]]) -> Figure:
    """Every run's evaluations against iterations, one line per run coloured by its label (the model):
    validation loss, and beside it the ListOps accuracy where the runs logged it
    (``train.eval_accuracy_samples``)."""
    curves = [(label, [r for r in read_metrics(run_dir) if "val_loss" in r]) for label, run_dir in runs]
    panels = [("val_loss", "validation loss (nats)")]
    if any("accuracy" in r for _, evals in curves for r in evals):
        panels.append(("accuracy", "ListOps accuracy (logged test samples)"))
    fig, axes = new_figure(1, len(panels), panel_size=(6, 4))
    colors = label_colors(label for label, _ in curves)
    for ax, (key, ylabel) in zip(axes[0], panels):
        for label, evals in curves:
            points = [(r["iter"], r[key]) for r in evals if key in r]
            if points:
                ax.plot(*zip(*points), "-", color=colors[label], lw=1.0, alpha=0.7)
        ax.set(xlabel="iteration", ylabel=ylabel)
        ax.grid(alpha=0.3)
    color_legend(axes[0, 0], colors)
    return fig


def _curves(runs: Sequence[tuple[str, Path]]) -> list[tuple[str, str, dict[str, list[float]]]]:
    """(label, run name, ``overfitting_curve``) of each run, read once for the over-fitting figure and table."""
    from .evaluate import overfitting_curve

    return [(label, run_dir.name, overfitting_curve(run_dir)) for label, run_dir in runs]


def common_train_loss(curves: Sequence[tuple[str, str, dict[str, list[float]]]]) -> float:
    """The lowest training loss that every run's evaluations reached: max over runs of min(train_loss)."""
    return max(min(curve["train_loss"]) for _, _, curve in curves)


def overfitting_figure(runs: Sequence[tuple[str, Path]]) -> Figure:
    """Every run's validation minus training loss against its training loss, one line per run coloured by its
    label; the x axis runs from high to low training loss, i.e. as training proceeds, so runs are compared
    at equal fit (dotted: ``common_train_loss``)."""
    curves = _curves(runs)
    fig, axes = new_figure(panel_size=(7, 4))
    ax = axes[0, 0]
    colors = label_colors(label for label, _ in runs)
    for label, _, curve in curves:
        ax.plot(curve["train_loss"], curve["gap"], "-", color=colors[label], lw=1.0, alpha=0.8)
    ax.axvline(common_train_loss(curves), color="0.5", ls=":", lw=1.0)
    ax.invert_xaxis()
    ax.set(xlabel="training loss (nats; training proceeds to the right)", ylabel="validation - training loss")
    ax.grid(alpha=0.3)
    color_legend(ax, colors)
    return fig


def overfitting_table(runs: Sequence[tuple[str, Path]]) -> Table:
    """Per run: the iteration of the best validation loss, that loss, the final one and the rise between them
    (the upturn of over-fitting), and the gap at the training loss every run reached."""
    curves = _curves(runs)
    level = common_train_loss(curves)
    rows = []
    for _, name, curve in curves:
        best = curve["val_loss"].index(min(curve["val_loss"]))
        rows.append([name, curve["iter"][best], curve["val_loss"][best], curve["iter"][-1],
                     curve["val_loss"][-1], curve["val_loss"][-1] - curve["val_loss"][best],
                     gap_at_train_loss(curve["train_loss"], curve["val_loss"], level)])
    return Table(["run", "best iter", "best val. loss", "last iter", "last val. loss", "rise after best",
                  f"gap at train loss {level:.3f}"], rows)


def _key_values(data: dict[str, Any], prefix: str = "") -> list[list[Any]]:
    rows = []
    for key, value in data.items():
        if isinstance(value, dict):
            rows += _key_values(value, f"{prefix}{key}.")
        else:
            rows.append([f"{prefix}{key}", json.dumps(value) if isinstance(value, list) else value])
    return rows


def depth_blocks(path: Path) -> list[Block]:
    """The test-time depth section of a ``depth.json`` (``nrgpt depth``): its figure and table."""
    from .depth import depth_figure, depth_table

    result = json.loads(path.read_text(encoding="utf-8"))
    metric = "ListOps test accuracy (overall and per number of reduction steps)" if result["metric"] == "accuracy" \
        else "validation loss"
    return ["## Test-time depth",
            Image("depth", png_bytes(depth_figure(result)),
                  f"{metric} against the number of inference steps; dashed: the {result['trained_steps']} trained "
                  "steps"),
            Table(*depth_table(result))]


def run_blocks(run_dir: Path) -> list[Block]:
    """Final metrics (the trainer's result.json and the sweep's row, when present), loss curves, the test-time
    depth curve (``depth/depth.json``, when present), config."""
    final: dict[str, Any] = {}
    for name in ("result.json", RESULT):
        if (run_dir / name).is_file():
            final.update(json.loads((run_dir / name).read_text(encoding="utf-8")))
    blocks: list[Block] = []
    if final:
        blocks += ["## Final metrics", Table(["metric", "value"], _key_values(final))]
    blocks += ["## Loss curves", Image("loss_curves", png_bytes(loss_curve_figure(run_dir)),
                                       "Training batch loss and evaluated train/validation loss per iteration")]
    if any("accuracy" in r for r in read_metrics(run_dir)):
        blocks += [Image("accuracy_curve", png_bytes(evaluation_curves_figure([(run_dir.name, run_dir)])),
                         "Validation loss and the ListOps accuracy logged at each evaluation")]
    if (run_dir / "depth" / "depth.json").is_file():
        blocks += depth_blocks(run_dir / "depth" / "depth.json")
    if (run_dir / "config.json").is_file():
        config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
        blocks += ["## Config", Table(["setting", "value"], _key_values(config))]
    return blocks


# ----------------------------------------------------------------------------------------------- a sweep


def _by_model(results: list[dict[str, Any]], column: str) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        if r.get(column) is not None and r.get("n_params"):
            groups[r["model"]].append(r)
    return dict(sorted(groups.items()))


def fit_models(results: list[dict[str, Any]]) -> dict[str, LogisticFit | str]:
    """The logistic fit of accuracy against total parameters for each model, or why there is none."""
    fits: dict[str, LogisticFit | str] = {}
    for model, runs in _by_model(results, "accuracy").items():
        try:
            fits[model] = fit_logistic([r["n_params"] for r in runs], [r["accuracy"] for r in runs])
        except ValueError as e:
            fits[model] = str(e)
    return fits


def crossing(fit: LogisticFit | str | None) -> float | None:
    """Where a fit crosses 80%, or None (no fit, never crossed, or a degenerate fit whose crossing is not a
    finite number)."""
    if not isinstance(fit, LogisticFit):
        return None
    n = fit.crossing(LEVEL)
    return n if n is not None and math.isfinite(n) else None


def accuracy_figure(results: list[dict[str, Any]], fits: dict[str, LogisticFit | str]) -> Figure:
    """Figure 3: accuracy (top) and losses (bottom) against total parameters, a logistic fit per model and a
    star (gid ``crossing:<model>``) where the fit crosses 80%."""
    fig, axes = new_figure(2, 1, panel_size=(7, 3.8), sharex=True)
    top, bottom = axes[:, 0]
    groups = _by_model(results, "accuracy")
    sizes = [r["n_params"] for runs in groups.values() for r in runs]
    grid = np.geomspace(min(sizes) / 1.5, max(sizes) * 1.5, 200) if sizes else np.array([])
    for i, (model, runs) in enumerate(groups.items()):
        color = f"C{i}"
        top.plot([r["n_params"] for r in runs], [r["accuracy"] for r in runs], "o", color=color, alpha=0.7,
                 label=model)
        fit = fits.get(model)
        if isinstance(fit, LogisticFit):
            top.plot(grid, fit.predict(grid), "-", color=color, lw=1.2)
            n = crossing(fit)
            if n is not None and grid[0] <= n <= grid[-1]:
                top.plot([n], [LEVEL], "*", ms=16, color="gold", mec="black", zorder=5, gid=f"crossing:{model}")
        runs = sorted(runs, key=lambda r: r["n_params"])
        n = [r["n_params"] for r in runs]
        bottom.plot(n, [r["best_val_loss"] for r in runs], "s-", color=color, ms=4, label=f"{model} validation")
        bottom.plot(n, [r["final_train_loss"] for r in runs], "o--", color=color, ms=3, alpha=0.6,
                    label=f"{model} training")
    top.axhline(LEVEL, color="gray", ls=":", lw=1)
    top.set(xscale="log", ylabel="ListOps test accuracy", ylim=(-0.02, 1.02))
    bottom.set(xscale="log", xlabel="total parameters", ylabel="loss (best val., final train)")
    for ax in (top, bottom):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    return fig


def crossing_table(results: list[dict[str, Any]], fits: dict[str, LogisticFit | str]) -> Table:
    """Per model: runs, best accuracy, the fit's 80% crossing (marked when it lies outside the sizes
    trained) and parameters, and the paper's crossing."""
    rows = []
    for model, runs in _by_model(results, "accuracy").items():
        fit = fits[model]
        best = max(runs, key=lambda r: r["accuracy"])
        sizes = [r["n_params"] for r in runs]
        n = crossing(fit)
        if not isinstance(fit, LogisticFit):
            cells = [f"no fit: {fit}", None, None, None]
        else:
            where = "not reached" if n is None else f"{n:.3g}" + ("" if min(sizes) <= n <= max(sizes) else
                                                                  " (extrapolated)")
            cells = [where, fit.x0, fit.k, fit.rss]
        rows.append([model, len(runs), best["accuracy"], *cells, PAPER_CROSSINGS.get(model)])
    return Table(["model", "runs", "best accuracy", "n_params at 80%", "fit x0 (log10 N)", "fit k", "fit rss",
                  "paper: n_params at 80%"], rows)


def _seed_part(slug: str) -> tuple[str, int]:
    """(the slug without its seed part, the seed; -1 if none), wherever the seed axis is (``seed1-A-n_embd16``,
    ``n_embd16-A-seed1``)."""
    rest, seed = [], -1
    for part in slug.split("-"):
        if re.fullmatch(r"seed\d+", part):
            seed = int(part[4:])
        else:
            rest.append(part)
    return "-".join(rest), seed


def _without_seed(slug: str) -> str:
    return _seed_part(slug)[0]


def _iterations_to(level: float, evals: list[dict[str, Any]]) -> float | None:
    points = [(r["iter"], r["accuracy"]) for r in evals if "accuracy" in r]
    return at_first_reaching([a for _, a in points], [i for i, _ in points], level) if points else None


def learning_time_table(sweep_dir: Path, results: list[dict[str, Any]]) -> Table | None:
    """For finished ListOps runs that logged their accuracy during training (``train.eval_accuracy_samples``):
    per grid point, its seeds together, the test accuracy (mean and range) and the iteration at which each
    seed's logged accuracy first reached 50% and 80% (seeds in increasing order; linear between evaluations,
    ``nrgpt.fits.at_first_reaching``), "-" for a seed that never did. The spread of those iterations is how much the
    time to leave ListOps' loss plateau varies from seed to seed. None when no run logged its accuracy."""
    groups: dict[str, list[tuple[dict[str, Any], list[dict[str, Any]]]]] = defaultdict(list)
    for r in results:
        run_dir = sweep_dir / "runs" / r["slug"]
        evals = read_metrics(run_dir) if r["kind"] == "listops" and (run_dir / METRICS_JSONL).is_file() else []
        if any("accuracy" in e and "val_loss" in e for e in evals):
            groups[_without_seed(r["slug"])].append((r, [e for e in evals if "val_loss" in e]))
    if not groups:
        return None
    rows = []
    for key, runs in sorted(groups.items(), key=lambda kv: (str(kv[1][0][0]["model"]), kv[1][0][0]["n_params"])):
        runs.sort(key=lambda run: (_seed_part(run[0]["slug"])[1], run[0]["slug"]))
        accuracy = [r["accuracy"] for r, _ in runs if r.get("accuracy") is not None]
        spread = f"{min(accuracy):.3f}-{max(accuracy):.3f}" if len(accuracy) > 1 else None
        times = [" / ".join("-" if (t := _iterations_to(level, evals)) is None else f"{t:,.0f}" for _, evals in runs)
                 for level in LEARNING_LEVELS]
        rows.append([key, runs[0][0]["model"], runs[0][0]["n_params"], len(runs),
                     sum(accuracy) / len(accuracy) if accuracy else None, spread, *times])
    return Table(["grid point", "model", "n_params", "seeds", "test accuracy (mean)", "range",
                  *(f"iteration at {level:.0%} (each seed)" for level in LEARNING_LEVELS)], rows)


def per_size(runs: list[dict[str, Any]], column: str) -> list[tuple[int, list[dict[str, Any]]]]:
    """The runs of one model grouped by parameter count, each group sorted by ``column`` (best first)."""
    groups: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        groups[r["n_params"]].append(r)
    return [(n, sorted(groups[n], key=lambda r: r[column])) for n in sorted(groups)]


def loss_figure(results: list[dict[str, Any]]) -> Figure:
    """Figure 4: best validation loss against total parameters (every run a transparent dot, a line through
    the best of each size with its final training loss dashed, a band over the better half of each size)
    and the train-validation gap of the best run of each size."""
    fig, axes = new_figure(2, 1, panel_size=(7, 3.8), sharex=True)
    top, bottom = axes[:, 0]
    for i, (model, runs) in enumerate(_by_model(results, "best_val_loss").items()):
        color = f"C{i}"
        top.plot([r["n_params"] for r in runs], [r["best_val_loss"] for r in runs], "o", color=color, alpha=0.25,
                 ms=4)
        groups = per_size(runs, "best_val_loss")
        n = [size for size, _ in groups]
        best = [group[0] for _, group in groups]
        top.plot(n, [r["best_val_loss"] for r in best], "o-", color=color, label=model)
        top.plot(n, [r["final_train_loss"] for r in best], "x--", color=color, alpha=0.6, lw=1)
        upper = [group[max(0, math.ceil(len(group) / 2) - 1)]["best_val_loss"] for _, group in groups]
        top.fill_between(n, [r["best_val_loss"] for r in best], upper, color=color, alpha=0.15, lw=0)
        bottom.plot(n, [r["gap"] for r in best], "o-", color=color, label=model)
    top.set(xscale="log", ylabel="best validation loss")
    bottom.axhline(0, color="gray", lw=0.8)
    bottom.set(xscale="log", xlabel="total parameters", ylabel="final val. - train loss (best run per size)")
    for ax in (top, bottom):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    return fig


def _model_and_kind(run_dir: Path) -> tuple[str, str | None]:
    """A run's model preset and kind of dataset ('listops' or 'language') from its config.json and the dataset
    it names ('', None where these cannot be read)."""
    from .data import load_meta
    from .errors import DataError

    try:
        config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
        model, data_dir = str(config["model"]["preset"]), config["data"]["dir"]
    except (OSError, ValueError, KeyError, TypeError):
        return "", None
    try:
        return model, run_kind(load_meta(data_dir))
    except DataError:
        return model, None


def _curve_runs(sweep_dir: Path, results: list[dict[str, Any]]) -> list[tuple[str, Path, str | None]]:
    """(label, run directory, kind) of every run with evaluations: the finished ones, then those still
    training (or interrupted; labelled unfinished, their kind the finished runs' when these share one). A
    label is the run's slug without its seed, so that seeds share a colour; the model beyond 10 labels."""
    runs_dir = sweep_dir / "runs"
    finished = [(r["slug"], str(r["model"]), r["kind"]) for r in results
                if (runs_dir / r["slug"] / METRICS_JSONL).is_file()]
    kinds = {kind for _, _, kind in finished}
    done = {slug for slug, _, _ in finished}
    unfinished = []
    started = sorted(p for p in runs_dir.iterdir() if p.is_dir() and p.name not in done) if runs_dir.is_dir() else []
    for run_dir in started:
        if (run_dir / METRICS_JSONL).is_file() and any("val_loss" in r and "train_loss" in r
                                                        for r in read_metrics(run_dir)):
            model, kind = _model_and_kind(run_dir)
            unfinished.append((run_dir.name, model, kind or (next(iter(kinds)) if len(kinds) == 1 else None)))
    points = finished + unfinished
    labels = [_without_seed(slug) for slug, _, _ in points]
    if len(set(labels)) > 10:
        labels = [model for _, model, _ in points]
    labels[len(finished):] = [f"{label} (unfinished)" for label in labels[len(finished):]]
    return [(label, runs_dir / slug, k) for label, (slug, _, k) in zip(labels, points)]


def sweep_blocks(sweep_dir: Path) -> list[Block]:
    results = collect_results(sweep_dir)
    curve_runs = _curve_runs(sweep_dir, results)
    if not results and not curve_runs:
        raise ReportError(f"{sweep_dir} has no finished runs yet (no runs/*/{RESULT}) and no evaluations")
    blocks: list[Block] = [f"{len(results)} finished runs, {len(curve_runs) - len(results)} unfinished ones with "
                           "evaluations. Parameter counts are total parameters (embeddings and head included), as "
                           "in the paper."]
    listops = [r for r in results if r["kind"] == "listops"]
    language = [r for r in results if r["kind"] == "language"]
    if listops:
        fits = fit_models(listops)
        blocks += ["## ListOps accuracy against size (Figure 3)",
                   Image("figure3", png_bytes(accuracy_figure(listops, fits)),
                         "ListOps test accuracy (top) and best validation / final training loss (bottom) against "
                         "total parameters; lines: logistic fits; stars: where a fit crosses 80%"),
                   crossing_table(listops, fits)]
        learning = learning_time_table(sweep_dir, listops)
        if learning is not None:
            blocks += ["## Time to learn: iterations to 50% and 80% logged accuracy", learning]
    if language:
        blocks += ["## Validation loss against size (Figure 4)",
                   Image("figure4", png_bytes(loss_figure(language)),
                         "Best validation loss against total parameters: dots every run, lines the best run of "
                         "each size (dashed: its final training loss), bands the better half of the runs of each "
                         "size (top); final validation minus training loss of the best run of each size (bottom)")]
    if curve_runs:
        runs = [(label, run_dir) for label, run_dir, _ in curve_runs]
        blocks += ["## Evaluation curves",
                   Image("curves", png_bytes(evaluation_curves_figure(runs)),
                         "Every run's validation loss (and ListOps accuracy, where logged) against iterations; "
                         "one colour per grid point, its seeds together (per model beyond 10 of them); runs "
                         "still training are marked unfinished")]
        language_runs = [(label, run_dir) for label, run_dir, kind in curve_runs if kind == "language"]
        if language_runs:
            blocks += ["## Over-fitting at equal training loss (Figure 4's claim)",
                       Image("overfitting", png_bytes(overfitting_figure(language_runs)),
                             "Validation minus training loss against training loss, as training proceeds; dotted: "
                             "the lowest training loss every run reached"),
                       overfitting_table(language_runs)]
    if results:
        blocks += ["## Best configuration of each model (Tables 4/6)", Table(*best_table(results))]
        columns = [c for c in RUN_TABLE_COLUMNS if any(r.get(c) is not None for r in results)]
        blocks += ["## All runs", Table(columns, [[r.get(c) for c in columns] for r in results])]
    return blocks


# ----------------------------------------------------------------------------------------------- command


def command(args: argparse.Namespace) -> int:
    for path in write_report(args.dir, args.out):
        print(f"wrote {path}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """``nrgpt report RUN_OR_SWEEP_DIR``."""
    p = subparsers.add_parser("report", help="write an HTML and a Markdown report of a run or a sweep",
                              description="Write report.html (self-contained: figures embedded) and report.md "
                                          "(figures in report_files/) for a run directory or a sweep directory.")
    p.add_argument("dir", help="a run directory (with metrics.jsonl) or a sweep directory (with sweep.toml)")
    p.add_argument("--out", help="where to write the report (default: the directory itself)")
    p.set_defaults(func=command)
