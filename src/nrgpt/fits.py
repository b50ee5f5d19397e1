"""Numbers read off training runs: perplexity, the train-validation gap (at the best validation loss, or at
equal training loss), and the accuracy-vs-size logistic fit of Figure 3 (with the size at which a model
crosses 80% accuracy, the paper's "transition to learning")."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


def perplexity_from_loss(loss: float) -> float:
    """Perplexity of a mean token cross-entropy loss in nats: exp(loss)."""
    return math.exp(loss)


def train_val_gap(train_losses: Sequence[float], val_losses: Sequence[float]) -> float:
    """Generalization gap at the best validation point: val[i*] - train[i*], i* = argmin(val)
    (the first one on ties). The two sequences are losses recorded at the same evaluations."""
    if len(train_losses) != len(val_losses) or not val_losses:
        raise ValueError("need equally long, non-empty train and validation loss sequences")
    best = int(np.argmin(val_losses))
    return float(val_losses[best] - train_losses[best])


def at_first_reaching(values: Sequence[float], others: Sequence[float], level: float, *,
                      falling: bool = False) -> float | None:
    """The value of ``others`` where ``values`` (evaluations in order, paired with ``others``) first reaches
    ``level``: rises to it or above, or with ``falling`` falls to it or below. Linear in ``values`` between
    the two evaluations around that point; ``others[0]`` if the first evaluation is already there; None if
    it never gets there. ``others`` = iterations gives the iteration at which a run first reaches an
    accuracy; ``others`` = gaps, the gap at a training loss (``gap_at_train_loss``)."""
    if len(values) != len(others) or not values:
        raise ValueError("need equally long, non-empty sequences")
    sign = -1.0 if falling else 1.0
    v, target = [sign * x for x in values], sign * level
    if v[0] >= target:
        return float(others[0])
    for i in range(1, len(v)):
        if v[i] >= target:
            w = (target - v[i - 1]) / (v[i] - v[i - 1])
            return float(others[i - 1] + w * (others[i] - others[i - 1]))
    return None


def gap_at_train_loss(train_losses: Sequence[float], val_losses: Sequence[float], level: float) -> float | None:
    """Generalization gap val - train where the training loss first falls to ``level``: linear in the training
    loss between the two evaluations around that point (the first evaluation's gap if it starts at or below
    ``level``), None if it never gets there. Comparing runs at one ``level`` compares them at equal fit, which
    a gap at equal iterations does not (a run that has fitted less has a smaller gap)."""
    if len(train_losses) != len(val_losses) or not val_losses:
        raise ValueError("need equally long, non-empty train and validation loss sequences")
    return at_first_reaching(train_losses, [v - t for t, v in zip(train_losses, val_losses)], level, falling=True)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-z)), written as (1 + tanh(z / 2)) / 2 so that it never overflows."""
    return 0.5 * (1.0 + np.tanh(0.5 * z))


@dataclass(frozen=True)
class LogisticFit:
    """acc(N) = lo + (hi - lo) / (1 + exp(-k (log10 N - x0))); ``rss`` = residual sum of squares of the fit."""

    k: float
    x0: float
    lo: float
    hi: float
    rss: float

    def predict(self, n_params: float | np.ndarray) -> float | np.ndarray:
        """The fitted accuracy at total parameter count(s) ``n_params``."""
        x = np.log10(np.asarray(n_params, dtype=np.float64))
        acc = self.lo + (self.hi - self.lo) * _sigmoid(self.k * (x - self.x0))
        return float(acc) if acc.ndim == 0 else acc

    def crossing(self, level: float = 0.8) -> float | None:
        """The parameter count N* where the fit rises through ``level`` (the paper's "transition to
        learning" at 80%): log10 N* = x0 + ln(s / (1 - s)) / k, s = (level - lo) / (hi - lo).
        None when the fit never rises through it: it decreases or is flat ((hi - lo) k <= 0), or
        ``level`` is not strictly between lo and hi."""
        if (self.hi - self.lo) * self.k <= 0 or not min(self.lo, self.hi) < level < max(self.lo, self.hi):
            return None
        s = (level - self.lo) / (self.hi - self.lo)
        log10_n = self.x0 + math.log(s / (1.0 - s)) / self.k
        return math.inf if log10_n > sys.float_info.max_10_exp else 10.0**log10_n


def _levenberg_marquardt(
    residuals: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], p: np.ndarray, max_iter: int
) -> tuple[np.ndarray, float]:
    """Minimize |r(p)|^2 by Levenberg-Marquardt: step = -(J^T J + lam diag(J^T J))^-1 J^T r, lam
    shrunk after an accepted step and grown after a rejected one. Returns (p, |r|^2)."""
    r, jac = residuals(p)
    cost = float(r @ r)
    lam = 1e-3
    for _ in range(max_iter):
        a = jac.T @ jac
        step = np.linalg.solve(a + lam * np.diag(np.diag(a) + 1e-12), -(jac.T @ r))
        r_new, jac_new = residuals(p + step)
        cost_new = float(r_new @ r_new)
        if np.isfinite(cost_new) and cost_new < cost:
            p, r, jac, cost, lam = p + step, r_new, jac_new, cost_new, lam / 3
            if np.linalg.norm(step) <= 1e-10 * (np.linalg.norm(p) + 1e-10):
                break
        else:
            lam *= 4
            if lam > 1e16:
                break
    return p, cost


def fit_logistic(
    n_params: Sequence[float],
    accuracy: Sequence[float],
    *,
    lo: float | None = 0.0,
    hi: float | None = 1.0,
    max_iter: int = 300,
) -> LogisticFit:
    """Least-squares fit of acc = lo + (hi - lo) / (1 + exp(-k (log10 N - x0))) to (N, accuracy) points.

    k and x0 are always fitted; ``lo`` and ``hi`` are fixed at the given values (default 0 and 1,
    so the fit has two free parameters, the right number for the handful of sizes in Figure 3) or
    fitted when None. Levenberg-Marquardt with the analytic Jacobian, started from a grid of
    midpoints x0 across the data and slopes k (2, 8, 32 per data span); the lowest residual wins.
    """
    n = np.asarray(n_params, dtype=np.float64)
    y = np.asarray(accuracy, dtype=np.float64)
    if n.shape != y.shape or n.ndim != 1:
        raise ValueError("n_params and accuracy must be 1-D sequences of equal length")
    if not (np.all(np.isfinite(n) & (n > 0)) and np.all(np.isfinite(y))):
        raise ValueError("n_params must be positive and finite, accuracy finite")
    x = np.log10(n)
    n_free = 2 + (lo is None) + (hi is None)
    span = float(np.ptp(x)) if x.size else 0.0
    if x.size < n_free or span == 0:
        raise ValueError(f"need at least {n_free} points at two or more distinct sizes")

    def unpack(p: np.ndarray) -> tuple[float, float, float, float]:
        rest = iter(p[2:])
        return p[0], p[1], next(rest) if lo is None else lo, next(rest) if hi is None else hi

    def residuals(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        k, x0, low, high = unpack(p)
        s = _sigmoid(k * (x - x0))
        slope = (high - low) * s * (1 - s)
        columns = [slope * (x - x0), -slope * k]
        if lo is None:
            columns.append(1 - s)
        if hi is None:
            columns.append(s)
        return low + (high - low) * s - y, np.stack(columns, axis=1)

    best: tuple[np.ndarray, float] | None = None
    for x0_start in np.linspace(x.min(), x.max(), 5):
        for k_start in (2 / span, 8 / span, 32 / span):
            start = [k_start, x0_start] + ([y.min()] if lo is None else []) + ([y.max()] if hi is None else [])
            p, cost = _levenberg_marquardt(residuals, np.array(start), max_iter)
            if best is None or cost < best[1]:
                best = (p, cost)
    k, x0, low, high = unpack(best[0])
    return LogisticFit(k=float(k), x0=float(x0), lo=float(low), hi=float(high), rss=best[1])
