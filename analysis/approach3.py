"""Approach 3 of Hoffmann et al. (2022): the parametric law L(N, D) = E + A/N^alpha + B/D^beta.

Fitted as their Appendix D.2 describes: with (a, b, e) = log(A, B, E),
log L = LSE(a - alpha log N, b - beta log D, e), a Huber loss (delta = 1e-3) on the log-loss
residuals, summed, minimised from every point of the published grid of initialisations
(4,500 starts), best kept.

The solver is ours (analysis.approach3_solver): a damped (Levenberg-Marquardt) Newton method
with the exact 5x5 Hessian, run in float64 over many starts at once, each to convergence.

Each start is first minimised with a wider Huber threshold (delta = 0.1: nearly least squares,
smooth, so Newton steps work from far away) and then, from where that converged, with the
published delta = 1e-3. Both stages run to convergence; the objective, the grid and the optimum
kept are the published ones, and this continuation takes 1.3x (Chinchilla data) to 3.5x
(synthetic laws) fewer iterations than starting at delta = 1e-3.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from analysis.approach3_solver import HUBER_DELTA, fgh, minimise
from analysis.points import check_points
from lab.errors import UserError

PARAMS = ("a", "b", "e", "alpha", "beta")  # the order of the solver's parameter vector
NAMES = ("E", "A", "B", "alpha", "beta")  # the order of reported values and bootstrap samples
CONTINUATION = (1e-1,)  # Huber thresholds solved first, each from the previous one's optimum


def chinchilla_grid() -> np.ndarray:
    """The 4,500 starts of Hoffmann et al. Appendix D.2, as rows (a, b, e, alpha, beta)."""
    a = np.arange(0.0, 30.0, 5.0)  # {0, 5, ..., 25}
    e = np.arange(-1.0, 1.5, 0.5)  # {-1, -0.5, ..., 1}
    ab = np.arange(0.0, 2.5, 0.5)  # {0, 0.5, ..., 2}
    return np.array(list(itertools.product(a, a, e, ab, ab)), dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# The fit and what it implies.


@dataclass
class Approach3Fit:
    """A fitted L(N, D) = E + A/N^alpha + B/D^beta, with diagnostics and optional intervals."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float  # summed Huber loss at the optimum
    n_points: int
    n_starts: int
    n_converged: int
    max_iterations: int = 0  # the most iterations any start needed (both stages)
    warnings: list[str] = field(default_factory=list)
    # Distinct local optima (rows a, b, e, alpha, beta), best first; bootstrap refits start there.
    optima: np.ndarray = field(default_factory=lambda: np.zeros((0, 5)), repr=False)
    # Bootstrap: parameter samples (K x 5, in NAMES order) and percentile intervals.
    samples: np.ndarray | None = field(default=None, repr=False)
    level: float = 0.95
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def theta(self) -> np.ndarray:
        """The solver's parameters (a, b, e, alpha, beta)."""
        return np.array([np.log(self.A), np.log(self.B), np.log(self.E), self.alpha, self.beta])

    @property
    def degenerate(self) -> bool:
        """An optimum no law could mean: a non-finite parameter, an exponent at zero or beyond
        the grid of starts, or a coefficient beyond e^50 (e.g. A = 9.7e116)."""
        values = (self.E, self.A, self.B, self.alpha, self.beta)
        if not all(np.isfinite(v) for v in values):
            return True
        return not (0.01 <= self.alpha <= 2.0 and 0.01 <= self.beta <= 2.0) or max(
            abs(np.log(self.A)), abs(np.log(self.B))) > 50

    def describe(self) -> str:
        """The law as text, or "degenerate fit" when its numbers mean nothing."""
        if self.degenerate:
            return "degenerate fit (see its warnings)"
        return (f"L(N, D) = {self.E:.3g} + {self.A:.3g}/N^{self.alpha:.3f} + "
                f"{self.B:.3g}/D^{self.beta:.3f}")

    @property
    def a(self) -> float:
        """Allocation exponent of N: N_opt is proportional to C^a, a = beta / (alpha + beta)."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        """Allocation exponent of D: D_opt is proportional to C^b, b = alpha / (alpha + beta)."""
        return self.alpha / (self.alpha + self.beta)

    @property
    def G(self) -> float:
        """G = (alpha A / (beta B))^(1 / (alpha + beta)); N_opt = G (C/6)^a."""
        return _G(self.A, self.B, self.alpha, self.beta)

    def predict(self, N, D) -> np.ndarray:
        """Predicted loss at N parameters and D tokens."""
        return law(N, D, self.E, self.A, self.B, self.alpha, self.beta)

    def compute_optimal(self, C) -> pd.DataFrame:
        """N_opt, D_opt and the predicted loss for each budget C (FLOPs), with intervals when
        bootstrapped (columns *_lo, *_hi)."""
        return compute_optimal(self, C)

    def to_dict(self) -> dict:
        """The JSON form: E, A, B, alpha, beta, a, b, n_points, and the rest."""
        out = {
            "method": "approach3",
            "E": self.E,
            "A": self.A,
            "B": self.B,
            "alpha": self.alpha,
            "beta": self.beta,
            "a": self.a,
            "b": self.b,
            "G": self.G,
            "n_points": self.n_points,
            "objective": self.objective,
            "huber_delta": HUBER_DELTA,
            "n_starts": self.n_starts,
            "n_converged": self.n_converged,
            "max_iterations": self.max_iterations,
            "warnings": list(self.warnings),
            "degenerate": self.degenerate,
        }
        if self.samples is not None:
            out["bootstrap_samples"] = len(self.samples)
            out["level"] = self.level
            out["intervals"] = {k: list(v) for k, v in self.intervals.items()}
        return out


def law(N, D, E, A, B, alpha, beta) -> np.ndarray:
    """L(N, D) = E + A / N^alpha + B / D^beta."""
    N, D = np.asarray(N, dtype=np.float64), np.asarray(D, dtype=np.float64)
    return E + A / N**alpha + B / D**beta


def _G(A, B, alpha, beta):
    # In numpy floats: a negative base (alpha < 0, a law whose loss grows with N) gives NaN, no
    # optimum, where Python floats would give a complex number that JSON cannot write.
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.float64(alpha * A / (beta * B)) ** (1.0 / (alpha + beta))


def optimal_allocation(C, E, A, B, alpha, beta) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The minimiser of L(N, D) subject to 6 N D = C: (N_opt, D_opt, loss).

    Setting the derivative along N D = C/6 to zero gives alpha A / N^alpha = beta B / D^beta,
    hence N_opt = G (C/6)^(beta/(alpha+beta)) and D_opt = (C/6) / N_opt (Hoffmann et al. eq. 4).
    """
    C = np.asarray(C, dtype=np.float64)
    G = _G(A, B, alpha, beta)
    N = G * (C / 6.0) ** (beta / (alpha + beta))
    D = (C / 6.0) / N
    return N, D, law(N, D, E, A, B, alpha, beta)


def compute_optimal(fit: Approach3Fit, C) -> pd.DataFrame:
    """Compute-optimal N, D and loss at budgets C, with bootstrap intervals when available."""
    C = np.atleast_1d(np.asarray(C, dtype=np.float64))
    if (C <= 0).any() or not np.isfinite(C).all():
        raise UserError("compute budgets must be positive FLOP counts, e.g. 1e21")
    N, D, L = optimal_allocation(C, fit.E, fit.A, fit.B, fit.alpha, fit.beta)
    out = pd.DataFrame({"C": C, "N_opt": N, "D_opt": D, "loss": L})
    if fit.samples is not None:
        q = [(1 - fit.level) / 2, (1 + fit.level) / 2]
        s = fit.samples  # K x 5: E, A, B, alpha, beta
        Ns, Ds, Ls = optimal_allocation(C[None, :], *(s[:, i : i + 1] for i in range(5)))
        for name, arr in (("N_opt", Ns), ("D_opt", Ds), ("loss", Ls)):
            lo, hi = np.nanquantile(arr, q, axis=0)
            out[name + "_lo"], out[name + "_hi"] = lo, hi
    return out


def _diagnose(theta, f, it, conv, best, x, z, y, max_iter) -> list[str]:
    """Warnings about a fit that ended at an edge or is poorly identified."""
    warns = []
    a, b, e, alpha, beta = theta[best]
    if not conv[best]:
        warns.append(
            f"the best start did not converge in {max_iter} iterations; treat the fit as rough"
        )
    for name, value in (("alpha", alpha), ("beta", beta)):
        if value < 0.01:
            warns.append(f"{name}={value:.3g} is at zero: the data do not show that term falling")
        elif value > 2.0:
            warns.append(f"{name}={value:.3g} is beyond the grid of starts (0 to 2)")
    for name, value, lo, hi in (("log A", a, 0, 25), ("log B", b, 0, 25), ("log E", e, -1, 1)):
        if not lo <= value <= hi:
            warns.append(f"{name}={value:.3g} is outside the grid of starts ({lo} to {hi})")
    # Starts that reach (nearly) the same objective should agree on the exponents.
    near = conv & (f <= f[best] * 1.01)
    spread = np.ptp(theta[near][:, 3:], axis=0) if near.any() else np.zeros(2)
    if spread.max() > 0.01:
        warns.append(
            f"starts within 1% of the best objective disagree (alpha spans {spread[0]:.3g}, "
            f"beta {spread[1]:.3g}): the optimum is poorly identified"
        )
    with jax.enable_x64(True):
        _, _, H = fgh(
            jnp.asarray(theta[best : best + 1]), jnp.ones((1, len(x))), x, z, y, HUBER_DELTA
        )
    H = np.asarray(H[0])
    scale = np.sqrt(np.abs(np.diag(H)))
    if (scale == 0).any():
        cond = np.inf
    else:
        ev = np.linalg.eigvalsh(H / np.outer(scale, scale))
        cond = np.inf if ev[0] <= 0 else ev[-1] / ev[0]
    if cond > 1e8:
        warns.append(
            f"the Hessian at the optimum is near-singular (scaled condition number {cond:.2g}): "
            "the data do not pin down all five parameters"
        )
    return warns


# Every start is minimised over every point: 4,500 starts x 240 points took 3.5 s on 2 cores
# (benchmarks/results/vm-20261123-223326.json),
# so this many start-points is about a minute there.
MAX_START_POINTS = 20_000_000


def _check_size(n_starts: int, n_points: int) -> None:
    """Refuse a fit that would run for many minutes without a word."""
    if n_starts * n_points > MAX_START_POINTS:
        raise UserError(f"Approach 3 minimises {n_starts:,} starts over every point, and "
                        f"{n_points:,} points would take many minutes; fit at most "
                        f"{MAX_START_POINTS // n_starts:,} points (one per run, or a sample)")


COLLINEAR = 1e-3  # below this, log N and log D are one variable: the law cannot be fitted
NEARLY_COLLINEAR = 0.05  # below this, say loudly that N and D are hard to separate


def check_design(N: np.ndarray, D: np.ndarray) -> list[str]:
    """Refuse a design Approach 3 cannot fit; return warnings about a weak one.

    The law needs N and D to vary independently: with a single N (or D) one of its terms is a
    constant absorbed by E, and with log D an affine function of log N (D = 20 N at every size)
    the two terms cannot be told apart. The second is measured by the smaller singular value of
    the standardised (log N, log D) cloud, relative to the larger.
    """
    for name, v in (("N", N), ("D", D)):
        distinct = len(np.unique(v))
        if distinct < 2:
            raise UserError(
                f"Approach 3 needs at least 2 distinct {name} values and got {distinct}: "
                f"L(N, D) cannot be fitted; add runs at other {name}"
            )
    xz = np.stack([np.log(N), np.log(D)], axis=1)
    xz = (xz - xz.mean(0)) / xz.std(0)
    sv = np.linalg.svd(xz, compute_uv=False)
    ratio = sv[-1] / sv[0]
    if ratio < COLLINEAR:
        slope = np.polyfit(np.log(N), np.log(D), 1)[0]
        raise UserError(
            f"Approach 3 cannot separate N from D: log D is an affine function of log N in "
            f"every point (D ∝ N^{slope:.3g}), so A/N^alpha and B/D^beta are one term; add runs "
            "with other tokens per parameter at the same N"
        )
    if ratio < NEARLY_COLLINEAR:
        return [f"N and D are nearly collinear (singular value ratio {ratio:.2g}): the fit "
                "cannot tell their terms apart well; add other tokens per parameter"]
    return []


def _distinct_optima(theta, f, conv, limit=4, within=1.5) -> np.ndarray:
    """Distinct converged optima whose objective is within `within` times the best, best first."""
    rows = []
    for j in np.argsort(f):
        if not conv[j] or f[j] > within * f[np.argmin(f)]:
            continue
        if all(np.max(np.abs(theta[j] - r)) > 1e-3 for r in rows):
            rows.append(theta[j])
        if len(rows) == limit:
            break
    return np.array(rows).reshape(-1, 5)


def fit_approach3(
    N,
    D,
    loss,
    *,
    grid: np.ndarray | None = None,
    bootstrap: int = 0,
    seed: int = 0,
    level: float = 0.95,
    max_iter: int = 5000,
) -> Approach3Fit:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta as Hoffmann et al. Appendix D.2 describe.

    Every start of `grid` (default: the published 4,500) is minimised to convergence and the
    best is kept. With `bootstrap` > 0, that many resamples of the points are refitted (seeded
    by `seed`) and percentile intervals at `level` are attached.
    """
    df = pd.DataFrame({"N": np.ravel(N), "D": np.ravel(D), "loss": np.ravel(loss)})
    check_points(df, ("N", "D", "loss"), min_points=len(PARAMS), what="Approach 3 (5 parameters)")
    starts = chinchilla_grid() if grid is None else np.asarray(grid, dtype=np.float64)
    _check_size(len(starts), len(df))
    N, D, loss = (df[c].to_numpy(np.float64) for c in ("N", "D", "loss"))
    design_warnings = check_design(N, D)
    theta, iters = starts, 0
    for delta in (*CONTINUATION, HUBER_DELTA):
        theta, f, it, conv = minimise(theta, N, D, loss, delta=delta, max_iter=max_iter)
        iters = iters + it
    f = np.where(np.isfinite(f), f, np.inf)
    best = int(np.argmin(f))
    if not np.isfinite(f[best]):
        raise UserError("Approach 3 found no finite fit from any start; check N, D and loss")
    a, b, e, alpha, beta = theta[best]
    warns = design_warnings + _diagnose(
        theta, f, it, conv, best, np.log(N), np.log(D), np.log(loss), max_iter
    )
    fit = Approach3Fit(
        E=float(np.exp(e)),
        A=float(np.exp(a)),
        B=float(np.exp(b)),
        alpha=float(alpha),
        beta=float(beta),
        objective=float(f[best]),
        n_points=len(N),
        n_starts=len(starts),
        n_converged=int(conv.sum()),
        max_iterations=int(iters.max()),
        warnings=warns,
        optima=_distinct_optima(theta, f, conv),
    )
    if bootstrap:
        fit = bootstrap_approach3(fit, N, D, loss, n_samples=bootstrap, seed=seed, level=level)
    return fit


def resample_indices(n: int, n_samples: int, seed: int) -> np.ndarray:
    """The bootstrap's resamples (n_samples x n indices into the points, with replacement);
    another fit refitted on the same rows (analysis.downstream's second step) draws them here."""
    return np.random.default_rng(seed).integers(0, n, size=(n_samples, n))


def bootstrap_approach3(
    fit: Approach3Fit,
    N,
    D,
    loss,
    *,
    n_samples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    max_iter: int = 5000,
) -> Approach3Fit:
    """Refit on `n_samples` resamples (with replacement) of the points; attach the samples and
    percentile intervals of E, A, B, alpha, beta, a, b and G.

    Each resample is refitted from the fit's distinct optima (the best one first), as Besiroglu
    et al. (2024) refit theirs from a single good start; all resamples run in one batch, with
    resampling expressed as per-point multiplicities.
    """
    if n_samples < 2:
        raise UserError(f"--bootstrap needs at least 2 samples, got {n_samples}")
    if not 0 < level < 1:
        raise UserError(f"the interval level must be between 0 and 1, got {level}")
    N, D, loss = (np.asarray(v, dtype=np.float64).ravel() for v in (N, D, loss))
    n = len(N)
    idx = resample_indices(n, n_samples, seed)
    weights = np.stack([np.bincount(row, minlength=n) for row in idx]).astype(np.float64)
    starts0 = fit.optima if len(fit.optima) else fit.theta[None, :]
    m = len(starts0)
    starts = np.tile(starts0, (n_samples, 1))
    sample = np.repeat(np.arange(n_samples), m)
    theta, f, _, conv = minimise(
        starts, N, D, loss, weights=weights, sample=sample, max_iter=max_iter
    )
    f = np.where(np.isfinite(f), f, np.inf).reshape(n_samples, m)
    pick = np.argmin(f, axis=1)
    th = theta.reshape(n_samples, m, 5)[np.arange(n_samples), pick]
    a, b, e, alpha, beta = th.T
    samples = np.stack([np.exp(e), np.exp(a), np.exp(b), alpha, beta], axis=1)
    q = [(1 - level) / 2, (1 + level) / 2]
    derived = {
        "a": beta / (alpha + beta),
        "b": alpha / (alpha + beta),
        "G": _G(np.exp(a), np.exp(b), alpha, beta),
    }
    columns = dict(zip(NAMES, samples.T, strict=True)) | derived
    intervals = {k: tuple(float(v) for v in np.nanquantile(col, q)) for k, col in columns.items()}
    warns = list(fit.warnings)
    failed = int((~conv.reshape(n_samples, m)[np.arange(n_samples), pick]).sum())
    if failed:
        warns.append(f"{failed} of {n_samples} bootstrap refits did not converge")
    return replace(fit, samples=samples, level=level, intervals=intervals, warnings=warns)
