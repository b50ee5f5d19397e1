"""Local lm-evaluation-harness tasks that give ``nrgpt eval``'s numbers, and ``nrgpt eval --harness``.

``write_tasks(EXPORT_DIR)`` (``nrgpt export RUN OUT --tasks``) writes, for the exported model's dataset,
task YAML, its data file (JSON lines, read locally: nothing is downloaded), ``utils.py`` and a README
with the ``lm_eval`` command:

* ``nrgpt_listops`` (a ListOps dataset): ``generate_until`` on the test samples cut after their first
  ``=``, greedy; ``accuracy`` is ``nrgpt eval --task listops``'s ``overall`` (also ``exact_chain`` and
  ``terminated``). Each document carries nrgpt's token budget for its prompt (the default of
  ``score_listops``, capped by the block), so the scores agree exactly. lm-eval keeps
  ``max_length - max_gen_toks`` tokens of a prompt, so it must be run with
  ``max_length = block_size + max_gen_toks`` (the README's command does this).
* ``nrgpt_perplexity`` (a character dataset, e.g. Tiny Shakespeare): ``loglikelihood`` of the
  validation split in exactly the windows ``nrgpt eval`` scores (starts 0, T, 2T, ...; the first token of
  a window is its context, every other token a target); ``token_perplexity`` = exp(mean loss per
  target) is ``nrgpt eval``'s perplexity and ``loss`` its val_loss.

``run_harness`` calls ``lm_eval.simple_evaluate`` on an exported directory with these tasks.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import tempfile
from pathlib import Path
from string import Template
from typing import Any

from ..data import TokenStream, load_meta, load_tokenizer
from ..errors import ConfigError, DataError
from .export import HF_EXTRA, RUN_FILE
from .tokenizer import WORD_JOINER

TASKS = {"listops": "nrgpt_listops", "perplexity": "nrgpt_perplexity"}
METRICS = {"nrgpt_listops": ("accuracy", "exact_chain", "terminated"), "nrgpt_perplexity": ("token_perplexity", "loss")}
_TEMPLATES = Path(__file__).parent / "tasks"
_IMPORT_LINE = "from nrgpt.evaluate import score_continuation  # replaced by its source when the tasks are written\n"


def _write_jsonl(path: Path, docs: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")


def listops_docs(data_dir: str | Path, block_size: int) -> tuple[list[dict[str, Any]], int]:
    """The test samples with nrgpt's budget each, and the largest budget (lm-eval's max_gen_toks)."""
    from ..evaluate import load_listops_samples

    samples = load_listops_samples(data_dir, "test")
    lengths = [len(samples.tokenizer.encode(r["prompt"])) for r in samples.records]
    budget = max(len(r["line"].split()) + 1 for r in samples.records) - min(lengths)
    docs = [{"prompt": r["prompt"], "answer": r["answer"], "target": r["target"],
             "budget": max(0, min(budget, block_size - n + 1))} for r, n in zip(samples.records, lengths)]
    return docs, max(1, budget)


def perplexity_docs(data_dir: str | Path, block_size: int) -> list[dict[str, Any]]:
    """The windows of ``nrgpt eval`` over the validation split (``TokenStream.iter_sequential``)."""
    tokenizer = load_tokenizer(data_dir)
    docs = []
    for x, y in TokenStream(data_dir, "val").iter_sequential(1 << 30, block_size):
        for inputs, targets in zip(x.tolist(), y.tolist()):
            docs.append({"context": tokenizer.decode(inputs[:1]) + WORD_JOINER,
                         "continuation": tokenizer.decode(targets), "targets": len(targets)})
    return docs


def _utils_source() -> str:
    from ..evaluate import score_continuation

    source = (_TEMPLATES / "utils.py").read_text(encoding="utf-8")
    if _IMPORT_LINE not in source:
        raise ConfigError("nrgpt/hf/tasks/utils.py lost its score_continuation import line")
    return source.replace(_IMPORT_LINE, inspect.getsource(score_continuation))


def write_tasks(export_dir: str | Path, data_dir: str | Path | None = None,
                out_dir: str | Path | None = None) -> list[str]:
    """Write the tasks for an exported model's dataset (its run's data.dir unless ``data_dir``) into
    ``out_dir`` (default EXPORT_DIR/tasks); returns the task names."""
    export_dir = Path(export_dir)
    out = Path(out_dir) if out_dir else export_dir / "tasks"
    config = json.loads((export_dir / "config.json").read_text(encoding="utf-8"))
    block = config["nrgpt"]["block_size"]
    record = json.loads((export_dir / RUN_FILE).read_text(encoding="utf-8"))
    data_dir = Path(data_dir or record["config"]["data"]["dir"])
    kind = load_meta(data_dir)["kind"]
    out.mkdir(parents=True, exist_ok=True)
    if kind == "listops":
        name = TASKS["listops"]
        docs, max_gen_toks = listops_docs(data_dir, block)
        model_args = f",max_length={block + max_gen_toks}"
    elif kind == "char":
        name, max_gen_toks, model_args = TASKS["perplexity"], 0, ""
        docs = perplexity_docs(data_dir, block)
    else:
        raise DataError(f"{data_dir} is a {kind!r} dataset: the harness tasks are for ListOps and character "
                        "datasets (nrgpt_listops, nrgpt_perplexity)")
    data_file = out / f"{name}.jsonl"
    _write_jsonl(data_file, docs)
    yaml = Template((_TEMPLATES / f"{name}.yaml").read_text(encoding="utf-8"))
    (out / f"{name}.yaml").write_text(yaml.substitute(data_file=json.dumps(str(data_file.resolve())),
                                                      max_gen_toks=max_gen_toks), encoding="utf-8")
    (out / "utils.py").write_text(_utils_source(), encoding="utf-8")
    command = (f"lm_eval --model hf --model_args pretrained={export_dir.resolve()},trust_remote_code=True{model_args} "
               f"--device cpu --include_path {out.resolve()} --tasks {name} --batch_size 16")
    (out / "README.md").write_text(f"# lm-evaluation-harness task {name}\n\nFrom {data_dir} "
                                   f"({len(docs)} documents), for a model with block_size {block}:\n\n"
                                   f"```bash\n{command}\n```\n", encoding="utf-8")
    return [name]


def run_harness(export_dir: str | Path, tasks_dir: str | Path, tasks: list[str], device: str = "cpu",
                batch_size: int = 16, limit: int | None = None) -> dict[str, dict[str, float]]:
    """``lm_eval.simple_evaluate`` of an exported model on tasks in ``tasks_dir``; {task: {metric: value}}."""
    import importlib.util

    missing = [name for name in ("lm_eval", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"the lm-evaluation-harness needs {' and '.join(missing)}: {HF_EXTRA}")
    import lm_eval
    from lm_eval.tasks import TaskManager

    config = json.loads((Path(export_dir) / "config.json").read_text(encoding="utf-8"))
    model_args = {"pretrained": str(export_dir), "trust_remote_code": True, "device": device}
    listops = Path(tasks_dir) / f"{TASKS['listops']}.yaml"
    if TASKS["listops"] in tasks and listops.is_file():
        max_gen_toks = int(listops.read_text(encoding="utf-8").split("max_gen_toks:")[1].split()[0])
        model_args["max_length"] = config["nrgpt"]["block_size"] + max_gen_toks
    out = lm_eval.simple_evaluate(model="hf", model_args=model_args, tasks=tasks, batch_size=batch_size,
                                  task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
                                  bootstrap_iters=0,
                                  limit=limit, log_samples=False)
    return {task: {metric: out["results"][task][f"{metric},none"] for metric in METRICS[task]} for task in tasks}


def harness_task(args: argparse.Namespace) -> dict[str, Any]:
    """``nrgpt eval RUN --harness listops|perplexity``: export to a temporary directory, write the tasks for
    the run's dataset (or ``--data-dir``) and run them; one printable value per task and metric, also
    written to ``--json`` if given."""
    from .export import export_model

    names = [TASKS.get(t.strip(), t.strip()) for t in args.harness.split(",") if t.strip()]
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise ConfigError(f"--harness {args.harness!r}: choose among {', '.join(TASKS)} (comma-separated)")
    from ..device import pick_device

    device = str(pick_device(args.device))
    with tempfile.TemporaryDirectory(prefix="nrgpt-harness-") as tmp:
        export_dir = export_model(args.run, Path(tmp) / "model", args.checkpoint, args.data_dir)
        written = write_tasks(export_dir, args.data_dir, Path(tmp) / "tasks")
        missing = [n for n in names if n not in written]
        if missing:
            raise ConfigError(f"--harness {', '.join(missing)} does not apply to this run's dataset "
                              f"(its task: {', '.join(written)})")
        results = run_harness(export_dir, Path(tmp) / "tasks", names, device, args.batch_size)
    flat = {f"{task}_{metric}": value for task, metrics in results.items() for metric, value in metrics.items()
            if not (isinstance(value, float) and math.isnan(value))}
    if getattr(args, "json", None):
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(flat, indent=2) + "\n", encoding="utf-8")
    return flat
