"""Text datasets: Tiny Shakespeare as characters, and tokenised corpora (char, trained BPE, GPT-2 BPE).

Where raw files are found
-------------------------
``find_raw_file(name)`` looks for a raw file such as ``tinyshakespeare.txt`` in, in this order:

1. ``$NRGPT_DATA_DIR`` (when the variable is set),
2. ``./data/raw`` (relative to the working directory),
3. ``../shared/data`` (relative to the working directory).

A file that is downloaded is saved to ``$NRGPT_DATA_DIR`` if set, else to ``./data/raw``.

Tiny Shakespeare
----------------
``prepare_shakespeare_char`` reads ``tinyshakespeare.txt`` (1,115,394 characters, md5
6fb458f1232090904fb40fe944165e91; a mismatch only warns), from ``source``, else the search path above,
else ``https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt``. The
vocabulary is the 65 distinct characters, sorted; the first 90% of the characters (``int(n * 0.9)`` =
1,003,854) are the training split and the rest (111,540) the validation split, as in nanoGPT and the paper.
``train_fraction`` < 1 keeps only the start of every ``TRAIN_BLOCK`` (10,000) characters of the training split,
``int(train_fraction * 10,000)`` characters of each, with the same vocabulary and validation split: a smaller
corpus on which a model over-fits within a CPU budget (``nrgpt prepare shakespeare --train-fraction 0.1``:
101,000 characters). Spread over the whole split, the kept text is a sample of the same plays: a character
bigram model fitted on it has a validation cross-entropy of 2.490 nats, against 2.484 for the whole split
and 2.688 for its first 10% taken in one piece (which is a few plays only).

Corpora
-------
``prepare_corpus`` tokenises documents from

* ``.txt`` files: each file is split into documents at blank lines (one or more lines holding only
  whitespace); a document keeps its inner newlines and loses the newline that ends its last line;
* ``.jsonl`` files: one JSON object a line, the document is its ``text_field`` (default ``text``);
* directories: their ``.txt`` and ``.jsonl`` files, sorted by name (not recursive);
* a Hugging Face dataset: a string that is not an existing path and does not end in ``.txt``/``.jsonl``
  is loaded with ``datasets.load_dataset(name, split='train')`` (install ``nrgpt[hf]``; needs network
  access or the dataset in the Hugging Face cache), documents from ``text_field``.

Empty documents are skipped. Documents keep their input order; the last ``max(1, round(n *
val_fraction))`` documents are the validation split. Every document is followed by the EOS token
``<|endoftext|>`` in the token stream, so ``decode`` of a split is its documents each followed by
``<|endoftext|>``. Tokenisers:

* ``char``: the sorted distinct characters of the corpus plus ``<|endoftext|>`` (``vocab.json``);
* ``bpe``: a byte-level BPE (GPT-2 pre-tokenisation, ByteLevel decoder, special token ``<|endoftext|>``)
  with at most ``vocab_size`` tokens trained with Hugging Face ``tokenizers`` on the training documents,
  offline (``tokenizer.json``); ``vocab_size`` must be at least 257 (256 bytes and EOS);
* ``gpt2``: GPT-2's 50,257-token BPE from ``tiktoken`` (which downloads its BPE file on first use, or
  reads it from ``TIKTOKEN_CACHE_DIR``); EOS is 50256.

Tokenisation runs in ``workers`` processes (default: all CPUs; 1 tokenises in this process) over chunks
of documents, with a progress bar on stderr when it is a terminal.

OpenWebText, the paper's recipe (app. C.4)
------------------------------------------
::

    nrgpt prepare corpus --hf openwebtext --tokenizer gpt2

loads OpenWebText (8,013,769 documents, about 17 GB of text; if the name ``openwebtext`` no longer loads
with your ``datasets`` version use ``Skylion007/openwebtext``), tokenises it with GPT-2's BPE (vocabulary
50,257) and writes ``train.bin``/``val.bin`` as uint16: about 9 billion tokens (about 18 GB), of which
0.5% of the documents (about 45 million tokens) are the validation split at the default
``val_fraction=0.005`` (nanoGPT uses 0.0005). The paper trains on it with 1024-token contexts.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import multiprocessing
import os
import sys
import urllib.request
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .stream import DataError, start_dataset_dir, token_dtype, write_meta, write_tokens
from .tokenizers import EOS_TEXT, CharTokenizer, Tokenizer, tokenizer_for

SHAKESPEARE_FILE = "tinyshakespeare.txt"
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_MD5 = "6fb458f1232090904fb40fe944165e91"
SHAKESPEARE_CHARS = 1_115_394
TRAIN_BLOCK = 10_000  # prepare_shakespeare_char(train_fraction=f) keeps the first f of every block this long
CORPUS_TOKENIZERS = ("bpe", "gpt2", "char")
_CHUNK_DOCS = 1024
_FILE_SUFFIXES = (".txt", ".jsonl")


# ----------------------------------------------------------------------------------------------- raw files


def raw_search_path() -> list[Path]:
    """The directories ``find_raw_file`` searches, in order (see the module docstring)."""
    dirs = [Path(os.environ["NRGPT_DATA_DIR"])] if os.environ.get("NRGPT_DATA_DIR") else []
    return dirs + [Path("data/raw"), Path("../shared/data")]


def find_raw_file(name: str) -> Path | None:
    """The first ``dir/name`` that is a file, for dir in ``raw_search_path()``; None if there is none."""
    for d in raw_search_path():
        if (d / name).is_file():
            return d / name
    return None


def download_dir() -> Path:
    """Where downloaded raw files are saved: ``$NRGPT_DATA_DIR`` if set, else ``./data/raw``."""
    return Path(os.environ["NRGPT_DATA_DIR"]) if os.environ.get("NRGPT_DATA_DIR") else Path("data/raw")


def _download(url: str, name: str) -> Path:
    """Download ``url`` to ``download_dir()/name``; DataError (with where to put the file) if it fails."""
    dest = download_dir() / name
    try:
        with urllib.request.urlopen(url, timeout=20) as response:
            data = response.read()
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        tmp.write_bytes(data)
        tmp.replace(dest)
    except (OSError, ValueError) as e:
        looked = ", ".join(str(d.resolve()) for d in raw_search_path())
        raise DataError(f"{name} is not in {looked} and downloading {url} failed ({e}): put the file in one "
                        "of those directories (or set NRGPT_DATA_DIR to its directory), or pass its path") from e
    return dest


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"text file {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e})") from None


def prepare_shakespeare_char(out_dir: str | Path, source: str | Path | None = None,
                             train_fraction: float = 1.0) -> Path:
    """Tiny Shakespeare as characters into ``out_dir`` (see the module docstring): the first 90% the training
    split, of which ``train_fraction`` is kept (the start of every ``TRAIN_BLOCK`` characters); return ``out_dir``."""
    if not 0.0 < train_fraction <= 1.0:
        raise DataError(f"train_fraction = {train_fraction!r}: keep a fraction in (0, 1] of the training split")
    if source is not None:
        path = Path(source)
    else:
        path = find_raw_file(SHAKESPEARE_FILE) or _download(SHAKESPEARE_URL, SHAKESPEARE_FILE)
    text = _read_text(path)
    md5 = hashlib.md5(text.encode("utf-8")).hexdigest()
    if md5 != SHAKESPEARE_MD5 or len(text) != SHAKESPEARE_CHARS:
        warnings.warn(f"{path} is not the usual Tiny Shakespeare ({len(text)} characters, md5 {md5}; expected "
                      f"{SHAKESPEARE_CHARS} and {SHAKESPEARE_MD5}): results will not compare with the paper's",
                      stacklevel=2)
    if len(text) < 10:
        raise DataError(f"{path} has only {len(text)} characters: too short to split into train and val")
    split = int(len(text) * 0.9)
    per_block = int(TRAIN_BLOCK * train_fraction)
    if per_block < 1:
        raise DataError(f"train_fraction = {train_fraction} keeps no character of each {TRAIN_BLOCK:,}-character "
                        f"block of the training split; use at least {1 / TRAIN_BLOCK:g}")
    out_dir = start_dataset_dir(out_dir)
    symbols = sorted(set(text))
    ids = CharTokenizer(symbols).encode_array(text)
    dtype = token_dtype(len(symbols))
    (out_dir / "vocab.json").write_text(json.dumps(symbols) + "\n", encoding="utf-8")
    write_meta(out_dir, {
        "kind": "char", "vocab_size": len(symbols), "dtype": dtype, "eos_id": None,
        "train_tokens": write_tokens(out_dir / "train.bin", [ids[i:min(i + per_block, split)]
                                                             for i in range(0, split, TRAIN_BLOCK)], dtype),
        "val_tokens": write_tokens(out_dir / "val.bin", [ids[split:]], dtype),
        "source": str(path), "md5": md5, **({"train_fraction": train_fraction} if train_fraction < 1 else {}),
    })
    return out_dir


# ----------------------------------------------------------------------------------------------- corpora


def _txt_documents(path: Path) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8") as f:
            lines: list[str] = []
            for line in f:
                if line.strip():
                    lines.append(line)
                elif lines:
                    yield "".join(lines).removesuffix("\n")
                    lines = []
            if lines:
                yield "".join(lines).removesuffix("\n")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e})") from None


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({e})") from None
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    raise DataError(f"{path}:{lineno}: no string field {text_field!r} (set text_field to the "
                                    "field that holds the text)")
                if record[text_field]:
                    yield record[text_field]
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e})") from None


def _hf_documents(name: str, text_field: str) -> tuple[Callable[[], Iterator[str]], int]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{name!r} is not a file or directory, so it would be a Hugging Face dataset, which needs "
                        "the datasets package: pip install 'nrgpt[hf]'") from None
    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as e:  # network, missing dataset, unsupported script: all reported the same way
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(f"could not load the Hugging Face dataset {name!r} ({type(e).__name__}: {first}): it "
                        "needs network access once (or the dataset in the Hugging Face cache)") from e
    if text_field not in ds.column_names:
        raise DataError(f"Hugging Face dataset {name!r} has no column {text_field!r} (columns: "
                        f"{', '.join(ds.column_names)}): set text_field")

    def docs() -> Iterator[str]:
        for batch in ds.iter(batch_size=1000):
            yield from (t for t in batch[text_field] if t)

    return docs, len(ds)


def _corpus_sources(inputs: Sequence[str | Path] | str | Path, text_field: str) -> tuple[Callable[[], Iterator[str]],
                                                                                      int | None, str]:
    """(document iterator factory, document count if known without a pass, description) of the inputs."""
    items = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    if not items:
        raise DataError("no corpus inputs given: pass text/JSONL files, directories or a Hugging Face dataset name")
    if len(items) == 1 and isinstance(items[0], str) and not Path(items[0]).exists() \
            and not items[0].endswith(_FILE_SUFFIXES):
        docs, n = _hf_documents(items[0], text_field)
        return docs, n, f"hf:{items[0]}"
    files: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _FILE_SUFFIXES)
            if not found:
                raise DataError(f"directory {path} has no .txt or .jsonl files")
            files.extend(found)
        elif path.is_file():
            if path.suffix not in _FILE_SUFFIXES:
                raise DataError(f"{path}: unsupported corpus file type {path.suffix!r} (use .txt or .jsonl)")
            files.append(path)
        else:
            raise DataError(f"corpus input {path} does not exist (a Hugging Face dataset name must be the only input)")

    def docs() -> Iterator[str]:
        for f in files:
            yield from (_jsonl_documents(f, text_field) if f.suffix == ".jsonl" else _txt_documents(f))

    return docs, None, ", ".join(str(f) for f in files)


def _train_bpe(out_dir: Path, docs: Iterator[str], n_docs: int, vocab_size: int) -> None:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TEXT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=sys.stderr.isatty())
    tok.train_from_iterator(docs, trainer=trainer, length=n_docs)
    tok.save(str(out_dir / "tokenizer.json"))


def _encode_documents(tok: Tokenizer, docs: list[str]) -> np.ndarray:
    """The token ids of ``docs``, each followed by EOS, as one int64 array."""
    if isinstance(tok, CharTokenizer):
        parts = [tok.encode_array(d) for d in docs]
    else:
        parts = [np.asarray(ids, dtype=np.int64) for ids in tok.encode_batch(docs)]
    eos = np.array([tok.eos_id], dtype=np.int64)
    return np.concatenate([a for p in parts for a in (p, eos)]) if parts else np.zeros(0, dtype=np.int64)


# Tokeniser processes are forked where the platform can (no re-import of the caller's main module, which
# spawn needs and which fails for scripts read from stdin or without a main guard) and before this process
# starts any tokenizer threads; each loads the tokenizer on its first task and runs one thread.
_START_METHOD = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
_worker_tokenizers: dict[tuple[str, str], Tokenizer] = {}


def _init_worker() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _encode_task(task: tuple[str, str, str, list[str]]) -> tuple[str, int, np.ndarray]:
    kind, out_dir, split, docs = task
    if (kind, out_dir) not in _worker_tokenizers:
        _worker_tokenizers[kind, out_dir] = tokenizer_for(kind, out_dir)
    return split, len(docs), _encode_documents(_worker_tokenizers[kind, out_dir], docs)


def _chunks(docs: Iterator[str], n_train: int) -> Iterator[tuple[str, list[str]]]:
    """('train'|'val', up to _CHUNK_DOCS documents), the first ``n_train`` documents being 'train'."""
    for split, part in (("train", itertools.islice(docs, n_train)), ("val", docs)):
        while chunk := list(itertools.islice(part, _CHUNK_DOCS)):
            yield split, chunk


def _write_splits(out_dir: Path, tok: Tokenizer, tasks: Iterator[tuple[str, list[str]]], n_docs: int, dtype: str,
                  pool: Any, workers: int) -> dict[str, int]:
    """Tokenise the chunks (in ``pool``, of ``workers`` processes, if given, else here) into train.bin and
    val.bin; return the token counts."""
    counts = {"train": 0, "val": 0}
    with open(out_dir / "train.bin", "wb") as f_train, open(out_dir / "val.bin", "wb") as f_val, \
            tqdm(total=n_docs, unit="doc", desc="tokenizing", disable=None, file=sys.stderr) as bar:
        files = {"train": f_train, "val": f_val}

        def write(results: Iterator[tuple[str, int, np.ndarray]]) -> None:
            for split, n, ids in results:
                ids.astype(dtype).tofile(files[split])
                counts[split] += len(ids)
                bar.update(n)

        if pool is None:
            write((split, len(chunk), _encode_documents(tok, chunk)) for split, chunk in tasks)
        else:
            tasks = ((tok.kind, str(out_dir), split, chunk) for split, chunk in tasks)
            while wave := list(itertools.islice(tasks, 4 * workers)):  # bounded memory
                write(pool.imap(_encode_task, wave))
    return counts


def prepare_corpus(out_dir: str | Path, inputs: Sequence[str | Path] | str | Path, tokenizer: str = "bpe",
                   vocab_size: int = 4096, val_fraction: float = 0.005, workers: int | None = None,
                   text_field: str = "text") -> Path:
    """Tokenise a corpus into ``out_dir`` (see the module docstring); return ``out_dir``.

    ``vocab_size`` is used by 'bpe' only. ``val_fraction`` of the documents (at least one, and at least
    one left for training) form the validation split.
    """
    if tokenizer not in CORPUS_TOKENIZERS:
        raise DataError(f"unknown corpus tokenizer {tokenizer!r}: choose one of {', '.join(CORPUS_TOKENIZERS)}")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
    if workers is None:
        workers = os.cpu_count() or 1
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise DataError(f"workers must be a positive integer, got {workers!r}")
    if tokenizer == "bpe" and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 257):
        raise DataError(f"bpe vocab_size must be an integer >= 257 (256 bytes and <|endoftext|>), got {vocab_size!r}")

    docs, n_docs, source = _corpus_sources(inputs, text_field)
    chars: set[str] = set()
    if n_docs is None or tokenizer == "char":
        n_docs = 0
        for d in docs():
            n_docs += 1
            if tokenizer == "char":
                chars.update(d)
    if n_docs < 2:
        raise DataError(f"the corpus ({source}) has {n_docs} non-empty document(s); at least 2 are needed (one "
                        "for validation): split .txt files into documents with blank lines")
    n_val = min(max(1, round(n_docs * val_fraction)), n_docs - 1)
    n_train = n_docs - n_val

    out_dir = start_dataset_dir(out_dir)
    use_pool = workers > 1 and n_docs > _CHUNK_DOCS
    pool = multiprocessing.get_context(_START_METHOD).Pool(workers, _init_worker) if use_pool else None
    with pool or contextlib.nullcontext():
        if tokenizer == "char":
            (out_dir / "vocab.json").write_text(json.dumps(sorted(chars) + [EOS_TEXT]) + "\n", encoding="utf-8")
        elif tokenizer == "bpe":
            _train_bpe(out_dir, itertools.islice(docs(), n_train), n_train, vocab_size)
        tok = tokenizer_for(tokenizer, out_dir)
        dtype = token_dtype(tok.vocab_size)
        counts = _write_splits(out_dir, tok, _chunks(docs(), n_train), n_docs, dtype, pool, workers)

    meta: dict[str, Any] = {
        "kind": tokenizer, "vocab_size": tok.vocab_size, "dtype": dtype, "eos_id": tok.eos_id,
        "train_tokens": counts["train"], "val_tokens": counts["val"], "source": source,
        "train_docs": n_train, "val_docs": n_val, "val_fraction": val_fraction, "text_field": text_field,
    }
    if tokenizer == "bpe":
        meta["bpe_vocab_size"] = vocab_size
    write_meta(out_dir, meta)
    return out_dir
