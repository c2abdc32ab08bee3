"""The multi-power law of a loss curve along any learning-rate schedule (Luo et al. 2025).

    law = fit_multipower_law(curves)             # analysis.schedule_law.Curve, as for Tissue
    law.final(lr_T)                              # end loss of any schedule, e.g. a cosine

Luo, Wen, Hu, Sun, Liu, Sun, Lyu and Chen 2025, "A Multi-Power Law for Loss Curve Prediction
Across Learning Rate Schedules" (ICLR 2025, arXiv 2503.12811), their equation for L(t):

    L(t)   = L0 + A (S1(t) + S_W)^-alpha - LD(t)
    LD(t)  = B sum_{k=1..t} (eta_{k-1} - eta_k) G(eta_k^-gamma S_k(t))
    S_k(t) = sum_{tau=k..t} eta_tau,   G(x) = 1 - (C x + 1)^-beta

S1(t) + S_W is the area under the learning rate, warmup included: here simply the sum of every
update's learning rate (areas() of analysis.schedule_law). Each drop of the learning rate
eta_{k-1} -> eta_k lowers the loss by up to B times the drop, and pays off as a power law in
the area S_k(t) trained since then at the lower rates (scaled by eta_k^-gamma), so the gain of
a decay saturates, unlike Tissue et al.'s linear annealing area. As there, the warmup's rises are
left out (only drops count), and a step's own update is part of S_k, so a drop at the very last
update has not yet paid off.

Seven parameters: L0, A and B enter linearly, so the fit is variable projection: a bounded
linear least-squares solve for (L0, A, B) inside a bounded nonlinear least-squares search over
(alpha, C, beta, gamma), from the best few points of a coarse grid. Bounds: L0, A, B >= 0 (or
L0 fixed, as Approach 3's E), alpha in analysis.schedule_law.ALPHA_RANGE, C in [1e-3, 1e5],
beta in [0.05, 2], gamma in [0, 1.5]; a fit on a bound says so in `warnings`. The authors fit
on whole loss curves of 25M-400M models and report 0.11-0.17% mean and at most 1.0% worst
relative error; benchmarks/bench_schedule_law.py measures it on the lab's runs.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
from scipy.optimize import least_squares

from analysis.schedule_law import (
    ALPHA_RANGE,
    Curve,
    FitPoints,
    bound_warnings,
    drops,
    fit_points,
    linear_fit,
    with_gap,
)
from lab.errors import UserError

BOUNDS = {"alpha": ALPHA_RANGE, "logC": (np.log(1e-3), np.log(1e5)), "beta": (0.05, 2.0),
          "gamma": (0.0, 1.5)}
GRID = {"alpha": (0.2, 0.5, 1.0), "logC": (np.log(0.1), np.log(3.0), np.log(100.0)),
        "beta": (0.3, 0.8, 1.5), "gamma": (0.2, 0.6, 1.0)}


@dataclasses.dataclass(frozen=True)
class _Decays:
    """What LD needs of one learning-rate sequence at the points n: the drops, the rate after
    each drop, and the area S_k(n) trained since each drop (0 where the drop is not yet)."""

    s1_P: np.ndarray
    drop_K: np.ndarray
    eta_K: np.ndarray
    since_PxK: np.ndarray


def _decays(lr_T: np.ndarray, n_P: np.ndarray) -> _Decays:
    lr_T = np.asarray(lr_T, dtype=np.float64)
    s1 = np.concatenate([[0.0], np.cumsum(lr_T)])
    delta = drops(lr_T)
    k_K = np.flatnonzero(delta > 0)
    since = s1[n_P][:, None] - s1[k_K][None, :]  # sum of eta_k .. eta_{n-1}
    since_PxK = np.where(k_K[None, :] < n_P[:, None], np.maximum(since, 0.0), 0.0)
    eta_K = np.maximum(lr_T[k_K], 1e-12 * max(float(lr_T.max(initial=0.0)), 1e-30))
    return _Decays(s1[n_P], delta[k_K], eta_K, since_PxK)


def _reduction(d: _Decays, C: float, beta: float, gamma: float) -> np.ndarray:
    """LD / B at every point: sum_k drop_k G(eta_k^-gamma S_k(n))."""
    x_PxK = d.since_PxK * d.eta_K[None, :] ** -gamma
    return (1.0 - (C * x_PxK + 1.0) ** -beta) @ d.drop_K


@dataclasses.dataclass(frozen=True)
class MultiPowerLaw:
    L0: float
    A: float
    alpha: float
    B: float
    C: float
    beta: float
    gamma: float
    gap: float  # training-loss fits: mean final eval loss minus the law's loss at the end
    rms: float
    n_points: int
    curves: tuple[str, ...]
    warnings: tuple[str, ...] = ()

    name = "multi-power (Luo et al. 2025)"

    def curve(self, lr_T: np.ndarray) -> np.ndarray:
        """The law's loss after n = 0 .. T updates (n = 0 is infinite)."""
        n_P = np.arange(len(lr_T) + 1)
        d = _decays(lr_T, n_P)
        with np.errstate(divide="ignore"):
            power = self.A * d.s1_P ** -self.alpha
        return self.L0 + power - self.B * _reduction(d, self.C, self.beta, self.gamma)

    def final(self, lr_T: np.ndarray) -> float:
        """The predicted final eval loss of a run with these learning rates."""
        return float(self.curve(lr_T)[-1] + self.gap)

    def describe(self) -> str:
        gap = f"eval - train gap {self.gap:+.4f}; " if self.gap else ""
        text = (f"L = {self.L0:.4f} + {self.A:.4g} S1^-{self.alpha:.3f} - {self.B:.4g} "
                f"sum drop (1 - ({self.C:.4g} eta^-{self.gamma:.3f} S_k + 1)^-{self.beta:.3f}) "
                f"({gap}rms {self.rms:.4f} on {self.n_points} points of {len(self.curves)} "
                "curves)")
        return text + "".join(f"\n  warning: {w}" for w in self.warnings)


def _design(decays: list[_Decays], theta: np.ndarray) -> np.ndarray:
    alpha, logC, beta, gamma = theta
    s1 = np.concatenate([d.s1_P for d in decays])
    ld = np.concatenate([_reduction(d, np.exp(logC), beta, gamma) for d in decays])
    return np.stack([np.ones(len(s1)), s1 ** -alpha, -ld], axis=1)


def _residual(decays: list[_Decays], pts: FitPoints, L0: float | None, theta) -> np.ndarray:
    X = _design(decays, theta)
    coef, _ = linear_fit(X, pts, L0)
    return (X @ coef - pts.y) * pts.sqrt_w


def fit_multipower_law(curves: list[Curve], start: int = 1, L0: float | None = None,
                       train_loss: bool = False, starts: int = 3) -> MultiPowerLaw:
    """Fit the seven parameters to the curves' points with n >= start (> 0), within BOUNDS.
    `L0` fixes the floor; `train_loss` adds the eval - train gap of the finished curves;
    `starts` is how many of the coarse grid's best points are refined."""
    pts = fit_points(curves, start, "multi-power law", min_points=10)
    if L0 is not None and L0 < 0:
        raise UserError(f"the multi-power law's L0 must be >= 0, got {L0}")
    decays = [_decays(c.lr, c.n[k]) for c, k in zip(pts.curves, pts.keep, strict=True)]

    def sse(theta) -> float:
        return float(np.sum(_residual(decays, pts, L0, theta) ** 2))

    grid = sorted(itertools.product(*GRID.values()), key=sse)[:starts]
    lo, hi = (np.array([b[i] for b in BOUNDS.values()]) for i in (0, 1))
    fits = [least_squares(lambda t: _residual(decays, pts, L0, t), np.array(g), bounds=(lo, hi),
                          x_scale=hi - lo, xtol=1e-10, ftol=1e-12, max_nfev=400) for g in grid]
    theta = min(fits, key=lambda f: f.cost).x
    X = _design(decays, theta)
    coef, _ = linear_fit(X, pts, L0)
    resid = pts.y - X @ coef
    alpha, logC, beta, gamma = (float(v) for v in theta)
    values = {"L0": coef[0], "A": coef[1], "B": coef[2], "alpha": alpha, "logC": logC,
              "beta": beta, "gamma": gamma}
    warn = bound_warnings(values, {"L0": (0.0, np.inf), "A": (0.0, np.inf), "B": (0.0, np.inf),
                                   **BOUNDS}, fixed=("L0",) if L0 is not None else ())
    law = MultiPowerLaw(float(coef[0]), float(coef[1]), alpha, float(coef[2]), float(np.exp(logC)),
                        beta, gamma, 0.0, float(np.sqrt(np.mean(resid**2))), len(resid),
                        tuple(c.name for c in curves), warn)
    return with_gap(law, curves) if train_loss else law
