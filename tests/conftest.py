"""Shared test helpers."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from nrgpt.data import prepare_shakespeare_char
from nrgpt.runconfig import RunConfig, resolve_config

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NRGPT_SHARED_DIR", REPO.parent / "shared"))
FIXTURES = SHARED / "fixtures" / "reference-checkpoints"
WORDS = "the king and queen of a fair town shall speak to thee my lord good night sweet prince".split()

# A model and run small enough to train in about a second. float32, not 'auto': the results must not depend
# on whether the host multiplies bfloat16 in hardware ('auto' has its own test in test_train.py).
TINY = [
    "model.preset=NRGPT_H_FF2W", "model.n_embd=16", "model.n_head=1", "model.n_steps=2", "model.block_size=16",
    "train.batch_size=8", "train.max_iters=40", "train.warmup_iters=5", "train.lr=1e-2", "train.min_lr=1e-3",
    "train.eval_interval=10", "train.eval_iters=4", "log.interval=1", "log.progress=false", "system.device=cpu",
    "system.dtype=float32",
]


# ------------------------------------------------------------------------------- tiny data and runs


def make_text_data(out_dir: Path, n_lines: int = 1500) -> Path:
    """A small learnable character corpus (random sentences over a few words) as a prepared dataset."""
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))).capitalize() + "." for _ in range(n_lines)]
    source = out_dir.with_suffix(".txt")
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "not the usual Tiny Shakespeare"
        return prepare_shakespeare_char(out_dir, source=source)


def tiny_config(data_dir: Path, out_dir: Path, *overrides: str) -> RunConfig:
    return resolve_config(None, [*TINY, f"data.dir={data_dir}", f"out_dir={out_dir}", *overrides])


def tiny_args(data_dir: Path, out_dir: Path, *overrides: str) -> list[str]:
    """The same as command-line arguments."""
    return [a for item in [*TINY, f"data.dir={data_dir}", f"out_dir={out_dir}", *overrides] for a in ("--set", item)]


def run_nrgpt(*args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    """``python -m nrgpt ...`` in a subprocess (one CPU thread)."""
    return subprocess.run([sys.executable, "-m", "nrgpt", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, **kwargs)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def timeless_records(run_dir: Path) -> list[dict]:
    """``records`` without the fields that depend on the clock: what an exact resume must reproduce."""
    return [{k: v for k, v in r.items() if k not in ("elapsed", "tokens_per_s")} for r in records(run_dir)]


def train_one_and_two_processes(common: list[str], tmp_path: Path) -> tuple[list[dict], list[dict], str]:
    """``nrgpt train`` with ``common`` arguments in one process at batch 8 and under torchrun in two gloo
    processes at batch 4 each; returns both runs' metrics records and the two-process run's stdout, and
    checks that the two-process losses equal the one-process losses (to 1e-5)."""
    single = run_nrgpt("train", *common, "--batch-size", "8", "--out-dir", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "nrgpt",
               "train", *common, "--batch-size", "4", "--out-dir", str(tmp_path / "two")]
    for attempt in range(2):
        ddp = subprocess.run(command + ["--overwrite"] * attempt, capture_output=True, text=True, cwd=REPO,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
        # Known and unexplained: about once in 20 full suites a gloo rank aborts in its first iterations
        # ("terminate called without an active exception", SIGABRT); it never repeated at once. Once more then.
        if ddp.returncode == 0 or "terminate called without an active exception" not in ddp.stderr:
            break
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = records(tmp_path / "one"), records(tmp_path / "two")
    for a, b in zip(one, two):
        for key in ("loss", "train_loss", "val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-5), (a["iter"], key)
    return one, two, ddp.stdout


def randomize(module: torch.nn.Module, std: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Add N(0, std) noise to every parameter so that every nonlinearity matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return module


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A small prepared character dataset (see ``make_text_data``), one per test module."""
    return make_text_data(tmp_path_factory.mktemp("data") / "text")


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread: tiny models run thousands of small ops, which a loaded machine's thread pool only
    slows down. Use it module-wide with ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def require(path: Path) -> Path:
    """``path``, which a test needs from ``../shared``: skip where there is no shared folder at all, fail where
    it is there but the file is missing (a broken fixture set must not pass as skipped)."""
    if not path.exists():
        if not SHARED.is_dir():
            pytest.skip(f"{SHARED} is not on this machine (set NRGPT_SHARED_DIR)")
        pytest.fail(f"{path} is missing from {SHARED}")
    return path


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A 1-layer GPT-2 with random weights and a word-level tokenizer, saved to a directory."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    words = "the cat sat on a mat dog ran today".split()
    vocab = {"[UNK]": 0, "<s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>")
    config = transformers.GPT2Config(
        vocab_size=len(vocab), n_positions=32, n_embd=16, n_layer=1, n_head=2, bos_token_id=1, eos_token_id=1
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)  # far from uniform predictions, so that weighting choices show
    model.eval()
    path = tmp_path_factory.mktemp("tiny-gpt2")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer, vocab, path
