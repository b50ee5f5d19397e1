"""Run configuration: what to train, on which data, how, and where to write it.

A run is described by ``RunConfig``: one top-level setting (``out_dir``) and five sections,

    model   a ``ModelConfig``, written as a model preset name (``preset``, one of ``nrgpt.PRESETS``) plus
            any of its fields; ``vocab_size`` comes from the dataset's meta.json unless it is set here
    data    the prepared dataset directory
    train   optimisation: batch, schedule, AdamW, clipping, evaluation, budget, seed
    system  device, precision, torch.compile, threads
    log     logging interval, progress bar, TensorBoard, Weights & Biases

It is built in three layers, each overriding the one before: the defaults below, a preset file (TOML or
YAML; by name from ``nrgpt/presets`` or by path; a preset may name another in ``extends``, which is then
a layer below it), and dotted command-line overrides (``train.lr=1e-3``, all of them one layer). Every
value is checked on the way in: unknown keys, wrong types and impossible values raise ``ConfigError``
with one line naming the field.

A layer that sets ``model.preset`` picks the model afresh: the model settings of the layers below that
this model does not use (NRGPT's energy options under a GPT baseline, ``nrgpt.config.unused_options``)
are dropped, since they were meant for the model chosen there, while the layer's own settings must all
apply to its model (``ConfigError`` otherwise). So ``--set model.preset=GPT`` over the ``listops`` preset
(``model.mask = "strict"``) trains a GPT, and ``--set model.preset=GPT --set model.mask=strict`` is an
error. A run's saved config.json is read with such options dropped (``RunConfig.load``): versions before
this rule saved every model field, used or not.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .argtypes import SEED_MAX
from .config import PRESETS, ConfigError, ModelConfig, _check_type, unused_options
from .errors import read_parsed

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

SCHEDULES = ("cosine", "exponential", "constant")
STEPS_DISTRIBUTIONS = ("fixed", "lognormal", "uniform")
OPTIMIZERS = ("adamw", "muon")
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16")


def _require(ok: bool, name: str, value: Any, what: str) -> None:
    if not ok:
        raise ConfigError(f"{name} = {value!r} {what}")


def _choice(section: str, obj: Any, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    _require(value in allowed, f"{section}.{name}", value, f"is not allowed; choose one of {', '.join(allowed)}")


def _at_least(section: str, obj: Any, names: str, low: float) -> None:
    for name in names.split():
        value = getattr(obj, name)
        _require(value >= low, f"{section}.{name}", value, f"must be >= {low}")
        _require(math.isfinite(value), f"{section}.{name}", value, "must be a finite number")


@dataclass
class DataConfig:
    """dir: a prepared dataset directory (``nrgpt prepare ...`` writes one)."""

    dir: str = "data/shakespeare"

    def validate(self) -> None:
        _require(bool(self.dir), "data.dir", self.dir, "must name a prepared dataset directory")


@dataclass
class TrainConfig:
    """Optimisation.

    batch_size     sequences per micro-step and process; a distributed run draws one global batch of
                   batch_size x world_size and each rank takes its slice
    grad_accum     micro-steps per optimizer step (tokens per step: batch_size x grad_accum x
                   world_size x block_size)
    max_iters      optimizer steps; the schedule decays over them
    max_minutes    wall-clock budget of the run's training in minutes (0: none); the run then stops
                   cleanly, evaluates, checkpoints and counts as finished. The schedule's decay then
                   follows the budget too (steps or time, whichever runs out first), so the run has
                   annealed when the budget stops it
    lr, min_lr     peak and final learning rate
    schedule       'cosine' or 'exponential' decay from lr to min_lr over the steps after warmup, or
                   'constant' (lr throughout, after warmup)
    warmup_iters   linear warmup steps
    optimizer      'adamw', or 'muon': Muon (each update orthogonalised by Newton-Schulz, scaled to AdamW's
                   size; ``nrgpt.optim``) on the hidden matrices, AdamW on the embeddings, the output layer
                   and every vector; the same lr, schedule and weight decay
    muon_momentum  Muon's (Nesterov) momentum
    weight_decay   decoupled decay of the parameters with >= 2 dimensions (matrices and embeddings)
    beta1, beta2   AdamW betas
    grad_clip      clip the global gradient norm to this (0: no clipping)
    eval_interval  evaluate (and checkpoint) every this many steps, and at the end
    eval_iters     fixed batches per split for evaluation, drawn once from a constant seed
    eval_accuracy_samples  ListOps data only: at every evaluation, also greedy-decode the first N test samples
                   and log their accuracy (``accuracy`` in metrics.jsonl: Figure 3's accuracy against
                   iterations); 0: none (``nrgpt eval --task listops`` scores a finished run)
    seed           initialisation, training batches and dropout

    Recurrent steps per iteration (NRGPT, 'rgpt', 'rgpt_parallel'; the deep 'gpt' refuses all but fixed steps
    and full backpropagation). Evaluation, sampling and ListOps accuracy always run model.n_steps = n:
    steps_distribution  'fixed': n steps every iteration. 'lognormal': iteration it runs
                   S = clip(round(n exp(steps_sigma z)), steps_min, steps_max) steps, z ~ N(0, 1), whose
                   median is n exactly (rounding and clipping keep a median; the mean is about
                   n exp(steps_sigma^2 / 2) before clipping). 'uniform': S uniform on steps_min..steps_max
                   (mean (steps_min + steps_max) / 2). The draw comes from numpy's generator seeded with
                   (seed, it): the same on every rank and micro-step, the same after a resume, and no other
                   random stream moves. With n_blocks > 1 each block runs S steps. Logged as ``steps``
    steps_sigma    standard deviation of log S for 'lognormal' (> 0)
    steps_min, steps_max  bounds of S (steps_max 0: 2 x n); they must hold n
    backprop_steps k > 0: truncated backpropagation, only the last k of the S x n_blocks steps record an
                   autograd graph; the earlier ones run under no_grad, and the gradient reaches the
                   embeddings through them as through the identity (``nrgpt.energy.truncated_state``).
                   0: backpropagate through every step
    """

    batch_size: int = 64
    grad_accum: int = 1
    max_iters: int = 5000
    max_minutes: float = 0.0
    lr: float = 1e-3
    min_lr: float = 1e-4
    schedule: str = "cosine"
    warmup_iters: int = 100
    optimizer: str = "adamw"
    muon_momentum: float = 0.95
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    eval_interval: int = 500
    eval_iters: int = 50
    eval_accuracy_samples: int = 0
    seed: int = 1337
    steps_distribution: str = "fixed"
    steps_sigma: float = 0.5
    steps_min: int = 1
    steps_max: int = 0
    backprop_steps: int = 0

    def validate(self) -> None:
        _at_least("train", self, "batch_size grad_accum eval_interval eval_iters", 1)
        _at_least("train", self, "max_iters warmup_iters max_minutes weight_decay grad_clip min_lr", 0)
        _at_least("train", self, "eval_accuracy_samples", 0)
        _require(0 < self.lr < math.inf, "train.lr", self.lr, "must be a finite number > 0")
        _require(0 <= self.seed <= SEED_MAX, "train.seed", self.seed, f"must be an integer from 0 to {SEED_MAX}")
        _require(self.min_lr <= self.lr, "train.min_lr", self.min_lr, f"must be <= train.lr = {self.lr}")
        _choice("train", self, "schedule", SCHEDULES)
        _require(self.schedule != "exponential" or self.min_lr > 0, "train.min_lr", self.min_lr,
                 "must be > 0 for the exponential schedule")
        _choice("train", self, "optimizer", OPTIMIZERS)
        for name in ("beta1", "beta2", "muon_momentum"):
            value = getattr(self, name)
            _require(0 <= value < 1, f"train.{name}", value, "must be in [0, 1)")
        _choice("train", self, "steps_distribution", STEPS_DISTRIBUTIONS)
        _require(0 < self.steps_sigma < math.inf, "train.steps_sigma", self.steps_sigma, "must be a finite number > 0")
        _at_least("train", self, "steps_min", 1)
        _at_least("train", self, "steps_max backprop_steps", 0)

    @property
    def random_steps(self) -> bool:
        """A number of recurrent steps drawn per iteration (``steps_distribution`` is not 'fixed')."""
        return self.steps_distribution != "fixed"

    def steps_bounds(self, n_steps: int) -> tuple[int, int]:
        """(steps_min, steps_max) for a model of ``n_steps`` steps, steps_max 0 read as 2 x n_steps."""
        return self.steps_min, self.steps_max or 2 * n_steps

    def check_model(self, mc: ModelConfig) -> None:
        """The step settings against the model: a number of steps other than n_steps, or a truncated
        backward, needs a recurrent model, and the bounds must hold n_steps (checked for 'fixed' too: bounds
        that could not be used are a mistake)."""
        for name, on in (("steps_distribution", self.random_steps), ("backprop_steps", self.backprop_steps > 0)):
            _require(not on or mc.is_recurrent, f"train.{name}", getattr(self, name),
                     f"needs a recurrent model, and model.model = {mc.model!r} has n_steps distinct layers; use "
                     "GPT_Rec, GPT_Rec_parallel or an NRGPT preset")
        low, high = self.steps_bounds(mc.n_steps)
        _require(low <= high, "train.steps_min", low, f"must be <= train.steps_max = {high}"
                 + ("" if self.steps_max else " (2 x model.n_steps; set train.steps_max)"))
        if not low <= mc.n_steps <= high:
            raise ConfigError(f"train.steps_min..steps_max = {low}..{high} must include model.n_steps = {mc.n_steps}, "
                              "the number of steps evaluation runs")


@dataclass
class SystemConfig:
    """device: 'auto' (cuda, then mps, then cpu) or one of them; dtype: 'auto' (bfloat16 autocast where
    the hardware multiplies bfloat16: a GPU that supports it, a CPU with AVX512-BF16 or AMX; else float32),
    'float32' or 'bfloat16'; compile: torch.compile the unit applied at each step (``model.compile_steps``);
    threads: CPU threads for torch (0: torch's default)."""

    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    threads: int = 0

    def validate(self) -> None:
        _choice("system", self, "device", DEVICES)
        _choice("system", self, "dtype", DTYPES)
        _at_least("system", self, "threads", 0)


@dataclass
class LogConfig:
    """interval: log the training loss every this many steps (the only host synchronisation in the
    loop); progress: tqdm progress bar; tensorboard / wandb: also log there (each needs its package)."""

    interval: int = 10
    progress: bool = True
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "nrgpt"

    def validate(self) -> None:
        _at_least("log", self, "interval", 1)


SECTIONS: dict[str, type] = {
    "data": DataConfig, "train": TrainConfig, "system": SystemConfig, "log": LogConfig,
}


DEFAULT_PRESET = "NRGPT_H_FF2W"


def _model(table: dict[str, Any], drop_unused: bool = False) -> ModelConfig:
    """A run's ModelConfig from its model table: vocab_size None (the dataset's) unless the table sets it."""
    return ModelConfig.from_dict({"vocab_size": None, **table}, drop_unused=drop_unused)


@dataclass
class RunConfig:
    """The whole configuration of a run; see the module docstring. Build with ``resolve_config`` or
    ``RunConfig.from_dict``; ``to_dict`` gives the JSON-ready form saved as a run's config.json."""

    out_dir: str = "runs/run"
    model: ModelConfig = field(default_factory=lambda: _model({"preset": DEFAULT_PRESET}))
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    system: SystemConfig = field(default_factory=SystemConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _require(bool(self.out_dir), "out_dir", self.out_dir, "must name the run directory")
        for name in SECTIONS:
            getattr(self, name).validate()
        if not isinstance(self.model, ModelConfig):
            raise ConfigError(f"model = {self.model!r} must be a ModelConfig (RunConfig.from_dict reads a table)")
        if self.model.preset_name is None:
            raise ConfigError(f"model.preset is missing; choose one of {', '.join(PRESETS)}")
        self.train.check_model(self.model)

    def model_config(self, vocab_size: int | None = None) -> ModelConfig:
        """``model`` with ``vocab_size`` (the dataset's) filled in unless it is set."""
        if self.model.vocab_size is None and vocab_size is not None:
            return self.model.replace(vocab_size=vocab_size)
        return self.model

    def to_dict(self) -> dict[str, Any]:
        return {"out_dir": self.out_dir, "model": self.model.to_dict(),
                **{name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, drop_unused: bool = False) -> RunConfig:
        """Check keys and types (``ConfigError`` names the first bad one) and build the config; ``drop_unused``:
        drop model options the model does not use instead (a saved config, see the module docstring)."""
        _check_keys("", data, [f.name for f in fields(cls)])
        kwargs: dict[str, Any] = {}
        if "out_dir" in data:
            _check_type("out_dir", data["out_dir"], str)
            kwargs["out_dir"] = data["out_dir"]
        if "model" in data:
            kwargs["model"] = _model(_table("model", data["model"]), drop_unused)
        for name, section in SECTIONS.items():
            if name in data:
                table = _table(name, data[name])
                _check_keys(f"{name}.", table, [f.name for f in fields(section)])
                defaults = section()
                for key, value in table.items():
                    _check_type(f"{name}.{key}", value, type(getattr(defaults, key)))
                kwargs[name] = section(**table)
        return cls(**kwargs)

    def with_overrides(self, overrides: list[str]) -> RunConfig:
        """A copy with dotted ``key=value`` overrides laid over it (``apply_overrides``)."""
        return RunConfig.from_dict(apply_overrides(self.to_dict(), overrides))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        """A config saved by ``save`` (a run's config.json)."""
        data = read_parsed(path, json.loads, ConfigError)
        return cls.from_dict(_table(str(path), data), drop_unused=True)


def _table(name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{name} must be a table of settings, not {value!r}")
    return value


def _check_keys(prefix: str, data: dict[str, Any], known: list[str]) -> None:
    unknown = sorted(set(data) - set(known))
    if unknown:
        where = f"in {prefix[:-1]} " if prefix else ""
        raise ConfigError(f"unknown config key {prefix}{unknown[0]}; known keys {where}are: {', '.join(known)}")


# ----------------------------------------------------------------------------------------- overrides


def _field_type(section: str, key: str) -> type:
    """The type of setting ``section.key`` (section '' is the top level); ConfigError if unknown."""
    if section == "":
        known = {"out_dir": str}
    elif section == "model":
        known = ModelConfig.setting_types()
    elif section in SECTIONS:
        defaults = SECTIONS[section]()
        known = {f.name: type(getattr(defaults, f.name)) for f in fields(defaults)}
    else:
        raise ConfigError(f"unknown config section {section!r}; sections: model, {', '.join(SECTIONS)}")
    if key not in known:
        where = f" in {section}" if section else ""
        raise ConfigError(f"unknown config key {'.'.join(filter(None, [section, key]))}; known keys{where} are: "
                          f"{', '.join(known)}")
    return known[key]


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def parse_value(name: str, text: str, expected: type) -> Any:
    """A command-line string as a value of ``expected`` type; ConfigError naming ``name`` if it is not one."""
    try:
        if expected is bool:
            if text.lower() in _TRUE + _FALSE:
                return text.lower() in _TRUE
            raise ValueError
        value = expected(text)
    except ValueError:
        kind = {bool: "true or false", int: "an integer", float: "a number"}.get(expected, expected.__name__)
        raise ConfigError(f"{name} = {text!r} must be {kind}") from None
    if expected is float and not math.isfinite(value):
        raise ConfigError(f"{name} = {text!r} must be a finite number")
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``data`` with the dotted ``section.key=value`` (or ``out_dir=value``) overrides laid over it as one
    layer (``layer``), each value parsed to its setting's type."""
    top: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.lr=1e-3")
        section, _, name = key.rpartition(".")
        value = parse_value(key, text.strip(), _field_type(section, name))
        (top.setdefault(section, {}) if section else top)[name] = value
    return layer(data, top)


# ------------------------------------------------------------------------------------------- presets


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-3`` as a string; this loader reads it as the float it means."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def preset_names() -> list[str]:
    """The run presets shipped in ``nrgpt/presets``."""
    folder = resources.files("nrgpt").joinpath("presets")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def _read_preset_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.load(text, Loader=_YamlLoader) if path.suffix in (".yaml", ".yml") else tomllib.loads(text)
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text; save the preset as UTF-8") from None
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path} is not valid {path.suffix[1:].upper()}: {str(e).splitlines()[0]}") from None
    return _table(str(path), data or {})


def load_preset(name_or_path: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """A preset as a nested dict: a shipped preset by name, or a .toml/.yaml/.yml file by path.

    ``extends = "other"`` (a name or a path relative to this file) loads that preset first and overlays
    this one on it.
    """
    path = Path(name_or_path)
    if path.suffix not in (".toml", ".yaml", ".yml"):
        if name_or_path not in preset_names():
            raise ConfigError(f"unknown preset {name_or_path!r}; choose one of {', '.join(preset_names())} "
                              "or give a .toml/.yaml file")
        path = Path(str(resources.files("nrgpt").joinpath("presets", f"{name_or_path}.toml")))
    elif not path.is_file():
        raise ConfigError(f"preset file {path} {'is a directory' if path.is_dir() else 'does not exist'}")
    if str(path.resolve()) in _seen:
        raise ConfigError(f"preset {path} extends itself (through {' -> '.join(_seen)})")
    data = _read_preset_file(path)
    base = data.pop("extends", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: extends = {base!r} must name a preset")
    if Path(base).suffix in (".toml", ".yaml", ".yml"):
        base = str(path.parent / base)
    return layer(load_preset(base, (*_seen, str(path.resolve()))), data)


def merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` laid over ``base``, tables merged key by key; ConfigError if ``top`` has a table where ``base``
    has a setting."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and key in out and not isinstance(out[key], dict):
            raise ConfigError(f"{key} must be a table of settings, not {out[key]!r}: fix the preset that sets it")
        out[key] = merge(out[key], value) if isinstance(value, dict) and key in out else value
    return out


def layer(data: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """The run config dict ``top`` laid over ``data`` (``merge``), as a layer: if ``top`` sets model.preset,
    first the model settings of ``data`` that this model does not use, and its model kind, are dropped (see
    the module docstring)."""
    model = top.get("model")
    preset = model.get("preset") if isinstance(model, dict) else None
    if isinstance(preset, str) and preset in PRESETS and isinstance(data.get("model"), dict):
        dropped = {"model", *unused_options(PRESETS[preset]["model"])}
        data = {**data, "model": {k: v for k, v in data["model"].items() if k not in dropped}}
    return merge(data, top)


def defaults() -> dict[str, Any]:
    """The bottom layer of a run config: every section's defaults, and of the model only its preset's name
    (so that a preset set above it picks the model afresh)."""
    return {**RunConfig().to_dict(), "model": {"preset": DEFAULT_PRESET}}


def resolve_config(preset: str | None = None, overrides: list[str] = ()) -> RunConfig:
    """Defaults, then the preset, then the overrides: the checked RunConfig."""
    data = defaults()
    if preset is not None:
        data = layer(data, load_preset(preset))
    return RunConfig.from_dict(apply_overrides(data, overrides))


# --------------------------------------------------------------------------------------- command line

# Options that are shortcuts for one setting each: option -> dotted key (a flag sets a fixed value).
SHORTCUTS = {
    "--out-dir": "out_dir", "--data-dir": "data.dir", "--max-iters": "train.max_iters",
    "--max-minutes": "train.max_minutes", "--batch-size": "train.batch_size", "--lr": "train.lr",
    "--seed": "train.seed", "--eval-interval": "train.eval_interval", "--device": "system.device",
    "--dtype": "system.dtype", "--optimizer": "train.optimizer",
}
FLAGS = {
    "--compile": "system.compile=true", "--tensorboard": "log.tensorboard=true", "--wandb": "log.wandb=true",
    "--no-progress": "log.progress=false",
}


class _Override(argparse.Action):
    """Append ``key=value`` to ``args.overrides`` so that all overrides apply in command-line order."""

    def __init__(self, option_strings: list[str], dest: str, key: str | None = None, flag: str | None = None,
                 **kwargs: Any):
        self.key, self.flag = key, flag
        super().__init__(option_strings, "overrides", nargs=0 if flag else None, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, value: Any,
                 option_string: str | None = None) -> None:
        item = self.flag or (value if self.key is None else f"{self.key}={value}")
        namespace.overrides = [*(namespace.overrides or []), item]


def add_arguments(parser: argparse.ArgumentParser, preset: bool = True) -> None:
    """The configuration options: --preset, --set KEY=VALUE (repeatable) and the shortcuts."""
    if preset:
        parser.add_argument("--preset", metavar="NAME|FILE",
                            help=f"run preset: a name ({', '.join(preset_names())}) or a .toml/.yaml file")
    parser.add_argument("--set", action=_Override, metavar="KEY=VALUE",
                        help="override any setting, e.g. --set train.lr=1e-3 --set model.n_embd=64 (repeatable)")
    for option, key in SHORTCUTS.items():
        parser.add_argument(option, action=_Override, key=key, metavar=key.rpartition(".")[2].upper(),
                            help=f"same as --set {key}=...")
    for option, item in FLAGS.items():
        parser.add_argument(option, action=_Override, flag=item, help=f"same as --set {item}")
    parser.set_defaults(overrides=[])
