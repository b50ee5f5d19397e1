"""Model configuration: one dataclass, validated at construction, plus the named presets.

Every architectural choice of the paper and of the authors' reference code is a field here.
``ModelConfig.preset(name, **overrides)`` gives the named models; ``build_model`` (in
``nrgpt.model``) turns a config into a module.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any

from .errors import ConfigError

MODELS = ("nrgpt", "gpt", "rgpt", "rgpt_parallel")
ATTENTIONS = ("lowrank", "full", "none")
MASKS = ("strict", "inclusive")
FF_ENERGIES = ("ff1", "ff2w", "ff2", "dam")
NORMS = ("layernorm", "rmsnorm", "bare_layernorm", "none")
ETAS = ("free", "descent", "psd", "identity")
GRAD_MODES = ("exact", "reference")


@dataclass
class ModelConfig:
    """Shape and architecture of a model.

    Shared by all models:
      model        'nrgpt' (one energy block, eq. 6), 'gpt' (n_steps distinct sequential blocks),
                   'rgpt' (one sequential block applied n_steps times), 'rgpt_parallel' (one
                   GPT-J parallel block, eq. 5, applied n_steps times).
      n_steps      recurrent steps (the paper's and reference code's ``n_layer``); layers for 'gpt'.
      ff_mult      hidden width of the feed-forward part as a multiple of n_embd.
      checkpoint_steps  recompute each step's activations in the backward pass instead of storing
                   them (activation checkpointing over steps): less memory for long contexts, about
                   one more forward of compute, identical results.

    NRGPT only (ignored by the baselines):
      attention    'lowrank': J_h = W_K^T W_Q with head size n_embd/n_head, beta = 1/sqrt(head size)
                   and a learnable alpha_h (eq. 11, the paper); 'full': one n_embd x n_embd matrix per
                   head, beta = 1, no alpha (the reference code); 'none': no attention energy
                   (tokens do not interact: an ablation, and the case where total energy must fall).
      mask         'strict': token A attends B < A (eq. 11); 'inclusive': B <= A.
      ff           feed-forward energy: 'ff1' -||GELU(W g + b)||^2; 'ff2w' -g.(W2 GELU(W1 g + b1) + b2)
                   (eq. 24); 'ff2' -||GELU(W2 GELU(W1 g + b1) + b2)||^2 (W1 is n_embd x n_embd);
                   'dam' -sum F(W g + b), F = ReLU^2/2 (eq. 14-16).
      norm         g = norm(x) (eq. 17, 25-26): 'layernorm', 'rmsnorm', 'bare_layernorm' (weight
                   fixed at 1, trained bias: the reference code), 'none' (g = x).
      eta          inference rate (eq. 6): 'free' a trained n_embd x n_embd matrix (reference code);
                   'descent' c * diag(gamma), c > 0 (Prop. 2.1); 'psd' U^T U + V - V^T (Prop. 2.2,
                   eq. 19); 'identity'.
      eta_per_step one eta per step (eta^(t)) instead of one shared by all steps.
      eta_init     initial c for 'descent'/'psd' (the initial step size scale).
      ff_scale     a trained scalar s multiplying the FF energy, E = E^AT + s E^FF (the reference
                   code's ``scale_ff``).
      grad_mode    'exact': the update uses dE_A/dg_A exactly; 'reference': with the inclusive mask
                   the key-side self term -softmax_AA J^T g_A is omitted, as the reference code does.
    """

    model: str = "nrgpt"
    vocab_size: int = 65
    block_size: int = 256
    n_embd: int = 128
    n_head: int = 1
    n_steps: int = 8
    dropout: float = 0.0
    ff_mult: int = 4
    attention: str = "full"
    mask: str = "inclusive"
    ff: str = "ff2w"
    norm: str = "bare_layernorm"
    eta: str = "free"
    eta_per_step: bool = False
    eta_init: float = 1.0
    ff_scale: bool = True
    grad_mode: str = "reference"
    checkpoint_steps: bool = False

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def choice(name: str, allowed: tuple[str, ...]) -> None:
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(
                    f"model.{name} = {value!r} is not allowed; choose one of {', '.join(allowed)}"
                )

        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"model.{name} = {value!r} must be a positive integer")

        choice("model", MODELS)
        choice("attention", ATTENTIONS)
        choice("mask", MASKS)
        choice("ff", FF_ENERGIES)
        choice("norm", NORMS)
        choice("eta", ETAS)
        choice("grad_mode", GRAD_MODES)
        for name in ("vocab_size", "block_size", "n_embd", "n_head", "n_steps", "ff_mult"):
            positive_int(name)
        for name in ("eta_per_step", "ff_scale", "checkpoint_steps"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"model.{name} = {getattr(self, name)!r} must be true or false")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout = {self.dropout!r} must be a number in [0, 1)")
        if not isinstance(self.eta_init, (int, float)) or not 0 < self.eta_init < math.inf:
            raise ConfigError(f"model.eta_init = {self.eta_init!r} must be a finite positive number")
        if self.n_embd % self.n_head != 0:
            raise ConfigError(
                f"model.n_embd = {self.n_embd} is not divisible by model.n_head = {self.n_head}; "
                "pick n_head among the divisors of n_embd"
            )

    # ------------------------------------------------------------------ helpers
    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def is_energy_model(self) -> bool:
        return self.model == "nrgpt"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown model config key(s): {', '.join(unknown)}; known keys: {', '.join(sorted(known))}"
            )
        for f in fields(cls):
            if f.name in data:
                _check_type(f"model.{f.name}", data[f.name], type(getattr(cls(), f.name)))
        return cls(**data)

    def replace(self, **overrides: Any) -> ModelConfig:
        return ModelConfig.from_dict({**self.to_dict(), **overrides})

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named model (see ``PRESETS``) with any field overridden."""
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


def _check_type(name: str, value: Any, expected: type) -> None:
    if expected is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name} = {value!r} must be a finite number")
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return
    if expected is int and isinstance(value, bool):
        raise ConfigError(f"{name} = {value!r} must be an integer, not a boolean")
    if not isinstance(value, expected):
        raise ConfigError(f"{name} = {value!r} must be of type {expected.__name__}")


# The reference code's NRGPT: full D x D attention matrices, no scale, BareLayerNorm, a free eta
# matrix, a trained FF scale, and its update (which drops the self term under the inclusive mask).
_REFERENCE_NRGPT = dict(
    model="nrgpt", attention="full", mask="inclusive", norm="bare_layernorm", eta="free",
    ff_scale=True, grad_mode="reference",
)
# The paper's form: low-rank J_h = W_K^T W_Q with beta and alpha (eq. 11), strict mask, LayerNorm,
# eta = c diag(gamma) (Prop. 2.1) and the exact gradient.
_PAPER_NRGPT = dict(
    model="nrgpt", attention="lowrank", mask="strict", norm="layernorm", eta="descent",
    ff_scale=False, grad_mode="exact",
)

PRESETS: dict[str, dict[str, Any]] = {
    "NRGPT_H_FF1": {**_REFERENCE_NRGPT, "ff": "ff1"},
    "NRGPT_H_FF2W": {**_REFERENCE_NRGPT, "ff": "ff2w"},
    "NRGPT_H_FF2": {**_REFERENCE_NRGPT, "ff": "ff2"},
    "NRGPT_P_FF1": {**_PAPER_NRGPT, "ff": "ff1"},
    "NRGPT_P_FF2W": {**_PAPER_NRGPT, "ff": "ff2w"},
    "NRGPT_P_DAM": {**_PAPER_NRGPT, "ff": "dam"},
    # Prop. 2.2: no normalisation, eta = U^T U + V - V^T.
    "NRGPT_P_PSD": {**_PAPER_NRGPT, "ff": "ff2w", "norm": "none", "eta": "psd"},
    "GPT": {"model": "gpt"},
    "GPT_Rec": {"model": "rgpt"},
    "GPT_Rec_parallel": {"model": "rgpt_parallel"},
}
