"""The unified scaling law of routed (mixture-of-experts) language models, Clark et al. 2022
("Unified Scaling Laws for Routed Language Models", ICML), at a fixed number of training tokens:

    log L(N, E) = a log N + b log Ê + c log N log Ê + d

N is the active parameter count (what one token uses: the dense part, top_k experts' share and
the router), E the number of experts (1 is the dense model) and Ê their saturating transform

    1/Ê = 1 / (E - 1 + (1/E_start - 1/E_max)^-1) + 1/E_max,

which is E_start at E = 1, grows as E - 1 + E_start over the first experts (the curvature at
small E) and tends to E_max (the saturation they see at hundreds of experts); E_start = 1 and
E_max = inf give plain E.

How much of the transform can be fitted depends on the distinct expert counts: the law sees Ê
only through log Ê at those counts, up to a shift (which a and d absorb) and a scale (b and c),
so k counts pin down k - 2 numbers of its shape. `transform="auto"` fits both E_start and E_max
with 5 or more counts, E_start alone (E_max = inf) with 4, and plain E with 2 or 3, so that at
least one count is left to test the shape; "saturating", "start" and "plain" force a form.

The dense equivalent (their Effective Parameter Count) is the dense N_dense with
L(N_dense, 1) = L(N, E):

    log N_dense = ((a + c log Ê) log N + b (log Ê - log Ê(1))) / (a + c log Ê(1)).

At a fixed token count a dense model's training compute is proportional to its parameters, so
N_dense / N is how many times the MoE's active compute a dense model of the same loss costs.

Fitted as Approach 3 is: a Huber loss (delta 1e-3) on the log-loss residuals, minimised (scipy's
least_squares) from a grid of transform starts, the best kept. Intervals: a residual bootstrap
(the design, a sweep's grid of N and E, stays fixed; residuals inflated by sqrt(n / (n - p)))
for the parameters and the dense equivalents; a new run's loss gets the least-squares
prediction interval s sqrt(1 + g'(J'J)^+ g) in log space (analysis.predict's "residual").
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import optimize, stats

from analysis.output import format_table, interval
from analysis.points import check_points, group_budgets
from lab.errors import UserError

HUBER_DELTA = 1e-3  # on log-loss residuals, as Hoffmann et al. fit Approach 3
TRANSFORMS = ("auto", "saturating", "start", "plain")
NAMES = ("a", "b", "c", "d", "E_start", "E_max")
SIZE_TOLERANCE = 0.1  # active counts within 10% are one size (the router adds D·E a layer)
# The solver's vector: a, b, c, d, u = log E_start, r = E_start / E_max (0: E_max = inf).
FREE = {"plain": (0, 1, 2, 3), "start": (0, 1, 2, 3, 4), "saturating": (0, 1, 2, 3, 4, 5)}
R_MAX = 0.5  # E_max at least 2 E_start: a transform flat from the start has no slope to fit
START_GRID = {"u": (1.0, 1.5, 2.0, 4.0), "r": (0.0, 0.01, 0.1)}


def log_e_hat(E, e_start: float = 1.0, e_max: float = math.inf) -> np.ndarray:
    """log Ê, Clark et al.'s saturating transform of the expert count E (>= 1)."""
    E = np.asarray(E, dtype=np.float64)
    inv_max = 1.0 / e_max if math.isfinite(e_max) else 0.0
    return -np.log(1.0 / (E - 1.0 + 1.0 / (1.0 / e_start - inv_max)) + inv_max)


def moe_law(N, E, a: float, b: float, c: float, d: float, e_start: float = 1.0,
            e_max: float = math.inf) -> np.ndarray:
    """L(N, E) of the unified law."""
    x, g = np.log(np.asarray(N, dtype=np.float64)), log_e_hat(E, e_start, e_max)
    return np.exp(a * x + b * g + c * x * g + d)


def dense_equivalent(N, E, a: float, b: float, c: float, d: float, e_start: float = 1.0,
                     e_max: float = math.inf) -> np.ndarray:
    """N_dense with L(N_dense, 1) = L(N, E): NaN where the dense loss does not fall with N."""
    x, g = np.log(np.asarray(N, dtype=np.float64)), log_e_hat(E, e_start, e_max)
    g1 = float(log_e_hat(1.0, e_start, e_max))
    slope = a + c * g1  # d log L / d log N of the dense model
    if not slope < 0:
        return np.full(np.broadcast(x, g).shape, np.nan)
    return np.exp(((a + c * g) * x + b * (g - g1)) / slope)


def _transform(theta: np.ndarray) -> tuple[float, float]:
    e_start = float(np.exp(theta[4]))
    return e_start, (e_start / theta[5] if theta[5] > 0 else math.inf)


def _log_law(theta: np.ndarray, x: np.ndarray, E: np.ndarray) -> np.ndarray:
    g = log_e_hat(E, *_transform(theta))
    return theta[0] * x + theta[1] * g + theta[2] * x * g + theta[3]


def _huber(r: np.ndarray, delta: float = HUBER_DELTA) -> float:
    a = np.abs(r)
    return float(np.sum(np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))))


@dataclass
class MoEFit:
    """A fitted unified MoE law: its parameters, the points, and what the fit implies."""

    a: float
    b: float
    c: float
    d: float
    E_start: float
    E_max: float
    transform: str  # the form fitted: "saturating", "start" (E_max = inf) or "plain" (Ê = E)
    objective: float  # summed Huber loss at the optimum
    N: np.ndarray = field(repr=False)  # the fitted points
    E: np.ndarray = field(repr=False)
    loss: np.ndarray = field(repr=False)
    warnings: list[str] = field(default_factory=list)
    samples: np.ndarray | None = field(default=None, repr=False)  # K x 6 solver vectors
    level: float = 0.95
    at: list[tuple[float, float]] = field(default_factory=list)  # where to predict
    n_counts: str = "active"  # what N counts: "active" (the law's) or "total" (every expert)

    @property
    def theta(self) -> np.ndarray:
        r = self.E_start / self.E_max if math.isfinite(self.E_max) else 0.0
        return np.array([self.a, self.b, self.c, self.d, math.log(self.E_start), r])

    @property
    def params(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in NAMES}

    @property
    def n_free(self) -> int:
        return len(FREE[self.transform])

    @property
    def residuals(self) -> np.ndarray:
        return np.log(self.loss) - np.log(self.predict(self.N, self.E))

    def predict(self, N, E) -> np.ndarray:
        return moe_law(N, E, *self.params.values())

    def dense_equivalent(self, N, E) -> np.ndarray:
        return dense_equivalent(N, E, *self.params.values())

    def scale(self, N, E) -> np.ndarray:
        """s sqrt(1 + g'(J'J)^+ g) at each (N, E): the log-space standard error of one new run
        (s from the residuals on n - p degrees of freedom, g the log law's gradient)."""
        dof = len(self.N) - self.n_free
        if dof < 1:
            return np.full(len(np.atleast_1d(N)), np.nan)
        r = self.residuals
        s = math.sqrt(float(r @ r) / dof)
        J, g = self._gradient(self.N, self.E), self._gradient(N, E)
        leverage = np.einsum("ij,jk,ik->i", g, np.linalg.pinv(J.T @ J), g)
        return s * np.sqrt(1.0 + leverage)

    def _gradient(self, N, E, eps: float = 1e-6) -> np.ndarray:
        """d log L / d (free parameters) at each (N, E), by central differences."""
        x = np.log(np.atleast_1d(np.asarray(N, dtype=np.float64)))
        E = np.atleast_1d(np.asarray(E, dtype=np.float64))
        cols = []
        for i in FREE[self.transform]:
            step = np.zeros(6)
            step[i] = eps
            cols.append((_log_law(self.theta + step, x, E)
                         - _log_law(self.theta - step, x, E)) / (2 * eps))
        return np.column_stack(cols)

    def interval(self, N, E, level: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The `level` prediction interval of one new run's loss at each (N, E)."""
        level = level or self.level
        t = stats.t.ppf((1 + level) / 2, max(len(self.N) - self.n_free, 1))
        pred, half = self.predict(N, E), t * self.scale(N, E)
        return pred * np.exp(-half), pred * np.exp(half)

    def sample_params(self) -> list[dict[str, float]]:
        """The bootstrap refits as parameter dicts."""
        rows = [] if self.samples is None else self.samples
        return [dict(zip(NAMES, (*t[:4], *_transform(t)), strict=True)) for t in rows]

    def intervals(self) -> dict[str, tuple[float, float]]:
        """Percentile intervals of the parameters over the bootstrap refits ({} without);
        E_max's from those of 1/E_max, which stay finite."""
        if self.samples is None or len(self.samples) < 2:
            return {}
        q = [(1 - self.level) / 2, (1 + self.level) / 2]
        s = self.samples
        out = {k: _quantiles(s[:, i], q) for i, k in enumerate(NAMES[:4])}
        out["E_start"] = _quantiles(np.exp(s[:, 4]), q)
        inv_max = s[:, 5] / np.exp(s[:, 4])
        lo, hi = _quantiles(inv_max, q)
        out["E_max"] = (1 / hi if hi > 0 else math.inf, 1 / lo if lo > 0 else math.inf)
        return out

    def answers(self) -> pd.DataFrame:
        """At each requested (N, E) (default: the smallest and largest N of the data at each
        expert count above 1): the loss with its interval, the dense equivalent N_dense and the
        compute multiplier N_dense / N, with bootstrap intervals when there are refits."""
        pairs = self.at or [(n, e) for e in np.unique(self.E) if e > 1
                            for n in sorted({float(self.N.min()), float(self.N.max())})]
        N, E = (np.array([p[i] for p in pairs], dtype=np.float64) for i in (0, 1))
        lo, hi = self.interval(N, E)
        dense = self.dense_equivalent(N, E)
        table = pd.DataFrame({"N": N, "E": E, "loss": self.predict(N, E), "loss_lo": lo,
                              "loss_hi": hi, "N_dense": dense, "multiplier": dense / N})
        draws = [dense_equivalent(N, E, *p.values()) / N for p in self.sample_params()]
        if len(draws) >= 2:
            q = [(1 - self.level) / 2, (1 + self.level) / 2]
            with warnings.catch_warnings():  # all NaN where no refit has a dense equivalent
                warnings.simplefilter("ignore", RuntimeWarning)
                table["multiplier_lo"], table["multiplier_hi"] = np.nanquantile(
                    np.array(draws), q, axis=0)
        return table

    def describe(self) -> str:
        """The law as text, with its numbers."""
        e_hat = {"plain": "Ê = E",
                 "start": f"Ê = E - 1 + E_start, E_start = {self.E_start:.3g} (E_max = inf)",
                 "saturating": f"Ê saturating, E_start = {self.E_start:.3g}, "
                               f"E_max = {self.E_max:.3g}"}[self.transform]
        return (f"log L = {self.a:.4f} log N + {self.b:.4f} log Ê + {self.c:.5f} log N log Ê "
                f"+ {self.d:.4f}; {e_hat}")

    def report(self) -> str:
        """The printed report: the law, its parameters with intervals, and the answers."""
        counts = ", ".join(f"{e:g}" for e in np.unique(self.E))
        why = {"plain": "plain E: 3 or fewer expert counts leave no shape of Ê to test",
               "start": "E_start fitted, E_max = inf: 4 expert counts test one number of Ê's "
                        "shape",
               "saturating": "Clark et al.'s saturating Ê, E_start and E_max fitted"}
        head = [f"MoE law (Clark et al. 2022, unified law of routed models): {len(self.N)} points"
                f", {count_sizes(self.N)} sizes (N = {self.n_counts} parameters), experts E = "
                f"{counts};"
                f" {why[self.transform]}; Huber objective {self.objective:.6e}",
                self.describe()]
        iv = self.intervals()
        shown = NAMES[:len(FREE[self.transform])]  # the fitted ones: E_max = inf is not
        rows = [[k, self.params[k], interval(iv.get(k))] for k in shown]
        head.append(format_table(["parameter", "value", f"{self.level:.0%} interval"], rows))
        head.append("\nWhat an MoE is worth in dense compute, at the runs' token count (N_dense: "
                    "the dense model with the same loss; multiplier N_dense / N, as dense "
                    "training compute is proportional to N):")
        t = self.answers()
        has_iv = "multiplier_lo" in t.columns
        head.append(format_table(
            [f"N ({self.n_counts})", "E", "loss", f"{self.level:.0%} interval", "N_dense",
             "multiplier", f"{self.level:.0%} interval"],
            [[r.N, r.E, r.loss, interval((r.loss_lo, r.loss_hi)), r.N_dense, r.multiplier,
              interval((r.multiplier_lo, r.multiplier_hi)) if has_iv else "-"]
             for r in t.itertuples()]))
        return "\n".join(head)

    def to_dict(self) -> dict:
        out = {"method": "moe", "law": "log L = a log N + b log Ê + c log N log Ê + d",
               **self.params, "transform": self.transform, "objective": self.objective,
               "n_points": len(self.N), "params": self.n_counts,
               "experts": sorted(float(e) for e in np.unique(self.E)),
               "level": self.level,
               "intervals": {k: list(v) for k, v in self.intervals().items()},
               "answers": self.answers().to_dict(orient="records"),
               "points": np.column_stack([self.N, self.E, self.loss]).tolist(),
               "residuals": self.residuals.tolist(), "warnings": list(self.warnings)}
        if self.samples is not None:
            out["bootstrap_params"] = [list(p.values()) for p in self.sample_params()]
        return out


def _quantiles(values: np.ndarray, q: list[float]) -> tuple[float, float]:
    lo, hi = np.nanquantile(values, q)
    return float(lo), float(hi)


# ---------------------------------------------------------------------------------------------
# The fit.


def count_sizes(N) -> int:
    """How many model sizes the active counts N hold: those within SIZE_TOLERANCE of each
    other are one (a size's MoE runs differ from its dense run by their routers)."""
    return int(group_budgets(np.asarray(N, dtype=np.float64), SIZE_TOLERANCE).max()) + 1


def check_moe_points(points: pd.DataFrame, transform: str = "auto") -> str:
    """Refuse what the law cannot be fitted to; returns the transform to fit."""
    if transform not in TRANSFORMS:
        raise UserError(f"unknown MoE transform {transform!r}; choose one of "
                        f"{', '.join(TRANSFORMS)}")
    missing = [c for c in ("N", "E", "loss") if c not in points.columns]
    if missing:
        raise UserError(f"the MoE law needs column(s) {', '.join(missing)} (N active parameters"
                        ", E experts, 1 = dense); add them to the input")
    check_points(points, ("N", "loss"), what="the MoE law")
    E = pd.to_numeric(points["E"], errors="coerce").to_numpy(np.float64)
    if not np.isfinite(E).all() or (E < 1).any():
        first = int(np.argmax(~np.isfinite(E) | (E < 1)))
        raise UserError(f"E must be a number of experts, at least 1 (1 = dense); row {first} "
                        f"has {points['E'].iloc[first]!r}; fix or remove it")
    k, sizes = len(np.unique(E)), count_sizes(points["N"])
    if k < 2 or sizes < 2:
        raise UserError(f"the MoE law needs 2 or more expert counts and 2 or more sizes N, got "
                        f"{k} and {sizes}; add runs with other expert counts or sizes")
    if transform == "auto":
        transform = "saturating" if k >= 5 else "start" if k == 4 else "plain"
    need = len(FREE[transform]) + 1
    if len(points) < need:
        raise UserError(f"the MoE law ({transform} Ê) has {need - 1} parameters and needs at "
                        f"least {need} points, got {len(points)}; add runs")
    return transform


def _solve(theta0: np.ndarray, free: tuple[int, ...], x: np.ndarray, E: np.ndarray,
           y: np.ndarray, u_max: float) -> tuple[np.ndarray, float]:
    """Minimise the summed Huber loss of log-loss residuals over the free parameters."""
    def resid(p: np.ndarray) -> np.ndarray:
        theta = theta0.copy()
        theta[list(free)] = p
        return _log_law(theta, x, E) - y

    lo = np.array([-np.inf] * 4 + [0.0, 0.0])[list(free)]
    hi = np.array([np.inf] * 4 + [u_max, R_MAX])[list(free)]
    p0 = np.clip(theta0[list(free)], lo, hi)
    sol = optimize.least_squares(resid, p0, bounds=(lo, hi), loss="huber", f_scale=HUBER_DELTA,
                                 x_scale="jac", xtol=1e-12, ftol=1e-12, gtol=1e-12,
                                 max_nfev=2000)
    theta = theta0.copy()
    theta[list(free)] = sol.x
    return theta, _huber(resid(sol.x))


def _starts(transform: str, x: np.ndarray, E: np.ndarray, y: np.ndarray,
            u_max: float) -> list[np.ndarray]:
    """The starting vectors: a grid of transforms, each with its least-squares a, b, c, d."""
    us = [0.0] if transform == "plain" else [min(math.log(v), u_max) for v in START_GRID["u"]]
    rs = START_GRID["r"] if transform == "saturating" else (0.0,)
    out = []
    for u, r in itertools.product(sorted(set(us)), rs):
        e_start = math.exp(u)
        g = log_e_hat(E, e_start, e_start / r if r else math.inf)
        X = np.column_stack([x, g, x * g, np.ones_like(x)])
        coef, *_ = np.linalg.lstsq(X, y, rcond=None)
        out.append(np.array([*coef, u, r]))
    return out


def _u_max(E: np.ndarray) -> float:
    """The bound of log E_start: the largest expert count (beyond it E_start means nothing)."""
    return math.log(max(float(E.max()), 1.0 + 1e-9))


def _fit_theta(transform: str, x, E, y, starts: list[np.ndarray]) -> tuple[np.ndarray, float]:
    """The best optimum over the starts: (solver vector, summed Huber loss)."""
    u_max = _u_max(E)
    best = None
    for theta0 in starts:
        theta, obj = _solve(theta0, FREE[transform], x, E, y, u_max)
        if best is None or obj < best[1]:
            best = (theta, obj)
    return best


def fit_moe(points: pd.DataFrame, *, transform: str = "auto", bootstrap: int = 0,
            seed: int = 0, level: float = 0.95,
            at: list[tuple[float, float]] | None = None, params: str = "active") -> MoEFit:
    """Fit the unified law to points (columns N: active parameters, E: experts, loss); `params`
    names what N counts where it is not the active parameters (`lab fit --params total`)."""
    if not 0 < level < 1:
        raise UserError(f"the interval level must be between 0 and 1, got {level}")
    transform = check_moe_points(points, transform)
    N = points["N"].to_numpy(np.float64)
    E = pd.to_numeric(points["E"]).to_numpy(np.float64)
    loss = points["loss"].to_numpy(np.float64)
    x, y = np.log(N), np.log(loss)
    theta, obj = _fit_theta(transform, x, E, y, _starts(transform, x, E, y, _u_max(E)))
    fit = MoEFit(*theta[:4], *_transform(theta), transform=transform, objective=obj, N=N, E=E,
                 loss=loss, level=level, at=[(float(n), float(e)) for n, e in (at or [])],
                 n_counts=params)
    fit.warnings = _diagnose(fit, points, _u_max(E))
    if bootstrap:
        fit.samples = _bootstrap(fit, bootstrap, seed)
    return fit


def _bootstrap(fit: MoEFit, n_samples: int, seed: int) -> np.ndarray:
    """Residual bootstrap: the fitted log losses plus resampled (centred, inflated) residuals,
    each refitted from the fit's optimum; K x 6 solver vectors."""
    if n_samples < 2:
        raise UserError(f"--bootstrap needs at least 2 samples, got {n_samples}")
    rng = np.random.default_rng(seed)
    x, E = np.log(fit.N), fit.E
    r = fit.residuals
    n, p = len(r), fit.n_free
    noise = (r - r.mean()) * math.sqrt(n / (n - p))
    base = np.log(fit.predict(fit.N, fit.E))
    out = []
    for _ in range(n_samples):
        y = base + rng.choice(noise, size=n)
        out.append(_fit_theta(fit.transform, x, E, y, [fit.theta])[0])
    return np.array(out)


def _diagnose(fit: MoEFit, points: pd.DataFrame, u_max: float) -> list[str]:
    warns = []
    g1 = float(log_e_hat(1.0, fit.E_start, fit.E_max))
    if not fit.a + fit.c * g1 < 0:
        warns.append(f"the dense loss does not fall with N (slope a + c log Ê(1) = "
                     f"{fit.a + fit.c * g1:.3g}): no dense equivalent; add sizes")
    if not (fit.E == 1).any():
        warns.append("no dense runs (E = 1): the dense equivalent extrapolates the law to E = 1")
    if fit.transform != "plain" and math.log(fit.E_start) >= u_max - 1e-6:
        warns.append(f"E_start sits at its bound, the largest expert count ({fit.E_start:.3g})")
    if fit.transform == "saturating" and fit.E_start / fit.E_max >= R_MAX - 1e-6:
        warns.append(f"E_max sits at its bound, 2 E_start ({fit.E_max:.3g})")
    if "D" in points.columns:
        D = pd.to_numeric(points["D"], errors="coerce").to_numpy(np.float64)
        D = D[np.isfinite(D) & (D > 0)]
        if len(D) and D.max() / D.min() > 1.1:
            warns.append(f"the law holds at one token count, and these runs' D spans "
                         f"{D.min():.3g} to {D.max():.3g}; fit runs of equal D")
    return warns
