"""A sweep's results and their tables: every finished run's ``sweep_result.json`` collected, the best run of
each model, and the Markdown/CSV tables that ``nrgpt sweep`` and ``nrgpt report`` write."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .rundir import write_text_atomic

RESULT = "sweep_result.json"
QUALITY = "quality.json"
SPEC = "sweep.toml"
# What "best run" means for each kind of sweep: (column, larger is better).
BEST_BY = {"listops": ("accuracy", True), "language": ("best_val_loss", False)}


def run_kind(meta: dict[str, Any]) -> str:
    """The kind of a run, from its dataset's meta.json: 'listops', or 'language' for every text dataset."""
    return "listops" if meta["kind"] == "listops" else "language"


def collect_results(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """The ``sweep_result.json`` of every finished run under ``sweep_dir/runs``, sorted by model, size and slug."""
    runs = Path(sweep_dir) / "runs"
    results = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(runs.glob(f"*/{RESULT}"))]
    for result in results:
        quality = runs / result["slug"] / QUALITY
        if quality.is_file():
            result["quality"] = json.loads(quality.read_text(encoding="utf-8"))
    return sorted(results, key=lambda r: (str(r.get("model")), r.get("n_params") or 0, r["slug"]))


def best_per_model(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The best run of each model (by accuracy for ListOps, else by best validation loss); ties go to the
    smaller model."""
    best: dict[str, dict[str, Any]] = {}
    for result in results:
        column, larger = BEST_BY[result["kind"]]
        if result.get(column) is None:
            continue
        key = ((-1 if larger else 1) * result[column], result.get("n_params") or 0)
        current = best.get(result["model"])
        if current is None or key < current[0]:
            best[result["model"]] = (key, result)
    return [best[m][1] for m in sorted(best)]


def format_cell(value: Any) -> str:
    """A table cell: 4 significant digits for floats, thousands separators for large ints, '' for None."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and abs(value) >= 10_000:
        return f"{value:,}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; cells go through ``format_cell``."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(format_cell(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def table_columns(results: list[dict[str, Any]]) -> list[str]:
    """All scalar columns of the results, in first-seen order."""
    columns: dict[str, None] = {}
    for result in results:
        columns.update({k: None for k, v in result.items() if not isinstance(v, (dict, list))})
    return list(columns)


QUALITY_COLUMNS = ("perplexity", "gqs", "apcs", "distinct_1", "distinct_2")
BEST_COLUMNS = ("model", "lr", "min_lr", "n_steps", "n_head", "n_embd", "n_params")


def best_table(results: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Tables 4/6: the best configuration of each model, with its score and generation-quality metrics
    (empty where not computed; the metrics whose optional extra is not installed are listed as missing)."""
    best = best_per_model(results)
    score = sorted({BEST_BY[r["kind"]][0] for r in best})
    with_quality = any("quality" in r for r in best)
    headers = [*BEST_COLUMNS, *score, *(QUALITY_COLUMNS if with_quality else ())]
    rows = [[r.get(c, r.get("quality", {}).get(c)) for c in headers] for r in best]
    if with_quality:
        headers.append("missing")
        for row, r in zip(rows, best):
            row.append(", ".join(r.get("quality", {}).get("missing", [])))
    return headers, rows


def write_tables(sweep_dir: str | Path, results: list[dict[str, Any]]) -> None:
    """``results.csv`` (every column) and ``results.md`` (all runs, then the best run of each model)."""
    sweep_dir = Path(sweep_dir)
    columns = table_columns(results)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(results)
    write_text_atomic(sweep_dir / "results.csv", buffer.getvalue())
    shown = [c for c in columns if c not in ("kind", "slug")]
    text = [f"# Sweep {sweep_dir.name}: {len(results)} finished runs\n", "## All runs\n",
            markdown_table(shown, [[r.get(c) for c in shown] for r in results])]
    if results:
        text += ["\n## Best configuration of each model\n", markdown_table(*best_table(results))]
    write_text_atomic(sweep_dir / "results.md", "\n".join(text))
