"""Hugging Face export and lm-evaluation-harness: every nrgpt model a transformers causal LM, nothing lost.

Tiny models built here (random weights, so that every nonlinearity matters) or trained for a few
iterations: exported, loaded with ``AutoModelForCausalLM`` (the directory's own code), compared with nrgpt
(logits, greedy and seeded decoding, tokenizers), scored by lm-eval on the local tasks against ``nrgpt
eval``, loaded where nrgpt is not importable, and loaded back by nrgpt.
"""

from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nrgpt import cli
from nrgpt.checkpoint import load_model, save_checkpoint
from nrgpt.data import load_tokenizer, prepare_corpus, prepare_listops
from nrgpt.errors import CheckpointError
from nrgpt.model import build_model
from nrgpt.train import train

from .conftest import make_text_data, randomize, tiny_config

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationMixin, PreTrainedModel  # noqa: E402
from transformers.modeling_outputs import CausalLMOutputWithPast  # noqa: E402

from nrgpt.hf.export import export_model  # noqa: E402
from nrgpt.hf.modeling import NRGPTForCausalLM  # noqa: E402

# NRGPT: both masks, both attention forms, every FF energy, every norm and eta; and each baseline.
VARIANTS = {
    "P_FF1-strict-lowrank": ["model.preset=NRGPT_P_FF1"],
    "P_DAM-inclusive-lowrank": ["model.preset=NRGPT_P_DAM", "model.mask=inclusive"],
    "H_FF2W-inclusive-full": ["model.preset=NRGPT_H_FF2W"],
    "H_FF2-strict-full": ["model.preset=NRGPT_H_FF2", "model.mask=strict"],
    "P_PSD-no-norm": ["model.preset=NRGPT_P_PSD"],
    "gpt": ["model.preset=GPT"],
    "rgpt": ["model.preset=GPT_Rec"],
    "rgpt_parallel": ["model.preset=GPT_Rec_parallel"],
}
SHAPE = ["model.n_embd=16", "model.n_head=2", "model.n_steps=2", "model.block_size=16"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine, two OpenMP threads per process slow decoding 50x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def char_data(tmp_path_factory) -> Path:
    return make_text_data(tmp_path_factory.mktemp("hf-data") / "text", n_lines=300)


@pytest.fixture(scope="module")
def char_run(char_data, tmp_path_factory) -> Path:
    """A tiny NRGPT trained for a few iterations on the character corpus."""
    run = tmp_path_factory.mktemp("hf-runs") / "char"
    train(tiny_config(char_data, run, "train.max_iters=20"), quiet=True)
    return run


@pytest.fixture(scope="module")
def char_export(char_run, tmp_path_factory) -> Path:
    return export_model(char_run, tmp_path_factory.mktemp("hf-out") / "char")


@pytest.fixture(scope="module")
def bpe_data(char_data, tmp_path_factory) -> Path:
    """A byte-level BPE corpus of the same sentences."""
    tmp = tmp_path_factory.mktemp("hf-data")
    text = char_data.with_suffix(".txt").read_text(encoding="utf-8")
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in text.split(".")[:400] if t), encoding="utf-8")
    return prepare_corpus(tmp / "bpe", [corpus], tokenizer="bpe", vocab_size=300, val_fraction=0.1, workers=1)


@pytest.fixture(scope="module")
def listops_data(tmp_path_factory) -> Path:
    return prepare_listops(tmp_path_factory.mktemp("hf-data") / "listops", n_train=300, n_test=24)


@pytest.fixture(scope="module")
def listops_run(listops_data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("hf-runs") / "listops"
    train(tiny_config(listops_data, run, "train.max_iters=150", "model.block_size=64", "model.mask=strict"),
          quiet=True)  # long enough to end its answers with <eos>
    return run


def saved_model(variant: list[str], data_dir: Path, run: Path, vocab: int) -> torch.nn.Module:
    """A randomised model of ``variant`` saved as the best checkpoint of the run directory ``run``."""
    config = tiny_config(data_dir, run, *variant, *SHAPE, f"model.vocab_size={vocab}")
    model = randomize(build_model(config.model_config()), std=0.3).eval()
    save_checkpoint(run / "best", model, config, {"iter": 0, "val_loss": None})
    return model


def eval_output(capsys, *argv: str) -> dict[str, str]:
    """``nrgpt ARGV`` in this process; its printed ``key: value`` lines."""
    capsys.readouterr()
    assert cli.main(list(argv)) == 0
    lines = capsys.readouterr().out.splitlines()
    return dict(line.split(": ", 1) for line in lines if ": " in line)


# ------------------------------------------------------------------------------- export, load, decode


@pytest.mark.parametrize("variant", VARIANTS)
def test_export_from_pretrained_same_logits_and_greedy_tokens(variant, char_data, tmp_path):
    vocab = load_tokenizer(char_data).vocab_size
    model = saved_model(VARIANTS[variant], char_data, tmp_path / "run", vocab)
    out = export_model(tmp_path / "run", tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert isinstance(hf, PreTrainedModel) and isinstance(hf, GenerationMixin)
    idx = torch.randint(0, vocab, (3, 16), generator=torch.Generator().manual_seed(1))
    output = hf(idx)
    assert isinstance(output, CausalLMOutputWithPast)
    torch.testing.assert_close(output.logits, model(idx)[0], atol=1e-6, rtol=0)
    prompt = idx[:, :5]  # 5 + 20 tokens: the window slides past the block of 16
    assert torch.equal(hf.generate(prompt, max_new_tokens=20, do_sample=False), model.generate(prompt, 20, greedy=True))
    back, config = load_model(out)
    assert torch.equal(back(idx)[0], model(idx)[0]) and config.data.dir == str(char_data)


def test_generate_sampling_stopping_padding_and_cache(char_export, char_run):
    model, _ = load_model(char_run)
    hf = AutoModelForCausalLM.from_pretrained(char_export, trust_remote_code=True)
    prompt = torch.tensor([[3, 5, 8, 1], [7, 7, 2, 9]])

    torch.manual_seed(5)  # transformers samples from the global generator, nrgpt from a seeded one
    sampled = hf.generate(prompt, max_new_tokens=30, do_sample=True, temperature=0.8, top_k=5, top_p=1.0)
    expected = model.generate(prompt, 30, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(5))
    assert torch.equal(sampled, expected)

    first = hf(prompt, use_cache=True)  # by hand: a prefill, then two tokens on its cache
    more = hf(torch.tensor([[4, 6], [1, 2]]), cache=first.cache)
    whole = model(torch.cat([prompt, torch.tensor([[4, 6], [1, 2]])], 1))[0]
    torch.testing.assert_close(first.logits, whole[:, :4], atol=1e-6, rtol=0)
    torch.testing.assert_close(more.logits, whole[:, 4:], atol=1e-6, rtol=0)
    assert more.cache.seen == 6 and more.cache.groups[0].kv.length == 6

    greedy = model.generate(prompt[:1], 25, greedy=True)[0, 4:].tolist()
    stop = greedy[10]

    class StopAt(transformers.StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return input_ids[:, -1] == stop

    stopped = hf.generate(prompt[:1], max_new_tokens=25, do_sample=False, stopping_criteria=[StopAt()])
    assert stopped[0, 4:].tolist() == greedy[: greedy.index(stop) + 1]

    tok = AutoTokenizer.from_pretrained(char_export)
    texts = ["The", "Good", "A"]  # at most 4 + 12 tokens: within the block, so no window slides
    calls = []
    forward_cached = hf.model.forward_cached
    hf.model.forward_cached = lambda idx, cache: calls.append(idx.shape) or forward_cached(idx, cache)
    for side in ("left", "right"):
        batch = tok(texts, return_tensors="pt", padding=True, padding_side=side)
        out = hf.generate(**batch, max_new_tokens=12, do_sample=False)
        for text, row in zip(texts, out[:, -12:]):
            ids = torch.tensor([tok(text).input_ids])
            assert row.tolist() == model.generate(ids, 12, greedy=True)[0, -12:].tolist(), (side, text)
    # each row group is prefilled once, then fed one token per step (11 steps after the prefill's token)
    first = calls[:3 + 11 * 3]
    assert sorted(s[1] for s in first[:3]) == [1, 3, 4] and all(s[1] == 1 for s in first[3:])


def test_tokenizers_round_trip(char_export, char_data, listops_run, listops_data, bpe_data, tmp_path):
    text = char_data.with_suffix(".txt").read_text(encoding="utf-8")
    lines = (listops_data / "train.txt").read_text(encoding="utf-8").splitlines()
    listops_text = " <eos> ".join(lines[:50]) + " <eos>"
    bpe_tok = load_tokenizer(bpe_data)
    saved_model(VARIANTS["gpt"], bpe_data, tmp_path / "bpe-run", bpe_tok.vocab_size)
    exports = {"char": (char_export, char_data, text), "bpe": (export_model(tmp_path / "bpe-run", tmp_path / "bpe-hf"),
                                                              bpe_data, text + "\n<|endoftext|> Ünïcödé ☃"),
               "listops": (export_model(listops_run, tmp_path / "listops-hf"), listops_data, listops_text)}
    for kind, (out, data_dir, sample) in exports.items():
        hf_tok, nrgpt_tok = AutoTokenizer.from_pretrained(out), load_tokenizer(data_dir)
        if kind == "bpe":
            sample = sample.replace("<|endoftext|>", "")  # nrgpt encodes it as text, transformers as the token
        ids = hf_tok(sample).input_ids
        assert ids == nrgpt_tok.encode(sample), kind
        assert hf_tok.decode(ids) == sample, kind


def test_registered_classes_need_no_remote_code(char_export):
    model = AutoModelForCausalLM.from_pretrained(char_export)  # import nrgpt registered model_type 'nrgpt'
    assert type(model) is NRGPTForCausalLM


# ------------------------------------------------------------------------------------------ lm-eval


def test_harness_listops_accuracy_equals_nrgpt_eval(listops_run, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    report = tmp_path / "listops.json"
    eval_output(capsys, "eval", str(listops_run), "--task", "listops", "--json", str(report))
    expected = json.loads(report.read_text())
    eval_output(capsys, "eval", str(listops_run), "--harness", "listops", "--json", str(tmp_path / "harness.json"))
    harness = json.loads((tmp_path / "harness.json").read_text())
    assert expected["n"] == 24 and 0 < expected["terminated"] and 0 < expected["overall"]
    for metric, key in (("accuracy", "overall"), ("exact_chain", "exact_chain"), ("terminated", "terminated")):
        assert harness[f"nrgpt_listops_{metric}"] * 24 == pytest.approx(expected[key] * 24, abs=1e-9), metric


def test_listops_results_read_termination_from_the_budget(listops_run, tmp_path):
    """lm-eval removes <eos>: a generation shorter than nrgpt's budget ended with it, one as long did not."""
    import importlib.util

    from nrgpt.hf.harness import write_tasks

    write_tasks(export_model(listops_run, tmp_path / "hf"), None, tmp_path / "tasks")
    spec = importlib.util.spec_from_file_location("task_utils", tmp_path / "tasks" / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    doc = {"answer": "4", "target": "max_10 ( 1 4 ) = 4", "budget": 3}
    assert utils.listops_results(doc, ["= 4"]) == {"accuracy": 1.0, "exact_chain": 0.0, "terminated": 1.0}
    assert utils.listops_results(doc, ["= 7 = 4"])["accuracy"] == 0.0  # the budget ran out after '= 7 ='
    assert utils.listops_results(doc, ["( 1 = 4"]) == {"accuracy": 0.0, "exact_chain": 0.0, "terminated": 0.0}
    doc["budget"] = 8
    assert utils.listops_results(doc, ["max_10 ( 1 4 ) = 4"]) == {"accuracy": 1.0, "exact_chain": 1.0,
                                                                   "terminated": 1.0}
    assert utils.listops_results({**doc, "budget": 0}, [""])["terminated"] == 0.0


def test_harness_perplexity_equals_nrgpt_eval(char_run, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    expected = eval_output(capsys, "eval", str(char_run))  # perplexity printed to 4 decimals (about 1e-5 here)
    eval_output(capsys, "eval", str(char_run), "--harness", "perplexity", "--json", str(tmp_path / "harness.json"))
    harness = json.loads((tmp_path / "harness.json").read_text())
    ppl = harness["nrgpt_perplexity_token_perplexity"]
    assert ppl == pytest.approx(float(expected["perplexity"]), rel=1e-4)
    assert harness["nrgpt_perplexity_loss"] == pytest.approx(float(expected["val_loss"]), abs=1e-4)
    assert harness["nrgpt_perplexity_loss"] == pytest.approx(math.log(ppl), rel=1e-9)


def test_harness_rolling_loglikelihood_is_nrgpt_over_the_harness_windows(char_export, char_run, char_data):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    lm = HFLM(pretrained=str(char_export), trust_remote_code=True, device="cpu", batch_size=4)
    text = char_data.with_suffix(".txt").read_text(encoding="utf-8")[:100]
    request = Instance("loglikelihood_rolling", {}, (text,), 0)
    (total,) = lm.loglikelihood_rolling([request], disable_tqdm=True)
    model, _ = load_model(char_run)
    ids = load_tokenizer(char_data).encode(text)
    expected = 0.0
    for context, targets in map(make_disjoint_window, get_rolling_token_windows(ids, 0, 16, 1)):
        window = torch.tensor([(context + targets)[:-1]])  # the start token is read as token 0
        logp = model(window)[0].log_softmax(-1)[0, -len(targets):]
        expected += logp.gather(1, torch.tensor(targets)[:, None]).sum().item()
    assert total == pytest.approx(expected, rel=1e-5)


def test_exported_directory_works_without_nrgpt(char_export, char_run, tmp_path, capsys):
    """Load, decode, tokenize and run lm-eval's hf model on the perplexity task in a process that cannot
    import nrgpt."""
    pytest.importorskip("lm_eval")
    for path in char_export.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:  # siblings only: from .x import / from . import x
                for module in [node.module] if node.module else [alias.name for alias in node.names]:
                    assert (char_export / f"{module}.py").is_file(), (path.name, module)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                assert not any(n.split(".")[0] == "nrgpt" for n in names), path.name
    model, _ = load_model(char_run)
    idx = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    expected = {"logits": model(idx)[0].tolist(), "greedy": model.generate(idx[:, :3], 15, greedy=True).tolist()}
    from nrgpt.hf.harness import write_tasks

    write_tasks(char_export, None, tmp_path / "tasks")
    script = f"""
import json, sys
sys.modules["nrgpt"] = None  # any import of nrgpt fails
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
import lm_eval
from lm_eval.tasks import TaskManager
out = {str(char_export)!r}
model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
idx = torch.tensor({idx.tolist()})
text = "Good night sweet prince.\\nThe king and queen."
tasks = TaskManager(include_path={str(tmp_path / "tasks")!r}, include_defaults=False)
results = lm_eval.simple_evaluate(model="hf", model_args=dict(pretrained=out, trust_remote_code=True, device="cpu"),
                                  tasks=["nrgpt_perplexity"], task_manager=tasks, batch_size=16, bootstrap_iters=0)
model.save_pretrained({str(tmp_path / "resaved")!r})  # what push_to_hub uploads: the code is saved along
resaved = AutoModelForCausalLM.from_pretrained({str(tmp_path / "resaved")!r}, trust_remote_code=True)
assert torch.equal(resaved(idx).logits, model(idx).logits)
print(json.dumps({{"logits": model(idx).logits.tolist(), "greedy": model.generate(idx[:, :3], max_new_tokens=15,
                  do_sample=False).tolist(), "text": tok.decode(tok(text).input_ids) == text,
                  "ppl": results["results"]["nrgpt_perplexity"]["token_perplexity,none"]}}))
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
    proc = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    torch.testing.assert_close(torch.tensor(got["logits"]), torch.tensor(expected["logits"]), atol=1e-6, rtol=0)
    assert got["greedy"] == expected["greedy"] and got["text"]
    assert got["ppl"] == pytest.approx(float(eval_output(capsys, "eval", str(char_run))["perplexity"]), rel=1e-4)


# ------------------------------------------------------------------------------------ errors, the way back


def test_sample_from_exported_directory_equals_run(char_run, char_export, capsys):
    args = ["--prompt", "The king", "--max-new-tokens", "40", "--seed", "3"]
    capsys.readouterr()
    assert cli.main(["sample", str(char_run), *args]) == 0
    from_run = capsys.readouterr().out
    assert cli.main(["sample", str(char_export), *args]) == 0
    assert capsys.readouterr().out == from_run
    tok = AutoTokenizer.from_pretrained(char_export)
    hf = AutoModelForCausalLM.from_pretrained(char_export)
    torch.manual_seed(3)
    out = hf.generate(**tok(["The king"], return_tensors="pt"), max_new_tokens=40, do_sample=True, temperature=0.8,
                      top_k=0, top_p=1.0)
    assert tok.decode(out[0]) + "\n" == from_run


def test_eval_and_dynamics_accept_an_exported_directory(char_run, char_export, tmp_path, capsys):
    assert eval_output(capsys, "eval", str(char_export)) == eval_output(capsys, "eval", str(char_run))
    for path, out in ((char_run, "run"), (char_export, "export")):
        eval_output(capsys, "dynamics", str(path), "--prompt", "The king", "--steps", "3", "--out", str(tmp_path / out))
    run, exported = (json.loads((tmp_path / name / "summary.json").read_text()) for name in ("run", "export"))
    exported.pop("checkpoint"), run.pop("checkpoint")  # the paths differ; the dynamics do not
    assert exported == run


def test_corrupted_exported_directory_is_one_clear_error(char_export, tmp_path, capsys):
    import shutil

    def damaged(name: str, change) -> Path:
        path = tmp_path / name
        shutil.copytree(char_export, path)
        change(path)
        return path

    cases = {
        "truncated weights": damaged("a", lambda p: (p / "model.safetensors").write_bytes(
            (p / "model.safetensors").read_bytes()[:500])),
        "bad config JSON": damaged("b", lambda p: (p / "config.json").write_text("{not json")),
        "config and weights disagree": damaged("c", lambda p: (p / "config.json").write_text(
            (p / "config.json").read_text().replace('"n_embd": 16', '"n_embd": 32'))),
        "missing run record": damaged("d", lambda p: (p / "nrgpt_run.json").unlink()),
    }
    for case, path in cases.items():
        with pytest.raises(CheckpointError):
            load_model(path)
        capsys.readouterr()
        assert cli.main(["sample", str(path), "--max-new-tokens", "3"]) == 2, case
        err = capsys.readouterr().err
        assert err.startswith("nrgpt: error: ") and err.count("\n") == 1 and "Traceback" not in err, (case, err)
    with pytest.raises(Exception, match="safetensors|header|deserial|corrupt|invalid|Error"):
        AutoModelForCausalLM.from_pretrained(cases["truncated weights"], trust_remote_code=True)


def test_export_errors(char_data, tmp_path, capsys, monkeypatch):
    capsys.readouterr()
    assert cli.main(["export", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else
                        find_spec(name, *a))
    assert cli.main(["export", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert "pip install 'nrgpt[hf]'" in capsys.readouterr().err


def test_perplexity_documents_are_nrgpt_eval_windows(char_data, char_export, bpe_data, tmp_path):
    from nrgpt.data import DataError, TokenStream
    from nrgpt.hf.harness import perplexity_docs, write_tasks

    docs = perplexity_docs(char_data, 16)
    stream = TokenStream(char_data, "val")
    tok = load_tokenizer(char_data)
    n = len(stream)
    assert len(docs) == math.ceil((n - 1) / 16) and sum(d["targets"] for d in docs) == n - 1
    text = tok.decode(stream.tokens[:n].tolist())
    for k, doc in enumerate(docs):
        assert doc["context"] == text[16 * k] + "\u2060"  # WORD JOINER: lm-eval keeps a whitespace context
        assert doc["continuation"] == text[16 * k + 1: 16 * k + 1 + doc["targets"]]
    with pytest.raises(DataError, match="'bpe' dataset"):
        write_tasks(char_export, bpe_data, tmp_path / "tasks")
