"""The two kinds of energy part, their registry, and the autograd fallback for a missing closed form.

A token's energy is E_A = E_A^AT + s E_A^FF (eq. 7). Each part is a small ``nn.Module`` built as
``cls(config)`` from the ``ModelConfig``:

* ``FFEnergy``: E_A^FF depends on g_A alone (and, for a conditioned energy, on a conditioning c_A held
  fixed in the derivative). ``energy(g)`` gives (B, T); ``grad(g)`` gives dE_A/dg_A (B, T, D).
* ``AttentionEnergy``: E_A^AT depends on g_A (the query) and on the keys of the tokens A sees. ``keys(g)``
  is what each token offers later tokens, a function of its own g_B only, so cached decoding can store it
  per step; ``energy(g, keys, visible)`` and ``grad(g, keys, visible)`` take the queries' g and the keys.

A subclass that gives no closed-form ``grad`` inherits one by autograd of its ``energy`` (only the query
side for attention), with the graph kept in training, so that it trains and decodes like any other.
``@register_energy("name")`` makes a subclass selectable as ``ModelConfig(ff="name")`` or
``ModelConfig(attention="name")``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from ..config import ModelConfig

NO_ATTENTION = "none"  # ModelConfig(attention="none"): no attention energy (tokens do not interact)


def partial_grad(energy: Callable[[torch.Tensor], torch.Tensor], g: torch.Tensor) -> torch.Tensor:
    """d(sum of ``energy(g)``)/dg through this argument only, by autograd: whatever else ``energy`` closes
    over (keys, a conditioning computed from the same g) is held fixed. In training (g in a graph, grad
    mode on) the graph is kept, so the result can be differentiated again by the loss's backward."""
    create_graph = torch.is_grad_enabled() and g.requires_grad
    with torch.enable_grad():
        q = g.view_as(g) if g.requires_grad else g.detach().requires_grad_(True)
        return torch.autograd.grad(energy(q).sum(), q, create_graph=create_graph)[0]


class FFEnergy(nn.Module):
    """A feed-forward energy: a scalar of each token's normalised state, E_A^FF = f(g_A).

    Subclass it and define ``energy(g)`` -> (B, T); define ``grad(g)`` -> (B, T, D) too where a closed
    form exists (otherwise autograd of ``energy`` is used). ``conditioning`` = 'input' or 'step' makes
    it a conditioned energy f(g_A; c_A), called as ``energy(g, c)`` and ``grad(g, c)`` with c held fixed
    in the derivative: c_A is the token's normalised input embedding norm(x_A^(0)) ('input') or its
    normalised state at the start of the step, g_A^(t) ('step').
    """

    name = ""  # set by register_energy
    conditioning: str | None = None

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dim, self.hidden = config.n_embd, config.ff_mult * config.n_embd

    def energy(self, g: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define energy(g)")

    def autograd_grad(self, g: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        """dE_A/dg_A by autograd of ``energy`` (the conditioning held fixed)."""
        return partial_grad(lambda q: self.energy(q, *cond), g)

    def grad(self, g: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        """dE_A/dg_A, (B, T, D); this default is ``autograd_grad``: override it with the closed form."""
        return self.autograd_grad(g, *cond)

    @classmethod
    def has_closed_form(cls) -> bool:
        return cls.grad is not FFEnergy.grad


class AttentionEnergy(nn.Module):
    """An attention energy: token A's energy given its own g_A and the keys of the tokens B it sees
    (B < A under ``mask='strict'``, B <= A under 'inclusive').

    Subclass it and define ``keys(g)`` -> (B, H, T, d) (a function of each token's own g only) and
    ``energy(g, keys, visible=None)`` -> (B, Tq); define ``grad(g, keys, visible=None)`` -> (B, Tq, D)
    where a closed form exists. The queries g (B, Tq, D) are the last Tq of the Tk tokens whose keys
    (B, H, Tk, d) are given (Tq = Tk for a whole sequence, Tq = 1 when decoding); ``self.visibility(g,
    keys, visible)`` is the (Tq, Tk) mask of which keys each query sees, ``visible`` being the one a
    static decoding step supplies (see ``nrgpt.decoding.KVCache``).

    Without a closed form, ``grad`` is autograd of ``energy`` on the query side only (the keys held
    fixed). Under the inclusive mask that omits the key-side self term (token A is one of its own keys),
    which is the update of grad_mode='reference'; grad_mode='exact' then needs a closed form.
    """

    name = ""  # set by register_energy

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dim, self.n_head = config.n_embd, config.n_head
        self.strict = config.mask == "strict"
        self.self_term = config.mask == "inclusive" and config.grad_mode == "exact"
        self.dropout = config.dropout

    def keys(self, g: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define keys(g)")

    def energy(self, g: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define energy(g, keys, visible)")

    def autograd_grad(self, g: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        """dE_A/dg_A by autograd of ``energy`` through the queries only (the keys held fixed)."""
        return partial_grad(lambda q: self.energy(q, keys, visible), g)

    def grad(self, g: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        """dE_A/dg_A, (B, Tq, D); this default is ``autograd_grad``: override it with the closed form."""
        return self.autograd_grad(g, keys, visible)

    @classmethod
    def has_closed_form(cls) -> bool:
        return cls.grad is not AttentionEnergy.grad

    def visibility(self, g: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        """Which keys each query sees, (Tq, Tk) (or the static step's (1, Tk) ``visible``)."""
        if visible is not None:
            return visible
        tq, tk = g.shape[-2], keys.shape[-2]
        return torch.ones(tq, tk, dtype=torch.bool, device=g.device).tril(tk - tq - int(self.strict))

    @staticmethod
    def logsumexp(s: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """log sum_B exp(s_AB) over the visible B, (..., Tq); 0 for a query that sees no key (the first
        token under the strict mask)."""
        s = s.masked_fill(~visible, float("-inf"))
        empty = ~visible.any(-1)
        return torch.logsumexp(s.masked_fill(empty[..., None], 0.0), dim=-1).masked_fill(empty, 0.0)


FF_ENERGIES: dict[str, type[FFEnergy]] = {}
ATTENTION_ENERGIES: dict[str, type[AttentionEnergy]] = {}


def register_energy(name: str):
    """Class decorator: ``@register_energy("name")`` on an ``FFEnergy`` or ``AttentionEnergy`` subclass
    makes it selectable as ``ModelConfig(ff="name")`` or ``ModelConfig(attention="name")``. Registering
    a user's name again replaces the earlier class (re-running a notebook cell); a built-in name is kept."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"energy name {name!r} must be an identifier such as 'my_energy'")

    def register(cls: type) -> type:
        if isinstance(cls, type) and issubclass(cls, FFEnergy):
            table = FF_ENERGIES
        elif isinstance(cls, type) and issubclass(cls, AttentionEnergy):
            table = ATTENTION_ENERGIES
        else:
            raise TypeError(f"register_energy({name!r}) decorates a subclass of nrgpt.energies.FFEnergy or "
                            f"AttentionEnergy, not {cls!r}")
        if table is ATTENTION_ENERGIES and name == NO_ATTENTION:
            raise ValueError(f"attention energy name {NO_ATTENTION!r} is reserved for 'no attention energy'")
        if name in table and table[name].__module__.startswith(__package__ + ".") and table[name] is not cls:
            raise ValueError(f"{name!r} is a built-in energy; register yours under another name")
        if table is FF_ENERGIES and cls.conditioning not in (None, "input", "step"):
            raise ValueError(f"{cls.__name__}.conditioning = {cls.conditioning!r}; use None, 'input' or 'step'")
        cls.name = name
        table[name] = cls
        return cls

    return register
