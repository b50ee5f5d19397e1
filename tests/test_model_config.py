"""The run config's typed model: the dict form parsed into a ModelConfig at the edge, round trips, command-line
overrides, options a model does not use (rejected when set for it, dropped from the layers below the one that
picks the model, dropped from old saved configs), old run directories, and the shipped sweeps."""

from __future__ import annotations

import json
import re
from dataclasses import fields
from pathlib import Path

import pytest

from nrgpt import ConfigError, ModelConfig, checkpoint, cli
from nrgpt.runconfig import RunConfig, resolve_config
from nrgpt.sweep import SweepError, load_sweep
from nrgpt.train import train

from .conftest import REPO, tiny_config

pytestmark = pytest.mark.usefixtures("single_thread")

MASK_ON_GPT = ("model.mask = 'strict' does not apply to GPT_Rec_parallel (a 'rgpt_parallel' model): it is an NRGPT "
               "option; remove it for this model")


# ------------------------------------------------------------------------------------------ the typed model


def test_round_trip_through_json():
    for config in (resolve_config("listops"), resolve_config("shakespeare-gpt", ["model.vocab_size=70"])):
        data = json.loads(json.dumps(config.to_dict()))
        assert isinstance(config.model, ModelConfig) and RunConfig.from_dict(data) == config
        assert data["model"]["preset"] == config.model.preset_name
    assert "mask" not in resolve_config("shakespeare-gpt").to_dict()["model"]  # a GPT has no NRGPT options
    assert resolve_config("listops").to_dict()["model"]["mask"] == "strict"


def test_command_line_overrides_land_in_the_typed_config():
    config = resolve_config(None, ["model.n_embd=64", "model.preset=NRGPT_P_FF1", "model.eta_init=0.5"])
    assert config.model == ModelConfig.preset("NRGPT_P_FF1", vocab_size=None, n_embd=64, eta_init=0.5)
    assert (config.model.eta, config.model.mask, config.model.preset_name) == ("descent", "strict", "NRGPT_P_FF1")
    assert config.model_config(37).vocab_size == 37 and config.model.vocab_size is None  # the dataset's
    assert resolve_config(None, ["model.vocab_size=80"]).model_config(37).vocab_size == 80  # unless set


def test_a_models_preset_names_its_kind():
    with pytest.raises(ConfigError, match=r"^model.model = 'gpt' is not the model of model.preset = 'NRGPT_H_FF2W' "
                                          r"\('nrgpt'\); leave model.model unset$"):
        resolve_config(None, ["model.model=gpt"])
    with pytest.raises(ConfigError, match="model.preset is missing"):
        RunConfig(model=ModelConfig())


# ------------------------------------------------------------------------------------------ unused options


def test_an_option_the_model_does_not_use_is_an_error():
    with pytest.raises(ConfigError, match=f"^{re.escape(MASK_ON_GPT)}$"):
        ModelConfig.preset("GPT_Rec_parallel", mask="strict")
    with pytest.raises(ConfigError, match="model.eta = 'psd' does not apply to a 'gpt' model"):
        ModelConfig(model="gpt", eta="psd")
    with pytest.raises(ConfigError, match="model.n_blocks = 1 does not apply to GPT"):
        ModelConfig.from_dict({"preset": "GPT", "n_blocks": 1})  # set, even to the default
    for order in (["model.preset=GPT_Rec_parallel", "model.mask=strict"],
                  ["model.mask=strict", "model.preset=GPT_Rec_parallel"]):  # the overrides are one layer
        with pytest.raises(ConfigError, match=f"^{re.escape(MASK_ON_GPT)}$"):
            resolve_config(None, order)
    with pytest.raises(ConfigError, match="model.mask = 'strict' does not apply to GPT_Rec_parallel"):
        resolve_config("shakespeare-rgpt-p", ["model.mask=strict"])  # a later layer than the model's


def test_an_inference_rate_option_its_eta_does_not_use_is_an_error():
    with pytest.raises(ConfigError, match=r"^model.eta_rank = 4 does not apply to model.eta = 'free': it is an option "
                                          r"of eta 'diag_lowrank'; remove it or pick one of those$"):
        ModelConfig.preset("NRGPT_H_FF2W", eta_rank=4)
    with pytest.raises(ConfigError, match="model.eta_init = 0.5 does not apply to model.eta = 'identity': it is an "
                                          "option of eta 'descent' or 'psd' or 'diag_lowrank'"):
        resolve_config(None, ["model.preset=NRGPT_P_FF2W", "model.eta=identity", "model.eta_init=0.5"])
    assert ModelConfig.preset("NRGPT_P_PRECOND", eta_rank=4, eta_init=0.5).eta_rank == 4
    assert ModelConfig.preset("NRGPT_P_FF2W", eta_init=0.5).eta == "descent"


def test_a_preset_file_is_checked_the_same_way(tmp_path):
    (tmp_path / "bad.toml").write_text('[model]\npreset = "GPT"\nff = "ff1"\n')
    with pytest.raises(ConfigError, match="model.ff = 'ff1' does not apply to GPT"):
        resolve_config(str(tmp_path / "bad.toml"))
    (tmp_path / "gpt.toml").write_text('extends = "listops"\n[model]\npreset = "GPT_Rec_parallel"\n')
    assert resolve_config(str(tmp_path / "gpt.toml")).model.mask == "inclusive"  # listops' mask is dropped


def test_a_lower_layers_options_are_dropped_when_a_layer_picks_the_model():
    config = resolve_config("listops", ["model.preset=GPT_Rec_parallel"])  # listops sets model.mask = "strict"
    assert config.model == ModelConfig.preset("GPT_Rec_parallel", vocab_size=None, n_steps=5, n_embd=64,
                                              block_size=128)
    assert resolve_config("listops", ["model.preset=NRGPT_P_FF1"]).model.mask == "strict"  # it applies: kept


def test_the_command_line_prints_one_line(tmp_path, capsys):
    assert cli.main(["train", "--preset", "shakespeare-rgpt-p", "--set", "model.mask=strict", "--out-dir",
                     str(tmp_path / "never")]) == 2
    assert capsys.readouterr().err == f"nrgpt: error: {MASK_ON_GPT}\n"
    assert not (tmp_path / "never").exists()


# ------------------------------------------------------------------------------------------ sweeps


def _sweep(tmp_path: Path, grid: str) -> Path:
    path = tmp_path / "s.toml"
    path.write_text(f'[base]\npreset = "listops"\nmodel.eta_per_step = true\n[grid]\n{grid}\n[budget]\niters = 8\n')
    return path


def test_a_sweep_base_holds_nrgpt_options_for_a_grid_with_a_baseline(tmp_path):
    sweep = load_sweep(_sweep(tmp_path, 'model.preset = ["NRGPT_H_FF1", "GPT_Rec_parallel"]'), tmp_path / "sw")
    nrgpt, gpt = (p.config.model for p in sweep.points)
    assert (nrgpt.mask, nrgpt.eta_per_step) == ("strict", True)
    assert gpt == ModelConfig.preset("GPT_Rec_parallel", vocab_size=None, n_steps=5, n_embd=64, block_size=128)


def test_a_grid_points_own_options_must_apply(tmp_path):
    grid = 'model = [{model.preset = "NRGPT_H_FF1", model.ff = "ff2"}, {model.preset = "GPT", model.ff = "ff2"}]'
    with pytest.raises(SweepError, match=r"s.toml: grid point GPT-ffff2: model.ff = 'ff2' does not apply to GPT \(a "
                                         r"'gpt' model\): it is an NRGPT option; remove it for this model$"):
        load_sweep(_sweep(tmp_path, grid), tmp_path / "sw")
    grid = 'model = [{model.preset = "NRGPT_H_FF1", model.ff = "ff2"}, {model.preset = "GPT"}]'
    assert [p.config.model.ff for p in load_sweep(_sweep(tmp_path, grid), tmp_path / "sw").points] == ["ff2", "ff2w"]


@pytest.mark.parametrize("path", sorted((REPO / "sweeps").glob("*.toml")), ids=lambda p: p.stem)
def test_shipped_sweeps_resolve(path, tmp_path, capsys):
    """Every grid point of every shipped sweep is a checked run config; the CPU sweeps' dry runs (which also
    build each model to count its parameters) pass from the command line."""
    sweep = load_sweep(path, tmp_path / "sw")
    assert all(p.config.model.preset_name in p.slug for p in sweep.points)
    if path.stem.endswith("_cpu"):
        assert cli.main(["sweep", str(path), "--dry-run", "--out-dir", str(tmp_path / "sw")]) == 0
        assert capsys.readouterr().out.endswith(f"{len(sweep.points)} runs in {tmp_path / 'sw'}\n")


# ------------------------------------------------------------------------------------------ old run directories


def _old_form(model: ModelConfig) -> dict:
    """A model section as versions before the typed model saved it: the preset and every field, used or not."""
    return {"preset": model.preset_name, **{f.name: getattr(model, f.name) for f in fields(model)
                                            if f.name != "preset_name"}, "mask": "strict"}


def test_an_old_run_directory_loads_and_resumes(data_dir, tmp_path):
    """A GPT run of a ListOps-style sweep, saved with the old dict form: every field, NRGPT's included, and
    the base's mask = 'strict' that the GPT never used."""
    run = tmp_path / "run"
    train(tiny_config(data_dir, run, "model.preset=GPT_Rec_parallel", "train.max_iters=2", "train.eval_interval=2"),
          quiet=True)
    new = RunConfig.load(run / "config.json")
    for path in (run / "config.json", run / "best" / checkpoint.INFO, run / "last" / checkpoint.INFO):
        data = json.loads(path.read_text())
        config = data.get("config", data)
        config["model"] = _old_form(new.model)
        path.write_text(json.dumps(data))
    assert RunConfig.load(run / "config.json") == new
    assert checkpoint.load_model(run)[1] == new
    with pytest.raises(ConfigError, match="does not apply to GPT_Rec_parallel"):
        RunConfig.from_dict(json.loads((run / "config.json").read_text()))  # as user input: an error
    assert cli.main(["train", "--resume", "--out-dir", str(run), "--set", "train.max_iters=4"]) == 0
    assert checkpoint.read_info(run / "last")["iter"] == 4
    assert json.loads((run / "config.json").read_text())["model"] == new.model.to_dict()  # saved in the new form
