"""Model behaviour: causality, parameter counts, trajectories, cached decoding, configuration errors."""

from __future__ import annotations

import pytest
import torch

from nrgpt import ConfigError, ModelConfig, build_model

from .conftest import randomize

SMALL = dict(vocab_size=11, block_size=12, n_embd=16, n_head=2, n_steps=3)
MODELS = [
    ModelConfig.preset("NRGPT_H_FF2W", **SMALL),
    ModelConfig.preset("NRGPT_H_FF1", **SMALL, mask="strict"),
    ModelConfig.preset("NRGPT_H_FF2", **SMALL),
    ModelConfig.preset("NRGPT_P_FF2W", **SMALL),
    ModelConfig.preset("NRGPT_P_FF1", **SMALL, mask="inclusive", eta_per_step=True),
    ModelConfig.preset("NRGPT_P_DAM", **SMALL, norm="rmsnorm"),
    ModelConfig.preset("NRGPT_P_PSD", **SMALL),
    ModelConfig.preset("GPT", **SMALL),
    ModelConfig.preset("GPT_Rec", **SMALL),
    ModelConfig.preset("GPT_Rec_parallel", **SMALL),
]
IDS = [f"{c.model}-{c.attention}-{c.mask}-{c.ff}-{c.norm}-{c.eta}" for c in MODELS]


def random_model(cfg: ModelConfig, seed: int = 0):
    return randomize(build_model(cfg), std=0.2, seed=seed).eval()


@pytest.mark.parametrize("cfg", MODELS, ids=IDS)
def test_causality(cfg):
    model = random_model(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.block_size))
    logits, _ = model(idx)
    for k in (0, 4, cfg.block_size - 1):
        changed = idx.clone()
        changed[:, k] = (changed[:, k] + 1) % cfg.vocab_size
        new_logits, _ = model(changed)
        torch.testing.assert_close(new_logits[:, :k], logits[:, :k], rtol=0, atol=0)
        assert not torch.allclose(new_logits[:, k], logits[:, k])


@pytest.mark.parametrize("cfg", MODELS, ids=IDS)
def test_cached_generation_equals_recomputation(cfg):
    model = random_model(cfg, seed=1)
    prompt = torch.randint(0, cfg.vocab_size, (3, 4))
    n_new = cfg.block_size + 6  # runs past the block: the window slides
    cached = model.generate(prompt, n_new, greedy=True)
    full = model.generate(prompt, n_new, greedy=True, use_cache=False)
    assert torch.equal(cached, full)
    # the cached path's logits equal the full forward's last-position logits
    from nrgpt.decoding import KVCache

    idx = torch.randint(0, cfg.vocab_size, (2, 9))
    cache = KVCache(cfg.block_size)
    model.forward_cached(idx[:, :5], cache)
    steps = [model.forward_cached(idx[:, i : i + 1], cache) for i in range(5, 9)]
    for j, i in enumerate(range(5, 9)):
        torch.testing.assert_close(steps[j], model(idx[:, : i + 1])[0][:, -1], rtol=1e-5, atol=1e-5)


def test_generated_tokens_are_an_ordinary_tensor_a_training_step_can_use():
    """generate decodes under inference_mode; what it returns must still be usable with autograd (an
    inference tensor cannot be saved for backward, as the embedding's indices are)."""
    cfg = MODELS[0]
    model = random_model(cfg).train()
    out = model.generate(torch.randint(0, cfg.vocab_size, (2, 3)), 5, greedy=True)
    assert not out.is_inference() and model.training
    _, loss = model(out[:, :-1], out[:, 1:])
    loss.backward()
    assert model.lm_head.weight.grad is not None


@pytest.mark.parametrize("cfg", MODELS, ids=IDS)
def test_static_cache_decoding_equals_the_growing_cache(cfg):
    """KVCache(static=True) (what a CUDA graph replays: keys written at a device-tensor position,
    attention over every slot under a mask) gives the growing cache's logits, in float64."""
    from nrgpt.decoding import KVCache

    model = random_model(cfg, seed=2).double()
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.block_size))
    caches = KVCache(cfg.block_size), KVCache(cfg.block_size, static=True)
    for cache in caches:
        model.forward_cached(idx[:, :3], cache)
    for i in range(3, cfg.block_size):
        growing, static = (model.forward_cached(idx[:, i : i + 1], c) for c in caches)
        assert caches[1].position.item() == i  # the step ran static: it wrote at the device-tensor position
        torch.testing.assert_close(static, growing, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="cuda_graph=True needs"):
        model.generate(idx[:, :3], 2, cuda_graph=True)


def test_sampling_is_reproducible_under_a_seed():
    model = random_model(MODELS[0])
    prompt = torch.zeros(2, 1, dtype=torch.long)
    runs = [model.generate(prompt, 20, temperature=0.9, top_k=5, top_p=0.9,
                           generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    other = model.generate(prompt, 20, temperature=0.9, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(runs[0], other)


def test_top_k_and_top_p_restrict_the_support():
    from nrgpt import sample_next

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    top1 = {sample_next(logits, top_k=1, generator=g).item() for _ in range(50)}
    assert top1 == {0}
    # top_p = 0.7: 0.5 < 0.7, 0.5 + 0.3 >= 0.7 -> tokens {0, 1}
    seen = {sample_next(logits, top_p=0.7, generator=g).item() for _ in range(300)}
    assert seen == {0, 1}


def test_parameter_counts_match_the_reference():
    shape = dict(n_embd=128, n_head=1, n_steps=8, vocab_size=65, block_size=256)
    assert build_model(ModelConfig.preset("NRGPT_H_FF2W", **shape)).num_params() == 214_338
    assert build_model(ModelConfig.preset("GPT_Rec_parallel", **shape)).num_params() == 247_617
    # by hand: NRGPT_H_FF1 drops W2 (128*512) and b2 (128) from FF2W
    assert build_model(ModelConfig.preset("NRGPT_H_FF1", **shape)).num_params() == 214_338 - 65_536 - 128


@pytest.mark.parametrize("cfg", [MODELS[0], MODELS[3], MODELS[4]], ids=IDS[:1] + IDS[3:5])
def test_energy_trajectory(cfg):
    model = random_model(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 7))
    traj = model.energy_trajectory(idx)
    s = cfg.n_steps
    assert traj.states.shape == (s + 1, 2, 7, cfg.n_embd)
    assert traj.energy.shape == traj.attn_energy.shape == traj.ff_energy.shape == (s + 1, 2, 7)
    torch.testing.assert_close(traj.energy, traj.attn_energy + traj.ff_energy)
    torch.testing.assert_close(traj.logits, model(idx)[0])
    g0 = model.block.norm(traj.states[0])
    torch.testing.assert_close(traj.energy[0], model.block.energy(g0)[0])
    longer = model.energy_trajectory(idx, n_steps=3 * s)
    assert longer.energy.shape[0] == 3 * s + 1
    torch.testing.assert_close(longer.states[: s + 1], traj.states)


@pytest.mark.parametrize(
    "overrides,field",
    [
        (dict(n_embd=30, n_head=4), "n_embd"),
        (dict(ff="ff3"), "model.ff"),
        (dict(norm="batchnorm"), "model.norm"),
        (dict(eta="adam"), "model.eta"),
        (dict(dropout=1.5), "model.dropout"),
        (dict(n_steps=0), "model.n_steps"),
        (dict(eta_init=-1.0), "model.eta_init"),
        (dict(n_head="2"), "model.n_head"),
        (dict(colour="red"), "colour"),
    ],
)
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_dict({**ModelConfig().to_dict(), **overrides})


def test_unknown_preset():
    with pytest.raises(ConfigError, match="NRGPT_H_FF2W"):
        ModelConfig.preset("NRGPT_XL")


def test_sequence_longer_than_block_is_an_error():
    model = random_model(MODELS[0])
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, SMALL["block_size"] + 1, dtype=torch.long))


@pytest.mark.parametrize("preset", ["NRGPT_H_FF2W", "NRGPT_P_FF1", "GPT", "GPT_Rec_parallel"])
def test_activation_checkpointing_gives_identical_gradients(preset):
    cfg = ModelConfig.preset(preset, **SMALL)
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.block_size))
    grads, reference = [], random_model(cfg)
    for ckpt in (False, True):
        model = build_model(cfg.replace(checkpoint_steps=ckpt))
        model.load_state_dict(reference.state_dict())
        model(idx, targets=idx)[1].backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("preset,mask", [("NRGPT_H_FF2W", "inclusive"), ("NRGPT_P_FF2W", "strict")])
def test_no_graph_breaks_for_torch_compile(preset, mask):
    import torch._dynamo as dynamo

    model = random_model(ModelConfig.preset(preset, **SMALL, mask=mask)).train()
    idx = torch.randint(0, SMALL["vocab_size"], (2, SMALL["block_size"]))
    explained = dynamo.explain(model)(idx, idx)
    assert explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.parametrize("preset", ["NRGPT_P_FF2W", "GPT_Rec_parallel"])
def test_compile_steps_one_graph_for_all_steps_and_same_results(preset):
    from torch._dynamo.testing import CompileCounter

    cfg = ModelConfig.preset(preset, **SMALL, eta_per_step=True) if preset.startswith("NRGPT") else \
        ModelConfig.preset(preset, **SMALL)
    eager, compiled = random_model(cfg).train(), build_model(cfg).train()
    compiled.load_state_dict(eager.state_dict())
    counter = CompileCounter()
    compiled.compile_steps(backend=counter)
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.block_size))
    grads = []
    for model in (eager, compiled):
        _, loss = model(idx, targets=idx)
        loss.backward()
        grads.append([p.grad for p in model.parameters()])
    assert counter.frame_count == 1  # one graph serves all n_steps steps
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    with torch.no_grad():  # cached decoding bypasses the compiled graph and gives the same tokens
        torch.manual_seed(0)
        out = compiled.eval().generate(idx[:1, :4], 6, greedy=True)
        assert torch.equal(out, eager.eval().generate(idx[:1, :4], 6, greedy=True))


@pytest.mark.parametrize("preset,mask", [("NRGPT_H_FF2W", "inclusive"), ("NRGPT_P_FF2W", "strict"),
                                         ("GPT_Rec_parallel", "inclusive")])
def test_compile_decode_one_graph_for_every_position_and_same_tokens(preset, mask):
    from torch._dynamo.testing import CompileCounter

    cfg = ModelConfig.preset(preset, **SMALL, mask=mask, grad_mode="exact") if preset.startswith("NRGPT") else \
        ModelConfig.preset(preset, **SMALL)
    model = random_model(cfg, seed=3)
    prompt = torch.randint(0, cfg.vocab_size, (1, 3))  # batch 1: (1, 1) views of idx have odd strides
    n_new = cfg.block_size + 4  # past the block: the window slides and the cache is rebuilt
    expected = model.generate(prompt, n_new, greedy=True)
    counter = CompileCounter()
    model.compile_decode(backend=counter)
    assert torch.equal(model.generate(prompt, n_new, greedy=True), expected)
    assert counter.frame_count == 1  # one graph for every position (the position is a tensor)


def test_compile_decode_inductor_gives_the_same_tokens():
    model = random_model(ModelConfig.preset("NRGPT_H_FF2W", **SMALL), seed=4)
    prompt = torch.randint(0, SMALL["vocab_size"], (2, 2))
    expected = model.generate(prompt, 8, greedy=True)
    model.compile_decode()
    assert torch.equal(model.generate(prompt, 8, greedy=True), expected)


def test_compile_steps_inductor_matches_eager():
    cfg = ModelConfig.preset("NRGPT_H_FF2W", **SMALL)
    eager, compiled = random_model(cfg), build_model(cfg).eval()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_steps()
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.block_size))
    torch.testing.assert_close(compiled(idx)[0], eager(idx)[0], rtol=1e-4, atol=1e-5)
