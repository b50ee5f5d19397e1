"""Energies as parts: the base classes, the registry and the built-in energies.

``FFEnergy`` and ``AttentionEnergy`` are the base classes (see ``nrgpt.energies.base``); a subclass is
built as ``cls(config)``. ``@register_energy("name")`` makes one selectable by ``ModelConfig(ff="name")``
or ``ModelConfig(attention="name")``; ``nrgpt.testing.check_energy(config)`` checks it.
"""

# Importing the built-in energies registers them.
from .attention import DiagLowRankAttention, FullAttention, LogSumExpAttention, LowRankAttention
from .base import (
    ATTENTION_ENERGIES,
    FF_ENERGIES,
    NO_ATTENTION,
    AttentionEnergy,
    FFEnergy,
    partial_grad,
    register_energy,
)
from .feedforward import FF1, FF2, FF2W, DenseAssociativeMemory, GatedEnergy, StepGatedEnergy

__all__ = ["ATTENTION_ENERGIES", "FF_ENERGIES", "NO_ATTENTION", "AttentionEnergy", "FFEnergy", "partial_grad",
           "register_energy", "LogSumExpAttention", "LowRankAttention", "FullAttention", "DiagLowRankAttention",
           "FF1", "FF2W", "FF2", "DenseAssociativeMemory", "GatedEnergy", "StepGatedEnergy"]
