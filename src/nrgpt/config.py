"""Model configuration: one dataclass, validated at construction, plus the named presets.

Every architectural choice of the paper and of the authors' reference code is a field here.
``ModelConfig.preset(name, **overrides)`` gives the named models; ``build_model`` (in
``nrgpt.model``) turns a config into a module.

The dict form (``to_dict``, ``from_dict``; a run config's ``model`` table, a run's config.json) is a
preset name and fields, which override the preset's: ``{"preset": "GPT", "n_embd": 64}``. A field a model
does not use (``unused_options``: NRGPT's energy options on a GPT baseline) is an error there, not a
setting silently ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from .errors import ConfigError

MODELS = ("nrgpt", "gpt", "rgpt", "rgpt_parallel")
BASELINES = MODELS[1:]
MASKS = ("strict", "inclusive")
NORMS = ("layernorm", "rmsnorm", "bare_layernorm", "none")
ETAS = ("free", "descent", "psd", "diag_lowrank", "identity")
ETA_OPTIONS = {"eta_init": ("descent", "psd", "diag_lowrank"), "eta_rank": ("diag_lowrank",)}  # who uses them
GRAD_MODES = ("exact", "reference")


@dataclass
class ModelConfig:
    """Shape and architecture of a model.

    Shared by all models:
      model        'nrgpt' (one energy block, eq. 6), 'gpt' (n_steps distinct sequential blocks),
                   'rgpt' (one sequential block applied n_steps times), 'rgpt_parallel' (one
                   GPT-J parallel block, eq. 5, applied n_steps times).
      vocab_size   None: not set yet (a run config's model takes its dataset's vocabulary).
      n_steps      recurrent steps (the paper's and reference code's ``n_layer``); layers for 'gpt'.
      ff_mult      hidden width of the feed-forward part as a multiple of n_embd.
      checkpoint_steps  recompute each step's activations in the backward pass instead of storing
                   them (activation checkpointing over steps): less memory for long contexts, about
                   one more forward of compute, identical results.
      preset_name  the preset the config was made from (``preset`` in the dict form), whose model it
                   is: a label for run names and results tables; None for a config made field by field.

    NRGPT only (``NRGPT_OPTIONS``): a baseline keeps their defaults, and its dict form may not set them.
      attention    a registered attention energy (``nrgpt.energies``; docs/model.md): 'lowrank':
                   J_h = W_K^T W_Q with head size n_embd/n_head, beta = 1/sqrt(head size) and a learnable
                   alpha_h (eq. 11, the paper); 'full': one n_embd x n_embd matrix per head, beta = 1, no
                   alpha (the reference code); 'diag_lowrank': J_h = diag(d_h) + W_K^T W_Q; 'none': no
                   attention energy (tokens do not interact: an ablation, and the case where total energy
                   must fall).
      mask         'strict': token A attends B < A (eq. 11); 'inclusive': B <= A.
      ff           a registered feed-forward energy: 'ff1' -||GELU(W g + b)||^2; 'ff2w'
                   -g.(W2 GELU(W1 g + b1) + b2) (eq. 24); 'ff2' -||GELU(W2 GELU(W1 g + b1) + b2)||^2 (W1 is
                   n_embd x n_embd); 'dam' -sum F(W g + b), F = ReLU^2/2 (eq. 14-16); 'glu', 'glu_step' the
                   gated energy -sum_i F(w_i.g)(v_i.c + b_i), F' = GELU, conditioned on the normalised input
                   embedding or on the state at the start of the step.
      n_blocks     distinct energy blocks, each applied n_steps times in turn (recursive blocks; 1: NRGPT).
      norm         g = norm(x) (eq. 17, 25-26): 'layernorm', 'rmsnorm', 'bare_layernorm' (weight
                   fixed at 1, trained bias: the reference code), 'none' (g = x).
      eta          inference rate (eq. 6): 'free' a trained n_embd x n_embd matrix (reference code);
                   'descent' c * diag(gamma), c > 0 (Prop. 2.1); 'psd' U^T U + V - V^T (Prop. 2.2,
                   eq. 19); 'diag_lowrank' diag(softplus(d)) + U U^T with U of rank eta_rank (a
                   lightweight preconditioner, positive definite: Prop. 2.2 applies); 'identity'.
      eta_rank     the rank r of U for eta 'diag_lowrank'.
      eta_per_step one eta per step (eta^(t)) instead of one shared by all steps.
      eta_init     initial c for 'descent'/'psd' (the initial step size scale).
      ff_scale     a trained scalar s multiplying the FF energy, E = E^AT + s E^FF (the reference
                   code's ``scale_ff``).
      grad_mode    'exact': the update uses dE_A/dg_A exactly; 'reference': with the inclusive mask
                   the key-side self term -softmax_AA J^T g_A is omitted, as the reference code does.
    """

    model: str = "nrgpt"
    vocab_size: int | None = 65
    block_size: int = 256
    n_embd: int = 128
    n_head: int = 1
    n_steps: int = 8
    dropout: float = 0.0
    ff_mult: int = 4
    n_blocks: int = 1
    attention: str = "full"
    mask: str = "inclusive"
    ff: str = "ff2w"
    norm: str = "bare_layernorm"
    eta: str = "free"
    eta_per_step: bool = False
    eta_init: float = 1.0
    eta_rank: int = 8
    ff_scale: bool = True
    grad_mode: str = "reference"
    checkpoint_steps: bool = False
    preset_name: str | None = None

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

        from .energies import ATTENTION_ENERGIES, FF_ENERGIES, NO_ATTENTION

        choice("model", MODELS)
        if self.preset_name is not None:
            _check_preset(self.preset_name)
            kind = PRESETS[self.preset_name]["model"]
            if self.model != kind:
                raise ConfigError(f"model.model = {self.model!r} is not the model of model.preset = "
                                  f"{self.preset_name!r} ({kind!r}); leave model.model unset")
        for f in fields(self):
            if f.name in unused_options(self.model) and getattr(self, f.name) != f.default:
                raise ConfigError(_unused_message(f.name, getattr(self, f.name), self.model, self.preset_name))
        choice("attention", (*ATTENTION_ENERGIES, NO_ATTENTION))
        choice("mask", MASKS)
        choice("ff", tuple(FF_ENERGIES))
        choice("norm", NORMS)
        choice("eta", ETAS)
        for name, etas in ETA_OPTIONS.items():
            value = getattr(self, name)
            if self.eta not in etas and value != type(self).__dataclass_fields__[name].default:
                raise ConfigError(f"model.{name} = {value!r} does not apply to model.eta = {self.eta!r}: it is an "
                                  f"option of eta {' or '.join(repr(e) for e in etas)}; remove it or pick one of those")
        choice("grad_mode", GRAD_MODES)
        if self.vocab_size is not None:
            positive_int("vocab_size")
        for name in ("block_size", "n_embd", "n_head", "n_steps", "ff_mult", "n_blocks", "eta_rank"):
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
        attention = ATTENTION_ENERGIES.get(self.attention)
        if attention is not None and not attention.has_closed_form() and self.mask == "inclusive" \
                and self.grad_mode == "exact":
            raise ConfigError(
                f"model.attention = {self.attention!r} has no closed-form grad, and autograd gives only the query "
                "side, which under mask 'inclusive' is grad_mode 'reference'; set model.mask = 'strict' or "
                "model.grad_mode = 'reference' (or give the energy a grad)"
            )

    # ------------------------------------------------------------------ helpers
    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def is_energy_model(self) -> bool:
        return self.model == "nrgpt"

    @property
    def is_recurrent(self) -> bool:
        """Whether the model applies shared weights n_steps times, so that it can run any number of steps
        (every model but the deep 'gpt', whose n_steps layers are distinct)."""
        return self.model != "gpt"

    @classmethod
    def setting_types(cls) -> dict[str, type]:
        """The keys of the dict form and the type of each: ``preset`` and every field but ``preset_name``."""
        return {"preset": str, **{f.name: type(f.default) for f in fields(cls) if f.name != "preset_name"}}

    def to_dict(self) -> dict[str, Any]:
        """The dict form: ``preset`` and the fields this model uses."""
        unused = unused_options(self.model)
        return {"preset": self.preset_name, **{name: getattr(self, name) for name in self.setting_types()
                                               if name != "preset" and name not in unused}}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, drop_unused: bool = False) -> ModelConfig:
        """The config of a dict form (see the module docstring); ConfigError naming the first bad key: unknown,
        of the wrong type, or an option the model does not use. ``drop_unused`` drops those options instead:
        for configs saved by earlier versions, which recorded every field whatever the model."""
        data = dict(data)
        preset = data.pop("preset", None)
        base = {}
        if preset is not None:
            _check_preset(preset)
            base = {**PRESETS[preset], "preset_name": preset}
        types = cls.setting_types()
        unknown = sorted(set(data) - set(types))
        if unknown:
            raise ConfigError(
                f"unknown model config key(s): {', '.join(unknown)}; known keys: {', '.join(sorted(types))}"
            )
        for name, value in data.items():
            if not (name == "vocab_size" and value is None):
                _check_type(f"model.{name}", value, types[name])
        kind = base.get("model", data.get("model", cls.model))  # a preset's own, if it contradicts: validate()
        unused = [name for name in unused_options(kind) if name in data]
        if unused and not drop_unused:
            raise ConfigError(_unused_message(unused[0], data[unused[0]], kind, preset))
        return cls(**{**base, **{k: v for k, v in data.items() if k not in unused}})

    def replace(self, **overrides: Any) -> ModelConfig:
        return ModelConfig.from_dict({**self.to_dict(), **overrides})

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named model (see ``PRESETS``) with any field overridden."""
        return cls.from_dict({"preset": name, **overrides})


NRGPT_OPTIONS = ("n_blocks", "attention", "mask", "ff", "norm", "eta", "eta_per_step", "eta_init", "eta_rank",
                 "ff_scale", "grad_mode")


def unused_options(model: str) -> tuple[str, ...]:
    """The ModelConfig fields a model of kind ``model`` does not use: NRGPT's energy options on a baseline."""
    return NRGPT_OPTIONS if model in BASELINES else ()


def _unused_message(name: str, value: Any, model: str, preset: str | None) -> str:
    which = f"{preset} (a {model!r} model)" if preset else f"a {model!r} model"
    return f"model.{name} = {value!r} does not apply to {which}: it is an NRGPT option; remove it for this model"


def _check_preset(name: Any) -> None:
    if not isinstance(name, str) or name not in PRESETS:
        raise ConfigError(f"model.preset = {name!r} is not allowed; choose one of {', '.join(PRESETS)}")


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
    # Also the Energy Transformer's energy (Hoover et al. 2023) in causal per-token form: energy attention
    # is the low-rank attention, its Hopfield network the dam energy (docs/model.md).
    "NRGPT_P_DAM": {**_PAPER_NRGPT, "ff": "dam"},
    # Prop. 2.2: no normalisation, eta = U^T U + V - V^T.
    "NRGPT_P_PSD": {**_PAPER_NRGPT, "ff": "ff2w", "norm": "none", "eta": "psd"},
    # After NRGPT (docs/model.md, "The variants after NRGPT"): each changes one part of NRGPT_P_FF2W.
    "NRGPT_P_DLR": {**_PAPER_NRGPT, "ff": "ff2w", "attention": "diag_lowrank"},
    "NRGPT_P_GLU": {**_PAPER_NRGPT, "ff": "glu"},
    "NRGPT_P_GLU_STEP": {**_PAPER_NRGPT, "ff": "glu_step"},
    "NRGPT_P_PRECOND": {**_PAPER_NRGPT, "ff": "ff2w", "norm": "none", "eta": "diag_lowrank"},
    "NRGPT_P_REC": {**_PAPER_NRGPT, "ff": "ff2w", "n_blocks": 2, "n_steps": 4},
    "GPT": {"model": "gpt"},
    "GPT_Rec": {"model": "rgpt"},
    "GPT_Rec_parallel": {"model": "rgpt_parallel"},
}
