"""Tiny Shakespeare, corpora (char / bpe / gpt2), the raw-file search path, meta.json and TokenStream."""

from __future__ import annotations

import io
import json
import random
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from nrgpt.data import (
    DataError,
    TokenStream,
    find_raw_file,
    load_meta,
    load_tokenizer,
    prepare_corpus,
    prepare_shakespeare_char,
)
from nrgpt.data import text as text_module
from nrgpt.data.stream import token_dtype, write_meta, write_tokens
from nrgpt.data.tokenizers import EOS_TEXT, GPT2Tokenizer

from .conftest import SHARED, require

SHAKESPEARE = SHARED / "data" / "tinyshakespeare.txt"
WORDS = "the a of to and thou thee art king queen crown sword night day love death fair foul my lord good".split()
JSONL_DOCS = ["Ünïcödé: naïve café — ok", "two\nlines  with  spaces ", '{"json": "inside"}', "tab\there"]


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory):
    return prepare_shakespeare_char(tmp_path_factory.mktemp("shakespeare"), require(SHAKESPEARE))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A few KB of text: 30 paragraphs in a .txt (documents split at blank lines) and 4 JSONL documents."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    paragraphs = []
    for _ in range(30):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(rng.randint(1, 4))]
        paragraphs.append("\n".join(lines))
    (root / "a.txt").write_text("\n\n".join(paragraphs[:20]) + "\n\n\n   \n" + "\n\n".join(paragraphs[20:]) + "\n")
    (root / "b.jsonl").write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(JSONL_DOCS))
                                  + "\n" + json.dumps({"body": ""}) + "\n")
    return root, paragraphs + JSONL_DOCS


def tokens(data_dir, split):
    return np.asarray(TokenStream(data_dir, split).tokens)


def make_stream(tmp_path, train, val=(0, 1), dtype="uint16") -> Path:
    write_meta(tmp_path, {"kind": "char", "vocab_size": 1000, "dtype": dtype, "eos_id": None,
                          "train_tokens": write_tokens(tmp_path / "train.bin", [np.asarray(train)], dtype),
                          "val_tokens": write_tokens(tmp_path / "val.bin", [np.asarray(val)], dtype), "source": "test"})
    return tmp_path


# ----------------------------------------------------------------------------------------------- Shakespeare


def test_shakespeare_splits_and_vocabulary(shakespeare):
    meta = load_meta(shakespeare)
    assert meta["kind"] == "char" and meta["vocab_size"] == 65 and meta["eos_id"] is None
    assert meta["dtype"] == "uint16" and meta["md5"] == "6fb458f1232090904fb40fe944165e91"
    assert (meta["train_tokens"], meta["val_tokens"]) == (1_003_854, 111_540)
    text = SHAKESPEARE.read_text()
    vocab = json.loads((shakespeare / "vocab.json").read_text())
    assert vocab == sorted(set(text)) and vocab[:3] == ["\n", " ", "!"]
    tok = load_tokenizer(shakespeare)
    assert tok.decode(tokens(shakespeare, "train")[:14]) == "First Citizen:"
    assert tok.decode(tokens(shakespeare, "val")) == text[1_003_854:]
    assert len(TokenStream(shakespeare, "train")) == 1_003_854


def test_shakespeare_tokenizer(shakespeare):
    tok = load_tokenizer(shakespeare)
    s = "ROMEO:\nWhat's in a name? That which we call a rose, 3 $&!"
    ids = tok.encode(s)
    assert len(ids) == len(s) and tok.decode(ids) == s
    assert tok.encode("a") == [39] and tok.encode("\n ") == [0, 1]
    with pytest.raises(DataError, match="characters not in the vocabulary: '£', 'é'$"):
        tok.encode("café £3")  # of the digits only 3 occurs in Shakespeare
    with pytest.raises(DataError, match="outside the vocabulary of size 65: 65"):
        tok.decode([3, 65])


def test_shakespeare_found_on_search_path(tmp_path, monkeypatch):
    require(SHAKESPEARE)
    monkeypatch.setenv("NRGPT_DATA_DIR", str(SHAKESPEARE.parent))
    out = prepare_shakespeare_char(tmp_path / "out")
    assert load_meta(out)["source"] == str(SHAKESPEARE.parent / "tinyshakespeare.txt")


def test_other_text_warns_and_splits_90_10(tmp_path):
    (tmp_path / "small.txt").write_text("abcdefghij" * 10 + "zz")
    with pytest.warns(UserWarning, match="not the usual Tiny Shakespeare .102 characters"):
        out = prepare_shakespeare_char(tmp_path / "out", tmp_path / "small.txt")
    meta = load_meta(out)
    assert (meta["vocab_size"], meta["train_tokens"], meta["val_tokens"]) == (11, 91, 11)


def test_train_fraction_keeps_the_start_of_every_block_of_the_training_split(shakespeare, tmp_path, capsys):
    from nrgpt import cli

    out = tmp_path / "tenth"
    assert cli.main(["prepare", "shakespeare", "--source", str(require(SHAKESPEARE)), "--train-fraction", "0.1",
                     "--out", str(out)]) == 0
    # 1,003,854 training characters: 100 whole blocks of 10,000 and one of 3,854, the first 1,000 of each
    assert "101,000 train and 111,540 val tokens" in capsys.readouterr().out
    meta, full = load_meta(out), load_meta(shakespeare)
    assert (meta["train_tokens"], meta["val_tokens"], meta["train_fraction"]) == (101_000, 111_540, 0.1)
    assert "train_fraction" not in full and meta["vocab_size"] == full["vocab_size"] == 65
    assert (out / "vocab.json").read_text() == (shakespeare / "vocab.json").read_text()
    whole = tokens(shakespeare, "train")
    assert np.array_equal(tokens(out, "train"), whole[np.arange(len(whole)) % 10_000 < 1_000])
    assert np.array_equal(tokens(out, "val"), tokens(shakespeare, "val"))
    for bad in (0.0, 1.5):
        with pytest.raises(DataError, match=r"train_fraction = .* in \(0, 1\]"):
            prepare_shakespeare_char(tmp_path / "bad", require(SHAKESPEARE), train_fraction=bad)
    with pytest.raises(DataError, match="keeps no character of each 10,000-character block .* at least 0.0001"):
        prepare_shakespeare_char(tmp_path / "bad", require(SHAKESPEARE), train_fraction=5e-5)
    with pytest.raises(SystemExit) as stop:
        cli.main(["prepare", "shakespeare", "--train-fraction", "0", "--out", str(tmp_path / "bad")])
    assert stop.value.code == 2
    assert "--train-fraction: 0 is out of range: use a number > 0 and <= 1" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_find_raw_file_order(tmp_path, monkeypatch):
    env, cwd = tmp_path / "env", tmp_path / "project"
    for d in (env, cwd / "data" / "raw", tmp_path / "shared" / "data"):
        d.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("NRGPT_DATA_DIR", raising=False)
    assert find_raw_file("x.txt") is None
    (tmp_path / "shared" / "data" / "x.txt").write_text("shared")
    assert find_raw_file("x.txt").read_text() == "shared"
    (cwd / "data" / "raw" / "x.txt").write_text("raw")
    assert find_raw_file("x.txt").read_text() == "raw"
    monkeypatch.setenv("NRGPT_DATA_DIR", str(env))
    assert find_raw_file("x.txt").read_text() == "raw"
    (env / "x.txt").write_text("env")
    assert find_raw_file("x.txt") == env / "x.txt"


def test_download_saved_to_data_dir_or_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NRGPT_DATA_DIR", str(tmp_path / "raw"))

    def offline(url, timeout):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match="tinyshakespeare.txt is not in .* put the file in one of those"):
        prepare_shakespeare_char(tmp_path / "out")
    assert not (tmp_path / "out" / "meta.json").exists()

    def online(url, timeout):
        assert url == text_module.SHAKESPEARE_URL and timeout <= 30
        return io.BytesIO(b"To be, or not to be: that is the question.\n" * 3)  # 3 * 43 bytes

    monkeypatch.setattr(urllib.request, "urlopen", online)
    with pytest.warns(UserWarning, match="not the usual"):
        out = prepare_shakespeare_char(tmp_path / "out")
    assert (tmp_path / "raw" / "tinyshakespeare.txt").read_bytes().startswith(b"To be, or not")
    assert load_meta(out)["train_tokens"] == int(129 * 0.9) == 116


# ----------------------------------------------------------------------------------------------- corpora


def test_char_corpus(corpus, tmp_path):
    root, docs = corpus
    out = prepare_corpus(tmp_path / "c", [root / "a.txt", root / "b.jsonl"], tokenizer="char", val_fraction=0.1,
                         workers=1, text_field="body")
    meta = load_meta(out)
    vocab = json.loads((out / "vocab.json").read_text())
    assert vocab == sorted(set("".join(docs))) + [EOS_TEXT]
    assert meta["vocab_size"] == len(vocab) and meta["eos_id"] == len(vocab) - 1 and meta["dtype"] == "uint16"
    assert (meta["train_docs"], meta["val_docs"]) == (31, 3)  # round(34 * 0.1) = 3 documents, the last ones
    tok = load_tokenizer(out)
    train, val = tokens(out, "train"), tokens(out, "val")
    assert train.dtype == np.uint16 and (meta["train_tokens"], meta["val_tokens"]) == (len(train), len(val))
    assert tok.decode(train) == "".join(d + EOS_TEXT for d in docs[:31])
    assert tok.decode(val) == "".join(d + EOS_TEXT for d in docs[31:])
    assert len(train) == sum(len(d) + 1 for d in docs[:31]) and (train == tok.eos_id).sum() == 31


def test_bpe_corpus(corpus, tmp_path):
    root, docs = corpus
    out = prepare_corpus(tmp_path / "b", root, tokenizer="bpe", vocab_size=300, workers=1, text_field="body")
    meta = load_meta(out)
    assert meta["kind"] == "bpe" and (out / "tokenizer.json").is_file()
    assert 257 < meta["vocab_size"] <= 300 and meta["bpe_vocab_size"] == 300
    assert meta["eos_id"] == 0 and (meta["train_docs"], meta["val_docs"]) == (33, 1)
    tok = load_tokenizer(out)
    train, val = tokens(out, "train"), tokens(out, "val")
    assert train.max() < meta["vocab_size"] and (train == 0).sum() == 33 and val[-1] == 0
    assert tok.decode(np.concatenate([train, val])) == "".join(d + EOS_TEXT for d in docs)
    ends = np.flatnonzero(train == 0)
    assert tok.decode(train[: ends[0]]) == docs[0] and tok.decode(train[ends[0] + 1: ends[1]]) == docs[1]
    assert len(train) < sum(len(d.encode()) for d in docs[:33])  # merges were learnt
    assert tok.decode(tok.encode("crème brûlée 🍮")) == "crème brûlée 🍮"  # byte-level: any text


def test_parallel_tokenisation_matches(corpus, tmp_path, monkeypatch):
    root, _ = corpus
    serial = prepare_corpus(tmp_path / "s", root, tokenizer="bpe", vocab_size=300, workers=1, text_field="body")
    monkeypatch.setattr(text_module, "_CHUNK_DOCS", 4)  # 9 chunks across 2 worker processes
    parallel = prepare_corpus(tmp_path / "p", root, tokenizer="bpe", vocab_size=300, workers=2, text_field="body")
    for name in ("train.bin", "val.bin", "meta.json"):
        assert (serial / name).read_bytes() == (parallel / name).read_bytes(), name


def test_gpt2_corpus(corpus, tmp_path):
    try:
        GPT2Tokenizer()
    except DataError as e:
        pytest.skip(f"tiktoken cannot load gpt2 offline: {e}")
    root, docs = corpus
    out = prepare_corpus(tmp_path / "g", root, tokenizer="gpt2", workers=1, text_field="body")
    meta = load_meta(out)
    assert (meta["vocab_size"], meta["eos_id"], meta["dtype"]) == (50257, 50256, "uint16")
    tok = load_tokenizer(out)
    assert tok.decode(np.concatenate([tokens(out, "train"), tokens(out, "val")])) == \
        "".join(d + EOS_TEXT for d in docs)


def test_gpt2_code_path_with_a_stand_in_encoding(corpus, tmp_path, monkeypatch):
    """The gpt2 path offline: tiktoken.get_encoding returns a byte-level encoding built here (257 tokens)."""
    import tiktoken

    stand_in = tiktoken.Encoding("bytes", pat_str=r"\S+|\s+", mergeable_ranks={bytes([i]): i for i in range(256)},
                                 special_tokens={EOS_TEXT: 256})
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: stand_in if name == "gpt2" else None)
    root, docs = corpus
    out = prepare_corpus(tmp_path / "g", root, tokenizer="gpt2", workers=1, text_field="body")
    meta = load_meta(out)
    assert (meta["kind"], meta["vocab_size"], meta["eos_id"]) == ("gpt2", 257, 256)
    train, val = tokens(out, "train"), tokens(out, "val")
    assert len(val) == len(docs[-1].encode()) + 1 and val[-1] == 256  # one token per byte, then EOS
    assert load_tokenizer(out).decode(np.concatenate([train, val])) == "".join(d + EOS_TEXT for d in docs)
    assert load_tokenizer(out).encode(EOS_TEXT)[0] == ord("<")  # a literal <|endoftext|> is ordinary text


def test_token_dtype():
    assert token_dtype(65) == token_dtype(50257) == token_dtype(65535) == "uint16"
    assert token_dtype(65536) == token_dtype(100277) == "uint32"


def test_corpus_errors(corpus, tmp_path):
    root, _ = corpus
    (tmp_path / "one.txt").write_text("a single paragraph\nwith two lines\n")
    (tmp_path / "x.csv").write_text("a,b\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    cases = [
        (dict(inputs=[tmp_path / "missing.txt"]), "corpus input .*missing.txt does not exist"),
        (dict(inputs="missing.jsonl"), "corpus input missing.jsonl does not exist"),
        (dict(inputs=[tmp_path / "x.csv"]), "unsupported corpus file type '.csv'"),
        (dict(inputs=[tmp_path / "bad.jsonl"]), "bad.jsonl:2: no string field 'text'"),
        (dict(inputs=[tmp_path / "one.txt"]), "has 1 non-empty document"),
        (dict(inputs=[root], vocab_size=256), "vocab_size must be an integer >= 257"),
        (dict(inputs=[root], tokenizer="wordpiece"), "unknown corpus tokenizer 'wordpiece'"),
        (dict(inputs=[root], val_fraction=1.0), "val_fraction must be a number in"),
        (dict(inputs=[], tokenizer="char"), "no corpus inputs"),
    ]
    for kwargs, message in cases:
        with pytest.raises(DataError, match=message):
            prepare_corpus(tmp_path / "out", **kwargs)


def test_hugging_face_name_needs_datasets(tmp_path):
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match=r"Hugging Face dataset, which needs the datasets package: .*nrgpt\[hf\]"):
            prepare_corpus(tmp_path / "out", "openwebtext", tokenizer="char")
    else:
        pytest.skip("datasets is installed, so the name would be loaded from the network")


# ----------------------------------------------------------------------------------------------- meta, streams


def test_load_meta_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist: run `nrgpt prepare"):
        load_meta(tmp_path / "nothing")
    with pytest.raises(DataError, match="has no meta.json: run `nrgpt prepare"):
        load_meta(tmp_path)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match="meta.json is not valid JSON"):
        load_meta(tmp_path)
    (tmp_path / "meta.json").write_text('{"kind": "char"}')
    with pytest.raises(DataError, match="lacks the field.s. vocab_size, dtype"):
        load_meta(tmp_path)
    with pytest.raises(DataError, match="unknown split 'test'"):
        TokenStream(make_stream(tmp_path, np.arange(10)), "test")


def test_get_batch_shifted_and_resumable(tmp_path):
    stream = TokenStream(make_stream(tmp_path, np.arange(1000) % 997), "train")
    g = torch.Generator().manual_seed(7)
    state = g.get_state()
    torch.manual_seed(0)
    x, y = stream.get_batch(6, 16, g)
    assert x.shape == y.shape == (6, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    start = x[:, :1]
    assert torch.equal(x, (start + torch.arange(16)) % 997) and torch.equal(y, (start + 1 + torch.arange(16)) % 997)
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(3))  # the global RNG was not used
    x2, y2 = stream.get_batch(6, 16, g)
    assert not torch.equal(x, x2)
    g.set_state(state)
    x3, y3 = stream.get_batch(6, 16, g)
    assert torch.equal(x, x3) and torch.equal(y, y3)


def test_get_batch_offsets_reach_both_ends(tmp_path):
    stream = TokenStream(make_stream(tmp_path, np.arange(20)), "train")
    g = torch.Generator().manual_seed(0)
    x, y = stream.get_batch(400, 15, g)
    assert set(x[:, 0].tolist()) == set(range(5)) and y[:, -1].max() == 19
    x, y = stream.get_batch(3, 19, g)  # the only window that fits
    assert torch.equal(x, torch.arange(19).expand(3, 19)) and torch.equal(y, x + 1)


def test_too_short_split(tmp_path):
    stream = TokenStream(make_stream(tmp_path, np.arange(100), val=np.arange(9)), "val")
    with pytest.raises(DataError, match="val split of .* has 9 tokens, too short for block_size 9 .*block_size <= 8"):
        stream.get_batch(2, 9, torch.Generator())
    with pytest.raises(DataError, match="batch_size must be a positive integer"):
        stream.get_batch(0, 4, torch.Generator())


@pytest.mark.parametrize("n, batch, block", [(100, 3, 8), (97, 4, 8), (9, 5, 8), (5, 2, 8)])
def test_iter_sequential_covers_each_token_once(tmp_path, n, batch, block):
    stream = TokenStream(make_stream(tmp_path, np.arange(n) + 1000, dtype="uint32"), "train")
    batches = list(stream.iter_sequential(batch, block))
    assert all(x.shape == y.shape and x.shape[0] <= batch and x.shape[1] <= block for x, y in batches)
    xs = torch.cat([x.reshape(-1) for x, _ in batches])
    ys = torch.cat([y.reshape(-1) for _, y in batches])
    assert torch.equal(xs, torch.arange(n - 1) + 1000) and torch.equal(ys, torch.arange(1, n) + 1000)
