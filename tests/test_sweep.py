"""Sweeps: grid expansion and slugs, bad sweep files, the results table, resuming, and real tiny runs."""

from __future__ import annotations

import csv
import dataclasses
import json
import textwrap
from pathlib import Path

import pytest
import torch

from nrgpt.cli import main
from nrgpt.data import prepare_listops, prepare_shakespeare_char
from nrgpt.sweep import (
    SweepError,
    dump_toml,
    format_slug_value,
    load_sweep,
    run_sweep,
    slug,
    tomllib,
)
from nrgpt.tables import RESULT, best_per_model, write_tables
from nrgpt.train import train

# A tiny base config: every run trains in about a second on a CPU, in float32 whatever the host (see
# test_a_sweep_trains_every_run_in_the_precision_that_auto_chose_first for 'auto').
TINY_BASE = """
[base]
data.dir = "{data}"
model.block_size = 32
model.n_steps = 2
train.batch_size = 4
train.eval_interval = 4
train.eval_iters = 1
train.warmup_iters = 1
system.device = "cpu"
system.dtype = "float32"
system.threads = 1
log.progress = false
"""


def write_sweep(tmp_path: Path, body: str, data: Path | str = "data/x", base: str = TINY_BASE) -> Path:
    path = tmp_path / "s.toml"
    path.write_text(base.format(data=data) + textwrap.dedent(body), encoding="utf-8")
    return path


GRID = """
[grid]
model.preset = ["NRGPT_H_FF1", "GPT_Rec_parallel"]
model.n_embd = [8, 16, 32]
lr = [{train.lr = 1e-3, train.min_lr = 1e-4}, {train.lr = 3e-4, train.min_lr = 2e-5}]

[budget]
iters = 8
"""


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Runs set torch's thread count (system.threads = 1); give the next test the count it had."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def listops_dir(tmp_path_factory) -> Path:
    return prepare_listops(tmp_path_factory.mktemp("listops") / "data", n_train=300, n_test=30)


@pytest.fixture(scope="module")
def chars_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("chars")
    source = root / "text.txt"
    source.write_text("To be, or not to be, that is the question.\n" * 60, encoding="utf-8")
    with pytest.warns(UserWarning, match="not the usual Tiny Shakespeare"):
        return prepare_shakespeare_char(root / "data", source=source)


# ------------------------------------------------------------------------------------------ grid and slugs


def test_grid_expands_to_every_combination_with_readable_slugs(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, GRID), out_dir=tmp_path / "sw")
    assert len(sweep.points) == 2 * 3 * 2
    assert [a.name for a in sweep.axes] == ["model.preset", "model.n_embd", "lr"]
    first, last = sweep.points[0], sweep.points[-1]
    assert first.slug == "NRGPT_H_FF1-n_embd8-lr0.001-min_lr0.0001"
    assert last.slug == "GPT_Rec_parallel-n_embd32-lr0.0003-min_lr2e-5"
    assert len({p.slug for p in sweep.points}) == len(sweep.points)
    cfg = last.config
    assert (cfg.model.preset_name, cfg.model.n_embd, cfg.train.lr, cfg.train.min_lr) == ("GPT_Rec_parallel", 32,
                                                                                         3e-4, 2e-5)
    assert cfg.train.max_iters == 8 and cfg.model.n_steps == 2  # budget and base applied
    assert Path(cfg.out_dir) == tmp_path / "sw" / "runs" / last.slug
    assert [p.slug for p in sweep.shard(1, 5)] == [p.slug for p in sweep.points[1::5]]


def test_slug_values():
    assert format_slug_value(2e-5) == "2e-5" and format_slug_value(1e-3) == "0.001"
    assert format_slug_value(1e20) == "1e20" and format_slug_value(True) == "true"
    assert format_slug_value("a/b c") == "a-b-c"
    # keys sharing a last part are told apart by their full names
    assert slug({"model.preset": "GPT", "model.dropout": 0.1, "train.seed": 1, "data.seed": 2}) == (
        "GPT-dropout0.1-train_seed1-data_seed2")


def test_extends_replaces_axes_and_keeps_the_rest(tmp_path):
    write_sweep(tmp_path, GRID)
    child = tmp_path / "trimmed.toml"
    child.write_text('extends = "s.toml"\n[grid]\nmodel.n_embd = [8]\n[budget]\niters = 3\n')
    sweep = load_sweep(child)
    assert sweep.name == "trimmed" and sweep.out_dir == Path("runs/sweeps/trimmed")
    assert [p.slug for p in sweep.points][:2] == ["NRGPT_H_FF1-n_embd8-lr0.001-min_lr0.0001",
                                                  "NRGPT_H_FF1-n_embd8-lr0.0003-min_lr2e-5"]
    assert len(sweep.points) == 4 and sweep.points[0].config.train.max_iters == 3
    child.write_text('extends = "trimmed.toml"\n')
    with pytest.raises(SweepError, match="extends itself"):
        load_sweep(child)


def test_resolved_sweep_toml_round_trips(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, GRID + "[eval]\nlistops_samples = 0\n"))
    assert tomllib.loads(dump_toml(sweep.spec()))["base"] == sweep.spec()["base"]
    resolved = tmp_path / "resolved" / "sweep.toml"
    resolved.parent.mkdir()
    resolved.write_text(dump_toml(sweep.spec()))
    again = load_sweep(resolved)  # a sweep directory's sweep.toml runs the same sweep
    assert again.spec() == sweep.spec() and again.eval.listops_samples == 0
    assert [p.config for p in again.points] == [p.config for p in sweep.points]


@pytest.mark.parametrize("body, message", [
    ("bogus = 1\n" + GRID, "[base]: unknown config key bogus"),
    ("[grid]\n[budget]\niters = 5\n", "[grid] is empty"),
    ("[grid]\nmodel.n_embd = []\n[budget]\niters = 5\n", "grid.model.n_embd is an empty list"),
    ("[grid]\nmodel.n_embd = 8\n[budget]\niters = 5\n", "must be a list"),
    ("[grid]\nmodel.n_embd = [8, 'x']\n[budget]\niters = 5\n", "model.n_embd = 'x' must be of type int"),
    ("[grid]\nmodel.n_embed = [8]\n[budget]\niters = 5\n", "unknown model config key(s): n_embed"),
    ("[grid]\ntrain.lr = [-1.0]\n[budget]\niters = 5\n", "train.lr = -1.0 must be a finite number > 0"),
    ("[grid]\nmodel.n_embd = [10]\nmodel.n_head = [3]\n[budget]\niters = 5\n", "not divisible"),
    ("[grid]\nmodel.n_embd = [8, 8]\n[budget]\niters = 5\n", "lists a value twice"),
    ("[grid]\nmodel.n_embd = [8]\n", "[budget] sets neither"),
    ("[grid]\nmodel.n_embd = [8]\n[budget]\niters = -3\n", "budget.iters = -3"),
    ("[grid]\nmodel.n_embd = [8]\n[budget]\nsteps = 3\n", "unknown key 'steps' in"),
    ("[grid]\ntrain.max_iters = [8]\n[budget]\niters = 5\n", "train.max_iters is both in [grid]"),
    ("[grid]\nmodel.n_embd = [8]\n[budget]\niters = 5\n[eval]\nlistops_samples = 'all'\n", "eval.listops_samples"),
    ("[grid]\nmodel.n_embd = [8\n", "not valid TOML"),
])
def test_bad_sweep_files_give_one_clear_error(tmp_path, capsys, body, message):
    path = write_sweep(tmp_path, body)
    with pytest.raises(SweepError) as err:
        load_sweep(path)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert main(["sweep", str(path), "--dry-run"]) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith("nrgpt: error: ") and message in err_lines[0]


def test_unknown_top_level_key(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text("bogus = 1\n" + TINY_BASE.format(data="d") + GRID)
    with pytest.raises(SweepError, match="unknown key 'bogus' in .*allowed keys: name, out_dir, extends, base"):
        load_sweep(path)


def test_bad_base_is_named(tmp_path):
    base = TINY_BASE + "train.lr = 'fast'\n"
    with pytest.raises(SweepError, match=r"\[base\]: train.lr = 'fast'"):
        load_sweep(write_sweep(tmp_path, GRID, base=base))


def test_changed_base_in_existing_sweep_dir_is_refused(tmp_path, listops_dir):
    sweep = load_sweep(write_sweep(tmp_path, GRID, data=listops_dir), out_dir=tmp_path / "sw")
    run_sweep(sweep, shard=(0, 100), train_fn=fake_train, log=lambda _: None)
    changed = load_sweep(write_sweep(tmp_path, GRID.replace("iters = 8", "iters = 9"), data=listops_dir),
                         out_dir=tmp_path / "sw")
    with pytest.raises(SweepError, match="different budget"):
        run_sweep(changed, shard=(0, 100), train_fn=fake_train, log=lambda _: None)


def test_a_sweep_dir_written_before_a_setting_existed_still_resumes(tmp_path, listops_dir):
    """A sweep.toml without a setting that nrgpt has since added ran with that setting's default: resuming is
    allowed while the sweep keeps the default, and refused once it sets another value."""
    sweep = load_sweep(write_sweep(tmp_path, GRID, data=listops_dir), out_dir=tmp_path / "sw")
    run_sweep(sweep, shard=(0, 100), train_fn=fake_train, log=lambda _: None)
    spec = tmp_path / "sw" / "sweep.toml"
    text = spec.read_text()
    assert "eval_accuracy_samples = 0\n" in text
    spec.write_text(text.replace("eval_accuracy_samples = 0\n", ""))  # as an older nrgpt wrote it
    run_sweep(sweep, shard=(0, 100), train_fn=fake_train, log=lambda _: None)
    spec.write_text(text.replace("eval_accuracy_samples = 0\n", ""))
    base = TINY_BASE + "train.eval_accuracy_samples = 3\n"
    changed = load_sweep(write_sweep(tmp_path, GRID, data=listops_dir, base=base), out_dir=tmp_path / "sw")
    with pytest.raises(SweepError, match=r"different base \(base.train.eval_accuracy_samples: 0 there, 3 now\)"):
        run_sweep(changed, shard=(0, 100), train_fn=fake_train, log=lambda _: None)


def test_a_sweep_trains_every_run_in_the_precision_that_auto_chose_first(tmp_path, listops_dir, monkeypatch):
    """With system.dtype 'auto' the sweep resolves the dtype once and records it in sweep.toml: a shard or a
    resume on a machine where 'auto' means another dtype trains in the recorded one, so the runs stay
    comparable. A sweep.toml that records 'auto' (an older nrgpt) keeps it."""
    def host(native: bool) -> None:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)

    path = write_sweep(tmp_path, GRID, data=listops_dir, base=TINY_BASE.replace('system.dtype = "float32"\n', ""))
    host(True)
    first = load_sweep(path, out_dir=tmp_path / "sw")
    assert {p.config.system.dtype for p in first.points} == {"bfloat16"}
    run_sweep(first, shard=(0, 100), train_fn=fake_train, log=lambda _: None)
    spec = tmp_path / "sw" / "sweep.toml"
    assert tomllib.loads(spec.read_text())["base"]["system"]["dtype"] == "bfloat16"
    host(False)
    later = load_sweep(path, out_dir=tmp_path / "sw")
    assert {p.config.system.dtype for p in later.points} == {"bfloat16"}
    run_sweep(later, shard=(1, 100), train_fn=fake_train, log=lambda _: None)
    assert {p.config.system.dtype for p in load_sweep(path, out_dir=tmp_path / "new").points} == {"float32"}
    spec.write_text(spec.read_text().replace('dtype = "bfloat16"', 'dtype = "auto"'))  # as an older nrgpt wrote it
    legacy = load_sweep(path, out_dir=tmp_path / "sw")
    assert {p.config.system.dtype for p in legacy.points} == {"auto"}
    run_sweep(legacy, shard=(2, 100), train_fn=fake_train, log=lambda _: None)


# ------------------------------------------------------------------------------------------ results table


def fake_result(model: str, n: int, loss: float, acc: float | None = None) -> dict:
    kind = "listops" if acc is not None else "language"
    return {"slug": f"{model}-{n}", "kind": kind, "model": model, "lr": 1e-3, "min_lr": 1e-4, "n_steps": 5,
            "n_head": 1, "n_embd": n // 100, "n_params": n, "best_val_loss": loss, "final_train_loss": loss - 0.1,
            "gap": 0.1, **({"accuracy": acc} if acc is not None else {})}


def test_results_table_and_best_per_model(tmp_path):
    results = [fake_result("A", 1000, 2.0), fake_result("A", 2000, 1.5), fake_result("A", 4000, 1.5),
               fake_result("B", 1500, 1.8)]
    assert [r["slug"] for r in best_per_model(results)] == ["A-2000", "B-1500"]  # ties go to the smaller model
    listops = [fake_result("A", 1000, 2.0, 0.3), fake_result("A", 2000, 1.9, 0.9)]
    assert best_per_model(listops)[0]["slug"] == "A-2000"  # by accuracy
    write_tables(tmp_path, results)
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [r["slug"] for r in rows] == ["A-1000", "A-2000", "A-4000", "B-1500"]
    assert rows[1]["n_params"] == "2000" and float(rows[1]["best_val_loss"]) == 1.5
    md = (tmp_path / "results.md").read_text()
    assert "| model | lr | min_lr | n_steps | n_head | n_embd | n_params | best_val_loss |" in md
    assert "| B | 0.001 | 0.0001 | 5 | 1 | 15 | 1500 | 1.8 |" in md


# ------------------------------------------------------------------------------------------ running


def fake_train(config, *, resume, overwrite, quiet, calls=None, losses=(2.0, 1.0)):
    """A stand-in for nrgpt.train.train: writes a 'best' checkpoint of the untrained model and two evaluations."""
    from nrgpt.checkpoint import save_checkpoint
    from nrgpt.data import load_meta
    from nrgpt.model import build_model

    if calls is not None:
        calls.append((Path(config.out_dir).name, resume))
    run_dir = Path(config.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    vocab = load_meta(config.data.dir)["vocab_size"]
    resolved = dataclasses.replace(config, model=config.model_config(vocab))
    model = build_model(resolved.model)
    save_checkpoint(run_dir / "best", model, resolved, {"iter": 8})
    evals = [{"iter": i, "train_loss": loss - 0.1, "val_loss": loss} for i, loss in enumerate(losses)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    return {"status": "finished", "iters": config.train.max_iters, "elapsed_s": 1.5}


def test_interrupted_sweep_resumes_and_skips_finished_runs(tmp_path, chars_dir):
    body = "[grid]\nmodel.preset = ['NRGPT_H_FF1', 'GPT_Rec_parallel']\nmodel.n_embd = [8]\n[budget]\niters = 8\n"
    sweep = load_sweep(write_sweep(tmp_path, body, data=chars_dir), out_dir=tmp_path / "sw")
    calls: list = []

    def interrupted_after_one(config, **kw):
        if calls:
            raise KeyboardInterrupt
        return fake_train(config, calls=calls, **kw)

    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, train_fn=interrupted_after_one, log=lambda _: None)
    assert calls == [("NRGPT_H_FF1-n_embd8", False)]
    (tmp_path / "sw" / "runs" / "GPT_Rec_parallel-n_embd8").mkdir()  # a run started, without a checkpoint yet
    calls.clear()
    log: list[str] = []
    results = run_sweep(sweep, train_fn=lambda c, **kw: fake_train(c, calls=calls, **kw), log=log.append)
    assert calls == [("GPT_Rec_parallel-n_embd8", False)]
    assert "[1/2] NRGPT_H_FF1-n_embd8: finished, skipped" in log
    assert [r["slug"] for r in results] == ["GPT_Rec_parallel-n_embd8", "NRGPT_H_FF1-n_embd8"]
    r = results[1]
    assert r["kind"] == "language" and r["best_val_loss"] == 1.0 and r["final_train_loss"] == 0.9
    assert r["best_iter"] == 1  # the iteration of the best evaluation
    assert r["gap"] == pytest.approx(0.1) and r["minutes"] == pytest.approx(1.5 / 60)
    assert "accuracy" not in r


def test_a_diverged_run_is_recorded_and_the_sweep_goes_on(tmp_path, chars_dir):
    from nrgpt.report import write_report
    from nrgpt.train import DivergenceError

    def diverges_at_high_lr(config, **kw):
        if config.train.lr > 1e-2:
            raise DivergenceError("the loss is nan at iteration 3")
        return fake_train(config, **kw)

    body = "[grid]\nmodel.preset = ['GPT']\ntrain.lr = [1e-3, 0.1]\n[budget]\niters = 8\n"
    sweep = load_sweep(write_sweep(tmp_path, body, data=chars_dir), out_dir=tmp_path / "sw")
    results = {r["slug"]: r for r in run_sweep(sweep, train_fn=diverges_at_high_lr, log=lambda _: None)}
    assert results["GPT-lr0.1"]["status"] == "diverged" and "nan" in results["GPT-lr0.1"]["error"]
    assert results["GPT-lr0.1"]["n_params"] == results["GPT-lr0.001"]["n_params"] > 0
    assert results["GPT-lr0.001"]["status"] == "finished"
    assert [r["slug"] for r in best_per_model(list(results.values()))] == ["GPT-lr0.001"]
    assert "diverged" in write_report(tmp_path / "sw")[0].read_text()


def test_language_sweep_scores_the_best_run_of_each_model_once(tmp_path, chars_dir, monkeypatch):
    import nrgpt.evaluate

    scored = []

    def fake_quality(run_dir, n_samples, max_new_tokens):
        scored.append((Path(run_dir).name, n_samples, max_new_tokens))
        return {"perplexity": None, "gqs": 0.9, "apcs": None, "distinct_1": 0.5, "distinct_2": 0.8,
                "missing": ["apcs", "perplexity"]}

    monkeypatch.setattr(nrgpt.evaluate, "generation_quality_for_model", fake_quality)
    body = "[grid]\nmodel.preset = ['GPT']\nmodel.n_embd = [8, 16]\n[budget]\niters = 8\n[eval]\nquality_samples = 3\n"
    sweep = load_sweep(write_sweep(tmp_path, body, data=chars_dir), out_dir=tmp_path / "sw")
    losses = iter([(2.0, 1.0), (2.0, 0.5)])
    for _ in range(2):
        run_sweep(sweep, train_fn=lambda c, **kw: fake_train(c, losses=next(losses), **kw), log=lambda _: None)
    assert scored == [("GPT-n_embd16", 3, 200)]  # the best run only, and only once
    assert json.loads((tmp_path / "sw" / "runs" / "GPT-n_embd16" / "quality.json").read_text())["gqs"] == 0.9
    md = (tmp_path / "sw" / "results.md").read_text()
    assert "| perplexity | gqs | apcs | distinct_1 | distinct_2 | missing |" in md
    assert "|  | 0.9 |  | 0.5 | 0.8 | apcs, perplexity |" in md


def test_real_tiny_listops_sweep_end_to_end(tmp_path, listops_dir, capsys):
    body = """
    [grid]
    model.preset = ["NRGPT_H_FF1", "GPT_Rec_parallel"]
    model.n_embd = [8]

    [budget]
    iters = 6

    [eval]
    listops_samples = 10
    """
    path = write_sweep(tmp_path, body, data=listops_dir)
    out = tmp_path / "sw"
    assert main(["sweep", str(path), "--out-dir", str(out), "--quiet", "--report"]) == 0
    assert "2 of 2 runs finished" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} >= {"sweep.toml", "results.csv", "results.md", "runs", "report.html",
                                               "report.md"}
    rows = {r["slug"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert set(rows) == {"NRGPT_H_FF1-n_embd8", "GPT_Rec_parallel-n_embd8"}
    row = rows["NRGPT_H_FF1-n_embd8"]
    assert row["kind"] == "listops" and row["iters"] == "6" and row["n_steps"] == "2"
    assert 0.0 <= float(row["accuracy"]) <= 1.0 and float(row["best_val_loss"]) > 0
    from nrgpt import ModelConfig, build_model

    expected = build_model(ModelConfig.preset("NRGPT_H_FF1", vocab_size=17, block_size=32, n_embd=8, n_steps=2))
    assert int(row["n_params"]) == expected.num_params()
    run_dir = out / "runs" / "NRGPT_H_FF1-n_embd8"
    assert json.loads((run_dir / RESULT).read_text())["accuracy"] == float(row["accuracy"])

    # A finished run whose result marker is lost is resumed (nothing left to train) and evaluated again.
    (run_dir / RESULT).unlink()
    sweep = load_sweep(path, out_dir=out)
    calls = []
    results = run_sweep(sweep, train_fn=lambda c, **kw: calls.append(kw) or train(c, **kw), log=lambda _: None)
    assert calls == [{"resume": True, "overwrite": False, "quiet": False}] and len(results) == 2
    assert json.loads((run_dir / "result.json").read_text())["iters"] == 6


def test_dry_run_counts_parameters_with_the_datasets_vocabulary_and_marks_a_guess(tmp_path, capsys, listops_dir):
    from nrgpt import ModelConfig, build_model

    grid = "[grid]\nmodel.preset = ['NRGPT_H_FF1']\nmodel.n_embd = [8]\n[budget]\niters = 8\n"
    count = lambda vocab: build_model(ModelConfig.preset(  # noqa: E731
        "NRGPT_H_FF1", n_embd=8, block_size=32, n_steps=2, vocab_size=vocab)).num_params()
    vocab = json.loads((listops_dir / "meta.json").read_text())["vocab_size"]
    assert vocab != ModelConfig.vocab_size
    out = tmp_path / "out"
    assert main(["sweep", str(write_sweep(tmp_path, grid, data=listops_dir)), "--dry-run", "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"| NRGPT_H_FF1-n_embd8 | {count(vocab):,} | false |" in printed and "*" not in printed

    assert main(["sweep", str(write_sweep(tmp_path, grid, data=tmp_path / "none")), "--dry-run", "--out-dir",
                 str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert f"| NRGPT_H_FF1-n_embd8 | {count(ModelConfig.vocab_size):,}* | false |" in printed
    assert printed[-2] == (f"* counted with the default vocabulary ({ModelConfig.vocab_size}): no prepared dataset "
                           f"in {tmp_path / 'none'}; prepare it (`nrgpt prepare`) for the exact counts")

    grid = grid.replace("[budget]", "model.vocab_size = [30]\n[budget]")  # set in the config: no guess, no data read
    assert main(["sweep", str(write_sweep(tmp_path, grid, data=tmp_path / "none")), "--dry-run", "--out-dir",
                 str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"| {count(30):,} | false |" in printed and "*" not in printed
