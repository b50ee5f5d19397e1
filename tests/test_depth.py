"""Test-time depth: a recurrent model at k steps (full forward and cached decoding) against hand-built k-step
loops, the trained k against the ordinary evaluation, the ListOps groups on hand-counted samples, the deep
GPT's refusal, and ``nrgpt depth`` on tiny trained runs (with its section in ``nrgpt report``)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nrgpt import ModelConfig, build_model
from nrgpt.checkpoint import load_model, save_checkpoint
from nrgpt.cli import main as cli_main
from nrgpt.data import import_listops, load_meta
from nrgpt.data.listops import parse_sample, reduction_chain
from nrgpt.decoding import KVCache, greedy_continuations
from nrgpt.depth import AtSteps, default_steps, depth_curve, evaluate_at_steps
from nrgpt.errors import ConfigError
from nrgpt.evaluate import SplitWindows, listops_accuracy, load_listops_samples, score_continuation, split_loss
from nrgpt.report import write_report
from nrgpt.train import train

from .conftest import randomize, tiny_config

pytestmark = pytest.mark.usefixtures("single_thread")

# Hand-made samples and, counted by hand, their reduction steps (function nodes: each step of the chain
# evaluates one) and nesting depth.
LINES = [
    "max_10 ( 3 7 ) = 7",
    "max_10 ( add_10 ( 6 7 ) 2 ) = max_10 ( 3 2 ) = 3",
    "add_10 ( max_10 ( 1 2 ) min_10 ( 4 5 ) 3 ) = add_10 ( 2 min_10 ( 4 5 ) 3 ) = add_10 ( 2 4 3 ) = 9",
    "median_10 ( max_10 ( add_10 ( 5 8 ) 1 ) 4 6 ) = median_10 ( max_10 ( 3 1 ) 4 6 ) = median_10 ( 3 4 6 ) = 4",
    "add_10 ( 4 9 ) = 3",
    "max_10 ( min_10 ( 1 2 ) min_10 ( 3 4 ) min_10 ( 5 6 ) ) = max_10 ( 1 min_10 ( 3 4 ) min_10 ( 5 6 ) ) = "
    "max_10 ( 1 3 min_10 ( 5 6 ) ) = max_10 ( 1 3 5 ) = 5",
]
REDUCTIONS = [1, 2, 3, 3, 1, 4]
DEPTHS = [1, 2, 2, 3, 1, 2]


@pytest.fixture(scope="module")
def listops_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("listops")
    (tmp / "train.txt").write_text("".join(line + "\n" for line in LINES))
    (tmp / "test.txt").write_text("".join(line + "\n" for line in LINES))
    return import_listops(tmp / "data", tmp / "train.txt", tmp / "test.txt")


def tiny(preset: str, vocab_size: int = 13, block_size: int = 16, **overrides) -> nn.Module:
    cfg = ModelConfig.preset(preset, **{"vocab_size": vocab_size, "block_size": block_size, "n_embd": 16,
                                        "n_head": 2, "n_steps": 3, **overrides})
    torch.manual_seed(0)
    return randomize(build_model(cfg), std=0.2).double().eval()


def hand_logits(model: nn.Module, idx: torch.Tensor, k: int) -> torch.Tensor:
    """k steps written out: NRGPT x <- x - eta^(t) dE/dg (eq. 6, each block in turn; eta^(t) of the last
    trained step beyond them), the recurrent GPTs x <- block(x) k times."""
    x = model.embed(idx)
    for block in model.blocks:
        for t in range(k):
            if model.config.is_energy_model:
                x = x - block.eta(block.energy_grad(block.norm(x)), min(t, model.config.n_steps - 1))
            else:
                x = block(x)
    return model.lm_head(model.ln_f(x))


RECURRENT = [("NRGPT_P_FF2W", {"eta_per_step": True}), ("NRGPT_P_REC", {}), ("NRGPT_H_FF2W", {}),
             ("GPT_Rec", {}), ("GPT_Rec_parallel", {})]


@pytest.mark.parametrize("preset, overrides", RECURRENT, ids=[p for p, _ in RECURRENT])
def test_k_steps_are_a_hand_built_k_step_forward_full_and_cached(preset, overrides):
    model = tiny(preset, **overrides)
    idx = torch.randint(0, 13, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for k in (1, 3, 7):
            logits, loss = AtSteps(model, k)(idx, idx)
            assert torch.equal(logits, hand_logits(model, idx, k))
            assert loss == F.cross_entropy(logits.flatten(0, 1), idx.flatten())
        assert torch.equal(AtSteps(model)(idx)[0], model(idx)[0])  # default: the trained steps
        at, cache = AtSteps(model, 7), KVCache(16)  # 7 steps: cache slots beyond the trained ones
        last = [at.forward_cached(idx[:, :5], cache)]
        last += [at.forward_cached(idx[:, i:i + 1], cache) for i in range(5, 12)]
        torch.testing.assert_close(torch.stack(last, 1), at(idx)[0][:, 4:], rtol=0, atol=1e-12)


@pytest.mark.parametrize("preset, overrides", RECURRENT, ids=[p for p, _ in RECURRENT])
def test_generate_at_k_steps_is_greedy_decoding_by_full_recomputation(preset, overrides):
    model = tiny(preset, **overrides)
    idx = torch.randint(0, 13, (2, 4), generator=torch.Generator().manual_seed(2))
    expected = idx
    with torch.no_grad():
        for _ in range(20):  # past the block of 16: the window slides
            expected = torch.cat([expected, hand_logits(model, expected[:, -16:], 7)[:, -1:].argmax(-1)], 1)
    assert torch.equal(model.generate(idx, 20, greedy=True, n_steps=7), expected)


def hand_greedy(model: nn.Module, prompt: list[int], k: int, eos: int, budget: int) -> list[int]:
    """Greedy decoding by full recomputation of the hand-built k-step forward (at most ``budget`` tokens, and
    no more than the block holds)."""
    ids: list[int] = []
    for _ in range(min(budget, model.config.block_size - len(prompt) + 1)):
        nxt = int(hand_logits(model, torch.tensor([prompt + ids]), k)[0, -1].argmax())
        ids.append(nxt)
        if nxt == eos:
            break
    return ids


@pytest.mark.parametrize("preset", ["NRGPT_P_FF2W", "GPT_Rec_parallel"])
def test_listops_at_k_steps_is_hand_built_greedy_decoding(listops_dir, preset):
    samples = load_listops_samples(listops_dir)
    tok = samples.tokenizer
    model = tiny(preset, vocab_size=tok.vocab_size, block_size=64)
    prompts = [tok.encode(r["prompt"]) for r in samples.records]
    budget = max(len(r["line"].split()) + 1 for r in samples.records) - min(map(len, prompts))  # score_listops'
    eos = tok.decode([tok.eos_id])
    for k in (1, 5):
        with torch.no_grad():
            hand = [hand_greedy(model, p, k, tok.eos_id, budget) for p in prompts]
        assert greedy_continuations(AtSteps(model, k), prompts, tok.eos_id, budget) == hand
        correct = [score_continuation(tok.decode(c).split(), eos, r)["correct"] for c, r in zip(hand, samples.records)]
        assert evaluate_at_steps(model, samples, k)["accuracy"] == sum(correct) / len(correct)


def test_trained_steps_are_the_ordinary_evaluation(listops_dir, data_dir):
    samples = load_listops_samples(listops_dir)
    model = tiny("NRGPT_P_FF2W", vocab_size=samples.tokenizer.vocab_size, block_size=64)
    ordinary = listops_accuracy(model, listops_dir)
    point = evaluate_at_steps(model, samples, 3)
    assert point["accuracy"] == ordinary["overall"] and point["exact_chain"] == ordinary["exact_chain"]
    assert {k: g["accuracy"] for k, g in point["groups"]["per_op"].items()} == ordinary["per_op"]
    for preset in ("NRGPT_H_FF2W", "GPT_Rec_parallel"):
        lm = tiny(preset, vocab_size=load_meta(data_dir)["vocab_size"], block_size=32).float()
        loss, tokens = split_loss(lm, data_dir)
        windows = SplitWindows(data_dir, 32)
        at_trained = depth_curve(lm, windows, [1, 3])[1]
        assert at_trained == {"steps": 3, "loss": loss, "perplexity": math.exp(loss), "tokens": tokens}
        first = evaluate_at_steps(lm, SplitWindows(data_dir, 32, max_windows=5), 3)
        x, y = next(iter(SplitWindows(data_dir, 32, batch_size=5)))
        with torch.no_grad():
            assert first["tokens"] == y.numel() == 5 * 32 and first["loss"] == lm(x, y)[1].item()


class StepsStub(nn.Module):
    """A recurrent stand-in that answers a sample right (its whole chain) exactly when it runs at least as many
    steps as the sample has reduction steps (as counted by hand), else emits a wrong answer."""

    def __init__(self, samples, needed: list[int]):
        super().__init__()
        tok = samples.tokenizer
        self.config = ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_steps=2)
        self.scripts = [(tok.encode(r["prompt"]), tok.encode(r["target"] + " <eos>"), tok.encode("( <eos>"), n)
                        for r, n in zip(samples.records, needed)]
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward_cached(self, idx: torch.Tensor, cache: KVCache, n_steps: int | None = None) -> torch.Tensor:
        context, _ = cache.update(0, idx[:, None, :, None].double())
        cache.advance(idx.shape[1])
        logits = torch.zeros(idx.shape[0], self.config.vocab_size)
        for row, ids in enumerate(context[:, 0, :, 0].long().tolist()):
            prompt, right, wrong, needed = next(s for s in self.scripts if ids[: len(s[0])] == s[0])
            output = right if (n_steps or self.config.n_steps) >= needed else wrong
            logits[row, output[min(len(ids) - len(prompt), len(output) - 1)]] = 1.0
        return logits


def test_listops_groups_on_hand_counted_samples(listops_dir):
    samples = load_listops_samples(listops_dir)
    assert [r["line"] for r in samples.records] == [reduction_chain(parse_sample(line)[0]) for line in LINES]
    curve = depth_curve(StepsStub(samples, REDUCTIONS), samples, [1, 2, 3, 4])
    sizes = {"1": 2, "2": 1, "3": 2, "4": 1}
    for point in curve:
        k = point["steps"]
        assert point["accuracy"] == pytest.approx(sum(n <= k for n in REDUCTIONS) / 6)
        assert point["groups"]["per_reductions"] == {key: {"n": n, "accuracy": float(int(key) <= k)}
                                                     for key, n in sizes.items()}
        assert {key: g["n"] for key, g in point["groups"]["per_depth"].items()} == {"1": 2, "2": 3, "3": 1}
        depth_acc = {d: [n <= k for n, dd in zip(REDUCTIONS, DEPTHS) if dd == d] for d in (1, 2, 3)}
        assert {key: g["accuracy"] for key, g in point["groups"]["per_depth"].items()} == pytest.approx(
            {str(d): sum(v) / len(v) for d, v in depth_acc.items()})
        assert point["groups"]["per_op"]["median"] == {"n": 1, "accuracy": float(k >= 3)}
    assert curve[-1]["exact_chain"] == 1.0


def test_default_steps():
    assert default_steps(8) == [4, 6, 8, 12, 16, 24, 32, 48, 64]
    assert default_steps(1) == [1, 2, 3, 4, 6, 8]
    assert default_steps(3) == [2, 3, 5, 6, 9, 12, 18, 24]
    for n in (2, 5, 12, 40):
        steps = default_steps(n)
        assert n in steps and steps[0] == -(-n // 2) and steps[-1] == 8 * n and steps == sorted(set(steps))


def test_a_deep_gpt_has_no_depth_curve():
    model = tiny("GPT")
    with pytest.raises(ConfigError, match="need a recurrent model"):
        AtSteps(model, 4)
    idx = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="cannot run 4 steps"):
        model(idx, n_steps=4)
    assert torch.equal(model(idx, n_steps=3)[0], model(idx)[0])


# --------------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def runs(tmp_path_factory, listops_dir, data_dir):
    """Tiny trained runs: an NRGPT on the hand-made ListOps samples and a GPT_Rec_parallel on text."""
    tmp = tmp_path_factory.mktemp("runs")
    few = ("train.max_iters=3", "train.eval_iters=1", "model.block_size=64")
    train(tiny_config(listops_dir, tmp / "listops", *few), quiet=True)
    train(tiny_config(data_dir, tmp / "text", *few, "model.preset=GPT_Rec_parallel"), quiet=True)
    return tmp


def test_depth_command_on_listops(runs, listops_dir, capsys):
    run = runs / "listops"
    assert cli_main(["depth", str(run), "--steps", "4,1,2,2", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "| 2 (trained) |" in printed and "1 red. (n=2)" in printed and "4 red. (n=1)" in printed
    result = json.loads((run / "depth" / "depth.json").read_text())
    assert (result["kind"], result["metric"], result["trained_steps"], result["samples"]) == ("listops", "accuracy",
                                                                                              2, 6)
    assert [p["steps"] for p in result["points"]] == [1, 2, 4]
    trained = result["points"][1]
    assert trained["accuracy"] == listops_accuracy(load_model(run)[0], listops_dir)["overall"]
    assert {k: g["n"] for k, g in trained["groups"]["per_reductions"].items()} == {"1": 2, "2": 1, "3": 2, "4": 1}
    assert (run / "depth" / "depth.png").read_bytes().startswith(b"\x89PNG")
    _, md = write_report(run)
    assert "## Test-time depth" in md.read_text() and (run / "report_files" / "depth.png").is_file()


def test_depth_command_on_a_language_run(runs, data_dir, tmp_path, capsys):
    run, out = runs / "text", tmp_path / "curve"
    assert cli_main(["depth", str(run), "--out", str(out), "--device", "cpu"]) == 0
    assert "| 2 (trained) |" in capsys.readouterr().out
    result = json.loads((out / "depth.json").read_text())
    assert result["model"] == "rgpt_parallel" and [p["steps"] for p in result["points"]] == default_steps(2)
    loss, tokens = split_loss(load_model(run)[0], data_dir)
    assert result["points"][1] == {"steps": 2, "loss": loss, "perplexity": math.exp(loss), "tokens": tokens}
    assert (out / "depth.png").read_bytes().startswith(b"\x89PNG")
    assert cli_main(["depth", str(run), "--out", str(out), "--samples", "3", "--steps", "2", "--device", "cpu"]) == 0
    assert json.loads((out / "depth.json").read_text())["points"][0]["tokens"] == 3 * 64


def test_depth_command_refuses_a_deep_gpt(data_dir, tmp_path, capsys):
    vocab = load_meta(data_dir)["vocab_size"]
    config = tiny_config(data_dir, tmp_path / "deep", "model.preset=GPT", f"model.vocab_size={vocab}")
    model = build_model(config.model_config(vocab))
    save_checkpoint(tmp_path / "deep" / "best", model, config, {"iter": 0})
    assert cli_main(["depth", str(tmp_path / "deep"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "need a recurrent model" in err and not (tmp_path / "deep" / "depth").exists()
