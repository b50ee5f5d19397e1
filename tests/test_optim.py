"""nrgpt.optim: Muon's orthogonalisation and update (M) against values worked out by hand, the parameters it
takes, and exact resumption of a Muon run."""

from __future__ import annotations

import math

import pytest
import torch

from nrgpt import ModelConfig, build_model, checkpoint
from nrgpt.errors import CheckpointError, ConfigError
from nrgpt.optim import NS_COEFFICIENTS, NS_STEPS, MuonAdamW, hidden_matrices, make_optimizer, orthogonalize
from nrgpt.runconfig import TrainConfig, resolve_config
from nrgpt.train import train

from .conftest import records, timeless_records, tiny_config


def quintic(s: torch.Tensor) -> torch.Tensor:
    """NS_5 on the singular values s of M, worked out as the scalar iteration x <- a x + b x^3 + c x^5."""
    a, b, c = NS_COEFFICIENTS
    x = s / (s.norm() + 1e-7)  # ||M||_F = ||s||_2, and orthogonalize's eps
    for _ in range(NS_STEPS):
        x = a * x + b * x**3 + c * x**5
    return x


def orthonormal(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))[0]


@pytest.mark.parametrize("shape", [(5, 9), (9, 5), (3, 6, 6)], ids=["wide", "tall", "stack"])
def test_orthogonalize_maps_each_singular_value_by_the_quintic_and_keeps_the_vectors(shape):
    gen = torch.Generator().manual_seed(0)
    *stack, m, n = shape
    k = min(m, n)
    count = stack[0] if stack else 1
    u = torch.stack([orthonormal(m, k, gen) for _ in range(count)])
    v = torch.stack([orthonormal(n, k, gen) for _ in range(count)])
    s = torch.rand(count, k, generator=gen, dtype=torch.float64) * 3 + 0.05
    mat = (u * s[:, None, :]) @ v.mT
    want = torch.stack([(u[i] * quintic(s[i])) @ v[i].T for i in range(count)])
    if not stack:
        mat, want = mat[0], want[0]
    got = orthogonalize(mat)
    assert got.shape == mat.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    values = torch.linalg.svdvals(got)
    assert values.min() > 0.65 and values.max() < 1.25  # about U V^T


def test_muon_adamw_steps_are_equation_m_and_adamw_by_hand():
    """Two steps: the matrix follows (M) with Nesterov momentum, worked out here in float64; the vector
    follows torch's AdamW exactly; both get their gradients back after the step."""
    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    b0 = torch.randn(6, generator=gen, dtype=torch.float64)
    grads = [(torch.randn(4, 6, generator=gen, dtype=torch.float64), torch.randn(6, generator=gen, dtype=torch.float64))
             for _ in range(2)]
    lr, wd, mu = 0.02, 0.1, 0.9
    w, b, b_ref = (torch.nn.Parameter(t.clone()) for t in (w0, b0, b0))
    opt = MuonAdamW([{"params": [w], "weight_decay": wd, "muon": True, "momentum": mu},
                     {"params": [b], "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.99))
    ref = torch.optim.AdamW([b_ref], lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    want, buf = w0.clone(), torch.zeros_like(w0)
    for gw, gb in grads:
        w.grad, b.grad, b_ref.grad = gw.clone(), gb.clone(), gb.clone()
        opt.step()
        ref.step()
        buf = mu * buf + gw
        want = want * (1 - lr * wd) - lr * 0.2 * math.sqrt(6) * orthogonalize(gw + mu * buf)
        torch.testing.assert_close(w.detach(), want, rtol=0, atol=1e-12)
        assert torch.equal(b.detach(), b_ref.detach())
        assert torch.equal(w.grad, gw) and torch.equal(b.grad, gb)
    torch.testing.assert_close(opt.state[w]["momentum_buffer"], buf, rtol=0, atol=1e-12)


@pytest.mark.parametrize("preset", ["NRGPT_H_FF1", "GPT_Rec_parallel"])
def test_muon_takes_the_hidden_matrices_and_adamw_the_rest(preset):
    model = build_model(ModelConfig.preset(preset, n_embd=16, n_head=2, n_steps=2, block_size=8))
    names = {id(p): n for n, p in model.named_parameters()}
    hidden = {names[id(p)] for p in hidden_matrices(model)}
    matrices = {n for n, p in model.named_parameters() if p.dim() >= 2}
    assert hidden == matrices - {"tok_emb.weight", "pos_emb.weight", "lm_head.weight"} and hidden
    opt = make_optimizer(model, TrainConfig(optimizer="muon", weight_decay=0.1), torch.device("cpu"))
    assert isinstance(opt, MuonAdamW)
    muon, decay, no_decay = opt.param_groups
    assert muon["muon"] and {names[id(p)] for p in muon["params"]} == hidden and muon["weight_decay"] == 0.1
    assert {names[id(p)] for p in decay["params"]} == {"tok_emb.weight", "pos_emb.weight", "lm_head.weight"}
    assert all(p.dim() < 2 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert type(make_optimizer(model, TrainConfig(), torch.device("cpu"))) is torch.optim.AdamW


def test_an_unknown_optimizer_is_one_clear_error():
    with pytest.raises(ConfigError, match="train.optimizer.*adamw.*muon"):
        resolve_config(None, ["train.optimizer=sgd"])


def test_a_muon_run_learns_and_resumes_exactly(data_dir, tmp_path):
    """N iterations straight, or N/2 then a resume to N: the same losses and evaluations, bitwise the same
    weights (the momentum buffers are in the checkpoint)."""
    common = ("train.optimizer=muon", "train.lr=1e-2", "train.schedule=constant", "train.eval_interval=6",
              "train.eval_iters=2", "model.dropout=0.1")
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    train(tiny_config(data_dir, straight, "train.max_iters=12", *common), quiet=True)
    train(tiny_config(data_dir, halves, "train.max_iters=6", *common), quiet=True)
    train(tiny_config(data_dir, halves, "train.max_iters=12", *common), resume=True, quiet=True)
    assert timeless_records(halves) == timeless_records(straight)
    evals = [r["val_loss"] for r in records(straight) if "val_loss" in r]
    assert evals[-1] < evals[0] - 0.3
    a, b = checkpoint.load_weights(straight / "last"), checkpoint.load_weights(halves / "last")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_resuming_with_the_other_optimizer_is_one_clear_error_and_keeps_the_run(data_dir, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(data_dir, run, "train.max_iters=2"), quiet=True)
    before = checkpoint.load_weights(run / "last")
    with pytest.raises(CheckpointError, match="'adamw', this run has 'muon': resume with --optimizer adamw"):
        train(tiny_config(data_dir, run, "train.max_iters=4", "train.optimizer=muon"), resume=True, quiet=True)
    after = checkpoint.load_weights(run / "last")
    assert checkpoint.read_info(run / "last")["iter"] == 2 and all(torch.equal(before[n], after[n]) for n in before)
