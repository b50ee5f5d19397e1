"""Energy dynamics: the recorder, own-move energies, the summary, early exit (exactness, causality,
cached decoding), descent guarantees per eta variant, figures and ``nrgpt dynamics``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nrgpt import ModelConfig, build_model
from nrgpt.checkpoint import save_checkpoint
from nrgpt.cli import main as cli_main
from nrgpt.data import prepare_listops
from nrgpt.decoding import KVCache
from nrgpt.dynamics import (
    Dynamics,
    EarlyExit,
    descent_figure,
    descent_guarantee,
    early_exit_curve,
    early_exit_figure,
    energy_figure,
    evaluate_early_exit,
    fixed_steps_curve,
    own_move_energies,
    record_dynamics,
    settle_steps,
    summarize_dynamics,
)
from nrgpt.evaluate import listops_accuracy, load_listops_samples
from nrgpt.plots import save_png
from nrgpt.runconfig import DataConfig, RunConfig

from .conftest import FIXTURES, randomize, require

pytestmark = pytest.mark.usefixtures("single_thread")

V, T = 13, 10


def tiny(preset: str = "NRGPT_P_FF2W", seed: int = 0, **overrides) -> torch.nn.Module:
    cfg = ModelConfig.preset(preset, **{"vocab_size": V, "block_size": 16, "n_embd": 16, "n_head": 2,
                                        "n_steps": 3, **overrides})
    torch.manual_seed(seed)
    return randomize(build_model(cfg), std=0.2, seed=seed).double().eval()


def tokens(batch: int = 2, length: int = T, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------- recording


@pytest.mark.parametrize("preset", ["NRGPT_P_FF2W", "NRGPT_H_FF2W", "NRGPT_P_PSD"])
def test_recorder_matches_energy_trajectory_and_a_hand_run_loop(preset):
    model, idx = tiny(preset), tokens()
    dyn = record_dynamics(model, idx, n_steps=7)  # more steps than the 3 trained
    traj = model.energy_trajectory(idx, 7)
    for name in ("energy", "attn_energy", "ff_energy", "grad_norm"):
        assert np.array_equal(getattr(dyn, name), getattr(traj, name).numpy())
    assert dyn.steps == 7 and dyn.trained_steps == 3 and dyn.own_move_change.shape == (7, 2, T)
    block, x = model.block, model.embed(idx)
    with torch.no_grad():
        for t in range(8):
            g = block.norm(x)
            e, e_att, e_ff = block.energy(g)
            torch.testing.assert_close(torch.from_numpy(dyn.energy[t]), e, rtol=0, atol=1e-12)
            torch.testing.assert_close(torch.from_numpy(dyn.attn_energy[t]), e_att, rtol=0, atol=1e-12)
            torch.testing.assert_close(torch.from_numpy(dyn.ff_energy[t]), e_ff, rtol=0, atol=1e-12)
            torch.testing.assert_close(torch.from_numpy(dyn.grad_norm[t]), block.energy_grad(g).norm(dim=-1),
                                       rtol=0, atol=1e-12)
            x = block(x, t)


@pytest.mark.parametrize("mask", ["strict", "inclusive"])
def test_own_move_energies_substitute_one_token_at_a_time(mask):
    model = tiny(mask=mask)
    block = model.block
    with torch.no_grad():
        x = model.embed(tokens())
        g, g_next = block.norm(x), block.norm(block(x, 0))
        fast = own_move_energies(block, g, g_next, chunk=3)
        for a in range(T):
            moved = g.clone()
            moved[:, a] = g_next[:, a]
            torch.testing.assert_close(fast[:, a], block.energy(moved)[0][:, a], rtol=0, atol=1e-12)


def test_own_move_descent_with_a_small_descent_step():
    """Prop. 2.1: with eta = c diag(gamma) and a small c, every token's own move lowers its energy."""
    model = tiny(eta_init=0.02)
    summary = summarize_dynamics(record_dynamics(model, tokens(3), n_steps=20))
    assert summary["own_move"] == {"descent": 1.0, "rise": 0.0}
    assert descent_guarantee(model)["guaranteed"]


# ----------------------------------------------------------------------------------------------- summary


def hand_made() -> Dynamics:
    energy = np.array([[0.0, 5.0, 1.0], [-1.0, 6.0, 0.0], [-2.0, 4.0, 0.5], [-2.0, 4.0, 3.0]])[:, None]  # (4, 1, 3)
    own = np.array([[-1.0, -0.5, -0.2], [-0.1, 0.3, -0.4], [0.0, -1e-9, 0.5]])[:, None]  # (3, 1, 3)
    grad = np.array([[2.0, 1.0, 3.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [0.5, 0.5, 0.5]])[:, None]
    return Dynamics(tokens=np.zeros((1, 3), dtype=np.int64), energy=energy, attn_energy=energy * 0,
                    ff_energy=energy, grad_norm=grad, own_move_change=own, trained_steps=2)


def test_summary_fractions_on_a_hand_made_trajectory():
    # changes (step x token): [-1, 1, -1], [-1, -2, 0.5], [0, 0, 2.5]; noise floor 0.01 (1 + |E|):
    # [0.01, 0.06, 0.02], [0.02, 0.07, 0.01], [0.03, 0.05, 0.015]
    s = summarize_dynamics(hand_made(), energy_tol=0.01)
    assert s["tokens_final_below_initial"] == pytest.approx(2 / 3)  # token 2 ends at 3 > 1
    assert s["sequences_total_final_below_initial"] == 1.0  # 5 < 6
    assert s["plain"] == pytest.approx({"descent": 4 / 9, "rise": 3 / 9})
    assert s["own_move"] == pytest.approx({"descent": 6 / 9, "rise": 2 / 9})
    assert settle_steps(hand_made().energy, 0.01).tolist() == [[2, 2, 3]]
    assert s["settle"] == pytest.approx({"mean_step": 7 / 3, "frac_settled": 2 / 3, "mean_step_settled": 2.0})
    # pairs after every earlier token settled: token 0 at steps 0-2, tokens 1 and 2 at step 2; token 2 rises there
    assert s["after_predecessors_settled"] == pytest.approx({"pairs": 5, "frac_no_rise": 4 / 5})
    assert s["grad_norm"] == pytest.approx({"initial_mean": 2.0, "final_mean": 0.5})
    assert (s["steps"], s["trained_steps"], s["tokens"], s["batch"]) == (3, 2, 3, 1)


@pytest.mark.parametrize("preset, overrides, guaranteed", [
    ("NRGPT_P_FF2W", {}, True),  # eta = c diag(gamma), LayerNorm (Prop. 2.1)
    ("NRGPT_P_PSD", {}, True),  # psd eta, no norm (Prop. 2.2)
    ("NRGPT_P_FF2W", {"eta": "psd"}, False),  # psd eta with LayerNorm
    ("NRGPT_P_FF2W", {"eta": "free"}, False),
    ("NRGPT_P_FF2W", {"eta": "identity", "norm": "bare_layernorm"}, True),  # gamma = 1
    ("NRGPT_P_FF2W", {"eta": "identity"}, False),  # a trained (here random) gamma
    ("NRGPT_P_FF2W", {"eta": "identity", "norm": "none"}, True),
    ("NRGPT_H_FF2W", {"eta": "descent"}, False),  # inclusive mask, reference update: not a gradient
    ("NRGPT_H_FF2W", {"eta": "descent", "grad_mode": "exact"}, True),
])
def test_descent_guarantee_per_eta_variant(preset, overrides, guaranteed):
    g = descent_guarantee(tiny(preset, **overrides))
    assert g["guaranteed"] is guaranteed and g["eta"] == tiny(preset, **overrides).config.eta and g["reason"]


# -------------------------------------------------------------------------------------------- early exit


EXITS = ["grad", "energy"]  # what the early-exit tolerance applies to


@pytest.mark.parametrize("exit_on", EXITS)
@pytest.mark.parametrize("grad", [True, False], ids=["graph", "no-graph"])
def test_early_exit_with_zero_tolerance_is_the_fixed_steps_model(grad, exit_on):
    """Bitwise, in either autograd mode (the FF gradients take ATen's closed form without a graph and the
    hand-written Functions with one: the two round differently, so both sides run in the same mode)."""
    model, idx = tiny(), tokens()
    with torch.set_grad_enabled(grad):
        logits, steps = EarlyExit(model, 0.0, exit_on=exit_on).run(idx)
        assert torch.equal(logits, model(idx)[0]) and (steps == 3).all()
        x = model.body(model.embed(idx), n_steps=6)
        logits6, steps6 = EarlyExit(model, 0.0, max_steps=6, exit_on=exit_on).run(idx)
        assert torch.equal(logits6, model.lm_head(model.ln_f(x))) and (steps6 == 6).all()


def test_early_exit_with_a_huge_tolerance_takes_no_step():
    model, idx = tiny(), tokens()
    logits, steps = EarlyExit(model, 1e30).run(idx)
    with torch.no_grad():
        assert torch.equal(logits, model.lm_head(model.ln_f(model.embed(idx))))
    assert (steps == 0).all()


def test_energy_early_exit_with_a_huge_tolerance_takes_one_step():
    """The energy change needs a step to measure: every token takes the first step, then stops for good
    (with recursive blocks too: a token that stopped in the first block skips the second)."""
    model, idx = tiny(), tokens()
    logits, steps = EarlyExit(model, 1e30, exit_on="energy").run(idx)
    assert torch.equal(logits, model(idx, n_steps=1)[0]) and (steps == 1).all()
    recursive = tiny("NRGPT_P_REC", n_blocks=2)
    with torch.no_grad():  # both sides in one autograd mode (see the zero-tolerance test)
        logits, steps = EarlyExit(recursive, 1e30, exit_on="energy").run(idx)
        x = recursive.blocks[0](recursive.embed(idx), 0)
        assert torch.equal(logits, recursive.lm_head(recursive.ln_f(x))) and (steps == 1).all()


def test_energy_early_exit_stops_where_the_energy_change_falls_below_the_noise_floor():
    """Token 0 attends to no other token, so until it freezes its energies are those of the fixed-steps
    trajectory: it takes the first step t >= 1 with |E^(t) - E^(t-1)| < tol (1 + |E^(t-1)|) steps (or all 8),
    worked out from the recorded energies."""
    model, idx = tiny(), tokens(6, T)
    energy = record_dynamics(model, idx, 8).energy[:, :, 0]  # (9, B): token 0 of every sequence
    change = np.abs(np.diff(energy, axis=0)) / (1 + np.abs(energy[:-1]))  # (8, B): change t -> t+1
    values = np.unique(change[1:4])  # sequences that start with the same token share token 0's changes
    middle = values[len(values) // 2 - 1: len(values) // 2 + 1]
    tol = float(np.sqrt(middle[0] * middle[1]))  # between two of the changes, so that none is a tie
    expected = [next((t for t in range(1, 8) if change[t - 1, b] < tol), 8) for b in range(idx.shape[0])]
    steps = EarlyExit(model, tol, max_steps=8, exit_on="energy").run(idx)[1][:, 0]
    assert steps.tolist() == expected and len(set(expected)) > 1


def mid_tolerance(model, idx, exit_on: str = "grad") -> float:
    """A tolerance at which some tokens freeze early and others do not: the median of the initial gradient
    norms ('grad': some tokens freeze before their first step), or of the relative energy changes over the
    first step ('energy': some tokens freeze after it)."""
    dyn = record_dynamics(model, idx, 1)
    if exit_on == "grad":
        return float(np.median(dyn.grad_norm[0]))
    return float(np.median(np.abs(dyn.energy[1] - dyn.energy[0]) / (1 + np.abs(dyn.energy[0]))))


@pytest.mark.parametrize("exit_on", EXITS)
@pytest.mark.parametrize("mask", ["strict", "inclusive"])
def test_early_exit_is_causal(mask, exit_on):
    model, idx = tiny(mask=mask), tokens(3, 14)
    ee = EarlyExit(model, mid_tolerance(model, idx, exit_on), max_steps=8, exit_on=exit_on)
    logits, steps = ee.run(idx)
    assert steps.unique().numel() > 1  # some tokens stop earlier than others
    for k in (0, 5, 12):
        changed = idx.clone()
        changed[:, k + 1:] = (changed[:, k + 1:] + 1 + torch.arange(13 - k) % 5) % V
        logits2, steps2 = ee.run(changed)
        assert torch.equal(steps2[:, : k + 1], steps[:, : k + 1])
        torch.testing.assert_close(logits2[:, : k + 1], logits[:, : k + 1], rtol=0, atol=1e-12)
        assert not torch.allclose(logits2[:, k + 1:], logits[:, k + 1:])


@pytest.mark.parametrize("exit_on", EXITS)
def test_cached_early_exit_decoding_equals_full_recomputation(exit_on):
    """A frozen token's keys in the cache are those of its frozen state at every later step; the energy
    criterion evaluates each new token's energy against the cached keys."""
    model, idx = tiny(), tokens(2, 12)
    ee = EarlyExit(model, mid_tolerance(model, idx, exit_on), max_steps=8, exit_on=exit_on)
    cache = KVCache(16)
    with torch.no_grad():
        last = [ee.forward_cached(idx[:, :4], cache)]
        last += [ee.forward_cached(idx[:, i:i + 1], cache) for i in range(4, 12)]
        full = ee(idx)[0]
    torch.testing.assert_close(torch.stack(last, 1), full[:, 3:], rtol=0, atol=1e-12)


def greedy_by_recomputation(logits_of, idx: torch.Tensor, n: int, block: int = 16) -> torch.Tensor:
    """Greedy decoding by hand: the whole (cropped) context through ``logits_of`` for every new token."""
    with torch.no_grad():
        for _ in range(n):
            idx = torch.cat([idx, logits_of(idx[:, -block:])[:, -1].argmax(-1, keepdim=True)], 1)
    return idx


@pytest.mark.parametrize("mask", ["strict", "inclusive"])
def test_early_exit_generate(mask):
    """``generate(tol=, n_steps=)``: tol 0 is plain decoding, a huge tol the zero-step model, and a middle tol
    greedy decoding by full recomputation under ``model.run(context, n_steps, tol)``, past the block of 16."""
    model, prompt = tiny(mask=mask), tokens(2, 4)
    plain = model.generate(prompt, 20, greedy=True)
    assert torch.equal(model.generate(prompt, 20, greedy=True, tol=0.0), plain)
    zero_step = greedy_by_recomputation(lambda x: model.lm_head(model.ln_f(model.embed(x))), prompt, 20)
    assert torch.equal(model.generate(prompt, 20, greedy=True, tol=1e30), zero_step)
    for exit_on in EXITS:
        tol = mid_tolerance(model, plain[:, -16:], exit_on)
        expected = greedy_by_recomputation(lambda x, t=tol, e=exit_on: model.run(x, 8, t, e)[0], prompt, 20)
        options = {"n_steps": 8, "tol": tol, "exit_on": exit_on}
        assert torch.equal(model.generate(prompt, 20, greedy=True, **options), expected)
        assert torch.equal(model.generate(prompt, 20, greedy=True, use_cache=False, **options), expected)
        steps = model.run(expected[:, -16:], 8, tol, exit_on)[1]
        assert (steps < 8).any() and (steps > 0).any()  # some tokens exit early, others descend


@pytest.mark.parametrize("exit_on", EXITS)
def test_static_cache_early_exit_decoding_equals_the_growing_cache(exit_on):
    """What a CUDA graph replays under early exit (``KVCache(static=True)``) is the growing cache's decoding."""
    model, idx = tiny(), tokens(2, 12)
    descent = {"n_steps": 8, "tol": mid_tolerance(model, idx, exit_on), "exit_on": exit_on}
    caches = KVCache(16), KVCache(16, static=True)
    for cache in caches:
        model.forward_cached(idx[:, :3], cache, **descent)
    for i in range(3, 12):
        growing, static = (model.forward_cached(idx[:, i:i + 1], c, **descent) for c in caches)
        torch.testing.assert_close(static, growing, rtol=0, atol=1e-12)


def test_early_exit_generate_needs_an_energy_model():
    with pytest.raises(ValueError, match=r"early-exit decoding \(tol\) needs an NRGPT model; this is a 'rgpt_par"):
        tiny("GPT_Rec_parallel").generate(tokens(1, 3), 2, tol=0.1)


def test_early_exit_curves_on_language_batches():
    model = tiny()
    batches = [(tokens(2, 9, seed=s)[:, :-1], tokens(2, 9, seed=s)[:, 1:]) for s in range(2)]
    curve = early_exit_curve(model, batches, [0.0, 1e30])
    fixed = fixed_steps_curve(model, batches)
    mean_loss = np.mean([model(x, y)[1].item() for x, y in batches])  # equal batch sizes
    assert curve[0] == pytest.approx({"tol": 0.0, "avg_steps": 3.0, "loss": mean_loss})
    assert curve[1]["avg_steps"] == 0.0 and curve[1]["loss"] == pytest.approx(fixed[0]["loss"])
    assert [p["steps"] for p in fixed] == [0, 1, 2, 3] and [p["avg_steps"] for p in fixed] == [0, 1, 2, 3]
    assert fixed[3]["loss"] == pytest.approx(mean_loss)


@pytest.fixture(scope="module")
def listops_dir(tmp_path_factory):
    return prepare_listops(tmp_path_factory.mktemp("lo") / "data", n_train=40, n_test=12)


def test_early_exit_on_listops(listops_dir):
    samples = load_listops_samples(listops_dir)
    model = tiny(vocab_size=samples.tokenizer.vocab_size, block_size=64)
    exact = evaluate_early_exit(EarlyExit(model, 0.0), samples)
    assert exact == {"avg_steps": 3.0, "accuracy": listops_accuracy(model, listops_dir)["overall"]}
    assert evaluate_early_exit(EarlyExit(model, 1e30), samples)["avg_steps"] == 0.0
    line = torch.tensor([samples.tokenizer.encode(samples.records[0]["line"])])
    partial = evaluate_early_exit(EarlyExit(model, mid_tolerance(model, line), max_steps=6), samples)
    assert 0.0 < partial["avg_steps"] < 6.0


# ------------------------------------------------------------------------------------- figures and CLI


def test_figures_are_png_files(tmp_path):
    model, idx = tiny(), tokens()
    dyn = record_dynamics(model, idx, 6)
    curve = [{"tol": 0.1, "avg_steps": 1.5, "loss": 2.0}, {"tol": 0.0, "avg_steps": 3.0, "loss": 1.9}]
    fixed = [{"steps": k, "avg_steps": float(k), "loss": 2.5 - 0.2 * k} for k in range(4)]
    for name, fig in (("e", energy_figure(dyn, 1, title="t")), ("l", energy_figure(dyn, log_grad=False)),
                      ("d", descent_figure(dyn)), ("x", early_exit_figure(curve, fixed))):
        data = save_png(fig, tmp_path / f"{name}.png").read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000


def test_dynamics_command(listops_dir, tmp_path, capsys):
    samples = load_listops_samples(listops_dir)
    model = tiny(vocab_size=samples.tokenizer.vocab_size, block_size=64).float()
    config = RunConfig(out_dir=str(tmp_path / "run"), data=DataConfig(dir=str(listops_dir)),
                       model=ModelConfig.preset("NRGPT_P_FF2W", vocab_size=samples.tokenizer.vocab_size, block_size=64,
                                                n_embd=16, n_head=2, n_steps=3))
    save_checkpoint(tmp_path / "run" / "best", model, config, {"iter": 0})
    out = tmp_path / "dyn"
    code = cli_main(["dynamics", str(tmp_path / "run"), "--data", str(listops_dir), "--batch", "2", "--length", "20",
                     "--steps", "5", "--out", str(out), "--early-exit", "0,0.05,1e9", "--early-exit-samples", "6",
                     "--early-exit-steps", "4", "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "descent guaranteed: yes" in printed and "early exit (grad) tol 0.05" in printed
    for name in ("energy.png", "descent.png", "early_exit.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG")
    summary = json.loads((out / "summary.json").read_text())
    arrays = np.load(out / "dynamics.npz")
    assert arrays["energy"].shape == (6, 2, 20) and arrays["settle_step"].shape == (2, 20)
    assert summary["steps"] == 5 and summary["trained_steps"] == 3 and summary["descent_guarantee"]["eta"] == "descent"
    assert [p["tol"] for p in summary["early_exit"]] == [0.0, 0.05, 1e9]
    assert [p["steps"] for p in summary["fixed_steps"]] == [0, 1, 2, 3, 4]
    four = summary["fixed_steps"][4]
    assert summary["early_exit"][0] == {"tol": 0.0, "avg_steps": four["avg_steps"], "accuracy": four["accuracy"]}
    assert summary["early_exit_on"] == "grad"
    code = cli_main(["dynamics", str(tmp_path / "run"), "--data", str(listops_dir), "--batch", "2", "--length", "20",
                     "--out", str(out), "--early-exit", "0,1e9", "--early-exit-on", "energy", "--early-exit-samples",
                     "6", "--device", "cpu"])
    assert code == 0 and "early exit (energy) tol 1e+09: 1.00 steps/token" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    one = summary["fixed_steps"][1]
    assert summary["early_exit_on"] == "energy" and summary["early_exit"][1] == {
        "tol": 1e9, "avg_steps": 1.0, "accuracy": one["accuracy"]}


def test_dynamics_command_on_a_reference_checkpoint(tmp_path, capsys):
    ckpt = require(FIXTURES / "nrgpt_h_ff2w.pt")
    out = tmp_path / "ref"
    assert cli_main(["dynamics", str(ckpt), "--ids", "1,2,3,4,5,6", "--steps", "9", "--out", str(out),
                     "--early-exit", "0,1e9", "--device", "cpu"]) == 0
    assert "descent guaranteed: no" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tokens"] == 6 and summary["steps"] == 9 and summary["early_exit"][1]["avg_steps"] == 0.0
