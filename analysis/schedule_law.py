"""Loss along a learning-rate schedule, without running it (Tissue et al. 2024).

    law = fit_schedule_law(curves)               # Curve: learning rates and logged losses
    law.final(lr_T)                              # end loss of any schedule, e.g. a cosine
    law.warnings                                 # the bounds that bind, if any

Pure numbers: lab.studies.branch_predict reads a run directory's curves and plans the branches;
analysis.multipower_law is the other law (Luo et al. 2025), fitted to the same curves.

The model is the "scaling law with learning-rate annealing" of Tissue et al. 2024:

    L(n) = L0 + A * S1(n)^-alpha - C * S2(n)

after n updates with learning rates eta_0 .. eta_{n-1}: S1(n) = sum_{i<n} eta_i is the forward
area, and S2(n) = sum_{i<n} m_i the annealing area with momentum, m_i = lam * m_{i-1} + delta_i,
delta_i = max(eta_{i-1} - eta_i, 0). So S2(n) = sum_k delta_k (1 - lam^(n-k)) / (1 - lam): a drop
in the learning rate pays off gradually, over about 1 / (1 - lam) updates. The warmup's rises
are left out of S2 (delta >= 0): only annealing lowers the loss beyond the power law.

Three of the parameters (L0, A, C) enter linearly, so for each (alpha, lam) on a grid the best
fit is one bounded linear least-squares solve, and alpha is then refined by golden-section
search: the fit cannot stop in a poor local minimum.

Bounds (a fit outside them is a curve fit, not a law): L0 >= 0, or L0 fixed to a given
irreducible loss (Approach 3's E); A >= 0 and C >= 0; alpha in ALPHA_RANGE = [0.1, 1.5], the
range of data-exponents reported for language models (Chinchilla's fits give 0.28-0.37; the lab's
demo ladder about 0.9). When the best fit sits on a bound the law says so in `warnings` (and
describe() prints them): on the lab's short runs the unbounded optimum was L0 = -20.5 with
alpha 0.015, a logarithm with no floor, that predicted a cosine run 3% too high.

Identifiability: on a stable run S2 is zero after the warmup, so C (and lam) cannot be fitted
from it; the fit refuses unless some fitted curve anneals. The law is fitted to every logged
point past the fitting window's start, each curve weighted equally (a decay has far fewer points
than its stable run, yet carries all the information on C). Eval losses on a fixed validation
set are fitted as they are. Only when the points are training losses (`train_loss=True`) does
the predicted end eval loss add the mean gap (final eval loss minus the law's loss at the end)
of the fitted runs, the validation-minus-training offset.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
from scipy.optimize import lsq_linear

from lab.errors import UserError

# The momentum grid of the annealing area: from no lag (0) to Tissue et al.'s 0.999.
LAMBDAS = (0.0, 0.5, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999)
ALPHA_RANGE = (0.1, 1.5)
ALPHAS = np.linspace(*ALPHA_RANGE, 71)


def areas(lr_T: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """S1 and S2 after n = 0 .. T updates (arrays of T + 1), for learning rates lr_T."""
    lr_T = np.asarray(lr_T, dtype=np.float64)
    s1 = np.concatenate([[0.0], np.cumsum(lr_T)])
    delta = drops(lr_T)
    m = np.empty_like(delta)
    acc = 0.0
    for i, d in enumerate(delta):  # a first-order recursion: T is small (steps, not tokens)
        acc = lam * acc + d
        m[i] = acc
    s2 = np.concatenate([[0.0], np.cumsum(m)])
    return s1, s2


def drops(lr_T: np.ndarray) -> np.ndarray:
    """delta_i = max(eta_{i-1} - eta_i, 0) for every update i (0 for the first): the annealing."""
    lr_T = np.asarray(lr_T, dtype=np.float64)
    return np.maximum(np.concatenate([[0.0], lr_T[:-1] - lr_T[1:]]), 0.0)


@dataclasses.dataclass(frozen=True)
class Curve:
    """One run's loss curve: `n` updates done before each `loss`, the learning rate of every
    update of the run, and its final eval loss (after all len(lr) updates) if known."""

    name: str
    lr: np.ndarray
    n: np.ndarray
    loss: np.ndarray
    final_eval: float | None = None


@dataclasses.dataclass(frozen=True)
class FitPoints:
    """The points a law is fitted to: each curve's points with n >= start, the curve's index
    for each, and sqrt weights that give every curve the same total weight."""

    curves: list[Curve]
    keep: list[np.ndarray]
    y: np.ndarray
    sqrt_w: np.ndarray


def fit_points(curves: list[Curve], start: int, law: str, min_points: int) -> FitPoints:
    """Check the curves can fit a schedule law (some anneal, at least `min_points` points) and
    select the points."""
    start = max(int(start), 1)
    annealing = False
    for c in curves:
        if len(c.n) != len(c.loss) or (len(c.n) and c.n.max() > len(c.lr)):
            raise UserError(f"the loss curve of {c.name} runs past its learning rates")
        _, s2 = areas(c.lr, 0.0)
        annealing |= bool(np.any(s2[c.n[c.n >= start]] > 0))
    if not annealing:
        raise UserError(f"the annealing term is unidentified: no curve fitted to the {law} "
                        "decays its learning rate (a stable run alone fixes L0, A and alpha "
                        "but not the annealing); finish one decay first, e.g. `lab branch RUN "
                        "--at S --decay-steps D`")
    keep = [c.n >= start for c in curves]
    if sum(int(k.sum()) for k in keep) < min_points:
        raise UserError(f"too few logged steps past step {start} to fit the {law}; "
                        "log more often (train.log_every) or train longer")
    y = np.concatenate([c.loss[k] for c, k in zip(curves, keep, strict=True)])
    w = np.concatenate([np.full(int(k.sum()), 1.0 / max(int(k.sum()), 1)) for k in keep])
    return FitPoints(curves, keep, y, np.sqrt(w))


def linear_fit(X: np.ndarray, pts: FitPoints, L0: float | None) -> tuple[np.ndarray, float]:
    """Weighted least squares for linear coefficients (L0, then the rest) all >= 0; with a given
    L0 that column is fixed. Returns the coefficients (L0 first) and the weighted SSE."""
    y = pts.y - (L0 if L0 is not None else 0.0)
    A = X[:, 1:] if L0 is not None else X
    Aw, yw = A * pts.sqrt_w[:, None], y * pts.sqrt_w
    coef, *_ = np.linalg.lstsq(Aw, yw, rcond=None)
    if np.any(coef < 0):  # only then the slower bounded solver
        coef = lsq_linear(Aw, yw, bounds=(0.0, np.inf), method="bvls").x
    sse = float(np.sum((Aw @ coef - yw) ** 2))
    return (np.concatenate([[L0], coef]) if L0 is not None else coef), sse


def bound_warnings(values: dict[str, float], bounds: dict[str, tuple[float, float]],
                   fixed: tuple[str, ...] = ()) -> tuple[str, ...]:
    """One line per parameter that sits on its bound (within 0.1% of the range)."""
    out = []
    for name, (lo, hi) in bounds.items():
        if name in fixed:
            continue
        v, tol = values[name], 1e-3 * ((hi - lo) if math.isfinite(hi) else max(abs(lo), 1.0))
        if v <= lo + tol:
            out.append(f"{name} = {v:.4g} sits on its lower bound {lo:g}")
        elif math.isfinite(hi) and v >= hi - tol:
            out.append(f"{name} = {v:.4g} sits on its upper bound {hi:g}")
    return tuple(out)


def golden(f: Callable[[float], float], lo: float, hi: float, steps: int = 40) -> float:
    """The minimum of a unimodal f on [lo, hi] by golden-section search."""
    g = (math.sqrt(5) - 1) / 2
    for _ in range(steps):
        a, b = hi - g * (hi - lo), lo + g * (hi - lo)
        if f(a) < f(b):
            hi = b
        else:
            lo = a
    return (lo + hi) / 2


@dataclasses.dataclass(frozen=True)
class ScheduleLaw:
    L0: float
    A: float
    alpha: float
    C: float
    lam: float
    gap: float  # training-loss fits: mean final eval loss minus the law's loss at the end
    rms: float  # root mean square residual of the fitted losses
    n_points: int
    curves: tuple[str, ...]
    warnings: tuple[str, ...] = ()  # the bounds the fit sits on

    name = "Tissue et al. 2024"

    def curve(self, lr_T: np.ndarray) -> np.ndarray:
        """The law's loss after n = 0 .. T updates (n = 0 is infinite)."""
        s1, s2 = areas(lr_T, self.lam)
        with np.errstate(divide="ignore"):
            return self.L0 + self.A * s1 ** -self.alpha - self.C * s2

    def final(self, lr_T: np.ndarray) -> float:
        """The predicted final eval loss of a run with these learning rates."""
        return float(self.curve(lr_T)[-1] + self.gap)

    def describe(self) -> str:
        gap = f"eval - train gap {self.gap:+.4f}; " if self.gap else ""
        text = (f"L = {self.L0:.4f} + {self.A:.4g} S1^-{self.alpha:.3f} - {self.C:.4g} S2 "
                f"(lam {self.lam:g}; {gap}rms {self.rms:.4f} on {self.n_points} points of "
                f"{len(self.curves)} curves)")
        return text + "".join(f"\n  warning: {w}" for w in self.warnings)


def with_gap(law, curves: list[Curve]):
    """A law fitted to training losses, with the mean gap of the finished curves between their
    final eval loss and the law's loss at their end (the validation-minus-training offset)."""
    gaps = [c.final_eval - law.curve(c.lr)[-1] for c in curves if c.final_eval is not None]
    return dataclasses.replace(law, gap=float(np.mean(gaps))) if gaps else law


def _areas_at_points(pts: FitPoints, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """S1 and S2 at every fitted point, in the order of pts.y."""
    both = [areas(c.lr, lam) for c in pts.curves]
    return tuple(np.concatenate([a[i][c.n[k]] for a, c, k in zip(both, pts.curves, pts.keep,
                                                                   strict=True)])
                 for i in (0, 1))


def _design(s1: np.ndarray, s2: np.ndarray, alpha: float) -> np.ndarray:
    return np.stack([np.ones(len(s1)), s1 ** -alpha, -s2], axis=1)


def fit_schedule_law(curves: list[Curve], start: int = 1, L0: float | None = None,
                     train_loss: bool = False) -> ScheduleLaw:
    """Fit L0, A, alpha, C and lam to the curves' points with n >= start (> 0), within the
    bounds of the module's docstring. `L0` fixes the floor (Approach 3's E); `train_loss` says
    the points are training losses, so the eval - train gap of the finished curves is added."""
    pts = fit_points(curves, start, "schedule law", min_points=6)
    if L0 is not None and L0 < 0:
        raise UserError(f"the schedule law's L0 must be >= 0, got {L0}")

    at = {lam: _areas_at_points(pts, lam) for lam in LAMBDAS}

    def sse(alpha: float, lam: float) -> float:
        return linear_fit(_design(*at[lam], alpha), pts, L0)[1]

    _, alpha, lam = min((sse(a, lam), a, lam) for lam in LAMBDAS for a in ALPHAS)
    step = ALPHAS[1] - ALPHAS[0]
    alpha = golden(lambda a: sse(a, lam), max(alpha - step, ALPHA_RANGE[0]),
                   min(alpha + step, ALPHA_RANGE[1]))
    X = _design(*at[lam], alpha)
    (l0, A, C), _ = linear_fit(X, pts, L0)
    resid = pts.y - X @ np.array([l0, A, C])
    values = {"L0": l0, "A": A, "C": C, "alpha": alpha}
    warn = bound_warnings(values, {"L0": (0.0, np.inf), "A": (0.0, np.inf), "C": (0.0, np.inf),
                                   "alpha": ALPHA_RANGE}, fixed=("L0",) if L0 is not None else ())
    law = ScheduleLaw(float(l0), float(A), float(alpha), float(C), float(lam), 0.0,
                      float(np.sqrt(np.mean(resid**2))), len(resid),
                      tuple(c.name for c in curves), warn)
    return with_gap(law, curves) if train_loss else law
