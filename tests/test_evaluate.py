"""ListOps accuracy, batched greedy decoding, the over-fitting curve, generation quality and ``nrgpt eval``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from nrgpt import ModelConfig, build_model
from nrgpt.checkpoint import save_checkpoint
from nrgpt.cli import main as cli_main
from nrgpt.data import import_listops, load_tokenizer
from nrgpt.data.tokenizers import CharTokenizer
from nrgpt.decoding import KVCache
from nrgpt.evaluate import (
    LISTOPS_GROUPS,
    _grouped,
    generation_quality_for_model,
    greedy_continuations,
    listops_accuracy,
    load_listops_samples,
    overfitting_curve,
)
from nrgpt.metrics import distinct_n, pairwise_cosine_mean
from nrgpt.runconfig import DataConfig, RunConfig

from .conftest import randomize

# Six samples (root op; ops used; depth; held-out?) and what the stub model emits for each, scored by hand:
#   1 max; max; 1; no          "7 <eos>"                        correct, exact chain
#   2 add; add; 1; no          "4 <eos>"                        wrong
#   3 median; max,median; 2; yes  "median_10 ( 1 2 5 ) = 5 <eos>"  correct answer, wrong chain
#   4 max; add,max; 2; no      the target                       correct, exact chain
#   5 add; add,median; 2; yes  the target, then 9 9 9 ...       never terminates: wrong
#   6 median; median; 1; no    "4 = 4 <eos>"                    correct answer, wrong chain
LINES = [
    "max_10 ( 3 7 ) = 7",
    "add_10 ( 4 9 ) = 3",
    "median_10 ( 1 max_10 ( 2 8 ) 5 ) = median_10 ( 1 8 5 ) = 5",
    "max_10 ( add_10 ( 6 7 ) 2 ) = max_10 ( 3 2 ) = 3",
    "add_10 ( median_10 ( 4 1 9 ) 5 ) = add_10 ( 4 5 ) = 9",
    "median_10 ( 2 6 4 ) = 4",
]
STUB_OUTPUT = [
    "7 <eos>",
    "4 <eos>",
    "median_10 ( 1 2 5 ) = 5 <eos>",
    "max_10 ( 3 2 ) = 3 <eos>",
    "add_10 ( 4 5 ) = 9" + " 9" * 60,
    "4 = 4 <eos>",
]
HELDOUT = [[], [], [[2, 8]], [], [[4, 1, 9]], []]

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def listops_dir(tmp_path_factory) -> Path:
    """The six samples as a prepared ListOps dataset, with hand-set held-out tuples."""
    tmp = tmp_path_factory.mktemp("listops")
    (tmp / "train.txt").write_text("".join(line + "\n" for line in LINES[:2]))
    (tmp / "test.txt").write_text("".join(line + "\n" for line in LINES))
    out = import_listops(tmp / "data", tmp / "train.txt", tmp / "test.txt")
    records = [json.loads(line) for line in (out / "test.jsonl").read_text().splitlines()]
    for record, held in zip(records, HELDOUT):
        record["heldout"] = held
    (out / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return out


class StubModel(nn.Module):
    """Emits a scripted continuation for each known prompt (repeating its last token past the end). The
    context is kept in the real KVCache (token ids stored as one-dimensional 'keys')."""

    def __init__(self, tokenizer, prompts: list[str], outputs: list[str], block_size: int = 128):
        super().__init__()
        self.config = ModelConfig(vocab_size=tokenizer.vocab_size, block_size=block_size)
        self.scripts = [(tokenizer.encode(p), tokenizer.encode(o)) for p, o in zip(prompts, outputs)]
        self.dummy = nn.Parameter(torch.zeros(()))
        self.calls = []

    def forward_cached(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        context, _ = cache.update(0, idx[:, None, :, None].double())
        cache.advance(idx.shape[1])
        self.calls.append(tuple(idx.shape))
        logits = torch.zeros(idx.shape[0], self.config.vocab_size)
        for row, ids in enumerate(context[:, 0, :, 0].long().tolist()):
            prompt, output = next(s for s in self.scripts if ids[: len(s[0])] == s[0])
            logits[row, output[min(len(ids) - len(prompt), len(output) - 1)]] = 1.0
        return logits


@pytest.fixture(scope="module")
def stub(listops_dir) -> StubModel:
    samples = load_listops_samples(listops_dir)
    return StubModel(samples.tokenizer, [r["prompt"] for r in samples.records], STUB_OUTPUT)


@pytest.mark.parametrize("batch_size", [1, 4, 64])
def test_listops_accuracy_of_a_scripted_model(stub, listops_dir, batch_size):
    r = listops_accuracy(stub, listops_dir, batch_size=batch_size, return_predictions=True)
    assert r["n"] == 6
    assert r["overall"] == pytest.approx(4 / 6)  # samples 1, 3, 4, 6
    assert r["exact_chain"] == pytest.approx(2 / 6)  # samples 1, 4
    assert r["terminated"] == pytest.approx(5 / 6)  # all but 5
    assert r["per_op"] == pytest.approx({"add": 0.0, "max": 1.0, "median": 1.0})
    assert r["per_op_present"] == pytest.approx({"add": 1 / 3, "max": 1.0, "median": 2 / 3})
    assert r["per_depth"] == pytest.approx({"1": 2 / 3, "2": 2 / 3})
    assert (r["heldout"], r["n_heldout"]) == (pytest.approx(1 / 2), 2)  # samples 3 (right), 5 (wrong)
    assert (r["in_distribution"], r["n_in_distribution"]) == (pytest.approx(3 / 4), 4)
    # budget: longest sample (3: 19 tokens) + <eos> - shortest prompt (1 and 2: 6 tokens)
    assert r["max_new_tokens"] == 20 - 6
    assert [p["answer"] for p in r["predictions"]] == ["7", "4", "5", "3", None, "4"]
    assert len(r["predictions"][4]["continuation"].split()) == 14
    assert r["samples_per_s"] > 0


def test_listops_groups_are_in_numeric_order():
    """Reduction counts and depths sort as numbers ('2' before '10'); op names after them, alphabetically."""
    scored = [({"n_funcs": n, "line": "x"}, {"correct": n % 2 == 0}) for n in (10, 2, 1, 10)]
    groups = _grouped(scored, LISTOPS_GROUPS["per_reductions"])
    assert list(groups) == ["1", "2", "10"] and groups["10"] == [True, True] and groups["1"] == [False]
    mixed = _grouped([({"ops": ["SM", "3", "MAX"]}, {"correct": True})], LISTOPS_GROUPS["per_op_present"])
    assert list(mixed) == ["3", "MAX", "SM"]


def test_listops_batches_group_equal_length_prompts(stub, listops_dir):
    stub.calls.clear()
    listops_accuracy(stub, listops_dir, batch_size=64)
    prefills = sorted(shape for shape in stub.calls if shape[1] > 1)
    # prompt lengths: 6 (samples 1, 2), 7 (6), 10 (4), 11 (3, 5)
    assert prefills == [(1, 7), (1, 10), (2, 6), (2, 11)]


def test_listops_max_samples_and_train_split(stub, listops_dir):
    assert listops_accuracy(stub, listops_dir, max_samples=2)["overall"] == pytest.approx(1 / 2)
    train = listops_accuracy(stub, listops_dir, split="train")
    assert train["n"] == 2 and train["heldout"] is None  # imported data: held-out tuples unknown


def _tiny_model(kind: str, vocab: int, seed: int = 0) -> nn.Module:
    preset = {"nrgpt": "NRGPT_P_FF2W", "nrgpt_ref": "NRGPT_H_FF2W", "rgpt_parallel": "GPT_Rec_parallel"}[kind]
    torch.manual_seed(seed)
    cfg = ModelConfig.preset(preset, vocab_size=vocab, block_size=24, n_embd=16, n_head=2, n_steps=3)
    return randomize(build_model(cfg), std=0.3, seed=seed).double().eval()


@pytest.mark.parametrize("kind", ["nrgpt", "nrgpt_ref", "rgpt_parallel"])
def test_batched_greedy_decoding_equals_one_by_one_and_generate(kind):
    model = _tiny_model(kind, vocab=11)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 11, (n,), generator=g).tolist() for n in (3, 5, 3, 7, 5, 3, 24, 23)]
    no_eos = greedy_continuations(model, prompts, eos_id=None, max_new_tokens=9)
    assert [len(out) for out in no_eos] == [9] * 6 + [1, 2]  # the block (24) bounds the last two
    eos = no_eos[0][2]  # so that some rows stop early
    batched = greedy_continuations(model, prompts, eos_id=eos, max_new_tokens=9, batch_size=16)
    single = [greedy_continuations(model, [p], eos_id=eos, max_new_tokens=9)[0] for p in prompts]
    assert batched == single
    assert batched == [out[: out.index(eos) + 1] if eos in out else out for out in no_eos]
    for prompt, out in zip(prompts[:6], no_eos):
        assert out == model.generate(torch.tensor([prompt]), 9, greedy=True)[0, len(prompt):].tolist()
    assert len(batched[0]) <= 3


def test_tiny_real_model_on_listops(listops_dir):
    tok = load_tokenizer(listops_dir)
    model = _tiny_model("nrgpt", tok.vocab_size)
    one = listops_accuracy(model, listops_dir, batch_size=1, return_predictions=True)
    many = listops_accuracy(model, listops_dir, batch_size=64, return_predictions=True)
    assert one["predictions"] == many["predictions"]


def test_overfitting_curve(tmp_path):
    records = [
        {"iter": 0, "train_loss": 3.0, "val_loss": 3.1},
        {"iter": 10, "loss": 2.5, "lr": 1e-3},
        {"iter": 20, "loss": 2.0, "lr": 1e-3},
        {"iter": 20, "train_loss": 2.0, "val_loss": 2.4},
        {"iter": 40, "train_loss": 1.0, "val_loss": 2.6},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    curve = overfitting_curve(tmp_path)
    assert curve["iter"] == [0, 20, 40]
    assert curve["train_loss"] == [3.0, 2.0, 1.0]
    assert curve["val_loss"] == [3.1, 2.4, 2.6]
    assert curve["gap"] == pytest.approx([0.1, 0.4, 1.6])


class LetterCounts:
    """A stand-in sentence embedder: letter counts."""

    def encode(self, texts):
        return np.array([[t.count(c) + 1.0 for c in "abcdefghij"] for t in texts])


def test_generation_quality_for_model():
    tok = CharTokenizer(list(" abcdefghij"))
    model = _tiny_model("nrgpt", tok.vocab_size).float()
    q = generation_quality_for_model(model, tok, n_samples=3, max_new_tokens=12, prompt="ab", seed=3,
                                     sbert_model=LetterCounts())
    assert len(q["texts"]) == 3 and all(len(t) == 12 for t in q["texts"])  # the prompt is removed
    assert q["distinct_1"] == distinct_n(q["texts"], 1) and q["n_texts"] == 3
    assert q["settings"]["seed"] == 3
    assert q["apcs"] == pytest.approx(pairwise_cosine_mean(LetterCounts().encode(q["texts"])))
    again = generation_quality_for_model(model, tok, n_samples=3, max_new_tokens=12, prompt="ab", seed=3,
                                         sbert_model=LetterCounts())
    assert again["texts"] == q["texts"]


def _saved_run(listops_dir: Path, run_dir: Path) -> nn.Module:
    """A tiny NRGPT saved as the best checkpoint of a run on the ListOps data; returns the model."""
    tok = load_tokenizer(listops_dir)
    model = _tiny_model("nrgpt", tok.vocab_size).float()
    config = RunConfig(out_dir=str(run_dir), data=DataConfig(dir=str(listops_dir)),
                       model=ModelConfig.preset("NRGPT_P_FF2W", vocab_size=tok.vocab_size, block_size=24, n_embd=16,
                                                n_head=2, n_steps=3))
    save_checkpoint(run_dir / "best", model, config, {"iter": 0})
    return model


def test_eval_command_listops(listops_dir, tmp_path, capsys):
    model = _saved_run(listops_dir, tmp_path / "run")
    out = tmp_path / "acc.json"
    assert cli_main(["eval", str(tmp_path / "run"), "--task", "listops", "--device", "cpu", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["n"] == 6 and f"overall: {saved['overall']:.4f}" in printed and "per_op_max" in printed
    assert saved == {**listops_accuracy(model, listops_dir), "seconds": saved["seconds"],
                     "samples_per_s": saved["samples_per_s"]}


def test_eval_command_quality_with_a_reference_lm(listops_dir, tiny_lm, tmp_path, capsys):
    from nrgpt.metrics import reference_perplexity

    _saved_run(listops_dir, tmp_path / "run")
    lm_path = str(tiny_lm[3])
    out = tmp_path / "quality.json"
    args = ["eval", str(tmp_path / "run"), "--task", "quality", "--device", "cpu", "--num-samples", "2",
            "--max-new-tokens", "10", "--json", str(out)]
    assert cli_main([*args, "--reference-lm", lm_path]) == 0
    saved = json.loads(out.read_text())
    assert "perplexity" not in saved["missing"] and saved["perplexity"] > 1.0
    assert saved["perplexity"] == pytest.approx(reference_perplexity(saved["texts"], lm_path), rel=1e-6)
    out.unlink()
    capsys.readouterr()
    assert cli_main([*args, "--reference-lm", str(tmp_path / "no-such-model")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--reference-lm" in err[0] and not out.exists()  # nothing sampled, nothing written
