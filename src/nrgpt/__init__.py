"""nrgpt: NRGPT (eNeRgy-GPT, arXiv 2512.16762), its GPT baselines, training, evaluation and dynamics."""

from .config import PRESETS, ConfigError, ModelConfig
from .decoding import KVCache, generate, sample_next
from .energies import AttentionEnergy, FFEnergy, register_energy
from .energy import EnergyBlock
from .hf import autoregister
from .model import GPT, NRGPT, LanguageModel, Trajectory, build_model
from .reference import CheckpointError, load_reference_checkpoint

__version__ = "0.1.0"
autoregister()  # the transformers Auto classes know model_type 'nrgpt' once transformers is imported

__all__ = [
    "PRESETS", "ConfigError", "ModelConfig", "KVCache", "generate", "sample_next", "AttentionEnergy", "FFEnergy",
    "register_energy", "EnergyBlock", "GPT", "NRGPT", "LanguageModel", "Trajectory", "build_model",
    "CheckpointError", "load_reference_checkpoint",
]
