"""Energies as parts: the base classes, the registry and the built-in energies.

``FFEnergy`` and ``AttentionEnergy`` are the base classes (see ``nrgpt.energies.base``); a subclass is
built as ``cls(config)``. ``@register_energy("name")`` makes one selectable by ``ModelConfig(ff="name")``
or ``ModelConfig(attention="name")``; ``nrgpt.testing.check_energy(config)`` checks it.
"""

from . import attention, feedforward  # noqa: F401 - registers the built-in energies
from .base import (
    ATTENTION_ENERGIES,
    FF_ENERGIES,
    NO_ATTENTION,
    AttentionEnergy,
    FFEnergy,
    partial_grad,
    register_energy,
)

__all__ = ["ATTENTION_ENERGIES", "FF_ENERGIES", "NO_ATTENTION", "AttentionEnergy", "FFEnergy", "partial_grad",
           "register_energy"]
