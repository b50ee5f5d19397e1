"""Tokenizers of prepared datasets, loaded by kind from the files in the data directory.

=========  =================================================================  ==============================
kind       vocabulary                                                         file
=========  =================================================================  ==============================
char       one symbol per character (plus ``<|endoftext|>`` for corpora)       ``vocab.json`` (ordered list)
listops    whole tokens separated by spaces: ops, ``( ) =``, numbers, ``<eos>``  ``vocab.json`` (ordered list)
bpe        byte-level BPE trained with Hugging Face ``tokenizers``             ``tokenizer.json``
gpt2       GPT-2's BPE through ``tiktoken`` (50,257 tokens)                    none (fetched once by tiktoken)
=========  =================================================================  ==============================

Every tokenizer has ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``, ``eos_id``
(None when the vocabulary has no end-of-sequence token) and ``kind``. ``encode`` of a char or ListOps
tokenizer raises ``DataError`` naming the characters or tokens that are not in the vocabulary; the
byte-level tokenizers encode any text. The end-of-sequence symbol is only ever inserted between documents
by ``prepare``: a char tokenizer's ``encode`` reads the text character by character and never produces it.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from ..errors import read_parsed
from .stream import DataError, load_meta

EOS_TEXT = "<|endoftext|>"
LISTOPS_EOS = "<eos>"


def _list_unknown(items: Iterable[str], limit: int = 10) -> str:
    items = sorted(set(items))
    shown = ", ".join(repr(s) for s in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


class Tokenizer(ABC):
    """Text <-> token ids for one prepared dataset."""

    kind: str
    vocab_size: int
    eos_id: int | None

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; DataError if it holds symbols outside the vocabulary."""

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids (a list, array or 1-d tensor); DataError for ids outside the vocabulary."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``encode`` of each text."""
        return [self.encode(t) for t in texts]

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise DataError(f"token ids outside the vocabulary of size {self.vocab_size}: "
                            f"{', '.join(map(str, sorted(set(bad))[:10]))}")
        return ids

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eos_id={self.eos_id})"


class CharTokenizer(Tokenizer):
    """One token per character; ``symbols[i]`` is token i. A multi-character symbol ``<|endoftext|>``,
    if present, is the end-of-sequence token."""

    kind = "char"

    def __init__(self, symbols: Sequence[str]):
        self.symbols = list(symbols)
        if len(set(self.symbols)) != len(self.symbols):
            raise DataError("the character vocabulary has repeated symbols: prepare the dataset again")
        chars = [(s, i) for i, s in enumerate(self.symbols) if len(s) == 1]
        if len(chars) + (EOS_TEXT in self.symbols) != len(self.symbols):
            raise DataError("a character vocabulary holds single characters and at most <|endoftext|>: "
                            "prepare the dataset again")
        order = sorted(chars, key=lambda c: ord(c[0]))
        self._codes = np.array([ord(c) for c, _ in order], dtype=np.uint32)
        self._code_ids = np.array([i for _, i in order], dtype=np.int64)
        self.vocab_size = len(self.symbols)
        self.eos_id = self.symbols.index(EOS_TEXT) if EOS_TEXT in self.symbols else None

    def encode_array(self, text: str) -> np.ndarray:
        """``encode`` as an int64 array (vectorised; used to tokenise whole corpora)."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        pos = np.minimum(np.searchsorted(self._codes, codes), max(len(self._codes) - 1, 0))
        known = self._codes[pos] == codes if len(self._codes) else np.zeros(len(codes), dtype=bool)
        if not known.all():
            unknown = (chr(c) for c in np.unique(codes[~known]))
            raise DataError(f"text contains characters not in the vocabulary: {_list_unknown(unknown)}")
        return self._code_ids[pos]

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.symbols[i] for i in self._check_ids(ids))


class ListOpsTokenizer(Tokenizer):
    """ListOps tokens are separated by whitespace; ``symbols[i]`` is token i and ``<eos>`` ends a sample.
    ``decode`` joins tokens with single spaces."""

    kind = "listops"

    def __init__(self, symbols: Sequence[str]):
        self.symbols = list(symbols)
        self._ids = {s: i for i, s in enumerate(self.symbols)}
        if len(self._ids) != len(self.symbols):
            raise DataError("the ListOps vocabulary has repeated tokens: prepare the dataset again")
        self.vocab_size = len(self.symbols)
        self.eos_id = self._ids.get(LISTOPS_EOS)

    def encode(self, text: str) -> list[int]:
        tokens = text.split()
        try:
            return [self._ids[t] for t in tokens]
        except KeyError:
            unknown = [t for t in tokens if t not in self._ids]
            raise DataError(f"text contains tokens not in the ListOps vocabulary: {_list_unknown(unknown)} "
                            "(tokens are separated by spaces)") from None

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(self.symbols[i] for i in self._check_ids(ids))


class BPETokenizer(Tokenizer):
    """A byte-level BPE saved by Hugging Face ``tokenizers`` (``tokenizer.json``); ``<|endoftext|>`` is EOS."""

    kind = "bpe"

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for unreadable files
            raise DataError(f"cannot read the BPE tokenizer {path} ({e}): prepare the dataset again") from e
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = self._tok.token_to_id(EOS_TEXT)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts))]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(self._check_ids(ids), skip_special_tokens=False)


class GPT2Tokenizer(Tokenizer):
    """GPT-2's BPE via ``tiktoken.get_encoding('gpt2')``; ``<|endoftext|>`` (50256) is EOS. Text is
    encoded as ordinary text, so a literal ``<|endoftext|>`` in it is not the EOS token."""

    kind = "gpt2"

    def __init__(self):
        import tiktoken

        try:
            self._enc = tiktoken.get_encoding("gpt2")
        except Exception as e:  # network, cache and parsing errors alike
            raise DataError(f"tiktoken could not load the gpt2 encoding ({type(e).__name__}): it downloads its "
                            "BPE file once, so run with network access once, or set TIKTOKEN_CACHE_DIR to a "
                            "directory holding the cached file") from e
        self.vocab_size = self._enc.n_vocab
        self.eos_id = self._enc.eot_token

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(list(texts), num_threads=1)

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode(self._check_ids(ids))


def read_vocab(data_dir: str | Path) -> list[str]:
    """The ordered symbol list in ``data_dir/vocab.json``."""
    path = Path(data_dir) / "vocab.json"
    symbols = read_parsed(path, json.loads, DataError, missing=f"{path} is missing: prepare the dataset again",
                          fix="prepare the dataset again")
    if not isinstance(symbols, list) or not all(isinstance(s, str) and s for s in symbols):
        raise DataError(f"{path} must hold a list of non-empty strings: prepare the dataset again")
    return symbols


def tokenizer_for(kind: str, data_dir: str | Path) -> Tokenizer:
    """The tokenizer of ``kind`` from the files in ``data_dir`` (no meta.json needed)."""
    if kind == "char":
        return CharTokenizer(read_vocab(data_dir))
    if kind == "listops":
        return ListOpsTokenizer(read_vocab(data_dir))
    if kind == "bpe":
        path = Path(data_dir) / "tokenizer.json"
        if not path.is_file():
            raise DataError(f"{path} is missing: prepare the dataset again")
        return BPETokenizer(path)
    if kind == "gpt2":
        return GPT2Tokenizer()
    raise DataError(f"unknown tokenizer kind {kind!r}: expected char, listops, bpe or gpt2")


def load_tokenizer(data_dir: str | Path) -> Tokenizer:
    """The tokenizer of the prepared dataset in ``data_dir`` (its kind is read from meta.json)."""
    meta = load_meta(data_dir)
    tok = tokenizer_for(meta["kind"], data_dir)
    if tok.vocab_size != meta["vocab_size"]:
        raise DataError(f"{data_dir}/meta.json says vocab_size {meta['vocab_size']} but the tokenizer has "
                        f"{tok.vocab_size} tokens: prepare the dataset again")
    return tok
