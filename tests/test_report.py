"""Reports: Figure 3's logistic fits and crossing stars, Figure 4's lines and bands, HTML and Markdown pages."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest

from nrgpt.cli import main
from nrgpt.fits import fit_logistic
from nrgpt.report import accuracy_figure, fit_models, learning_time_table, loss_figure, overfitting_table, write_report
from nrgpt.tables import RESULT, SPEC


def logistic_runs(model: str, x0: float, k: float = 6.0) -> list[dict]:
    """ListOps results whose accuracy follows a logistic in log10(n_params), with a little noise."""
    rng = np.random.default_rng(len(model))
    runs = []
    for n in np.geomspace(3e3, 3e5, 7).round().astype(int):
        acc = float(np.clip(1 / (1 + np.exp(-k * (np.log10(n) - x0))) + rng.normal(0, 0.02), 0, 1))
        runs.append({"slug": f"{model}-{n}", "kind": "listops", "model": model, "n_params": int(n), "accuracy": acc,
                     "best_val_loss": 1.0 - acc / 2, "final_train_loss": 0.9 - acc / 2, "gap": 0.1})
    return runs


def test_crossing_star_is_drawn_where_the_logistic_fit_crosses_80_percent():
    results = logistic_runs("A", 4.2) + logistic_runs("B", 4.6)
    fits = fit_models(results)
    fig = accuracy_figure(results, fits)
    stars = {line.get_gid(): line for ax in fig.axes for line in ax.lines if (line.get_gid() or "").startswith("cr")}
    assert set(stars) == {"crossing:A", "crossing:B"}
    for model in "AB":
        runs = [r for r in results if r["model"] == model]
        expected = fit_logistic([r["n_params"] for r in runs], [r["accuracy"] for r in runs]).crossing(0.8)
        x, y = stars[f"crossing:{model}"].get_data()
        assert x[0] == pytest.approx(expected) and y[0] == 0.8
        assert fits[model].predict(x[0]) == pytest.approx(0.8)
    assert 10 ** 4.2 < stars["crossing:A"].get_xdata()[0] < stars["crossing:B"].get_xdata()[0]


def test_no_star_when_a_model_never_learns():
    flat = [{**r, "accuracy": 0.05} for r in logistic_runs("C", 4.0)]
    fig = accuracy_figure(flat, fit_models(flat))
    assert not [line for ax in fig.axes for line in ax.lines if (line.get_gid() or "").startswith("crossing")]


def language_runs() -> list[dict]:
    runs = []
    for n, losses in ((1000, (2.0, 2.4, 2.2, 3.0)), (4000, (1.6, 1.7))):
        for i, loss in enumerate(losses):
            runs.append({"slug": f"A-{n}-{i}", "kind": "language", "model": "A", "n_params": n, "best_val_loss": loss,
                         "final_train_loss": loss - 0.1, "gap": 0.1 * (i + 1), "lr": 1e-3, "min_lr": 1e-4,
                         "n_embd": 8, "n_head": 1, "n_steps": 2})
    return runs


def test_loss_figure_connects_the_best_run_of_each_size_and_bands_the_better_half():
    fig = loss_figure(language_runs())
    top, bottom = fig.axes
    best_line = [line for line in top.lines if line.get_label() == "A"][0]
    assert list(best_line.get_xdata()) == [1000, 4000] and list(best_line.get_ydata()) == [2.0, 1.6]
    dots = top.lines[0]
    assert len(dots.get_xdata()) == 6 and dots.get_alpha() < 0.5
    band = top.collections[0].get_paths()[0].vertices
    assert band[:, 1].max() == pytest.approx(2.2) and band[:, 1].min() == pytest.approx(1.6)  # top 2 of 4, 1 of 2
    gap = [line for line in bottom.lines if line.get_label() == "A"][0]
    assert list(gap.get_ydata()) == [0.1, 0.1]  # the gap of the best run of each size


def make_sweep_dir(tmp_path, results):
    (tmp_path / SPEC).write_text('name = "demo"\n')
    for r in results:
        run = tmp_path / "runs" / r["slug"]
        run.mkdir(parents=True)
        (run / RESULT).write_text(json.dumps(r))
    return tmp_path


def embedded_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)]


def test_sweep_report_has_tables_and_embedded_figures(tmp_path):
    sweep_dir = make_sweep_dir(tmp_path, logistic_runs("A", 4.2) + language_runs())
    page, md = write_report(sweep_dir)
    html = page.read_text()
    pngs = embedded_pngs(html)
    assert len(pngs) == 2 and all(p.startswith(b"\x89PNG") for p in pngs)
    assert "## Evaluation curves" not in md.read_text()  # no run has its metrics.jsonl here
    assert "<table>" in html and "<th>n_params at 80%</th>" in html and "<td>A-1000-0</td>" in html
    text = md.read_text()
    assert "![" in text and "(report_files/figure3.png)" in text and "(report_files/figure4.png)" in text
    assert (sweep_dir / "report_files" / "figure3.png").read_bytes() == pngs[0]
    assert "| model | runs | best accuracy | n_params at 80% |" in text
    assert "## Best configuration of each model (Tables 4/6)" in text


def test_sweep_report_draws_every_run_s_evaluation_curves(tmp_path):
    runs = logistic_runs("A", 4.2)[:3]
    sweep_dir = make_sweep_dir(tmp_path, runs)
    for i, r in enumerate(runs):
        evals = [{"iter": it, "train_loss": 2.0 - it / 100, "val_loss": 2.1 - it / 100, "accuracy": it / 100 * i / 3}
                 for it in (0, 50, 100)]
        (sweep_dir / "runs" / r["slug"] / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    page, md = write_report(sweep_dir)
    assert len(embedded_pngs(page.read_text())) == 2 and "(report_files/curves.png)" in md.read_text()  # Fig. 3, curves
    assert (sweep_dir / "report_files" / "curves.png").read_bytes().startswith(b"\x89PNG")
    assert "## Time to learn: iterations to 50% and 80% logged accuracy" in md.read_text()


def test_learning_time_table_gives_each_seed_s_iteration_at_50_and_80_percent(tmp_path):
    runs = [{"slug": slug, "kind": "listops", "model": "A", "n_params": 900, "accuracy": acc}
            for slug, acc in (("n_embd16-A-seed10", 0.45), ("seed9-n_embd16-A", 0.85))]  # the seed axis anywhere
    runs.append({"slug": "n_embd32-A-seed1", "kind": "listops", "model": "A", "n_params": 3000, "accuracy": 0.9})
    runs.append({"slug": "n_embd16-B", "kind": "listops", "model": "B", "n_params": 800, "accuracy": 0.3})  # no log
    sweep_dir = make_sweep_dir(tmp_path, runs)
    logged = {"seed9-n_embd16-A": (0.1, 0.4, 0.6, 0.9), "n_embd16-A-seed10": (0.1, 0.2, 0.3, 0.5),
              "n_embd32-A-seed1": (0.55, 0.7, 0.85, 0.9)}
    for slug, accuracy in logged.items():
        evals = [{"iter": 1000 * i, "train_loss": 1.0, "val_loss": 1.1, "accuracy": a} for i, a in enumerate(accuracy)]
        evals.insert(1, {"iter": 10, "loss": 1.2})  # a training-step record: no evaluation
        (sweep_dir / "runs" / slug / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    (sweep_dir / "runs" / "n_embd16-B" / "metrics.jsonl").write_text(json.dumps({"iter": 0, "val_loss": 2.0}) + "\n")
    table = learning_time_table(sweep_dir, runs)
    assert table.rows == [
        # seed 9: 0.4 -> 0.6 between 1,000 and 2,000 crosses 0.5 halfway; 0.6 -> 0.9 crosses 0.8 at 2/3.
        # seed 10 (after 9: seeds in numeric order) reaches 0.5 exactly at its last evaluation and never 0.8
        ["n_embd16-A", "A", 900, 2, pytest.approx(0.65), "0.450-0.850", "1,500 / 3,000", "2,667 / -"],
        ["n_embd32-A", "A", 3000, 1, 0.9, None, "0", "1,667"],  # above 50% at its first evaluation
    ]
    assert learning_time_table(sweep_dir, runs[3:]) is None  # no run logged its accuracy


def write_evaluations(run_dir, evals):
    run_dir.mkdir(parents=True, exist_ok=True)
    records = [{"iter": it, "train_loss": t, "val_loss": v} for it, t, v in evals]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_overfitting_table_compares_runs_at_the_training_loss_both_reached(tmp_path):
    # run a fits down to 1.0 and over-fits (validation turns up after iter 200); run b stops at 1.5
    write_evaluations(tmp_path / "a", [(0, 3.0, 3.1), (100, 2.0, 2.3), (200, 1.0, 1.6), (300, 0.5, 1.9)])
    write_evaluations(tmp_path / "b", [(0, 3.0, 3.0), (100, 2.5, 2.6), (200, 1.5, 1.7)])
    table = overfitting_table([("A", tmp_path / "a"), ("B", tmp_path / "b")])
    assert table.headers[-1] == "gap at train loss 1.500"  # the lowest training loss both runs reached
    a, b = table.rows
    assert a[:5] == ["a", 200, 1.6, 300, 1.9] and a[5] == pytest.approx(0.3)
    assert a[6] == pytest.approx(0.45)  # halfway from (2.0, gap 0.3) to (1.0, gap 0.6)
    assert b[:5] == ["b", 200, 1.7, 200, 1.7] and b[5] == 0 and b[6] == pytest.approx(0.2)


def test_a_language_sweep_report_has_the_overfitting_view(tmp_path):
    runs = language_runs()[:2]
    sweep_dir = make_sweep_dir(tmp_path, runs)
    for i, r in enumerate(runs):
        write_evaluations(sweep_dir / "runs" / r["slug"], [(0, 3.0, 3.0), (50, 2.0, 2.1 + i / 10), (100, 1.5, 1.7)])
    # a run still training: its curves are drawn and it has a row, and the common training loss is its lowest
    write_evaluations(sweep_dir / "runs" / "A-9000-0", [(0, 3.0, 3.0), (50, 2.2, 2.25)])
    (sweep_dir / "runs" / "A-9000-1").mkdir()  # started, nothing evaluated yet: left out
    _, md = write_report(sweep_dir)
    text = md.read_text()
    assert "## Over-fitting at equal training loss" in text and "(report_files/overfitting.png)" in text
    assert "| run | best iter | best val. loss |" in text and "gap at train loss 2.200 |" in text
    assert "| A-9000-0 | 50 | 2.25 | 50 | 2.25 | 0 | 0.05 |" in text and "A-9000-1" not in text
    assert (sweep_dir / "report_files" / "overfitting.png").read_bytes().startswith(b"\x89PNG")


def test_run_report(tmp_path):
    records = [{"iter": 0, "loss": 3.0, "lr": 1e-3}, {"iter": 0, "train_loss": 3.0, "val_loss": 3.1},
               {"iter": 10, "loss": 2.0, "lr": 1e-3}, {"iter": 10, "train_loss": 2.0, "val_loss": 2.2}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "config.json").write_text(json.dumps({"model": {"preset": "GPT", "n_embd": 8}, "train": {"lr": 1e-3}}))
    (tmp_path / "result.json").write_text(json.dumps({"status": "finished", "iters": 10, "best_val_loss": 2.2}))
    out = tmp_path / "report"
    assert main(["report", str(tmp_path), "--out", str(out)]) == 0
    html = (out / "report.html").read_text()
    assert len(embedded_pngs(html)) == 1
    assert "<td>model.n_embd</td><td>8</td>" in html and "<td>best_val_loss</td><td>2.2</td>" in html
    assert "(report_files/loss_curves.png)" in (out / "report.md").read_text()


def test_report_of_something_else_is_one_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "neither a run directory" in err[0]
    make_sweep_dir(tmp_path, [])
    assert main(["report", str(tmp_path)]) == 2
    assert "no finished runs" in capsys.readouterr().err


def test_a_sweep_whose_runs_are_all_still_training_gets_their_curves(tmp_path, data_dir):
    sweep_dir = make_sweep_dir(tmp_path, [])
    run = sweep_dir / "runs" / "GPT-n_embd8"
    write_evaluations(run, [(0, 3.0, 3.0), (50, 2.0, 2.2)])
    (run / "config.json").write_text(json.dumps({"model": {"preset": "GPT"}, "data": {"dir": str(data_dir)}}))
    _, md = write_report(sweep_dir)
    text = md.read_text()
    assert "0 finished runs, 1 unfinished ones" in text and "(report_files/curves.png)" in text
    assert "| GPT-n_embd8 | 50 | 2.2 | 50 | 2.2 | 0 | 0.2 |" in text  # a language dataset: the over-fitting view
    assert "## All runs" not in text
