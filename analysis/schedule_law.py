"""Loss along a learning-rate schedule, without running it (Tissue et al. 2024).

    law = fit_schedule_law(curves)               # Curve: learning rates and logged losses
    law.final(lr_T)                              # end loss of any schedule, e.g. a cosine

Pure numbers: lab.branch_predict reads a run directory's curves and plans the branches.

The model is the "scaling law with learning-rate annealing" of Tissue et al. 2024:

    L(n) = L0 + A * S1(n)^-alpha - C * S2(n)

after n updates with learning rates eta_0 .. eta_{n-1}: S1(n) = sum_{i<n} eta_i is the forward
area, and S2(n) = sum_{i<n} m_i the annealing area with momentum, m_i = lam * m_{i-1} + delta_i,
delta_i = max(eta_{i-1} - eta_i, 0). So S2(n) = sum_k delta_k (1 - lam^(n-k)) / (1 - lam): a drop
in the learning rate pays off gradually, over about 1 / (1 - lam) updates. The warmup's rises
are left out of S2 (delta >= 0): only annealing lowers the loss beyond the power law.

Why this law and not the multi-power law of Luo et al. 2025: it has four parameters plus lam,
and three of them (L0, A, C) enter linearly, so for each (alpha, lam) the best fit is one linear
least-squares solve; the fit is a search over two numbers and cannot stop in a poor local
minimum. That matters here, where the data are one stable curve and one or two decays: the
multi-power law has seven parameters and is fitted by gradient descent on many schedules. The
price is that Tissue's law is a cruder description of very long decays; the held-out check in
docs/planning.md measures what that costs on the lab's runs.

Identifiability: on a stable run S2 is zero after the warmup, so C (and lam) cannot be fitted
from it; the fit refuses unless some fitted curve anneals. The law is fitted to every logged
point past the fitting window's start, each curve weighted equally (a decay has far fewer points
than its stable run, yet carries all the information on C). The points are the eval losses
along the runs when the stable run logged some (train.eval_every: a fixed validation set, far
quieter than one training batch), otherwise the training losses; the predicted end eval loss
adds the mean gap (final eval loss minus the law's loss at the end) of the fitted runs, which
is the validation-minus-training offset in the second case and about zero in the first.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from lab.errors import UserError

# The momentum grid of the annealing area: from no lag (0) to Tissue et al.'s 0.999.
LAMBDAS = (0.0, 0.5, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999)
ALPHAS = np.linspace(0.02, 3.0, 150)


def areas(lr_T: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """S1 and S2 after n = 0 .. T updates (arrays of T + 1), for learning rates lr_T."""
    lr_T = np.asarray(lr_T, dtype=np.float64)
    s1 = np.concatenate([[0.0], np.cumsum(lr_T)])
    delta = np.maximum(np.concatenate([[0.0], lr_T[:-1] - lr_T[1:]]), 0.0)
    m = np.empty_like(delta)
    acc = 0.0
    for i, d in enumerate(delta):  # a first-order recursion: T is small (steps, not tokens)
        acc = lam * acc + d
        m[i] = acc
    s2 = np.concatenate([[0.0], np.cumsum(m)])
    return s1, s2


@dataclasses.dataclass(frozen=True)
class Curve:
    """One run's training-loss curve: `n` updates done before each `loss`, the learning rate of
    every update of the run, and its final eval loss (after all len(lr) updates) if known."""

    name: str
    lr: np.ndarray
    n: np.ndarray
    loss: np.ndarray
    final_eval: float | None = None


@dataclasses.dataclass(frozen=True)
class ScheduleLaw:
    L0: float
    A: float
    alpha: float
    C: float
    lam: float
    gap: float  # mean final eval loss minus the law's training loss at the end
    rms: float  # root mean square residual of the fitted training losses
    n_points: int
    curves: tuple[str, ...]

    def curve(self, lr_T: np.ndarray) -> np.ndarray:
        """The law's training loss after n = 0 .. T updates (n = 0 is infinite)."""
        s1, s2 = areas(lr_T, self.lam)
        with np.errstate(divide="ignore"):
            return self.L0 + self.A * s1 ** -self.alpha - self.C * s2

    def final(self, lr_T: np.ndarray) -> float:
        """The predicted final eval loss of a run with these learning rates."""
        return float(self.curve(lr_T)[-1] + self.gap)

    def describe(self) -> str:
        return (f"L = {self.L0:.4f} + {self.A:.4g} S1^-{self.alpha:.3f} - {self.C:.4g} S2 "
                f"(lam {self.lam:g}; eval - train gap {self.gap:+.4f}; rms {self.rms:.4f} on "
                f"{self.n_points} points of {len(self.curves)} curves)")


def _solve(curves: list[Curve], start: int, alpha: float, lam: float):
    """Weighted linear least squares for (L0, A, C) at fixed (alpha, lam)."""
    rows, ys, ws = [], [], []
    for c in curves:
        s1, s2 = areas(c.lr, lam)
        keep = c.n >= start
        n = c.n[keep]
        rows.append(np.stack([np.ones(len(n)), s1[n] ** -alpha, -s2[n]], axis=1))
        ys.append(c.loss[keep])
        ws.append(np.full(len(n), 1.0 / max(len(n), 1)))
    X, y, w = np.concatenate(rows), np.concatenate(ys), np.sqrt(np.concatenate(ws))
    coef, *_ = np.linalg.lstsq(X * w[:, None], y * w, rcond=None)
    resid = y - X @ coef
    return coef, float(np.sum((resid * w) ** 2)), resid


def fit_schedule_law(curves: list[Curve], start: int = 1) -> ScheduleLaw:
    """Fit L0, A, alpha, C and lam to the curves' points with n >= start (> 0)."""
    start = max(int(start), 1)
    annealing = False
    for c in curves:
        if len(c.n) != len(c.loss) or (len(c.n) and c.n.max() > len(c.lr)):
            raise UserError(f"the loss curve of {c.name} runs past its learning rates")
        _, s2 = areas(c.lr, 0.0)
        annealing |= bool(np.any(s2[c.n[c.n >= start]] > 0))
    if not annealing:
        raise UserError("the annealing term is unidentified: no fitted curve decays its "
                        "learning rate (a stable run alone fixes L0, A and alpha but not C); "
                        "finish one decay first, e.g. `lab branch RUN --at S --decay-steps D`")
    if sum(int(np.sum(c.n >= start)) for c in curves) < 6:
        raise UserError(f"too few logged steps past step {start} to fit the schedule law; "
                        "log more often (train.log_every) or train longer")
    best = None
    for lam in LAMBDAS:
        for alpha in ALPHAS:
            coef, sse, _ = _solve(curves, start, alpha, lam)
            if best is None or sse < best[0]:
                best = (sse, alpha, lam)
    # Refine alpha between its grid neighbours by golden-section search (sse is smooth in it).
    _, alpha, lam = best
    step = ALPHAS[1] - ALPHAS[0]
    lo, hi = max(alpha - step, 1e-3), alpha + step
    g = (math.sqrt(5) - 1) / 2
    for _ in range(40):
        a, b = hi - g * (hi - lo), lo + g * (hi - lo)
        if _solve(curves, start, a, lam)[1] < _solve(curves, start, b, lam)[1]:
            hi = b
        else:
            lo = a
    alpha = (lo + hi) / 2
    (L0, A, C), _, resid = _solve(curves, start, alpha, lam)
    law = ScheduleLaw(float(L0), float(A), float(alpha), float(C), float(lam), 0.0,
                      float(np.sqrt(np.mean(resid**2))), len(resid),
                      tuple(c.name for c in curves))
    gaps = [c.final_eval - law.curve(c.lr)[-1] for c in curves if c.final_eval is not None]
    return dataclasses.replace(law, gap=float(np.mean(gaps)) if gaps else 0.0)
