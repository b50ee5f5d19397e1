"""``NRGPTForCausalLM``: any nrgpt model (NRGPT or a GPT baseline) as a Hugging Face causal LM.

The wrapped module is ``nrgpt.build_model(ModelConfig)``; the wrapper adds nothing to its computation:
``forward`` returns the logits of ``model(idx)`` (``CausalLMOutputWithPast``), and ``generate`` decodes
with the model's own per-step cache (``KVCache``, through ``LanguageModel.forward_cached``), so every
new token costs one cached step, exactly as in ``nrgpt sample``.

The cache travels through ``generate`` as ``NRGPTCache`` (the ``cache`` / ``past_key_values`` of the
outputs). It keeps, for each group of batch rows with the same number of real tokens, the rows' tokens
and one ``KVCache``. Padding (``attention_mask`` zeros, left or right) is removed before the model sees
a row: each row runs on its own real tokens at positions 0, 1, ..., as it would alone. When a row's
context fills the block, the window slides as in ``nrgpt.decoding.generate``: the cache is rebuilt from the last
``block_size`` tokens.

``nrgpt export`` writes this file into the exported directory as ``modeling_nrgpt.py``, next to the
nrgpt model modules it imports, so the directory needs only ``torch`` and ``transformers``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..config import ModelConfig
from ..decoding import KVCache
from ..model import build_model
from .configuration import NRGPTConfig

# transformers 5 calls the cache field of model outputs ``cache``; 4.x called it ``past_key_values``.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


@dataclass
class _Rows:
    """Batch rows decoded together: their indices, their real tokens so far (g, n) and their cache."""

    rows: torch.Tensor
    tokens: torch.Tensor
    kv: KVCache


class NRGPTCache:
    """The decoding state of a batch (see the module docstring). ``seen`` counts the input positions
    consumed so far, padding included (the length of ``attention_mask``)."""

    is_compileable = False
    is_linear = (False,)

    def __init__(self):
        self.groups: list[_Rows] = []
        self.seen = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen


def _row_groups(input_ids: torch.Tensor, mask: torch.Tensor | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(row indices, real tokens) for each set of rows with the same number of real tokens."""
    if mask is None:
        return [(torch.arange(input_ids.shape[0], device=input_ids.device), input_ids)]
    by_length: dict[int, list[int]] = {}
    for i, n in enumerate(mask.sum(1).tolist()):
        if n:
            by_length.setdefault(n, []).append(i)
    groups = []
    for rows in by_length.values():
        index = torch.tensor(rows, device=input_ids.device)
        groups.append((index, input_ids[index][mask[index]].view(len(rows), -1)))
    return groups


def _positions(mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The columns of the real tokens of ``rows`` (which all have the same number), (len(rows), n)."""
    return mask[rows].nonzero()[:, 1].view(len(rows), -1)


class NRGPTForCausalLM(PreTrainedModel, GenerationMixin):
    """An nrgpt ``LanguageModel`` (``self.model``) behind the ``transformers`` causal-LM interface."""

    config_class = NRGPTConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"

    def __init__(self, config: NRGPTConfig):
        super().__init__(config)
        self.model = build_model(ModelConfig.from_dict(config.nrgpt, drop_unused=True))
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Weights come from nrgpt's own initialisation (``build_model``) or from the checkpoint."""

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the cache is NRGPTCache, made by forward

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.tok_emb

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.lm_head

    def _extend(self, group: _Rows, new: torch.Tensor) -> torch.Tensor:
        """Append ``new`` (g, t) tokens to a group's cache; the last position's logits (g, V)."""
        block = self.model.config.block_size
        group.tokens = torch.cat([group.tokens, new], 1)
        if group.kv.length + new.shape[1] > block:  # slide: rebuild from the last block_size tokens
            group.kv = KVCache(block)
            return self.model.forward_cached(group.tokens[:, -block:], group.kv)
        if group.kv.length == 0:  # prefill
            return self.model.forward_cached(new, group.kv)
        for j in range(new.shape[1]):  # the cache takes one token at a time after its prefill
            last = self.model.forward_cached(new[:, j:j + 1], group.kv)
        return last

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        cache: NRGPTCache | None = None,
        past_key_values: NRGPTCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits (B, t, V) of ``input_ids`` (B, t), or of their last ``logits_to_keep`` positions.

        ``attention_mask`` (B, past + t) marks real tokens (1) and padding (0); padded positions get zero
        logits. The tokenizer's added start token (``start_id``) is read as token 0.
        With ``use_cache=True`` or a ``cache`` (``past_key_values``) from an earlier call, the tokens
        extend that cache and the output carries it. ``labels`` give the mean next-token
        cross-entropy (shifted inside, -100 ignored). Other keyword arguments (position ids,
        return_dict, ...) are ignored: positions follow from the real tokens, and the output is always a
        ``CausalLMOutputWithPast``.
        """
        cache = cache if cache is not None else past_key_values
        b, t = input_ids.shape
        vocab = self.model.config.vocab_size
        mask = None if attention_mask is None else attention_mask[:, -t:].bool()
        if mask is not None and bool(mask.all()):
            mask = None
        if getattr(self.config, "start_id", None) == vocab:  # the tokenizer's added start token: token 0
            input_ids = input_ids.masked_fill(input_ids == vocab, 0)
        real = input_ids if mask is None else input_ids[mask]
        if real.numel() and not 0 <= int(real.min()) <= int(real.max()) < vocab:
            raise ValueError(f"token ids must lie in [0, {vocab}), the model's vocabulary; got "
                             f"{int(real.min())}..{int(real.max())}")
        if cache is None and not use_cache:
            logits = self._full_logits(input_ids, mask)
        else:
            cache = cache if cache is not None else NRGPTCache()
            logits = self._cached_logits(cache, input_ids, mask, full=logits_to_keep != 1)
            cache.seen += t
        if logits_to_keep > 0:
            logits = logits[:, -logits_to_keep:]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})

    def _full_logits(self, input_ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is None:
            return self.model(input_ids)[0]
        out = input_ids.new_zeros((*input_ids.shape, self.model.config.vocab_size), dtype=self.dtype)
        for rows, tokens in _row_groups(input_ids, mask):
            out[rows[:, None], _positions(mask, rows)] = self.model(tokens)[0]
        return out

    def _cached_logits(self, cache: NRGPTCache, input_ids: torch.Tensor, mask: torch.Tensor | None,
                       full: bool) -> torch.Tensor:
        """Logits of new tokens through the cache: the last position only, or (``full``) every new
        position (each from the window of the last block_size tokens)."""
        b, t = input_ids.shape
        if not cache.groups:
            groups = _row_groups(input_ids, mask)
            cache.groups = [_Rows(rows, tokens[:, :0], KVCache(self.model.config.block_size))
                            for rows, tokens in groups]
            news = [tokens for _, tokens in groups]
        elif mask is None:
            news = [input_ids[g.rows] for g in cache.groups]
        else:
            raise ValueError("padding among the new tokens of a cached sequence is not supported: pass the new "
                             "tokens unpadded, or run the whole sequence again without the cache")
        shape = (b, t if full else 1, self.model.config.vocab_size)
        out = torch.zeros(shape, dtype=self.dtype, device=input_ids.device)
        block = self.model.config.block_size
        for group, new in zip(cache.groups, news):
            if full and new.shape[1] > block:
                raise ValueError(f"{new.shape[1]} new tokens: a forward pass that returns every position's logits "
                                 f"takes at most block_size = {block}")
            last = self._extend(group, new)
            if full:
                n = new.shape[1]
                cols = torch.arange(t - n, t, device=out.device) if mask is None else _positions(mask, group.rows)
                out[group.rows[:, None], cols] = self.model(group.tokens[:, -block:])[0][:, -n:]
            else:
                out[group.rows, 0] = last
        return out

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, cache: NRGPTCache | None = None,
                                      past_key_values: NRGPTCache | None = None,
                                      attention_mask: torch.Tensor | None = None, use_cache: bool = True,
                                      logits_to_keep: int = 1, **kwargs) -> dict:
        """The inputs of one ``generate`` step: the tokens the cache has not consumed yet."""
        cache = cache if cache is not None else past_key_values
        if cache is not None and cache.seen:
            input_ids = input_ids[:, cache.seen:]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "cache": cache, "use_cache": use_cache,
                "logits_to_keep": logits_to_keep}
