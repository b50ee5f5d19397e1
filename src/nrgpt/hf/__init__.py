"""Hugging Face ``transformers`` and lm-evaluation-harness support (extra: ``pip install 'nrgpt[hf]'``).

* ``nrgpt.hf.export``: ``nrgpt export RUN OUT`` writes a model directory that
  ``AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)`` loads, and ``load_exported``
  reads it back (without ``transformers``);
* ``nrgpt.hf.configuration`` / ``nrgpt.hf.modeling``: ``NRGPTConfig`` and ``NRGPTForCausalLM``;
* ``nrgpt.hf.harness``: the local lm-evaluation-harness tasks and ``nrgpt eval --harness``.

``import nrgpt`` calls ``autoregister``: once ``transformers`` is imported (before or after nrgpt),
``AutoConfig`` and ``AutoModelForCausalLM`` know model_type 'nrgpt', so an exported directory loads with
the installed package's classes and no remote code. Importing this package does not import
``transformers``.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings

_registered = False


def register() -> None:
    """Register ``NRGPTConfig`` and ``NRGPTForCausalLM`` with the transformers Auto classes (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    from .configuration import NRGPTConfig
    from .modeling import NRGPTForCausalLM

    AutoConfig.register(NRGPTConfig.model_type, NRGPTConfig, exist_ok=True)
    AutoModelForCausalLM.register(NRGPTConfig, NRGPTForCausalLM, exist_ok=True)
    _registered = True


class _RegisterAfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``transformers`` through the other finders and registers the classes once it has loaded."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        self._loader, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        module.__spec__.loader = module.__loader__ = self._loader  # transformers' own loader from now on
        _register_quietly()


def _register_quietly() -> None:
    try:
        register()
    except Exception as e:  # never break the user's import of nrgpt or transformers
        warnings.warn(f"nrgpt could not register its classes with transformers: {e}", stacklevel=3)


def autoregister() -> None:
    """Register now if ``transformers`` is imported, else as soon as it is (see the module docstring);
    nothing if it is not installed or its import is blocked (``sys.modules["transformers"] = None``)."""
    imported = sys.modules.get("transformers", False)
    if imported:
        _register_quietly()
    elif imported is False and importlib.util.find_spec("transformers") is not None and not any(
            isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
