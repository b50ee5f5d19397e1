"""Energy dynamics of NRGPT inference (sections 2.3 and 3.1, Figure 2) and energy-based early exit.

Recording
---------
``record_dynamics`` runs ``NRGPT.energy_trajectory`` for any number of steps (more than were trained
probes asymptotic stability, sec. 2.3) and adds, for every step t and token A, the energy change of
token A's OWN move: E_A evaluated with token A at its step-(t+1) state and every other token at its
step-t state, minus E_A^(t). Prop. 2.1/2.2 concern exactly this quantity (the update moves each token
down its own energy with the others held fixed, eq. 6); the plain change E_A^(t+1) - E_A^(t) also
contains the moves of the earlier tokens A attends to, so it may be positive while they still move.

Summary (``summarize_dynamics``)
--------------------------------
With the noise floor tol_A^(t) = energy_tol * (1 + |E_A^(t)|):

* ``tokens_final_below_initial``: fraction of tokens with E_A^(S) < E_A^(0) (Figure 2: "in all
  trajectories the final energy is lower than initial"); ``sequences_total_final_below_initial``: the
  same for the summed energy of a sequence;
* ``plain`` / ``own_move``: over all (step, token) pairs, the fraction with descent (change < 0) and
  with a rise above the noise floor (change > tol);
* ``settle``: token A has settled at step s when no later change |E_A^(t+1) - E_A^(t)|, t >= s, exceeds
  tol; ``settle_steps`` gives s per token (S: still changing at the last recorded step);
* ``after_predecessors_settled``: the pairs (t, A) with t at or after the settle step of every earlier
  token B < A, and among them the fraction without a rise: sec. 2.3 argues that once the tokens a token
  attends to are frozen, its own energy can only fall (so the first token's falls from the start);
* ``descent_guarantee``: the model's eta and whether its own-move descent is guaranteed (to first
  order, i.e. for small enough steps): eta = c diag(gamma) (Prop. 2.1), or without normalisation
  eta = I, psd or diag_lowrank (Prop. 2.2); a free eta matrix, or a psd or diag_lowrank eta with
  normalisation, carries no guarantee;
  and with the inclusive mask under grad_mode 'reference' the update is not the gradient of E_A at all.

Early exit (variable computation)
---------------------------------
``EarlyExit`` runs the same dynamics (``nrgpt.energy.descent`` with a tolerance) but freezes each token
once its gradient norm ||dE_A/dg_A^(t)|| falls below ``tol`` (``exit_on='grad'``), or once its energy
changed by less than the noise floor tol (1 + |E_A|) over its last step (``exit_on='energy'``, the settling
criterion above; meaningful where descent is guaranteed): from that step on its state is kept (it
takes no more steps, even if its gradient grows again as earlier tokens keep moving). A frozen token
still serves as a key, with its frozen state, for the later tokens that attend to it. Token A's freeze
decision depends only on its gradient or energy, which depend only on tokens B <= A, so causality is kept: no
token ever sees a later one, in the full forward as in cached decoding. The batched implementation still
computes frozen tokens (masked); the step counts measure what a per-token implementation would compute.
``tol = 0`` never freezes (the fixed-steps model); a huge tol freezes every token before its first step
(logits from the embedding).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .argtypes import comma_list, integer, number, seed
from .decoding import without_graph
from .depth import AtSteps, depth_curve
from .energy import EXIT_RULES, DescentStep, EnergyBlock
from .evaluate import ListOpsSamples, load_listops_samples, score_listops
from .model import NRGPT, LanguageModel
from .plots import index_colorbar, indexed_lines, mark_x, new_figure, save_png, style_axes

DEFAULT_ENERGY_TOL = 1e-3


def require_energy_model(model: nn.Module) -> NRGPT:
    if not isinstance(model, NRGPT):
        raise TypeError(f"energy dynamics need an NRGPT model; this is a {type(model).__name__} "
                        f"({getattr(getattr(model, 'config', None), 'model', '?')})")
    return model


# --------------------------------------------------------------------------------------------- recording


@dataclass
class Dynamics:
    """Per-token energy dynamics of a batch, as numpy arrays.

    tokens (B, T); energy, attn_energy, ff_energy, grad_norm (S+1, B, T) at steps 0..S (E_A, E_A^AT,
    s E_A^FF, ||dE_A/dg_A||, from ``NRGPT.energy_trajectory``); own_move_change (S, B, T): E_A after
    token A's own move minus E_A^(t) (see the module docstring); trained_steps: the model's n_steps;
    states (S+1, B, T, D) only if kept.
    """

    tokens: np.ndarray
    energy: np.ndarray
    attn_energy: np.ndarray
    ff_energy: np.ndarray
    grad_norm: np.ndarray
    own_move_change: np.ndarray
    trained_steps: int
    states: np.ndarray | None = None

    @property
    def steps(self) -> int:
        return self.energy.shape[0] - 1

    def save(self, path: str | Path, **extra: np.ndarray) -> Path:
        """Write every array (and ``extra`` ones) to a compressed ``.npz``."""
        arrays = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        np.savez_compressed(path, **arrays, **extra)
        return Path(path)


@torch.no_grad()
def own_move_energies(block: EnergyBlock, g: torch.Tensor, g_next: torch.Tensor, chunk: int = 16,
                      max_elements: int = 1 << 24, cond: torch.Tensor | None = None) -> torch.Tensor:
    """E_A with token A at ``g_next`` and every other token at ``g`` (both (B, T, D)), for every A: (B, T).

    The one-token substitutions are stacked along the batch and evaluated with ``block.energy`` (eq. 3),
    up to ``chunk`` tokens (and about ``max_elements`` numbers) at a time; since E_A depends on tokens
    B <= A only, each chunk is evaluated on the prefix that ends with its last token. A conditioned FF
    energy keeps its conditioning ``cond`` (default: as ``block.energy`` at g) fixed.
    """
    b, t, d = g.shape
    cond = block.condition(g, cond)
    out = g.new_empty(b, t)
    per_chunk = max(1, min(chunk, max_elements // (b * t * d)))
    for start in range(0, t, per_chunk):
        end = min(start + per_chunk, t)
        pos = torch.arange(start, end, device=g.device)
        rows = torch.arange(len(pos), device=g.device)
        moved = g[:, :end].unsqueeze(0).repeat(len(pos), 1, 1, 1)  # (n, B, end, D): copy i has pos[i] moved
        moved[rows, :, pos] = g_next[:, pos].transpose(0, 1)
        c = None if cond is None else cond[:, :end].expand(len(pos), -1, -1, -1).flatten(0, 1)
        energy = block.energy(moved.flatten(0, 1), cond=c)[0].view(len(pos), b, end)
        out[:, pos] = energy[rows, :, pos].T
    return out


@torch.no_grad()
def record_dynamics(model: NRGPT, idx: torch.Tensor, n_steps: int | None = None,
                    keep_states: bool = False) -> Dynamics:
    """Run ``n_steps`` steps (default: the trained number; may be more) on ``idx`` (B, T) and record every
    token's energies, gradient norm and own-move change at every step (in the model's dtype)."""
    model = require_energy_model(model)
    was_training = model.training
    model.eval()
    own: list[torch.Tensor] = []

    def own_move(step: DescentStep) -> None:
        own.append(own_move_energies(step.block, step.g, step.block.norm(step.x_next), cond=step.cond))

    try:
        traj = model.energy_trajectory(idx, n_steps, on_step=own_move)
    finally:
        model.train(was_training)
    own_change = torch.stack(own) - traj.energy[:-1] if own else traj.energy[:0]
    return Dynamics(
        tokens=_numpy(idx), energy=_numpy(traj.energy), attn_energy=_numpy(traj.attn_energy),
        ff_energy=_numpy(traj.ff_energy), grad_norm=_numpy(traj.grad_norm), own_move_change=_numpy(own_change),
        trained_steps=model.config.n_steps, states=_numpy(traj.states) if keep_states else None,
    )


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


# ----------------------------------------------------------------------------------------------- summary


def descent_guarantee(model: NRGPT) -> dict[str, Any]:
    """The model's inference rate and whether each token's own move is guaranteed to lower its energy
    (to first order in the step size): {"eta", "norm", "guaranteed", "reason"}."""
    cfg = require_energy_model(model).config
    out = {"eta": cfg.eta, "norm": cfg.norm, "mask": cfg.mask, "grad_mode": cfg.grad_mode}
    if cfg.attention != "none" and cfg.mask == "inclusive" and cfg.grad_mode == "reference":
        return {**out, "guaranteed": False, "reason": "grad_mode 'reference' with the inclusive mask omits the "
                "key-side self term: the update is not the gradient of E_A"}
    no_norm = cfg.norm == "none"
    gamma = model.block.norm.gamma
    if cfg.eta == "descent":
        prop = "Prop. 2.2: eta = c I is psd" if no_norm else "Prop. 2.1: eta = c diag(gamma), c > 0"
        return {**out, "guaranteed": True, "reason": prop}
    if cfg.eta in ("psd", "diag_lowrank"):
        if no_norm:
            form = "U^T U + V - V^T has a psd symmetric part" if cfg.eta == "psd" else \
                "diag(softplus(d)) + U U^T is positive definite"
            return {**out, "guaranteed": True, "reason": f"Prop. 2.2: eta = {form}"}
        return {**out, "guaranteed": False, "reason": f"a {cfg.eta} eta with normalisation is not c diag(gamma) "
                                                      "(Prop. 2.1)"}
    if cfg.eta == "identity":
        if no_norm or bool((gamma == gamma[0]).all() and gamma[0] > 0):
            return {**out, "guaranteed": True, "reason": "eta = I = c diag(gamma) with constant positive gamma "
                                                         "(Prop. 2.1) or no normalisation (Prop. 2.2)"}
        return {**out, "guaranteed": False, "reason": "eta = I is not c diag(gamma) for this trained gamma"}
    return {**out, "guaranteed": False, "reason": "free eta: an unconstrained trained matrix, no descent guarantee"}


def noise_floor(energy: np.ndarray, energy_tol: float) -> np.ndarray:
    """energy_tol * (1 + |E_A^(t)|) for t = 0..S-1: changes below it count as no change."""
    return energy_tol * (1.0 + np.abs(energy[:-1]))


def settle_steps(energy: np.ndarray, energy_tol: float = DEFAULT_ENERGY_TOL) -> np.ndarray:
    """Per token (B, T): the first step s from which every later change |E_A^(t+1) - E_A^(t)|, t >= s,
    stays within the noise floor; S (the number of recorded steps) if the last change does not."""
    big = np.abs(np.diff(energy, axis=0)) > noise_floor(energy, energy_tol)  # (S, B, T)
    n = big.shape[0]
    last = n - 1 - np.argmax(big[::-1], axis=0)
    return np.where(big.any(axis=0), last + 1, 0)


def _fractions(change: np.ndarray, floor: np.ndarray) -> dict[str, float]:
    return {"descent": float(np.mean(change < 0)), "rise": float(np.mean(change > floor))}


def summarize_dynamics(dyn: Dynamics, energy_tol: float = DEFAULT_ENERGY_TOL) -> dict[str, Any]:
    """The numbers of the module docstring, from the recorded arrays."""
    e = dyn.energy
    change = np.diff(e, axis=0)
    floor = noise_floor(e, energy_tol)
    settle = settle_steps(e, energy_tol)
    steps = dyn.steps
    earlier = np.concatenate([np.zeros_like(settle[:, :1]), np.maximum.accumulate(settle, axis=1)[:, :-1]], axis=1)
    after = np.arange(steps)[:, None, None] >= earlier[None]
    settled = settle < steps
    return {
        "batch": int(e.shape[1]), "tokens": int(e.shape[2]), "steps": steps, "trained_steps": dyn.trained_steps,
        "energy_tol": energy_tol,
        "tokens_final_below_initial": float(np.mean(e[-1] < e[0])),
        "sequences_total_final_below_initial": float(np.mean(e[-1].sum(-1) < e[0].sum(-1))),
        "plain": _fractions(change, floor),
        "own_move": _fractions(dyn.own_move_change, floor),
        "settle": {
            "mean_step": float(settle.mean()), "frac_settled": float(settled.mean()),
            "mean_step_settled": float(settle[settled].mean()) if settled.any() else None,
        },
        "after_predecessors_settled": {
            "pairs": int(after.sum()),
            "frac_no_rise": float(np.mean((change <= floor)[after])) if after.any() else None,
        },
        "energy": {"initial_mean": float(e[0].mean()), "final_mean": float(e[-1].mean())},
        "grad_norm": {"initial_mean": float(dyn.grad_norm[0].mean()), "final_mean": float(dyn.grad_norm[-1].mean())},
    }


# -------------------------------------------------------------------------------------------- early exit


class EarlyExit(AtSteps):
    """An NRGPT evaluated with early exit: ``model``'s descent with tolerance ``tol`` on the gradient norm
    (``exit_on='grad'``) or on the energy change ('energy') and at most ``max_steps`` steps (default: the
    trained number); see ``NRGPT.run`` and ``nrgpt.energy.descent``.
    The interface of ``nrgpt.depth.AtSteps`` (``logits, loss = ee(idx, targets)``, ``forward_cached(idx,
    cache)``, ``config``), early exit included; ``run(idx)`` also returns every token's number of steps."""

    def __init__(self, model: NRGPT, tol: float, max_steps: int | None = None, exit_on: str = "grad"):
        super().__init__(require_energy_model(model), max_steps)
        self.tol, self.exit_on = tol, exit_on

    def step_options(self) -> dict[str, Any]:
        return {"n_steps": self.n_steps, "tol": self.tol, "exit_on": self.exit_on}

    def run(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, T, V) and steps per token (B, T)."""
        return self.model.run(idx, self.n_steps, self.tol, self.exit_on)


Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]


def evaluate_early_exit(ee: EarlyExit, data: Batches | ListOpsSamples, batch_size: int = 64) -> dict[str, float]:
    """{"avg_steps", "loss"} on language batches (x, y) (mean over target tokens), or {"avg_steps",
    "accuracy"} on ListOps samples (greedy decoding; the steps are averaged over the tokens the decoding
    fed to the model: the prompt and every generated token but the last). Runs in eval mode."""
    was_training = ee.training
    ee.eval()
    try:
        with without_graph(ee):
            if isinstance(data, ListOpsSamples):
                return _listops_early_exit(ee, data, batch_size)
            return _language_early_exit(ee, data)
    finally:
        ee.train(was_training)


def _listops_early_exit(ee: EarlyExit, samples: ListOpsSamples, batch_size: int) -> dict[str, float]:
    device = next(ee.parameters()).device
    result = score_listops(ee, samples, batch_size=batch_size, return_predictions=True)
    tok = samples.tokenizer
    fed = [tok.encode(r["prompt"]) + tok.encode(p["continuation"])[:-1]
           for r, p in zip(samples.records, result["predictions"])]
    total = count = 0
    for start in range(0, len(fed), batch_size):
        rows = fed[start:start + batch_size]
        width = max(map(len, rows))  # right padding: causality keeps it out of the real tokens
        idx = torch.tensor([r + [0] * (width - len(r)) for r in rows], device=device)
        lengths = torch.tensor([len(r) for r in rows], device=device)
        real = torch.arange(width, device=device)[None] < lengths[:, None]
        total += int(ee.run(idx)[1][real].sum())
        count += int(real.sum())
    return {"avg_steps": total / count, "accuracy": result["overall"]}


def _language_early_exit(ee: EarlyExit, batches: Batches) -> dict[str, float]:
    device = next(ee.parameters()).device
    loss_sum, steps_sum, count = 0.0, 0, 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        logits, steps = ee.run(x)
        loss_sum += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        steps_sum += int(steps.sum())
        count += y.numel()
    return {"avg_steps": steps_sum / count, "loss": loss_sum / count}


def early_exit_curve(model: NRGPT, data: Batches | ListOpsSamples, tolerances: Sequence[float], *,
                     max_steps: int | None = None, batch_size: int = 64,
                     exit_on: str = "grad") -> list[dict[str, float]]:
    """For each tolerance: {"tol", "avg_steps", "loss" or "accuracy"} of ``EarlyExit(model, tol, max_steps,
    exit_on)``."""
    return [{"tol": tol, **evaluate_early_exit(EarlyExit(model, tol, max_steps, exit_on), data, batch_size)}
            for tol in tolerances]


def fixed_steps_curve(model: NRGPT, data: Batches | ListOpsSamples, steps: Sequence[int] | None = None, *,
                      batch_size: int = 64) -> list[dict[str, float]]:
    """The fixed-steps model cut at each number of steps (default 0..n_steps): {"steps", "avg_steps" (the
    steps of all blocks), "loss" or "accuracy"} of ``nrgpt.depth.depth_curve``; the baseline an early-exit
    curve is compared with."""
    n_blocks = require_energy_model(model).config.n_blocks
    steps = range(model.config.n_steps + 1) if steps is None else steps
    metric = "accuracy" if isinstance(data, ListOpsSamples) else "loss"
    return [{"steps": p["steps"], "avg_steps": float(n_blocks * p["steps"]), metric: p[metric]}
            for p in depth_curve(model, data, steps, batch_size=batch_size)]


# ----------------------------------------------------------------------------------------------- figures


def energy_figure(dyn: Dynamics, sequence: int = 0, *, log_grad: bool = True, title: str = ""):
    """Figure 2: total, attention and FF energy of every token of one sequence over the steps (one line
    per token, coloured by position), and the gradient norm ||dE_A/dg_A||."""
    fig, axes = new_figure(2, 2, sharex=True, title=title or None)
    steps = np.arange(dyn.steps + 1)
    panels = (
        (dyn.energy, "energy $E_A$", "total energy", False),
        (dyn.attn_energy, r"$E_A^{\mathrm{AT}}$", "attention energy", False),
        (dyn.ff_energy, r"$E_A^{\mathrm{FF}}$", "feed-forward energy", False),
        (dyn.grad_norm, r"$\|\partial E_A / \partial g_A\|$", "gradient norm", log_grad),
    )
    for i, (ax, (values, ylabel, name, log_y)) in enumerate(zip(axes.flat, panels)):
        mappable = indexed_lines(ax, steps, values[:, sequence].T)
        style_axes(ax, xlabel="step t" if i >= 2 else "", ylabel=ylabel, title=name, log_y=log_y)
        if dyn.steps > dyn.trained_steps:
            mark_x(ax, dyn.trained_steps, f"trained steps ({dyn.trained_steps})")
    if dyn.steps > dyn.trained_steps:
        axes[0, 0].legend(loc="best", fontsize="small")
    index_colorbar(fig, mappable, axes, "token position")
    return fig


def descent_figure(dyn: Dynamics, energy_tol: float = DEFAULT_ENERGY_TOL, title: str = ""):
    """Per step: the fraction of tokens whose energy fell (plain and own move) or rose above the noise
    floor, and the mean |change|; per token: the settle step against the position (all sequences)."""
    fig, axes = new_figure(1, 3, title=title or None)
    change = np.diff(dyn.energy, axis=0)
    floor = noise_floor(dyn.energy, energy_tol)
    t = np.arange(1, dyn.steps + 1)
    ax = axes[0, 0]
    ax.plot(t, (change < 0).mean(axis=(1, 2)), "o-", ms=3, label="plain descent $E_A^{(t)} < E_A^{(t-1)}$")
    ax.plot(t, (dyn.own_move_change < 0).mean(axis=(1, 2)), "s-", ms=3, label="own-move descent (Prop. 2.1)")
    ax.plot(t, (change > floor).mean(axis=(1, 2)), "^--", ms=3, label="plain rise above noise floor")
    ax.set_ylim(-0.03, 1.03)
    style_axes(ax, xlabel="step t", ylabel="fraction of tokens", title="per-token descent")
    ax.legend(fontsize="small")
    ax = axes[0, 1]
    ax.plot(t, np.abs(change).mean(axis=(1, 2)) + 1e-300, "o-", ms=3, label="plain")
    ax.plot(t, np.abs(dyn.own_move_change).mean(axis=(1, 2)) + 1e-300, "s-", ms=3, label="own move")
    style_axes(ax, xlabel="step t", ylabel=r"mean $|\Delta E_A|$", title="energy change per step", log_y=True)
    ax.legend(fontsize="small")
    ax = axes[0, 2]
    settle = settle_steps(dyn.energy, energy_tol)
    positions = np.broadcast_to(np.arange(settle.shape[1]), settle.shape)
    ax.scatter(positions.ravel(), settle.ravel(), s=8, alpha=0.5)
    ax.axhline(dyn.steps, color="0.4", linestyle=":", linewidth=1.0, label=f"not settled by step {dyn.steps}")
    style_axes(ax, xlabel="token position", ylabel="settle step", title=f"settling (tol {energy_tol:g})")
    ax.legend(fontsize="small")
    return fig


EXIT_LABELS = {"grad": r"$\|\partial E_A/\partial g_A\|$", "energy": r"$|\Delta E_A| / (1 + |E_A|)$"}


def early_exit_figure(curve: list[dict[str, float]], fixed: list[dict[str, float]], title: str = "",
                      exit_on: str = "grad"):
    """Loss or accuracy against the average number of steps: early exit (one point per tolerance) and the
    fixed-steps model cut at each number of steps."""
    metric = "accuracy" if "accuracy" in curve[0] else "loss"
    fig, axes = new_figure(1, 1, panel_size=(6.0, 4.0), title=title or None)
    ax = axes[0, 0]
    ax.plot([p["avg_steps"] for p in fixed], [p[metric] for p in fixed], "s-", color="0.5", label="fixed steps")
    by_steps = sorted(curve, key=lambda p: p["avg_steps"])
    ax.plot([p["avg_steps"] for p in by_steps], [p[metric] for p in by_steps], "o-", color="C3", label="early exit")
    for p in curve:
        ax.annotate(f"{p['tol']:g}", (p["avg_steps"], p[metric]), textcoords="offset points", xytext=(4, 4),
                    fontsize="x-small", color="C3")
    style_axes(ax, xlabel="average steps per token", ylabel=metric,
               title=f"early exit (labels: tolerance on {EXIT_LABELS[exit_on]})")
    ax.legend()
    return fig


# --------------------------------------------------------------------------------------- `nrgpt dynamics`


def _note(message: str) -> None:
    print(f"nrgpt: note: {message}", file=sys.stderr)


def _input_batch(args: argparse.Namespace, model: LanguageModel, data_dir: str | None,
                 device: torch.device) -> tuple[torch.Tensor, str]:
    """The token batch (B, T) to record and a description of it."""
    from .config import ConfigError
    from .data import TokenStream, load_tokenizer

    block = model.config.block_size
    if args.data:
        stream = TokenStream(args.data, args.split)
        length = min(args.length or block, block, len(stream) - 1)
        x, _ = stream.get_batch(args.batch, length, torch.Generator().manual_seed(args.seed))
        return x.to(device), f"{args.batch} windows of {length} tokens from the {args.split} split of {args.data}"
    if args.ids:
        ids = args.ids
        vocab = model.config.vocab_size
        if max(ids) >= vocab:
            raise ConfigError(f"--ids: token id {max(ids)} is outside the model's vocabulary (0 to {vocab - 1})")
        source = "token ids"
    else:
        tokenizer_dir = args.tokenizer or data_dir
        if tokenizer_dir is None:
            raise ConfigError("--prompt needs a tokenizer: give --tokenizer DATA_DIR (or use --ids)")
        ids = load_tokenizer(tokenizer_dir).encode(args.prompt)
        source = f"prompt {args.prompt!r}"
    if not ids:
        raise ConfigError("the prompt is empty")
    if len(ids) > block:
        _note(f"the input has {len(ids)} tokens, more than block_size {block}; using its last {block}")
        ids = ids[-block:]
    return torch.tensor([ids], device=device), f"{source} ({len(ids)} tokens)"


def _early_exit_data(args: argparse.Namespace, idx: torch.Tensor, data_dir: str | None) -> Batches | ListOpsSamples:
    """ListOps test samples when the dataset is ListOps, else the recorded batch as next-token targets."""
    from .data import load_meta

    listops_dir = args.data or args.tokenizer or data_dir
    if listops_dir and load_meta(listops_dir)["kind"] == "listops":
        return load_listops_samples(listops_dir, "test", args.early_exit_samples)
    return [(idx[:, :-1], idx[:, 1:])]


def _print_summary(summary: dict[str, Any]) -> None:
    g = summary["descent_guarantee"]
    s = summary
    print(f"model: {s['model']} eta={g['eta']} norm={g['norm']} mask={g['mask']}; descent guaranteed: "
          f"{'yes' if g['guaranteed'] else 'no'} ({g['reason']})")
    print(f"input: {s['input']}; {s['steps']} steps recorded ({s['trained_steps']} trained)")
    print(f"tokens whose energy ends below its start: {s['tokens_final_below_initial']:.3f}; sequences whose "
          f"total energy does: {s['sequences_total_final_below_initial']:.3f}")
    for key, name in (("plain", "plain E_A^(t+1) vs E_A^(t)"), ("own_move", "own move (Prop. 2.1)")):
        print(f"{name}: descent {s[key]['descent']:.3f}, rise above noise {s[key]['rise']:.3f} of (token, step) pairs")
    st, ap = s["settle"], s["after_predecessors_settled"]
    print(f"settling (tol {s['energy_tol']:g}): {st['frac_settled']:.3f} of tokens settled, mean settle step "
          f"{st['mean_step']:.2f}; after earlier tokens settled: no rise in {ap['frac_no_rise']} of {ap['pairs']} "
          "pairs")
    for point in s.get("early_exit", []):
        metric = "accuracy" if "accuracy" in point else "loss"
        print(f"early exit ({s['early_exit_on']}) tol {point['tol']:g}: {point['avg_steps']:.2f} steps/token, "
              f"{metric} {point[metric]:.4f}")
    for point in s.get("fixed_steps", []):
        metric = "accuracy" if "accuracy" in point else "loss"
        print(f"fixed {point['steps']} steps: {metric} {point[metric]:.4f}")


def main(args: argparse.Namespace) -> int:
    from .checkpoint import load_any
    from .config import ConfigError
    from .device import pick_device

    device = pick_device(args.device)
    batch = args.batch if args.data else 1
    if args.sequence >= batch:
        raise ConfigError(f"--sequence {args.sequence} is not in the batch of {batch} sequence(s); count from 0")
    model, data_dir = load_any(args.run, device, args.checkpoint, args.data or args.tokenizer)
    try:
        model = require_energy_model(model)
    except TypeError as e:
        raise ConfigError(str(e)) from None
    recorded = copy.deepcopy(model).double() if args.precision == "float64" else model
    steps = args.steps or model.config.n_steps
    path = Path(args.run)
    out = Path(args.out) if args.out else (Path("dynamics") / path.stem if path.is_file() else path / "dynamics")
    out.mkdir(parents=True, exist_ok=True)
    idx, source = _input_batch(args, model, data_dir, device)
    dyn = record_dynamics(recorded, idx, steps, keep_states=args.save_states)
    summary = {"model": model.config.model, "checkpoint": str(path), "input": source,
               "descent_guarantee": descent_guarantee(model), "config": model.config.to_dict(),
               **summarize_dynamics(dyn, args.energy_tol)}
    dyn.save(out / "dynamics.npz", settle_step=settle_steps(dyn.energy, args.energy_tol))
    name = f"{path.stem if path.is_file() else path.name} (eta {model.config.eta})"
    title = f"{name}: sequence {args.sequence}, {idx.shape[1]} tokens, {steps} steps"
    save_png(energy_figure(dyn, args.sequence, log_grad=not args.linear_grad, title=title), out / "energy.png")
    save_png(descent_figure(dyn, args.energy_tol, title=f"{name}: descent and settling"), out / "descent.png")
    if args.early_exit:
        tolerances = args.early_exit
        data = _early_exit_data(args, idx, data_dir)
        max_steps = args.early_exit_steps or model.config.n_steps
        summary["early_exit"] = early_exit_curve(model, data, tolerances, max_steps=max_steps,
                                                 exit_on=args.early_exit_on)
        summary["early_exit_on"] = args.early_exit_on
        summary["fixed_steps"] = fixed_steps_curve(model, data, range(max_steps + 1))
        save_png(early_exit_figure(summary["early_exit"], summary["fixed_steps"], title=name,
                                   exit_on=args.early_exit_on), out / "early_exit.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    _print_summary(summary)
    print(f"wrote {out}/: energy.png, descent.png{', early_exit.png' if args.early_exit else ''}, dynamics.npz, "
          "summary.json")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """``nrgpt dynamics``: record, plot and summarise the energy dynamics of a checkpoint."""
    from .runconfig import DEVICES

    p = subparsers.add_parser(
        "dynamics", help="energy of every token over the inference steps (Figure 2), descent, early exit",
        description="Record every token's total, attention and FF energy and gradient norm at every step of an "
                    "NRGPT checkpoint (run dir, checkpoint dir or reference-code .pt), write energy.png, "
                    "descent.png, dynamics.npz and summary.json, and print the summary.")
    p.add_argument("run", help="run directory, checkpoint directory or reference-code checkpoint file")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text to run (encoded with the run's tokenizer or --tokenizer)")
    src.add_argument("--ids", type=comma_list(integer(0), "3,17,5"), help="comma-separated token ids to run")
    src.add_argument("--data", help="a prepared dataset directory: run --batch random windows of it")
    p.add_argument("--split", choices=("val", "train"), default="val", help="with --data (default val)")
    p.add_argument("--batch", type=integer(1), default=4, help="with --data: number of windows (default 4)")
    p.add_argument("--length", type=integer(2), default=None, help="with --data: window length (default block_size)")
    p.add_argument("--seed", type=seed, default=0, help="with --data: seed of the window offsets")
    p.add_argument("--tokenizer", help="dataset directory whose tokenizer encodes --prompt (default: the run's)")
    p.add_argument("--steps", type=integer(1), default=None,
                   help="steps to run (default: the trained number; more probes asymptotic stability)")
    p.add_argument("--out", help="output directory (default: RUN/dynamics, or dynamics/NAME for a .pt file)")
    p.add_argument("--early-exit", metavar="TOL1,TOL2,...", type=comma_list(number(0), "0.1,0.01"),
                   help="early-exit tolerances: loss (or ListOps accuracy) against average steps, vs fixed steps")
    p.add_argument("--early-exit-on", choices=sorted(EXIT_RULES), default="grad",
                   help="what the tolerance applies to: the gradient norm ||dE_A/dg_A|| (grad, default) or the "
                        "energy change |dE_A| / (1 + |E_A|) over a step (energy)")
    p.add_argument("--early-exit-steps", type=integer(1), default=None,
                   help="most steps a token may take under early exit (default: the trained number)")
    p.add_argument("--early-exit-samples", type=integer(1), default=200,
                   help="ListOps test samples scored per early-exit point (default 200)")
    p.add_argument("--energy-tol", type=number(0), default=DEFAULT_ENERGY_TOL,
                   help="noise floor of an energy change: tol * (1 + |E|) (default 1e-3)")
    p.add_argument("--sequence", type=integer(0), default=0, help="which sequence of the batch energy.png shows")
    p.add_argument("--linear-grad", action="store_true", help="linear (not log) scale for the gradient norm")
    p.add_argument("--precision", choices=("float64", "float32"), default="float64",
                   help="arithmetic of the recording (default float64, so that tiny energy changes are not float32 "
                        "noise); early exit runs in the checkpoint's own precision")
    p.add_argument("--save-states", action="store_true", help="also store the states x^(t) in dynamics.npz")
    p.add_argument("--checkpoint", "--which", choices=("best", "last"), default="best",
                   help="which checkpoint of a run directory (default: best)")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.set_defaults(func=main)
