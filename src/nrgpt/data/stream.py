"""The prepared-dataset format, and batches drawn from it.

A prepared dataset is a directory holding

* ``meta.json``: ``kind`` ('char', 'listops', 'bpe' or 'gpt2'), ``vocab_size``, ``dtype`` ('uint16' or
  'uint32'), ``eos_id`` (int or null), ``train_tokens``, ``val_tokens``, ``source`` and whatever the kind
  adds;
* ``train.bin`` and ``val.bin``: flat token streams, raw arrays of ``dtype`` (read with ``numpy.memmap``);
* the tokenizer's files (see ``nrgpt.data.tokenizers``).

``TokenStream`` reads one split without loading it into memory. ``get_batch`` draws its random offsets
with ``torch.randint(..., generator=generator)`` and nothing else, so saving and restoring the
generator's state resumes the exact sequence of batches.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError, read_parsed

KINDS = ("char", "listops", "bpe", "gpt2")
SPLITS = ("train", "val")
_REQUIRED_META = ("kind", "vocab_size", "dtype", "eos_id", "train_tokens", "val_tokens", "source")


def token_dtype(vocab_size: int) -> str:
    """The storage dtype for a vocabulary: 'uint16' below 65,536 symbols, else 'uint32'."""
    return "uint16" if vocab_size < 65536 else "uint32"


def load_meta(data_dir: str | Path) -> dict[str, Any]:
    """Read and check ``data_dir/meta.json``; DataError if the directory, the file or a field is missing."""
    data_dir = Path(data_dir)
    hint = "run `nrgpt prepare ...` first"
    if not data_dir.is_dir():
        raise DataError(f"data directory {data_dir} does not exist: {hint}")
    path = data_dir / "meta.json"
    if not path.is_file():
        raise DataError(f"data directory {data_dir} has no meta.json: {hint}")
    meta = read_parsed(path, json.loads, DataError, fix="prepare the dataset again")
    if not isinstance(meta, dict):
        raise DataError(f"{path} does not hold a JSON object: prepare the dataset again")
    missing = [k for k in _REQUIRED_META if k not in meta]
    if missing:
        raise DataError(f"{path} lacks the field(s) {', '.join(missing)}: prepare the dataset again")
    if meta["kind"] not in KINDS:
        raise DataError(f"{path}: unknown kind {meta['kind']!r} (expected one of {', '.join(KINDS)})")
    if meta["dtype"] not in ("uint16", "uint32"):
        raise DataError(f"{path}: unknown dtype {meta['dtype']!r} (expected uint16 or uint32)")
    return meta


def start_dataset_dir(out_dir: str | Path) -> Path:
    """Create ``out_dir`` and remove an old ``meta.json`` from it, so that an interrupted ``prepare`` never
    leaves a directory that looks complete."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "meta.json").unlink(missing_ok=True)
    return out_dir


def write_tokens(path: Path, chunks: Iterable[np.ndarray], dtype: str) -> int:
    """Write token arrays one after another to ``path`` as a raw ``dtype`` array; return the token count."""
    n = 0
    with open(path, "wb") as f:
        for chunk in chunks:
            np.asarray(chunk).astype(dtype, copy=False).tofile(f)
            n += len(chunk)
    return n


def write_meta(data_dir: Path, meta: dict[str, Any]) -> None:
    """Write ``meta.json`` (the last file a ``prepare`` writes, so its presence means the data is complete)."""
    missing = [k for k in _REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"meta lacks {missing}")
    (data_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DataError(f"{name} must be a positive integer, got {value!r}")
    return value


class TokenStream:
    """One split ('train' or 'val') of a prepared dataset, memory-mapped.

    ``len(stream)`` is the number of tokens. ``stream.tokens`` is the read-only memmap and
    ``stream.meta`` the dataset's meta.json.
    """

    def __init__(self, data_dir: str | Path, split: str):
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}: use 'train' or 'val'")
        self.data_dir = Path(data_dir)
        self.split = split
        self.meta = load_meta(self.data_dir)
        path = self.data_dir / f"{split}.bin"
        if not path.is_file():
            raise DataError(f"{path} is missing: prepare the dataset again")
        itemsize = np.dtype(self.meta["dtype"]).itemsize
        size = path.stat().st_size
        if size % itemsize:
            raise DataError(f"{path} has {size} bytes, not a whole number of {self.meta['dtype']} tokens: "
                            "prepare the dataset again")
        if size == 0:
            self.tokens = np.zeros(0, dtype=self.meta["dtype"])
        else:
            self.tokens = np.memmap(path, dtype=self.meta["dtype"], mode="r")

    def __len__(self) -> int:
        return len(self.tokens)

    def _check_block(self, block_size: int) -> None:
        if len(self) < block_size + 1:
            fit = f"use block_size <= {len(self) - 1}" if len(self) >= 2 else "prepare more data"
            raise DataError(f"the {self.split} split of {self.data_dir} has {len(self)} tokens, too short for "
                            f"block_size {block_size} (needs block_size + 1 = {block_size + 1}): {fit}")

    def get_batch(self, batch_size: int, block_size: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` random windows: x (B, T) int64 and y = x shifted one token ahead.

        The offsets come from one ``torch.randint`` call on ``generator``.
        """
        _positive_int("batch_size", batch_size)
        _positive_int("block_size", block_size)
        self._check_block(block_size)
        offsets = torch.randint(0, len(self) - block_size, (batch_size,), generator=generator)
        index = offsets.numpy()[:, None] + np.arange(block_size + 1)
        window = torch.from_numpy(self.tokens[index].astype(np.int64))
        return window[:, :-1], window[:, 1:]

    def iter_sequential(self, batch_size: int, block_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Walk the split once in order: windows start at 0, T, 2T, ... so that every token but the first
        is a target exactly once.

        Full windows come in batches of up to ``batch_size`` rows (the last batch may have fewer); a final
        window shorter than ``block_size`` comes alone as a (1, r) batch. Weight a per-batch mean loss by
        ``y.numel()`` to get the split's mean.
        """
        _positive_int("batch_size", batch_size)
        _positive_int("block_size", block_size)
        if len(self) < 2:
            raise DataError(f"the {self.split} split of {self.data_dir} has {len(self)} tokens; at least 2 "
                            "are needed to predict one: prepare more data")
        n_full = (len(self) - 1) // block_size
        steps = np.arange(block_size + 1)
        for start in range(0, n_full, batch_size):
            rows = np.arange(start, min(start + batch_size, n_full)) * block_size
            window = torch.from_numpy(self.tokens[rows[:, None] + steps].astype(np.int64))
            yield window[:, :-1], window[:, 1:]
        tail = n_full * block_size
        if tail < len(self) - 1:
            window = torch.from_numpy(self.tokens[tail:].astype(np.int64))[None]
            yield window[:, :-1], window[:, 1:]
