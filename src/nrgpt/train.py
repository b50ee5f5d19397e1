"""Training: nanoGPT's loop for NRGPT and its baselines, from a laptop CPU to ``torchrun`` on GPUs.

One optimizer step (``Trainer.step``) draws ``grad_accum`` micro-batches, accumulates gradients (DDP
synchronises them on the last micro-step only), clips the global norm and applies the optimizer
(``nrgpt.optim``: AdamW, or Muon on the hidden matrices with AdamW on the rest); the learning rate
follows a linear warmup then a cosine, exponential or constant schedule (``lr_at``). The loop touches
host values only at log steps (``log.interval``): the loss, a non-finite flag and, under DDP, the stop
flags are gathered there in one reduction.

Every ``eval_interval`` steps and at the end the model is evaluated on fixed batches of both splits
(drawn once, from a constant seed, so every run on the same data and shapes sees the same ones), and
the run directory gets ``last`` (resumable) and, on a new best validation loss, ``best`` checkpoints
(``nrgpt.checkpoint``). A resumed run restores weights, optimizer, iteration, the data generator and
every rank's RNG, so on a CPU it continues bitwise as if never interrupted. A non-finite loss or
gradient stops the run with ``DivergenceError`` before anything is saved, so ``last`` stays good.

A recurrent model may run a random number of steps per iteration (``train.steps_distribution``,
``steps_sampler``: a function of the seed and the iteration, so resume and DDP need no extra state) and
backpropagate through the last ``train.backprop_steps`` of them only; evaluation runs ``model.n_steps``.

Run directory: ``config.json`` (the resolved config), ``metrics.jsonl`` and ``metrics.csv`` (one
record per log step: iter, loss, lr, tokens_per_s, elapsed, and with random steps the iteration's
number of steps, steps; one per evaluation: iter, lr, elapsed, train_loss, val_loss, and with
``train.eval_accuracy_samples`` the ListOps accuracy), ``last/``,
``best/``, ``result.json`` (the value ``train`` returns, with its status) and ``tensorboard/`` when
asked for.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from . import checkpoint, distributed
from .config import ModelConfig
from .data import TokenStream, load_meta
from .device import autocast_dtype, check_threads, keep_freed_memory, native_bf16_cpu, pick_device, resolved_dtype
from .errors import CheckpointError, ConfigError, DivergenceError, first_line
from .evaluate import load_listops_samples, score_listops
from .model import LanguageModel, build_model
from .optim import make_optimizer
from .runconfig import RunConfig, TrainConfig, add_arguments, resolve_config
from .rundir import RUN_FILES, MetricsLog, RunLock, clear_run

EVAL_SEED = 0


# ------------------------------------------------------------------------------------------- pieces


def lr_at(it: int, tc: TrainConfig, elapsed: float = 0.0) -> float:
    """Learning rate of step ``it``: linear warmup to ``lr``, then the schedule down to ``min_lr``.

    The decay's progress is the fraction of ``max_iters`` done or, when the run has a time budget
    (``max_minutes``), the fraction of that budget spent (``elapsed`` seconds), whichever is larger: a run
    stopped by its budget has annealed to ``min_lr`` all the same. ``elapsed`` is the run's training time
    across resumes, so a resumed run continues the schedule where it stopped."""
    if it < tc.warmup_iters:
        return tc.lr * (it + 1) / (tc.warmup_iters + 1)
    if tc.schedule == "constant":
        return tc.lr
    progress = (it - tc.warmup_iters) / max(1, tc.max_iters - tc.warmup_iters)
    if tc.max_minutes > 0:
        progress = max(progress, elapsed / (60 * tc.max_minutes))
    progress = min(1.0, progress)
    if tc.schedule == "exponential":
        return tc.lr * (tc.min_lr / tc.lr) ** progress
    return tc.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (tc.lr - tc.min_lr)


def expected_iters(tc: TrainConfig, it: int, rate: float, elapsed: float) -> int:
    """Where the run will stop (the progress bar's total): ``max_iters``, or sooner where the time budget
    runs out first at ``rate`` iterations a second from iteration ``it``, ``elapsed`` seconds into the run."""
    if tc.max_minutes <= 0:
        return tc.max_iters
    return min(tc.max_iters, it + math.ceil(max(0.0, 60 * tc.max_minutes - elapsed) * rate))


def steps_sampler(tc: TrainConfig, n_steps: int) -> Callable[[int], int]:
    """The number of recurrent steps S of each iteration, as a function of the iteration ``it``; chosen once,
    when training starts (``train.steps_distribution``, see ``TrainConfig``):

        fixed      S = n_steps
        lognormal  S = clip(round(n_steps exp(sigma z)), steps_min, steps_max),  z ~ N(0, 1)
                   (median n_steps exactly; sigma z is capped at log(steps_max / n_steps) before the exp,
                   which changes nothing after the clip and cannot overflow)
        uniform    S ~ U{steps_min, ..., steps_max}

    z and S come from a numpy generator of their own seeded with (train.seed, it): every rank and every
    micro-step of an iteration gets the same S, a resumed run the same S as an uninterrupted one, and the
    torch random streams (initialisation, batches, dropout) do not move."""
    low, high = tc.steps_bounds(n_steps)
    sigma, seed = tc.steps_sigma, tc.seed

    def fixed(it: int) -> int:
        return n_steps

    def lognormal(it: int) -> int:
        z = np.random.default_rng([seed, it]).standard_normal()
        return min(max(round(n_steps * math.exp(min(sigma * z, math.log(high / n_steps)))), low), high)

    def uniform(it: int) -> int:
        return int(np.random.default_rng([seed, it]).integers(low, high, endpoint=True))

    return {"fixed": fixed, "lognormal": lognormal, "uniform": uniform}[tc.steps_distribution]


def check_run(config: RunConfig) -> tuple[ModelConfig, dict[str, Any]]:
    """The model config (vocab_size from the data unless set) and the dataset's meta, after checking that
    they fit together; ConfigError or DataError with one line otherwise. Cheap: reads meta.json only."""
    meta = load_meta(config.data.dir)
    mc = config.model_config(meta["vocab_size"])
    if mc.vocab_size < meta["vocab_size"]:
        raise ConfigError(f"model.vocab_size = {mc.vocab_size} is smaller than the vocabulary of {config.data.dir} "
                          f"({meta['vocab_size']} tokens); leave it unset to take the data's")
    if config.train.eval_accuracy_samples and meta["kind"] != "listops":
        raise ConfigError(f"train.eval_accuracy_samples = {config.train.eval_accuracy_samples} scores ListOps "
                          f"answers, but {config.data.dir} is a {meta['kind']!r} dataset; set it to 0")
    for split in ("train", "val"):
        n = meta[f"{split}_tokens"]
        if mc.block_size + 1 > n:
            raise ConfigError(f"model.block_size = {mc.block_size} is larger than the data: the {split} split of "
                              f"{config.data.dir} has {n} tokens (needs block_size + 1); use block_size <= {n - 1}")
    return mc, meta


def _require_optional(config: RunConfig) -> None:
    for flag, module, extra in (("tensorboard", "torch.utils.tensorboard", "tensorboard"), ("wandb", "wandb", "wandb")):
        if getattr(config.log, flag):
            try:
                __import__(module)
            except ImportError:
                raise ConfigError(f"log.{flag} = true needs the {extra} package: pip install 'nrgpt[{extra}]' "
                                  f"(or drop --{flag})") from None


class _StopSignals:
    """SIGINT/SIGTERM ask the loop to stop at the next check (it then checkpoints); a second SIGINT
    interrupts at once. Installed only in the main thread."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum).name
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ------------------------------------------------------------------------------------------- trainer


class Trainer:
    """One run: set up in ``__init__`` (all checks first), then ``run``. See the module docstring."""

    def __init__(self, config: RunConfig, *, resume: bool = False, overwrite: bool = False, quiet: bool = False):
        self.config = config
        self.dist = distributed.from_env()
        self.main = self.dist.is_main
        self.quiet = quiet or not self.main
        model_config, _ = check_run(config)
        self.device = pick_device(config.system.device, self.dist.local_rank)
        self.amp_dtype = autocast_dtype(config.system.dtype, self.device)
        cpu_bf16 = self.device.type == "cpu" and self.amp_dtype is not None
        self.chose_cpu_bf16 = config.system.dtype == "auto" and cpu_bf16
        self.emulated_bf16 = cpu_bf16 and not native_bf16_cpu()  # asked for, or resumed from a run that chose it
        _require_optional(config)
        check_threads(config.system.threads)
        self.run_dir = Path(config.out_dir)
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise ConfigError(f"out_dir = {str(self.run_dir)!r} is a file, not a directory; choose another --out-dir")
        if resume and not self.run_dir.is_dir():
            raise CheckpointError(f"nothing to resume in {self.run_dir}: it does not exist; start the run without "
                                  "--resume")
        # One writer per run directory: the lock comes before anything is read, deleted or written there.
        self.lock = RunLock(self.run_dir) if self.main else None
        created = not self.run_dir.exists()
        if self.lock is not None:
            self.lock.acquire()
        try:
            self._setup(resume, overwrite, model_config)
        except BaseException:
            self._release(created)
            raise

    def _setup(self, resume: bool, overwrite: bool, model_config: ModelConfig) -> None:
        config, tc = self.config, self.config.train
        resume_from = self._prepare_run_dir(resume, overwrite)
        self.dataset = checkpoint.dataset_record(config.data.dir)
        # The config as run: the model section fully resolved (vocab_size from the data included), and the dtype
        # that 'auto' chose on this machine, so that a resume elsewhere trains in the same precision.
        system = dataclasses.replace(config.system, dtype=resolved_dtype(config.system.dtype, self.device))
        self.config = config = dataclasses.replace(config, model=model_config, system=system)

        distributed.setup(self.dist, self.device)
        if config.system.threads:
            torch.set_num_threads(config.system.threads)
        if self.device.type == "cpu":
            keep_freed_memory()  # no page faults on the step's large buffers
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")
        torch.manual_seed(tc.seed + self.dist.rank)
        self.raw_model: LanguageModel = build_model(model_config).to(self.device)
        self.optimizer = make_optimizer(self.raw_model, tc, self.device)
        self.train_stream = TokenStream(config.data.dir, "train")
        self.data_gen = torch.Generator().manual_seed(tc.seed)
        self.eval_batches = self._draw_eval_batches(model_config.block_size)
        n_accuracy = tc.eval_accuracy_samples
        self.accuracy_samples = load_listops_samples(config.data.dir, "test", n_accuracy) \
            if n_accuracy and self.main else None
        self.draw_steps = steps_sampler(tc, model_config.n_steps)
        self.log_steps, self.steps = tc.random_steps, model_config.n_steps  # steps: those of the last iteration
        self.start_iter, self.best_val, self.elapsed0 = 0, math.inf, 0.0
        self.losses: dict[str, float] = {}  # of the last evaluation
        self.resumed = resume_from is not None
        if self.resumed:
            self._restore(resume_from)
        if config.system.compile:
            self.raw_model.compile_steps()
        self.model = self.raw_model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # Random or truncated steps leave parameters out of some iterations' graphs (eta^(t) of steps not
            # taken, the embedding before a truncation): DDP must look for them each iteration.
            unused = tc.random_steps or tc.backprop_steps > 0
            self.model = torch.nn.parallel.DistributedDataParallel(self.raw_model, device_ids=ids,
                                                                   broadcast_buffers=False,
                                                                   find_unused_parameters=unused)
        self.tokens_per_step = tc.batch_size * tc.grad_accum * self.dist.world_size * model_config.block_size
        self.bad = torch.zeros((), dtype=torch.bool, device=self.device)
        self.last_loss = torch.zeros((), device=self.device)
        self.log = None
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            config.save(self.run_dir / "config.json")
            wandb = None
            if config.log.wandb:
                wandb = {"project": config.log.wandb_project, "name": self.run_dir.name, "config": config.to_dict()}
            self.log = MetricsLog(self.run_dir, self.start_iter if resume_from else None,
                                  tensorboard=config.log.tensorboard, wandb=wandb)

    # ------------------------------------------------------------------ setup helpers
    def _prepare_run_dir(self, resume: bool, overwrite: bool) -> Path | None:
        """The checkpoint to resume from (None for a new run), after clearing a previous run when asked."""
        if resume:
            ckpt = checkpoint.find(self.run_dir / "last")
            if ckpt is None:
                raise CheckpointError(f"nothing to resume in {self.run_dir}: it has no 'last' checkpoint; start the "
                                      "run without --resume")
            return ckpt
        if any((self.run_dir / name).exists() for name in RUN_FILES):
            if not overwrite:
                raise ConfigError(f"out_dir = {str(self.run_dir)!r} already holds a run; continue it with --resume "
                                  "or start over with --overwrite")
            if self.main:
                clear_run(self.run_dir)
        return None

    def _release(self, remove_dir: bool = False) -> None:
        """Give up the run directory's lock; ``remove_dir``: also remove the directory this trainer created."""
        if self.lock is not None:
            self.lock.release()
            if remove_dir:
                self.lock.path.unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    self.run_dir.rmdir()

    def _restore(self, ckpt: Path) -> None:
        state = checkpoint.check_resume_state(checkpoint.load_state(ckpt), ckpt / checkpoint.STATE)
        checkpoint.load_matching(self.raw_model, checkpoint.load_weights(ckpt), ckpt / checkpoint.WEIGHTS)
        checkpoint.check_optimizer_state(state, self.optimizer.param_groups, ckpt / checkpoint.STATE)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.data_gen.set_state(state["data_rng"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{ckpt / checkpoint.STATE} does not fit this run's optimizer or data generator "
                                  f"({first_line(e)}); resume with the settings it was written with") from None
        self.start_iter, self.elapsed0 = state["iter"], state["elapsed"]
        self.best_val = state["best_val_loss"]
        info = checkpoint.read_info(ckpt)
        self.losses = {k: info[k] for k in ("train_loss", "val_loss") if k in info}
        if len(state["torch_rng"]) == self.dist.world_size:
            try:
                torch.set_rng_state(state["torch_rng"][self.dist.rank])
                if self.device.type == "cuda" and state["cuda_rng"]:
                    torch.cuda.set_rng_state(state["cuda_rng"][self.dist.rank], self.device)
            except (RuntimeError, TypeError) as e:
                raise CheckpointError(f"{ckpt / checkpoint.STATE}: a random generator state is invalid "
                                      f"({first_line(e)})") from None
        else:
            warnings.warn(f"{ckpt} was written by {len(state['torch_rng'])} processes, this run has "
                          f"{self.dist.world_size}: dropout noise will differ from an uninterrupted run", stacklevel=2)
            torch.manual_seed(self.config.train.seed + self.dist.rank + state["iter"])

    def _draw_eval_batches(self, block_size: int) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
        """This rank's slices of ``eval_iters`` global batches per split, drawn once from EVAL_SEED."""
        b, r = self.config.train.batch_size, self.dist.rank
        batches = {}
        for split in ("train", "val"):
            stream = self.train_stream if split == "train" else TokenStream(self.config.data.dir, "val")
            gen = torch.Generator().manual_seed(EVAL_SEED)
            drawn = (stream.get_batch(b * self.dist.world_size, block_size, gen)
                     for _ in range(self.config.train.eval_iters))
            batches[split] = [(x[r * b:(r + 1) * b], y[r * b:(r + 1) * b]) for x, y in drawn]
        return batches

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # ------------------------------------------------------------------ training
    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of the next global batch (batch_size x world_size rows from the shared generator)."""
        b, r = self.config.train.batch_size, self.dist.rank
        x, y = self.train_stream.get_batch(b * self.dist.world_size, self.raw_model.config.block_size, self.data_gen)
        return self._to_device(x[r * b:(r + 1) * b]), self._to_device(y[r * b:(r + 1) * b])

    def step(self, it: int) -> None:
        """One optimizer step (no host synchronisation): loss kept in ``last_loss``, non-finite flag in ``bad``."""
        tc = self.config.train
        self.lr = lr = lr_at(it, tc, self.elapsed())
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.steps = steps = self.draw_steps(it)
        total = torch.zeros((), device=self.device)
        for micro in range(tc.grad_accum):
            defer_sync = self.dist.enabled and micro < tc.grad_accum - 1
            with self.model.no_sync() if defer_sync else contextlib.nullcontext():
                x, y = self.batch()
                with self._autocast():
                    _, loss = self.model(x, y, n_steps=steps, backprop_steps=tc.backprop_steps)
                (loss / tc.grad_accum).backward()
            total += loss.detach().float()
        total /= tc.grad_accum
        self.bad |= ~torch.isfinite(total)
        if tc.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), tc.grad_clip)
            self.bad |= ~torch.isfinite(norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last_loss = total

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss over the fixed batches of each split (each rank evaluates its slice of every batch) and,
        with ``train.eval_accuracy_samples``, the ListOps accuracy on those test samples (rank 0 only)."""
        self.raw_model.eval()
        out = {}
        for split, batches in self.eval_batches.items():
            total = torch.zeros((), dtype=torch.float64, device=self.device)
            for x, y in batches:
                with self._autocast():
                    _, loss = self.raw_model(self._to_device(x), self._to_device(y))
                total += loss.double()
            count = len(batches) * self.dist.world_size
            out[f"{split}_loss"] = (distributed.all_sum(total) / count).item()
        if self.accuracy_samples is not None:
            out["accuracy"] = score_listops(self.raw_model, self.accuracy_samples)["overall"]
        self.raw_model.train()
        return out

    def elapsed(self) -> float:
        return self.elapsed0 + time.perf_counter() - self.t0

    def _diverged(self, it: int, what: str) -> DivergenceError:
        last = checkpoint.find(self.run_dir / "last")
        where = (f"the last good checkpoint is {last} (iter {checkpoint.read_info(last)['iter']})" if last
                 else "no checkpoint was written")
        error = DivergenceError(f"training diverged at iter {it}: {what} is not finite; {where}. Lower train.lr, "
                                "raise train.warmup_iters or clip gradients (train.grad_clip)")
        self._finish("diverged", it, {"message": str(error)})
        return error

    def save(self, it: int, losses: dict[str, float]) -> None:
        """``last`` (with the resume state) and, on a new best validation loss, ``best``. All ranks call this
        (their RNG states are gathered); rank 0 writes."""
        improved = losses["val_loss"] < self.best_val
        self.best_val = min(self.best_val, losses["val_loss"])
        torch_rng = distributed.gather_objects(torch.get_rng_state())
        cuda = self.device.type == "cuda"
        cuda_rng = distributed.gather_objects(torch.cuda.get_rng_state(self.device)) if cuda else []
        if not self.main:
            return
        info = {"iter": it, **losses, "best_val_loss": self.best_val, "elapsed": self.elapsed(),
                "world_size": self.dist.world_size, "dataset": self.dataset}
        if improved:
            checkpoint.save_checkpoint(self.run_dir / "best", self.raw_model, self.config, info)
        state = {"iter": it, "best_val_loss": self.best_val, "elapsed": info["elapsed"],
                 "optimizer": self.optimizer.state_dict(), "data_rng": self.data_gen.get_state(),
                 "torch_rng": torch_rng, "cuda_rng": cuda_rng}
        checkpoint.save_checkpoint(self.run_dir / "last", self.raw_model, self.config, info, state)

    def _eval_and_save(self, it: int) -> None:
        self.losses = losses = self.evaluate()
        if not all(map(math.isfinite, losses.values())) or bool(self.bad):
            raise self._diverged(it, "the loss")
        best = losses["val_loss"] < self.best_val
        if self.main:  # the record first: a crash before the checkpoint below replays this evaluation on resume
            self.log.write({"iter": it, "lr": lr_at(it, self.config.train, self.elapsed()),
                            "elapsed": round(self.elapsed(), 3),
                            **losses})
        self.save(it, losses)
        if self.main:
            accuracy = f", accuracy {losses['accuracy']:.3f}" if "accuracy" in losses else ""
            self._print(f"iter {it}: train loss {losses['train_loss']:.4f}, val loss {losses['val_loss']:.4f}"
                        + accuracy + (" (best)" if best else ""))

    def _log_step(self, it: int, signals: _StopSignals) -> str | None:
        """Log step ``it`` (the only host synchronisation); returns a stop reason agreed by all ranks, if any."""
        tc = self.config.train
        over_time = self.main and tc.max_minutes > 0 and self.elapsed() >= 60 * tc.max_minutes
        flags = torch.stack([self.last_loss, self.bad.float(),
                             torch.tensor(float(over_time), device=self.device),
                             torch.tensor(float(signals.received is not None), device=self.device)])
        loss, bad, over_time, signalled = distributed.all_sum(flags).tolist()
        loss /= self.dist.world_size
        if bad:
            raise self._diverged(it, "the loss" if not math.isfinite(loss) else "the gradient")
        now = time.perf_counter()
        tokens_per_s = (it + 1 - self.last_log[0]) * self.tokens_per_step / max(now - self.last_log[1], 1e-9)
        self.last_log = (it + 1, now)
        if self.main:
            lr = self.lr
            record = {"iter": it, "loss": loss, "lr": lr, "tokens_per_s": round(tokens_per_s, 1),
                      "elapsed": round(self.elapsed(), 3)}
            if self.log_steps:
                record["steps"] = self.steps
            self.log.write(record)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            rate = (it + 1 - self.start_iter) / max(now - self.t0, 1e-9)
            self.bar.total = expected_iters(tc, it + 1, rate, self.elapsed())
        return "max_minutes" if over_time else "signal" if signalled else None

    def _print(self, message: str) -> None:
        if not self.quiet:
            tqdm.write(message)

    def _finish(self, status: str, it: int, extra: dict[str, Any]) -> dict[str, Any]:
        best = self.best_val if self.best_val < math.inf else None
        result = {"status": status, "iters": it, "best_val_loss": best, **extra,
                  "wall_time_s": round(time.perf_counter() - self.t0, 3), "elapsed_s": round(self.elapsed(), 3),
                  "run_dir": str(self.run_dir)}
        if self.main:
            (self.run_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        return result

    def run(self) -> dict[str, Any]:
        """Train from ``start_iter`` to ``max_iters`` (or the time budget, or a stop signal)."""
        tc = self.config.train
        self.t0 = time.perf_counter()
        self.last_log = (self.start_iter, self.t0)
        resumed_at = self.start_iter if self.resumed else None  # its evaluation is in the checkpoint
        if self.main and not self.quiet:
            self._print(f"{self.raw_model.config.model} model, {self.raw_model.num_params():,} parameters, "
                        f"{self.tokens_per_step:,} tokens per step, on {self.device}"
                        + (f" x {self.dist.world_size} processes" if self.dist.enabled else ""))
            if self.chose_cpu_bf16:
                self._print("training under bfloat16 autocast: this CPU multiplies bfloat16 in hardware "
                            "(--dtype float32 for float32 products)")
            if self.emulated_bf16:
                self._print("warning: training under bfloat16 autocast on a CPU that emulates bfloat16, several "
                            "times slower than float32 here (--dtype float32 for float32 products)")
        self.bar = tqdm(total=tc.max_iters, initial=self.start_iter, unit="it", dynamic_ncols=True, mininterval=0.5,
                        disable=self.quiet or not self.config.log.progress)
        it, reason = self.start_iter, None
        with self.bar, _StopSignals() as signals:
            while True:
                final = it >= tc.max_iters or reason is not None
                if (it % tc.eval_interval == 0 or final) and it != resumed_at:
                    self._eval_and_save(it)
                if final:
                    break
                self.step(it)
                self.bar.update()
                if it % self.config.log.interval == 0 or it == tc.max_iters - 1:
                    reason = self._log_step(it, signals)
                elif not self.dist.enabled:
                    reason = "signal" if signals.received else None
                it += 1
        status = "interrupted" if reason == "signal" else "finished"
        return self._finish(status, it, {"reason": reason or "max_iters", **self.losses})

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
        distributed.teardown()
        self._release()


def train(config: RunConfig, *, resume: bool = False, overwrite: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Train a run; returns (and writes to ``result.json``) its result:

    status ('finished' or 'interrupted'), reason ('max_iters', 'max_minutes' or 'signal'), iters,
    best_val_loss, train_loss and val_loss (last evaluation), wall_time_s (this call), elapsed_s (the run,
    across resumes), run_dir. ``resume`` continues ``config.out_dir``'s last checkpoint; ``overwrite``
    starts over in a run directory that holds a run; ``quiet`` prints nothing (no progress bar).
    Raises ConfigError / DataError / CheckpointError before any work for bad input, DivergenceError if
    the loss becomes non-finite.
    """
    trainer = Trainer(config, resume=resume, overwrite=overwrite, quiet=quiet)
    try:
        return trainer.run()
    finally:
        trainer.close()


# ------------------------------------------------------------------------------------------- command line


def main(args: argparse.Namespace) -> int:
    config = resolve_config(args.preset, args.overrides)
    if args.resume:
        saved = Path(config.out_dir) / "config.json"
        if args.preset:
            raise ConfigError("--resume continues a run with its saved config.json; change settings with --set, "
                              "not --preset")
        if not saved.is_file():
            raise CheckpointError(f"nothing to resume in {config.out_dir}: it has no config.json")
        config = RunConfig.load(saved).with_overrides(args.overrides)
    result = train(config, resume=args.resume, overwrite=args.overwrite)
    if not distributed.from_env().is_main:
        return 0
    if result["status"] == "interrupted":
        print(f"interrupted at iter {result['iters']} (checkpoint saved); continue with: "
              f"nrgpt train --resume --out-dir {config.out_dir}", file=sys.stderr)
        return 130
    print(f"done: {result['iters']} iterations, best val loss {result['best_val_loss']:.4f}, "
          f"{result['wall_time_s'] / 60:.1f} min; run directory {result['run_dir']}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train a model (torchrun --nproc_per_node=N -m nrgpt train ... for DDP)",
        description="Train from a preset plus overrides; the resolved config is saved as <out_dir>/config.json.")
    add_arguments(p)
    p.add_argument("--resume", action="store_true", help="continue out_dir's run from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start over in an out_dir that already holds a run")
    p.set_defaults(func=main)
