"""Training: the loop learns, resumes bitwise after SIGKILL, stops on divergence and on its time budget."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from nrgpt import checkpoint
from nrgpt.config import ConfigError
from nrgpt.data import prepare_listops
from nrgpt.evaluate import listops_accuracy
from nrgpt.optim import make_optimizer
from nrgpt.runconfig import RunConfig, TrainConfig, resolve_config
from nrgpt.train import DivergenceError, Trainer, expected_iters, lr_at, train

from .conftest import REPO, records, run_nrgpt, tiny_args, tiny_config

# ------------------------------------------------------------------------------------------ pieces


def test_lr_schedule():
    tc = resolve_config(None, ["train.lr=1.0", "train.min_lr=0.01", "train.warmup_iters=10",
                               "train.max_iters=110"]).train
    assert lr_at(0, tc) == pytest.approx(1 / 11) and lr_at(9, tc) == pytest.approx(10 / 11)
    assert lr_at(10, tc) == pytest.approx(1.0) and lr_at(110, tc) == pytest.approx(0.01)
    assert lr_at(60, tc) == pytest.approx(0.505)  # cosine: halfway between
    tc.schedule = "exponential"
    assert lr_at(60, tc) == pytest.approx(0.1) and lr_at(110, tc) == pytest.approx(0.01)
    tc.schedule = "constant"
    assert lr_at(100, tc) == 1.0


def test_lr_schedule_follows_a_time_budget():
    """With max_minutes the decay runs on the larger of step progress and budget progress."""
    tc = TrainConfig(lr=1.0, min_lr=0.0, warmup_iters=0, max_iters=100, max_minutes=2.0)
    assert lr_at(0, tc, elapsed=60.0) == pytest.approx(0.5)  # half the budget: cosine halfway
    assert lr_at(50, tc, elapsed=6.0) == pytest.approx(0.5)  # half the steps, a tenth of the budget
    assert lr_at(10, tc, elapsed=120.0) == pytest.approx(0.0) and lr_at(10, tc, elapsed=500.0) == 0.0
    assert lr_at(50, TrainConfig(lr=1.0, min_lr=0.0, warmup_iters=0, max_iters=100), elapsed=1e9) == pytest.approx(0.5)


def test_a_time_budget_sets_where_the_progress_bar_ends():
    """The bar's total: max_iters without a budget; with one, the iterations the rest of it holds at the rate so
    far (100 + 30 s x 5 it/s = 250), never beyond max_iters, and no more once the budget is spent."""
    budget = TrainConfig(max_iters=1000, max_minutes=1.0)
    assert expected_iters(TrainConfig(max_iters=1000), 100, rate=5.0, elapsed=30.0) == 1000
    assert expected_iters(budget, 100, rate=5.0, elapsed=30.0) == 250
    assert expected_iters(budget, 100, rate=50.0, elapsed=30.0) == 1000
    assert expected_iters(budget, 100, rate=5.0, elapsed=75.0) == 100


def test_weight_decay_only_on_matrices():
    from nrgpt import ModelConfig, build_model

    model = build_model(ModelConfig.preset("NRGPT_P_FF2W", n_embd=16, n_head=2, n_steps=2, block_size=8))
    tc = resolve_config(None, ["train.weight_decay=0.1"]).train
    decay, no_decay = make_optimizer(model, tc, torch.device("cpu")).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in no_decay["params"]} >= {"blocks.0.norm.bias", "blocks.0.attn.alpha",
                                                           "blocks.0.eta.log_c"}
    assert {names[id(p)] for p in decay["params"]} >= {"tok_emb.weight", "blocks.0.attn.query",
                                                       "blocks.0.ff.fc1.weight"}
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])


# ------------------------------------------------------------------------------------------ runs


def test_short_run_learns_and_writes_its_run_dir(data_dir, tmp_path):
    run = tmp_path / "run"
    result = train(tiny_config(data_dir, run, "train.max_iters=60"), quiet=True)
    assert result["status"] == "finished" and result["iters"] == 60 and result["reason"] == "max_iters"
    evals = [r for r in records(run) if "val_loss" in r]
    assert [r["iter"] for r in evals] == [0, 10, 20, 30, 40, 50, 60]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.8  # from ~ln(vocab) = 3.3 to well below
    assert result["best_val_loss"] == min(r["val_loss"] for r in evals)
    steps = [r for r in records(run) if "loss" in r]
    assert [r["iter"] for r in steps] == list(range(60))
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in steps)
    header = (run / "metrics.csv").read_text().splitlines()[0]
    assert header == "iter,loss,lr,tokens_per_s,elapsed,train_loss,val_loss,steps,accuracy"
    assert all("steps" not in r for r in records(run))  # fixed steps: the column stays empty
    assert json.loads((run / "result.json").read_text()) == result
    saved = RunConfig.load(run / "config.json")
    assert saved.model.vocab_size == json.loads((data_dir / "meta.json").read_text())["vocab_size"]
    assert checkpoint.read_info(run / "last")["iter"] == 60
    assert checkpoint.read_info(run / "best")["val_loss"] == result["best_val_loss"]
    model, config = checkpoint.load_model(run)
    assert config.to_dict() == saved.to_dict() and not model.training


def test_listops_accuracy_is_logged_at_every_evaluation(data_dir, tmp_path):
    """``train.eval_accuracy_samples``: the accuracy of the first N test samples at every evaluation, and at
    the end the accuracy of the final model (the last checkpoint) on them; a language dataset refuses it."""
    data = prepare_listops(tmp_path / "listops", n_train=300, n_test=12)
    run = tmp_path / "run"
    train(tiny_config(data, run, "model.block_size=64", "train.max_iters=20", "train.eval_accuracy_samples=6"),
          quiet=True)
    evals = [r for r in records(run) if "val_loss" in r]
    assert [r["iter"] for r in evals] == [0, 10, 20] and all(0 <= r["accuracy"] <= 1 for r in evals)
    model = checkpoint.load_model(run, "cpu", "last")[0]
    assert evals[-1]["accuracy"] == listops_accuracy(model, data, max_samples=6)["overall"]
    assert checkpoint.read_info(run / "last")["accuracy"] == evals[-1]["accuracy"]
    assert "accuracy" in (run / "metrics.csv").read_text().splitlines()[0]
    with pytest.raises(ConfigError, match=r"^train.eval_accuracy_samples = 6 scores ListOps answers, but .* is a "
                                          r"'char' dataset; set it to 0$"):
        train(tiny_config(data_dir, tmp_path / "text", "train.eval_accuracy_samples=6"), quiet=True)
    assert not (tmp_path / "text").exists()  # refused before the run directory is made


def test_existing_run_needs_resume_or_overwrite(data_dir, tmp_path):
    config = tiny_config(data_dir, tmp_path / "run", "train.max_iters=2")
    train(config, quiet=True)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(config, quiet=True)
    assert train(config, overwrite=True, quiet=True)["iters"] == 2


def test_time_budget_stops_cleanly(data_dir, tmp_path):
    run = tmp_path / "run"
    result = train(tiny_config(data_dir, run, "train.max_iters=100000", "train.max_minutes=0.002"), quiet=True)
    assert result["status"] == "finished" and result["reason"] == "max_minutes" and result["iters"] < 100000
    assert checkpoint.read_info(run / "last")["iter"] == result["iters"]
    assert records(run)[-1]["iter"] == result["iters"] and "val_loss" in records(run)[-1]


def test_resume_continues_bitwise_after_sigkill(data_dir, tmp_path):
    """A run killed with SIGKILL after writing a checkpoint, then resumed, logs exactly the losses of an
    uninterrupted run (dropout on, so the RNG state matters too)."""
    args = ["train", *tiny_args(data_dir, tmp_path / "x", "train.max_iters=300", "model.dropout=0.1")]
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert run_nrgpt(*args, "--out-dir", str(full)).returncode == 0

    proc = subprocess.Popen([sys.executable, "-m", "nrgpt", *args, "--out-dir", str(killed)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        found = checkpoint.find(killed / "last")
        if found is not None and checkpoint.read_info(found)["iter"] >= 20:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    at = checkpoint.read_info(checkpoint.find(killed / "last"))["iter"]
    assert 20 <= at < 300 and not (killed / "result.json").exists()

    resumed = run_nrgpt("train", "--resume", "--out-dir", str(killed))
    assert resumed.returncode == 0, resumed.stderr
    got, want = records(killed), records(full)
    strip = [{k: v for k, v in r.items() if k not in ("elapsed", "tokens_per_s")} for r in (*got, *want)]
    assert strip[:len(got)] == strip[len(got):]  # every loss, lr and eval loss bitwise equal, no duplicates
    assert json.loads((killed / "result.json").read_text())["val_loss"] == records(full)[-1]["val_loss"]


def test_divergence_stops_with_last_good_checkpoint_intact(data_dir, tmp_path):
    run = tmp_path / "run"
    assert run_nrgpt("train", *tiny_args(data_dir, run, "train.max_iters=20")).returncode == 0
    before = checkpoint.load_weights(run / "last")
    proc = run_nrgpt("train", "--resume", "--out-dir", str(run), "--set", "train.lr=1e30", "--set",
                     "train.max_iters=40", "--set", "train.warmup_iters=0")
    assert proc.returncode == 1
    error = proc.stderr.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("nrgpt: error: training diverged at iter 2")  # iter 20 or 21
    assert "last good checkpoint" in error[0]
    assert checkpoint.read_info(run / "last")["iter"] == 20
    after = checkpoint.load_weights(run / "last")
    assert all(torch.equal(before[k], after[k]) for k in before)
    model, _ = checkpoint.load_model(run, which="last")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert json.loads((run / "result.json").read_text())["status"] == "diverged"


def test_divergence_in_process_raises(data_dir, tmp_path):
    with pytest.raises(DivergenceError, match="not finite"):
        train(tiny_config(data_dir, tmp_path / "run", "train.lr=1e30", "train.warmup_iters=0"), quiet=True)
    assert math.isfinite(checkpoint.read_info(tmp_path / "run" / "last")["val_loss"])  # the iter-0 checkpoint


@pytest.mark.parametrize("package", ["tensorboard", "wandb"])
def test_optional_logger_absent_is_a_config_error(data_dir, tmp_path, package):
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed")
    with pytest.raises(ConfigError, match=rf"needs the {package} package: pip install 'nrgpt\[{package}\]'"):
        train(tiny_config(data_dir, tmp_path / "run", f"log.{package}=true"), quiet=True)
    assert not (tmp_path / "run").exists()


def test_sigint_checkpoints_and_exits_130(data_dir, tmp_path):
    run = tmp_path / "run"
    args = tiny_args(data_dir, run, "train.max_iters=100000")
    proc = subprocess.Popen([sys.executable, "-m", "nrgpt", "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and checkpoint.find(run / "last") is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "continue with: nrgpt train --resume" in err and "Traceback" not in err
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "interrupted" and result["reason"] == "signal"
    assert checkpoint.read_info(run / "last")["iter"] == result["iters"] > 0


@pytest.mark.parametrize("overrides", [("system.compile=true",), ("system.dtype=bfloat16",)],
                         ids=["compile", "bf16-autocast"])
def test_compiled_and_autocast_runs_track_the_plain_run(data_dir, tmp_path, overrides):
    """--compile (the steps compiled) and bf16 autocast (the GPU path's CPU twin) train the same model:
    their losses follow the float32 eager run's (to float32 round-off compiled, to bf16 precision autocast)."""
    plain = train(tiny_config(data_dir, tmp_path / "plain", "train.max_iters=20"), quiet=True)
    other = train(tiny_config(data_dir, tmp_path / "other", "train.max_iters=20", *overrides), quiet=True)
    a = [r["loss"] for r in records(tmp_path / "plain") if "loss" in r]
    b = [r["loss"] for r in records(tmp_path / "other") if "loss" in r]
    tol = 1e-4 if overrides[0].startswith("system.compile") else 0.05
    assert len(a) == len(b) == 20 and max(abs(x - y) for x, y in zip(a, b)) < tol
    assert abs(plain["best_val_loss"] - other["best_val_loss"]) < tol


@pytest.mark.parametrize("native, dtype, amp", [(True, "auto", torch.bfloat16), (False, "auto", None),
                                                (True, "float32", None), (False, "bfloat16", torch.bfloat16)])
def test_auto_dtype_is_bfloat16_on_a_cpu_that_multiplies_it_in_hardware(data_dir, tmp_path, monkeypatch, capsys,
                                                                         native, dtype, amp):
    """dtype 'auto' trains under bfloat16 autocast on a CPU with AVX512-BF16 or AMX and says so once, in
    float32 elsewhere; a dtype the user chose is kept either way, with a warning where bfloat16 is emulated."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    trainer = Trainer(tiny_config(data_dir, tmp_path / "run", "train.max_iters=1", f"system.dtype={dtype}"))
    try:
        assert trainer.amp_dtype == amp
        trainer.run()
    finally:
        trainer.close()
    out = capsys.readouterr().out
    assert out.count("this CPU multiplies bfloat16 in hardware") == int(native and dtype == "auto")
    assert out.count("emulates bfloat16") == int(not native and amp is not None)
    assert RunConfig.load(tmp_path / "run" / "config.json").system.dtype == ("bfloat16" if amp else "float32")


def test_a_resumed_run_keeps_the_precision_that_auto_chose(data_dir, tmp_path, monkeypatch):
    """config.json records the dtype 'auto' resolved to, so a run started on a CPU that multiplies bfloat16
    in hardware resumes in bfloat16 on one that does not (and the other way round)."""
    for native, chosen in ((True, torch.bfloat16), (False, None)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda native=native: native)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        run = tmp_path / f"run-{native}"
        train(tiny_config(data_dir, run, "train.max_iters=4", "system.dtype=auto"), quiet=True)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda native=native: not native)
        trainer = Trainer(RunConfig.load(run / "config.json").with_overrides(["train.max_iters=8"]), resume=True,
                          quiet=True)
        try:
            assert trainer.amp_dtype == chosen
            assert trainer.run()["iters"] == 8
        finally:
            trainer.close()
