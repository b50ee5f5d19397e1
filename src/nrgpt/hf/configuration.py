"""``NRGPTConfig``: the Hugging Face configuration of an exported nrgpt model.

It holds the model's ``nrgpt.ModelConfig`` as a plain dict (``nrgpt``), the dataset's tokenizer kind,
the tokenizer's added start token for a vocabulary without end-of-sequence (``start_id``, read as
token 0: ``nrgpt.hf.tokenizer``), and mirrors the fields that
``transformers`` and lm-evaluation-harness read: ``vocab_size``, ``max_position_embeddings`` (the block
size: the longest context a forward pass takes), ``hidden_size``, ``num_hidden_layers`` (the number of
steps) and the special token ids. ``nrgpt export`` writes this file into the exported directory as
``configuration_nrgpt.py``, so the directory needs only ``transformers``.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig


class NRGPTConfig(PretrainedConfig):
    """Configuration of ``NRGPTForCausalLM``; ``nrgpt`` is ``ModelConfig.to_dict()``."""

    model_type = "nrgpt"

    def __init__(self, nrgpt: dict[str, Any] | None = None, tokenizer_kind: str | None = None,
                 start_id: int | None = None, **kwargs):
        self.nrgpt = dict(nrgpt or {})
        self.tokenizer_kind = tokenizer_kind
        self.start_id = start_id
        if self.nrgpt:
            kwargs.setdefault("vocab_size", self.nrgpt["vocab_size"])
            kwargs.setdefault("max_position_embeddings", self.nrgpt["block_size"])
            kwargs.setdefault("hidden_size", self.nrgpt["n_embd"])
            kwargs.setdefault("num_hidden_layers", self.nrgpt["n_steps"])
            kwargs.setdefault("num_attention_heads", self.nrgpt["n_head"])
        kwargs.setdefault("tie_word_embeddings", False)
        kwargs.setdefault("use_cache", True)
        super().__init__(**kwargs)
