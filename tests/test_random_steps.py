"""Training with a random number of recurrent steps per iteration, and truncated backpropagation.

The draw (``nrgpt.train.steps_sampler``) is a function of (seed, iteration) with the documented law; a
resumed run draws what an uninterrupted one does; ``backprop_steps`` = k gives the gradient of a
hand-written truncated unroll; compiled steps do not re-trace per step count; bad settings are one line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nrgpt import checkpoint
from nrgpt.config import ConfigError, ModelConfig
from nrgpt.energy import EnergyBlock
from nrgpt.model import build_model
from nrgpt.runconfig import TrainConfig, resolve_config
from nrgpt.train import steps_sampler, train

from .conftest import REPO, randomize, timeless_records, tiny_args, tiny_config, train_one_and_two_processes

pytestmark = pytest.mark.usefixtures("single_thread")

DOCS = REPO / "docs" / "model.md"


def _draws(tc: TrainConfig, n_steps: int, iters: range) -> np.ndarray:
    draw = steps_sampler(tc, n_steps)
    return np.array([draw(it) for it in iters])


# ------------------------------------------------------------------------------------------ the draw


def test_fixed_always_draws_n_steps():
    assert set(_draws(TrainConfig(), 7, range(500))) == {7}


@pytest.mark.parametrize("distribution", ["lognormal", "uniform"])
def test_draw_is_a_function_of_seed_and_iteration(distribution):
    """Two samplers (two ranks, or a run and its resume) agree draw for draw; another seed draws otherwise;
    every draw is within the bounds, and no other random stream moves."""
    tc = TrainConfig(steps_distribution=distribution, steps_sigma=0.5, steps_min=2, steps_max=12, seed=5)
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
    a = _draws(tc, 6, range(300))
    b = _draws(tc, 6, range(300))
    other = _draws(dataclasses.replace(tc, seed=6), 6, range(300))
    assert np.array_equal(a, b) and not np.array_equal(a, other)
    assert a.min() >= 2 and a.max() <= 12 and len(set(a)) > 5
    assert steps_sampler(tc, 6)(123) == a[123]  # iteration 123 alone: what a resumed run draws
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert all(np.array_equal(x, y) for x, y in zip(np.random.get_state(), numpy_state))


def _lognormal_law(n: int, sigma: float, low: int, high: int) -> dict[int, float]:
    """P(S = k) of S = clip(round(n exp(sigma z)), low, high): the mass of n exp(sigma z) in [k - 1/2, k + 1/2),
    the tails piled on the bounds."""
    def cdf(s: float) -> float:  # P(n exp(sigma z) < s)
        return 0.5 * (1 + math.erf(math.log(s / n) / (sigma * math.sqrt(2))))
    edges = [0.0 if k == low else cdf(k - 0.5) for k in range(low, high + 1)] + [1.0]
    return {k: edges[i + 1] - edges[i] for i, k in enumerate(range(low, high + 1))}


@pytest.mark.parametrize("n,sigma,low,high", [(8, 0.5, 1, 0), (6, 1.0, 3, 10)], ids=["default-bounds", "clipped"])
def test_lognormal_median_is_n_steps_and_law_as_documented(n, sigma, low, high):
    """Median exactly n_steps; mean and every frequency within 4.5 standard errors of the exact law of the
    rounded, clipped log-normal (a wrong sigma, median or clip is off by far more at 10,000 draws)."""
    tc = TrainConfig(steps_distribution="lognormal", steps_sigma=sigma, steps_min=low, steps_max=high)
    draws = _draws(tc, n, range(10_000))
    law = _lognormal_law(n, sigma, *tc.steps_bounds(n))
    mean = sum(k * p for k, p in law.items())
    sd = math.sqrt(sum((k - mean) ** 2 * p for k, p in law.items()))
    assert np.median(draws) == n
    assert abs(draws.mean() - mean) < 4.5 * sd / math.sqrt(len(draws)), (draws.mean(), mean)
    for k, p in law.items():
        freq = np.mean(draws == k)
        assert abs(freq - p) < 4.5 * math.sqrt(p * (1 - p) / len(draws)) + 1e-12, (k, freq, p)
    assert set(draws) <= set(law)


def test_uniform_covers_its_bounds_evenly():
    tc = TrainConfig(steps_distribution="uniform", steps_min=2, steps_max=9)
    draws = _draws(tc, 5, range(10_000))
    assert set(draws) == set(range(2, 10))
    sd = math.sqrt((8 ** 2 - 1) / 12)  # of a discrete uniform over 8 values
    assert abs(draws.mean() - 5.5) < 4.5 * sd / math.sqrt(len(draws))


# ------------------------------------------------------------------------------------------ truncation

TINY = dict(vocab_size=11, block_size=10, n_embd=16, n_head=2, n_steps=3)
PRESETS = {
    "NRGPT_P_FF2W": dict(eta_per_step=True),  # eta^(t): the reference must count the steps right
    "NRGPT_P_GLU": {},  # conditioned on norm(x^(0)): the embedding keeps a path past the truncation
    "NRGPT_P_REC": dict(n_steps=2),  # two blocks: the last k steps are counted across them
    "GPT_Rec_parallel": {},
}


def _model(preset: str, **overrides) -> torch.nn.Module:
    cfg = ModelConfig.preset(preset, **{**TINY, **PRESETS[preset], **overrides})
    torch.manual_seed(0)
    return randomize(build_model(cfg), std=0.1).double().train()


def _reference_loss(model, idx, targets, steps: int, k: int) -> torch.Tensor:
    """The truncated unroll by hand: the first (total - k) steps under no_grad from the embedding, the state
    then re-attached to the embedding through the identity, the last k with a graph, the head and the loss."""
    x0 = x = model.embed(idx)
    unroll = [(block, t) for block in model.blocks for t in range(steps)]  # the recurrent GPT: one block
    for i, (block, t) in enumerate(unroll):
        if i == len(unroll) - k:
            x = x0 + (x - x0).detach()
        with torch.no_grad() if i < len(unroll) - k else contextlib.nullcontext():
            if isinstance(block, EnergyBlock):
                x = block(x, t, cond=block.norm(x0) if block.input_conditioned else None)
            else:
                x = block(x, t)
    logits = model.lm_head(model.ln_f(x))
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _grads(model, loss: torch.Tensor) -> dict[str, torch.Tensor | None]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "checkpoint_steps"])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_truncated_backprop_is_the_gradient_of_the_truncated_unroll(preset, ckpt):
    """backprop_steps = 2 of 5 drawn steps (more than the trained 3): the gradients of the hand-built
    truncated unroll, in float64; not those of full backpropagation; k >= the steps taken is full."""
    model = _model(preset, checkpoint_steps=ckpt)
    g = torch.Generator().manual_seed(1)
    idx, targets = (torch.randint(0, TINY["vocab_size"], (3, TINY["block_size"]), generator=g) for _ in range(2))
    steps, k = 5, 2
    total = steps * len(model.blocks)
    truncated = _grads(model, model(idx, targets, n_steps=steps, backprop_steps=k)[1])
    reference = _grads(model, _reference_loss(model, idx, targets, steps, k))
    full = _grads(model, model(idx, targets, n_steps=steps)[1])
    assert truncated.keys() == reference.keys()
    for name, grad in truncated.items():
        assert (grad is None) == (reference[name] is None), name
        if grad is not None:
            torch.testing.assert_close(grad, reference[name], rtol=1e-10, atol=1e-13, msg=name)
    # The embeddings learn through the identity path; the weights used only before the truncation do not.
    assert truncated["tok_emb.weight"] is not None and truncated["pos_emb.weight"] is not None
    if preset == "NRGPT_P_REC":  # 2 x 5 steps, the last 2 in the second block: the first block is not trained
        assert all(v is None for n, v in truncated.items() if n.startswith("blocks.0."))
    last = [n for n in truncated if n.startswith(f"blocks.{len(model.blocks) - 1}.") and truncated[n] is not None]
    assert last and all(not torch.allclose(truncated[n], full[n]) for n in last if full[n].abs().max() > 1e-8)
    for k_full in (total, total + 3):
        same = _grads(model, model(idx, targets, n_steps=steps, backprop_steps=k_full)[1])
        assert all(torch.equal(same[n], full[n]) for n in full), k_full


def test_deep_gpt_refuses_another_number_of_steps():
    model = build_model(ModelConfig.preset("GPT", **TINY))
    idx = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="3 distinct layers"):
        model(idx, n_steps=4)
    assert model(idx, n_steps=3)[0].shape == (1, 4, TINY["vocab_size"])


@pytest.mark.parametrize("preset", ["NRGPT_P_FF2W", "GPT_Rec_parallel"])
def test_compiled_steps_trace_once_whatever_the_number_of_steps(preset):
    """system.compile compiles the unit of one step, so a new step count re-traces nothing; truncation adds a
    few graphs once (the step without autograd, and on an input that needs no gradient: at most 3) and no
    more after that. Gradients equal the eager model's."""
    import torch._dynamo as dynamo
    from torch._dynamo.testing import CompileCounter

    dynamo.reset()
    eager, compiled = _model(preset).float(), _model(preset).float()
    counter = CompileCounter()
    compiled.compile_steps(backend=counter)
    idx = torch.randint(0, TINY["vocab_size"], (2, TINY["block_size"]))
    frames = []
    for steps, k in ((3, 0), (5, 0), (2, 0), (6, 2), (4, 3), (7, 1), (1, 0)):
        grads = [_grads(m, m(idx, idx, n_steps=steps, backprop_steps=k)[1]) for m in (eager, compiled)]
        for name, grad in grads[0].items():
            if grad is not None:
                torch.testing.assert_close(grads[1][name], grad, rtol=1e-6, atol=1e-7, msg=name)
        frames.append(counter.frame_count)
    assert frames[:3] == [1, 1, 1] and 1 < frames[3] <= 4 and frames[3:] == [frames[3]] * 4, frames


# ------------------------------------------------------------------------------------------ runs


@pytest.mark.parametrize("overrides", [
    ("train.steps_distribution=lognormal", "train.steps_sigma=0.7", "train.backprop_steps=1"),
    ("model.preset=GPT_Rec_parallel", "model.dropout=0.1", "train.steps_distribution=uniform",
     "train.grad_accum=2"),
], ids=["nrgpt-lognormal-truncated", "rgpt_parallel-uniform-dropout"])
def test_resume_with_random_steps_is_exact(data_dir, tmp_path, overrides):
    """N iterations straight, or N/2 then a resume to N: the same loss and steps at every iteration, the same
    evaluations and bitwise the same weights. (A constant schedule, so that max_iters changes no lr.)"""
    common = ("train.schedule=constant", "train.eval_interval=6", "train.eval_iters=2", *overrides)
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    train(tiny_config(data_dir, straight, "train.max_iters=12", *common), quiet=True)
    train(tiny_config(data_dir, halves, "train.max_iters=6", *common), quiet=True)
    result = train(tiny_config(data_dir, halves, "train.max_iters=12", *common), resume=True, quiet=True)
    assert result["iters"] == 12
    want, got = timeless_records(straight), timeless_records(halves)
    assert got == want
    config = tiny_config(data_dir, straight, *common)
    draw = steps_sampler(config.train, config.model_config().n_steps)
    logged = [r["steps"] for r in want if "loss" in r]
    assert logged == [draw(it) for it in range(12)] and len(set(logged)) > 1
    a, b = checkpoint.load_weights(straight / "last"), checkpoint.load_weights(halves / "last")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.slow
def test_two_processes_match_one_with_random_truncated_steps(data_dir, tmp_path):
    """DDP: both ranks draw the same steps, and the parameters a truncation leaves without a gradient (the
    embedding) are found, not waited for: two gloo processes train like one with the doubled batch."""
    common = tiny_args(data_dir, tmp_path / "x", "train.max_iters=8", "train.eval_interval=4", "train.eval_iters=2",
                       "train.steps_distribution=lognormal", "train.backprop_steps=1")
    one, two, _ = train_one_and_two_processes(common, tmp_path)
    assert [r.get("steps") for r in one] == [r.get("steps") for r in two]


# ------------------------------------------------------------------------------------------ settings


def test_docs_example_and_command_line_overrides_resolve(tmp_path):
    """The TOML example of docs/model.md is a valid preset, and the same settings work as --set overrides."""
    text = DOCS.read_text(encoding="utf-8")
    example = text.split("```toml\n", 1)[1].split("```", 1)[0]
    assert "steps_distribution" in example
    preset = tmp_path / "deep.toml"
    preset.write_text(example, encoding="utf-8")
    tc = resolve_config(str(preset)).train
    assert (tc.steps_distribution, tc.steps_sigma, tc.steps_max, tc.backprop_steps) == ("lognormal", 0.5, 16, 4)
    over = resolve_config(None, ["model.preset=GPT_Rec", "train.steps_distribution=uniform", "train.steps_min=4",
                                 "train.backprop_steps=3"]).train
    assert (over.steps_distribution, over.steps_min, over.backprop_steps) == ("uniform", 4, 3)


@pytest.mark.parametrize("overrides,message", [
    (["model.preset=GPT", "train.steps_distribution=lognormal"],
     "train.steps_distribution = 'lognormal' needs a recurrent model"),
    (["model.preset=GPT", "train.backprop_steps=2"], "train.backprop_steps = 2 needs a recurrent model"),
    (["train.steps_distribution=poisson"], "train.steps_distribution = 'poisson' is not allowed"),
    (["train.steps_sigma=-0.5"], "train.steps_sigma = -0.5 must be a finite number > 0"),
    (["train.steps_sigma=0"], "train.steps_sigma = 0.0 must be a finite number > 0"),
    (["train.steps_distribution=uniform", "train.steps_min=9", "train.steps_max=6"],
     "train.steps_min = 9 must be <= train.steps_max = 6"),
    (["train.steps_distribution=uniform", "train.steps_min=20"],
     "train.steps_min = 20 must be <= train.steps_max = 16 (2 x model.n_steps"),
    (["train.steps_distribution=lognormal", "train.steps_max=5"],
     "train.steps_min..steps_max = 1..5 must include model.n_steps = 8"),
    (["train.steps_min=0"], "train.steps_min = 0 must be >= 1"),
    (["train.steps_min=9"], "train.steps_min..steps_max = 9..16 must include model.n_steps = 8"),  # fixed too
    (["train.backprop_steps=-1"], "train.backprop_steps = -1 must be >= 0"),
    (["train.steps_max=-2"], "train.steps_max = -2 must be >= 0"),
])
def test_bad_step_settings_are_one_clear_line(overrides, message):
    with pytest.raises(ConfigError) as error:
        resolve_config(None, overrides)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_deep_gpt_with_the_default_steps_trains_as_before():
    assert resolve_config(None, ["model.preset=GPT"]).train.steps_distribution == "fixed"
