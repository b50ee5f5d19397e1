"""A prepared dataset's tokenizer as a Hugging Face ``tokenizers`` model (``tokenizer.json``).

=========  ==========================================================================================
kind       ``tokenizer.json``
=========  ==========================================================================================
char       WordLevel over the symbols, one token per character (``<|endoftext|>`` a special token); a
           normaliser drops U+2060 WORD JOINER, which no text of the vocabulary holds (the
           lm-evaluation-harness perplexity task writes it after each context: ``nrgpt.hf.harness``)
listops    WordLevel over whitespace-separated tokens, ``<eos>`` a special token; decoding joins with
           single spaces, as ``ListOpsTokenizer.decode`` does
bpe        the dataset's own byte-level BPE file
gpt2       none: the directory names GPT-2's tokenizer (``AutoTokenizer.from_pretrained("gpt2")``)
=========  ==========================================================================================

Token ids are the dataset's ids. A vocabulary without an end-of-sequence token gets one added token
``<|start|>`` (id vocab_size, outside the model's vocabulary) as the tokenizer's bos and pad token: the
model reads it as token 0, which is where ``nrgpt sample`` starts an empty prompt, so a generation from
nothing and lm-evaluation-harness's rolling windows (which start from the bos token) begin as in nrgpt;
padded positions never reach the model, and the model never emits it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..data.tokenizers import EOS_TEXT, LISTOPS_EOS, read_vocab
from ..errors import DataError

WORD_JOINER = "\u2060"
START_TEXT = "<|start|>"


def _word_level(symbols: list[str], single_characters: bool):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.WordLevel({s: i for i, s in enumerate(symbols)}, unk_token=None))
    if single_characters:
        if WORD_JOINER in symbols:
            raise DataError("the vocabulary holds U+2060 WORD JOINER, which the exported tokenizer reserves")
        tok.normalizer = normalizers.Replace(WORD_JOINER, "")
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tok.decoder = decoders.Fuse()
    else:
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def backend_tokenizer(data_dir: str | Path, kind: str) -> tuple[Any, str | None]:
    """The ``tokenizers.Tokenizer`` of a prepared dataset and its end-of-sequence text (None if it has
    none); (None, None) for GPT-2, which is named rather than written."""
    from tokenizers import Tokenizer

    if kind == "gpt2":
        return None, None
    if kind == "bpe":
        return Tokenizer.from_file(str(Path(data_dir) / "tokenizer.json")), EOS_TEXT
    symbols = read_vocab(data_dir)
    tok = _word_level(symbols, single_characters=kind == "char")
    eos = {"char": EOS_TEXT, "listops": LISTOPS_EOS}[kind]
    if eos not in symbols:
        return tok, None
    tok.add_special_tokens([eos])
    return tok, eos


def save_hf_tokenizer(data_dir: str | Path, kind: str, out_dir: str | Path) -> dict[str, int | None]:
    """Write the tokenizer files into ``out_dir``; returns the special token ids for the model's config:
    eos and pad, or for a vocabulary without end-of-sequence the added start token (``start_id``:
    not bos, which transformers wants inside the model's vocabulary); none for GPT-2."""
    from transformers import PreTrainedTokenizerFast

    backend, eos = backend_tokenizer(data_dir, kind)
    if backend is None:
        return {}
    special = {"eos_token": eos, "pad_token": eos} if eos else {"bos_token": START_TEXT, "pad_token": START_TEXT}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False, **special)
    tokenizer.save_pretrained(out_dir)
    if eos:
        return {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    return {"start_id": tokenizer.bos_token_id}
