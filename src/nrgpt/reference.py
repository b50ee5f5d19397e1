"""Load checkpoints written by the authors' reference code (github.com/bhoov/nrgpt).

The reference trainer saves ``{'model': state_dict, 'model_args': {...}, 'iter_num', 'config':
{'model_path': 'models.<Class>', ...}}``. Its six classes map onto presets of this package:

    NRGPT_H_FF1, NRGPT_H_FF2W, NRGPT_H_FF2 -> model 'nrgpt', full attention, bare LayerNorm,
        free eta, trained FF scale, grad_mode 'reference'; ``tril_plus_one`` True -> strict mask
    GPT_Rec_parallel, GPT_Rec, GPT          -> 'rgpt_parallel', 'rgpt', 'gpt' (always inclusive mask)

Its per-head Linear layers are stacked into this package's fused weights; its mask buffers and
``pos_idx`` are dropped after checking them. Loading uses ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .checkpoint import load_matching, torch_load_safely
from .config import ModelConfig
from .errors import CheckpointError, first_line
from .model import LanguageModel, build_model

REFERENCE_CLASSES = ("NRGPT_H_FF2W", "NRGPT_H_FF1", "NRGPT_H_FF2", "GPT_Rec_parallel", "GPT_Rec", "GPT")


def reference_config(checkpoint: dict[str, Any]) -> ModelConfig:
    """The ModelConfig equivalent to a reference checkpoint's class and ``model_args``."""
    try:
        cls = checkpoint["config"]["model_path"].rsplit(".", 1)[-1]
        args = checkpoint["model_args"]
    except (KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(
            "not a reference-code checkpoint: expected keys 'model', 'model_args' and "
            f"'config'['model_path'] (missing {e})"
        ) from None
    if cls not in REFERENCE_CLASSES:
        raise CheckpointError(f"reference class {cls!r} is not supported; known: {', '.join(REFERENCE_CLASSES)}")
    shape = dict(
        vocab_size=args["vocab_size"], block_size=args["block_size"], n_embd=args["n_embed"],
        n_head=args["n_head"], n_steps=args["n_layer"], ff_mult=args.get("ff_hid_factor", 4),
        dropout=float(args.get("dropout", 0.0)),
    )
    if cls.startswith("NRGPT"):
        shape["mask"] = "strict" if args.get("tril_plus_one", False) else "inclusive"
    return ModelConfig.preset(cls, **shape)


def _stack(sd: dict[str, torch.Tensor], pattern: str, n: int) -> torch.Tensor:
    return torch.cat([sd.pop(pattern.format(h)) for h in range(n)], dim=0)


def _convert_state(cls: str, sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    sd = dict(sd)
    sd.pop("pos_idx", None)
    out = {
        "tok_emb.weight": sd.pop("token_embedding_table.weight"),
        "pos_emb.weight": sd.pop("position_embedding_table.weight"),
        "ln_f.weight": sd.pop("ln_f.weight"), "ln_f.bias": sd.pop("ln_f.bias"),
        "lm_head.weight": sd.pop("lm_head.weight"), "lm_head.bias": sd.pop("lm_head.bias"),
    }
    n = cfg.n_head
    if cls.startswith("NRGPT"):
        for h in range(n):
            sd.pop(f"blocks.attn.heads.{h}.tril", None)
        out["blocks.0.attn.key"] = _stack(sd, "blocks.attn.heads.{}.H.weight", n)
        out["blocks.0.ff_scale"] = sd.pop("blocks.scale_ff")
        out["blocks.0.norm.weight"] = sd.pop("blocks.ln.weight")
        out["blocks.0.norm.bias"] = sd.pop("blocks.ln.bias")
        out["blocks.0.eta.weight"] = sd.pop("blocks.proj.weight").unsqueeze(0)
        for name in ("0", "2"):
            for p in ("weight", "bias"):
                key = f"blocks.ffwd.net.{name}.{p}"
                if key in sd:
                    out[f"blocks.0.ff.fc{1 if name == '0' else 2}.{p}"] = sd.pop(key)
    else:
        prefixes = [f"blocks.{i}." for i in range(cfg.n_steps)] if cls == "GPT" else ["blocks."]
        for i, pre in enumerate(prefixes):
            dst = f"blocks.{i}."
            for h in range(n):
                sd.pop(f"{pre}sa.heads.{h}.tril", None)
            out[dst + "attn.qkv.weight"] = torch.cat(
                [_stack(sd, pre + "sa.heads.{}." + w + ".weight", n) for w in ("query", "key", "value")]
            )
            renames = {"sa.proj": "attn.proj", "ffwd.net.0": "mlp.fc", "ffwd.net.2": "mlp.proj",
                       "ln1": "ln1", "ln2": "ln2"}
            for src, tgt in renames.items():
                for p in ("weight", "bias"):
                    out[f"{dst}{tgt}.{p}"] = sd.pop(f"{pre}{src}.{p}")
    if sd:
        raise CheckpointError(f"reference checkpoint has unexpected entries: {', '.join(sorted(sd))}")
    return out


def load_reference_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> LanguageModel:
    """A model of this package holding the weights of a reference-code checkpoint, in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    ckpt = torch_load_safely(path, map_location)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path} is not a reference-code checkpoint (no 'model' state dict)")
    cfg = reference_config(ckpt)
    cls = ckpt["config"]["model_path"].rsplit(".", 1)[-1]
    model = build_model(cfg)
    try:
        state = _convert_state(cls, ckpt["model"], cfg)
    except (KeyError, RuntimeError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: weights do not match a {cls} of the saved shape ({first_line(e)})") from None
    load_matching(model, state, path)
    return model.eval()
