"""NRGPT's one-token decoding step in C (``csrc/descent.c``), the default for cached decoding on a CPU.

An eager one-token step is bound by dispatch: a few hundred ATen ops of a few microseconds each for a
few hundred thousand FLOPs per step. ``csrc/descent.c`` runs eq. 6 for the new token over every step of
every block as plain loops (the same closed forms as ``nrgpt.energies``, over the KV cache's own
buffers), and ``descend`` calls it from ``NRGPT.body`` whenever it serves the step: a CPU, float32 or
float64, one new token in each of at most ``MAX_BATCH`` rows after a prefill, eval mode without
autograd, no step options (``n_steps``, ``tol``), and a model whose parts it knows (``serves``): the
norms, the 'lowrank' and 'full' attention energies (both masks, both grad modes) or none, the ff1,
ff2w, ff2 and dam energies, ``ff_scale``, and every inference rate (applied as its matrix,
``InferenceRate.matrix``). Anything else decodes eagerly, with the same results.

The C file is compiled on first use with the system's C compiler (``$CC``, else cc, gcc or clang) for
this CPU (``-march=native``) into ``$NRGPT_CACHE_DIR`` (default ``~/.cache/nrgpt``), keyed by the
source, the flags, the compiler and the CPU, which takes about a second once. The build runs in a
background thread while decoding goes on eagerly (``library``): a generation never waits for it. Where
no compiler works it warns once and decoding stays eager. ``NRGPT_NATIVE=0`` (or
``nrgpt.native.enabled = False``) turns it off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from .decoding import KVCache
from .energies.attention import FullAttention, LowRankAttention
from .energies.feedforward import FF1, FF2, FF2W, DenseAssociativeMemory

enabled = os.environ.get("NRGPT_NATIVE", "1") != "0"

_SOURCE = Path(__file__).parent / "csrc" / "descent.c"
_FLAGS = ("-O3", "-fPIC", "-shared", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
          "-fno-trapping-math")  # reassociation lets the compiler vectorise the dot products
_TYPES = {torch.float32: "float", torch.float64: "double"}
# the enums of descent.c
_NORMS = {"none": 0, "layernorm": 1, "bare_layernorm": 1, "rmsnorm": 2}
_ATTENTION = {type(None): 0, LowRankAttention: 1, FullAttention: 2}
_FF = {FF1: 0, FF2W: 1, FF2: 2, DenseAssociativeMemory: 3}
_W_COUNT = 11
# Rows of one step: descent.c's loops cost about the same per row whatever the batch, while the eager
# step's batched products amortise its dispatch; at 2 threads the C step was 1.4-2.7x faster at 4 rows
# (n_embd 768-128) and slower from 8-16 rows on (docs/performance.md)
MAX_BATCH = 4

_libraries: dict[torch.dtype, ctypes.CDLL | None] = {}  # ready (None: cannot be built)
_builds: dict[torch.dtype, threading.Thread] = {}
_failures: dict[torch.dtype, str] = {}  # a failed build's warning, for the next caller to give
_lock = threading.Lock()


def serves(blocks) -> bool:
    """Whether ``descent.c`` knows every part of these energy blocks (by class: a subclass may change
    the math)."""
    return all(type(b.attn) in _ATTENTION and type(b.ff) in _FF and b.norm.kind in _NORMS for b in blocks)


def _cache_dir() -> Path:
    root = os.environ.get("NRGPT_CACHE_DIR")
    return Path(root or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nrgpt") / "native"


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags", "Features"))}))
    except OSError:
        return platform.machine() + platform.processor()


def _compilers() -> list[str]:
    found = [os.environ.get("CC", ""), (sysconfig.get_config_var("CC") or "").split(" ")[0], "cc", "gcc", "clang"]
    return list(dict.fromkeys(path for name in found if name and (path := shutil.which(name))))


def _candidates(real: str) -> list[tuple[str, tuple[str, ...], Path]]:
    """(compiler, flags, cached library) for REAL = ``real``, in the order they are tried."""
    source, cpu = _SOURCE.read_bytes(), _cpu_id().encode()
    found = []
    for cc in _compilers():
        for arch in (("-march=native",), ()):
            flags = (*_FLAGS, *arch, f"-DREAL={real}")
            key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), cc.encode(), cpu])).hexdigest()
            found.append((cc, flags, _cache_dir() / f"descent_{real}_{key[:16]}.so"))
    return found


def _build(real: str) -> Path:
    """The shared library of descent.c with REAL = ``real``, compiled unless cached; raises on failure."""
    errors = []
    for cc, flags, out in _candidates(real):
        if out.exists():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            built = Path(tmp) / out.name
            run = subprocess.run([cc, *flags, "-o", str(built), str(_SOURCE), "-lm"], capture_output=True, text=True,
                                 timeout=300)
            if run.returncode == 0:
                os.replace(built, out)  # atomic: concurrent processes may build the same file
                return out
            errors.append(f"{cc} {' '.join(flags)}: {run.stderr.strip().splitlines()[-1:] or run.returncode}")
    raise RuntimeError("; ".join(errors) or "no C compiler found (set CC)")


def library(dtype: torch.dtype, wait: bool = False) -> ctypes.CDLL | None:
    """``descent.c`` for ``dtype`` (float32 or float64) where it is ready, else None.

    A library already in the cache is loaded at once. Otherwise the first call starts its build in a
    background thread and returns None, so decoding goes on eagerly and switches to the C step as soon as
    the build is done: a generation never waits for the compiler (``wait=True`` does; a process that ends
    first waits for it at exit, about a second once per machine). A build that fails
    is warned about once, in the calling thread, and decoding stays eager. None also where this module
    runs without its C file (the Hugging Face export bundles the Python files only)."""
    if dtype in _libraries and dtype not in _failures:  # every token after the first
        return _libraries[dtype]
    with _lock:
        if dtype not in _libraries and dtype not in _builds:
            if not _SOURCE.exists():
                _libraries[dtype] = None
            elif cached := next((out for _, _, out in _candidates(_TYPES[dtype]) if out.exists()), None):
                _libraries[dtype] = _load_or_warn(cached, dtype)
            else:
                # not a daemon: a process that ends first waits for the build, so that it lands in the cache
                _builds[dtype] = threading.Thread(target=_build_and_load, args=(dtype,))
                _builds[dtype].start()
    if wait and dtype in _builds:
        _builds[dtype].join()
    if dtype in _failures:
        warnings.warn(_failures.pop(dtype), stacklevel=3)
    return _libraries.get(dtype)


def _build_and_load(dtype: torch.dtype) -> None:
    try:
        path = _build(_TYPES[dtype])
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        _failures[dtype] = f"nrgpt.native: cannot build the C decoding step ({e}); decoding eagerly (same tokens)"
        _libraries[dtype] = None
        return
    _libraries[dtype] = _load_or_warn(path, dtype)


def _load_or_warn(path: Path, dtype: torch.dtype) -> ctypes.CDLL | None:
    try:
        return _load(path)
    except OSError as e:
        _failures[dtype] = f"nrgpt.native: cannot load {path} ({e}); decoding eagerly (same tokens)"
        return None


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.nrgpt_descend.restype = ctypes.c_int
    return lib


class _Packed:
    """One model's weights and one cache's key buffers as descent.c takes them, for ``dtype``. The
    tensors are kept so that the pointers stay valid. Most weights are read in place; ff2w's stacked
    [W1; W2^T] and the inference rates' matrices are formed here, once per cache (a new cache, as every
    ``generate`` call makes, sees changed weights)."""

    def __init__(self, model, cache: KVCache, dtype: torch.dtype, batch: int):
        config, blocks = model.config, model.blocks
        first = blocks[0]
        self.dtype, self.batch = dtype, batch
        head_dim = 0 if first.attn is None else first.attn.key.shape[0] // config.n_head
        self.config = (ctypes.c_int * 12)(
            config.n_embd, config.n_head, head_dim, first.ff.hidden, len(blocks), config.n_steps,
            _NORMS[first.norm.kind], _ATTENTION[type(first.attn)], int(first.attn is not None and first.attn.strict),
            int(first.attn is not None and first.attn.self_term), _FF[type(first.ff)], first.eta.n)
        self.tensors: list[torch.Tensor] = []
        pointers: list[int | None] = []
        for block in blocks:
            attn, ff = block.attn, block.ff
            fc2 = getattr(ff, "fc2", None)
            w1, w2, b2 = ff.fc1.weight, *((None, None) if fc2 is None else (fc2.weight, fc2.bias))
            if type(ff) is FF2W:  # [W1; W2^T], read in one pass (descent.c's ff_units)
                w1, w2 = torch.cat([w1, w2.T]), None
            rate = block.eta
            eta = None if rate.kind == "identity" else torch.stack([rate.matrix(t) for t in range(rate.n)])
            parts = [block.norm.weight if block.norm.kind != "none" else None, block.norm.bias,
                     getattr(attn, "query", None), None if attn is None else attn.key, getattr(attn, "alpha", None),
                     w1, ff.fc1.bias, w2, b2, block.ff_scale, eta]
            for part in parts:
                if part is not None:
                    part = part.detach().to(dtype).contiguous()
                    self.tensors.append(part)
                pointers.append(None if part is None else part.data_ptr())
        self.weights = (ctypes.c_void_p * len(pointers))(*pointers)
        n_slots = len(blocks) * config.n_steps
        self.keys = None
        if first.attn is not None:
            buffers = [cache.keys.get(slot) for slot in range(n_slots)]
            shape = (batch, config.n_head, cache.capacity, head_dim)
            if any(k is None or k.shape != shape or k.dtype != dtype or not k.is_contiguous() for k in buffers):
                raise LookupError("the cache holds other keys than this model's steps")
            self.keys = (ctypes.c_void_p * n_slots)(*[k.data_ptr() for k in buffers])


def descend(model, x: torch.Tensor, cache: KVCache) -> torch.Tensor | None:
    """The states after every step for the new tokens x (B, 1, D) by descent.c, or None where it does
    not serve this step (the caller then runs the eager descent)."""
    if (not enabled or x.shape[1] != 1 or x.shape[0] > MAX_BATCH or cache.length == 0 or cache.static_step
            or x.device.type != "cpu" or x.dtype not in _TYPES or model.training or torch.is_grad_enabled()):
        return None
    lib = library(x.dtype)
    if lib is None:
        return None
    packed = cache.packed
    if packed is None or packed.dtype != x.dtype or packed.batch != x.shape[0]:
        try:
            packed = cache.packed = _Packed(model, cache, x.dtype, x.shape[0])
        except LookupError:
            return None
    out = x.contiguous().clone()
    if lib.nrgpt_descend(packed.config, packed.weights, ctypes.c_void_p(out.data_ptr()), packed.keys,
                         x.shape[0], cache.length, cache.capacity):
        raise MemoryError("nrgpt.native: the C decoding step could not allocate its scratch memory")
    return out
