"""The command line and the run configuration: presets (TOML, YAML, extends), overrides, the saved
config, every user error as one line with exit code 2, prepare / sample / eval / quickstart."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nrgpt import ConfigError, ModelConfig, build_model, checkpoint, cli
from nrgpt.data import DataError, load_tokenizer
from nrgpt.evaluate import split_loss
from nrgpt.runconfig import RunConfig, load_preset, preset_names, resolve_config
from nrgpt.sample import generate_text
from nrgpt.train import train

from .conftest import REPO, run_nrgpt, tiny_args, tiny_config


@pytest.fixture(scope="module")
def run_dir(data_dir, tmp_path_factory) -> Path:
    """A tiny trained run."""
    run = tmp_path_factory.mktemp("runs") / "tiny"
    train(tiny_config(data_dir, run, "train.max_iters=30"), quiet=True)
    return run


# ------------------------------------------------------------------------------------------ configuration


def test_every_shipped_preset_resolves():
    assert {"quickstart", "shakespeare-nrgpt", "listops", "owt-nrgpt"} <= set(preset_names())
    for name in preset_names():
        resolve_config(name)


def test_paper_presets():
    gpt = resolve_config("shakespeare-gpt")
    assert gpt.model.model == "gpt" and (gpt.train.lr, gpt.train.min_lr) == (5e-3, 5e-4)
    assert (gpt.model.n_steps, gpt.model.n_head, gpt.model.n_embd) == (8, 4, 64)
    assert (gpt.model.block_size, gpt.model.dropout, gpt.train.batch_size) == (256, 0.1, 64)
    assert (gpt.train.beta2, gpt.train.warmup_iters, gpt.train.max_iters) == (0.99, 100, 40000)
    owt = resolve_config("owt-nrgpt").train
    assert (owt.batch_size, owt.grad_accum, owt.eval_interval, owt.eval_iters) == (12, 40, 1000, 200)
    assert build_model(resolve_config("shakespeare-nrgpt").model_config(65)).num_params() == 214_338


def test_toml_yaml_extends_and_overrides(tmp_path):
    (tmp_path / "base.toml").write_text('extends = "shakespeare"\n[train]\nlr = 2e-3\nmin_lr = 2e-4\n'
                                        '[model]\nn_embd = 64\n')
    (tmp_path / "run.yaml").write_text("extends: base.toml\ntrain:\n  batch_size: 8\n  min_lr: 1e-5\n"
                                       "model:\n  preset: GPT\n")
    config = resolve_config(str(tmp_path / "run.yaml"), ["train.lr=3e-3", "model.n_head=2", "system.compile=true"])
    assert (config.train.lr, config.train.min_lr, config.train.batch_size) == (3e-3, 1e-5, 8)
    assert config.model == ModelConfig.preset("GPT", vocab_size=None, block_size=256, dropout=0.1, n_embd=64, n_head=2)
    assert config.train.max_iters == 40000 and config.system.compile is True
    assert load_preset(str(tmp_path / "run.yaml"))["train"]["min_lr"] == 1e-5  # a float, not the string '1e-5'
    assert RunConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_saved_config_round_trips(run_dir):
    saved = json.loads((run_dir / "config.json").read_text())
    assert RunConfig.from_dict(saved).to_dict() == saved
    assert saved["model"] == RunConfig.load(run_dir / "config.json").model.to_dict()
    assert set(saved["model"]) == set(ModelConfig.setting_types()) and saved["model"]["vocab_size"] > 0


@pytest.mark.parametrize("overrides, message", [
    (["train.lrr=1"], "unknown config key train.lrr"),
    (["model.n_embdd=1"], "unknown config key model.n_embdd"),
    (["train.lr=fast"], "train.lr = 'fast' must be a number"),
    (["train.lr=-1"], "train.lr = -1.0 must be a finite number > 0"),
    (["train.min_lr=1", "train.lr=0.1"], "train.min_lr = 1.0 must be <= train.lr"),
    (["train.schedule=linear"], "train.schedule = 'linear' is not allowed"),
    (["model.preset=GPT3"], "model.preset = 'GPT3' is not allowed"),
    (["model.n_embd=30", "model.n_head=4"], "not divisible"),
    (["bogus=1"], "unknown config key bogus"),
    (["train.lr"], "must look like section.key=value"),
])
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config(None, overrides)


def test_bad_preset_files(tmp_path):
    (tmp_path / "bad.toml").write_text('[train]\nlr = "fast"\n')
    with pytest.raises(ConfigError, match="train.lr = 'fast' must be of type float"):
        resolve_config(str(tmp_path / "bad.toml"))
    (tmp_path / "broken.toml").write_text("[train\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        resolve_config(str(tmp_path / "broken.toml"))
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        resolve_config("nope")


# ------------------------------------------------------------------------------------------ user errors


def _bad_cases(data_dir: Path, run_dir: Path, tmp: Path) -> dict[str, tuple[list[str], str]]:
    train_args = ["train", *tiny_args(data_dir, tmp / "never")]
    return {
        "bad key": ([*train_args, "--set", "train.lrr=1"], "unknown config key train.lrr"),
        "bad type": ([*train_args, "--max-iters", "many"], "train.max_iters = 'many' must be an integer"),
        "n_embd % n_head": ([*train_args, "--set", "model.n_embd=30", "--set", "model.n_head=4"], "not divisible"),
        "block > data": ([*train_args, "--set", "model.block_size=100000"], "model.block_size = 100000 is larger"),
        "vocab < data": ([*train_args, "--set", "model.vocab_size=5"], "model.vocab_size = 5 is smaller"),
        "missing data": ([*train_args, "--data-dir", str(tmp / "nodata")], "does not exist"),
        "missing preset": (["train", "--preset", str(tmp / "none.toml")], "does not exist"),
        "missing checkpoint": (["sample", str(tmp)], "holds no checkpoint"),
        "missing run": (["eval", str(tmp / "norun")], "does not exist"),
        "resume nothing": (["train", "--resume", "--out-dir", str(tmp / "norun")], "nothing to resume"),
        "bad prompt": (["sample", str(run_dir), "--prompt", "Zebra €"], "'Z'"),
        "bad top-p": (["sample", str(run_dir), "--top-p", "1.5"], "--top-p = 1.5"),
    }


@pytest.fixture(scope="module")
def bad_results(data_dir, run_dir, tmp_path_factory):
    """Every bad-input command run at once (each is a fresh ``python -m nrgpt`` process)."""
    tmp = tmp_path_factory.mktemp("bad")
    cases = _bad_cases(data_dir, run_dir, tmp)
    procs = {name: subprocess.Popen([sys.executable, "-m", "nrgpt", *args], cwd=REPO, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, (args, _) in cases.items()}
    return {name: (p.wait(), *p.communicate(), cases[name][1]) for name, p in procs.items()}


@pytest.mark.parametrize("case", list(_bad_cases(Path("d"), Path("r"), Path("t"))))
def test_user_errors_are_one_line_and_exit_2(bad_results, case):
    code, out, err, message = bad_results[case]
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("nrgpt: error: ") and message in lines[0], err
    assert "Traceback" not in err and not out


def test_no_work_before_errors(bad_results, tmp_path_factory):
    assert not list(Path(tmp_path_factory.getbasetemp()).glob("bad*/never"))


# ------------------------------------------------------------------------------------------ commands


def test_sampling_is_seeded_crops_long_prompts_and_rejects_unknown_characters(run_dir, data_dir):
    model, config = checkpoint.load_model(run_dir)
    tok = load_tokenizer(data_dir)
    a = generate_text(model, tok, "The king", num_samples=2, max_new_tokens=30, seed=1)
    assert a == generate_text(model, tok, "The king", num_samples=2, max_new_tokens=30, seed=1)
    assert a != generate_text(model, tok, "The king", num_samples=2, max_new_tokens=30, seed=2)
    assert all(t.startswith("The king") and len(t) == len("The king") + 30 for t in a)
    assert len(generate_text(model, tok, "", max_new_tokens=5, greedy=True)[0]) == 5
    notes = []
    long = "the king and queen " * 5
    text = generate_text(model, tok, long, max_new_tokens=3, notice=notes.append, greedy=True)[0]
    assert len(notes) == 1 and "using its last 16 tokens" in notes[0] and text == long[-16:] + text[16:]
    with pytest.raises(DataError, match="'€'"):
        generate_text(model, tok, "the €")
    with pytest.raises(ConfigError, match="--temperature"):
        generate_text(model, tok, "the", temperature=0)


def test_sample_command(run_dir):
    proc = run_nrgpt("sample", str(run_dir), "--prompt", "The", "-n", "2", "--max-new-tokens", "20", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    first, sep, second = proc.stdout.rstrip("\n").partition("\n" + "-" * 40 + "\n")
    assert sep and first.startswith("The") and second.startswith("The") and len(first) == 23


def test_sample_command_with_early_exit(run_dir, data_dir, tmp_path, capsys):
    def sample(run: Path, *options: str) -> tuple[int, str, str]:
        code = cli.main(["sample", str(run), "--prompt", "The", "--greedy", "--max-new-tokens", "12", "--device",
                         "cpu", *options])
        return code, *capsys.readouterr()

    plain = sample(run_dir)
    assert plain[0] == 0 and sample(run_dir, "--early-exit", "0") == plain
    model, _ = checkpoint.load_model(run_dir)
    tok = load_tokenizer(data_dir)
    expected = generate_text(model, tok, "The", max_new_tokens=12, greedy=True, tol=1e9, n_steps=4)
    assert sample(run_dir, "--early-exit", "1e9", "--early-exit-steps", "4") == (0, expected[0] + "\n", "")
    one_step = generate_text(model, tok, "The", max_new_tokens=12, greedy=True, tol=1e9, exit_on="energy")
    assert one_step == generate_text(model, tok, "The", max_new_tokens=12, greedy=True, n_steps=1)
    assert sample(run_dir, "--early-exit", "1e9", "--early-exit-on", "energy") == (0, one_step[0] + "\n", "")
    gpt = tiny_config(data_dir, tmp_path / "gpt", "model.preset=GPT_Rec_parallel", f"model.vocab_size={tok.vocab_size}")
    checkpoint.save_checkpoint(tmp_path / "gpt" / "best", build_model(gpt.model_config()), gpt, {"iter": 0})
    assert sample(tmp_path / "gpt", "--early-exit", "0.1") == (2, "", f"nrgpt: error: --early-exit needs an NRGPT "
                                                              f"model; {tmp_path / 'gpt'} holds a 'rgpt_parallel' "
                                                              "model, which has no energy descent\n")
    deeper = generate_text(model, tok, "The", max_new_tokens=12, greedy=True, n_steps=5)
    assert sample(run_dir, "--steps", "5") == sample(run_dir, "--early-exit-steps", "5") == (0, deeper[0] + "\n", "")
    deep = tiny_config(data_dir, tmp_path / "deep", "model.preset=GPT", f"model.vocab_size={tok.vocab_size}")
    checkpoint.save_checkpoint(tmp_path / "deep" / "best", build_model(deep.model_config()), deep, {"iter": 0})
    code, out, err = sample(tmp_path / "deep", "--steps", "3")
    assert code == 2 and not out and err.startswith("nrgpt: error: --steps needs a recurrent model (nrgpt, rgpt or "
                                                    "rgpt_parallel);")
    assert sample(run_dir, "--early-exit-on", "energy")[2] == ("nrgpt: error: --early-exit-on says what the "
                                                               "early-exit tolerance applies to: give --early-exit TOL "
                                                               "too\n")


def test_eval_command_uses_the_whole_split(run_dir, data_dir, capsys):
    assert cli.main(["eval", str(run_dir), "--device", "cpu"]) == 0
    out = dict(line.split(": ") for line in capsys.readouterr().out.splitlines())
    loss, tokens = split_loss(checkpoint.load_model(run_dir)[0], data_dir, "val")
    meta = json.loads((data_dir / "meta.json").read_text())
    assert int(out["tokens"]) == tokens == meta["val_tokens"] - 1
    assert float(out["val_loss"]) == pytest.approx(loss, abs=1e-4)
    assert float(out["perplexity"]) == pytest.approx(math.exp(loss), rel=1e-3)


def test_prepare_and_quickstart(tmp_path, data_dir, capsys):
    source = data_dir.with_suffix(".txt")
    with pytest.warns(UserWarning, match="not the usual Tiny Shakespeare"):
        assert cli.main(["prepare", "shakespeare", "--source", str(source), "--out", str(tmp_path / "d")]) == 0
    assert "prepared" in capsys.readouterr().out
    args = ["quickstart", "--data-dir", str(tmp_path / "d"), "--out-dir", str(tmp_path / "q"), "--max-iters", "4",
            "--no-progress", "--set", "model.n_embd=16", "--set", "model.n_steps=1", "--set", "train.eval_iters=2"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "validation loss" in out and (tmp_path / "q" / "best" / "model.safetensors").is_file()
    assert torch.load(tmp_path / "q" / "last" / "state.pt", weights_only=True)["iter"] == 4
