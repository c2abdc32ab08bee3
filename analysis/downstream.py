"""The two-step downstream law of the OLMo ladder (Bhagia et al. 2024, "Establishing Task
Scaling Laws via Compute-Efficient Model Ladders"): a task's loss from (N, D), then the task's
accuracy from its loss.

    law = fit_downstream(points, chance=0.25, bootstrap=200)   # N, D, task_loss, accuracy
    law.predict([1e6], [2e7])                                  # accuracy with intervals

Step 1 fits the task loss as L(N, D) = E + A/N^alpha + B/D^beta by Approach 3
(analysis.approach3: Huber loss on log loss from the published grid of starts, best kept).

Step 2 fits accuracy as a sigmoid of the measured task loss. Bhagia et al. write it
Acc(L) = a / (1 + exp(-k (L - L0))) + b with four free parameters; here b is fixed at the task's
chance level (a model that has learnt nothing scores chance: the floor is known, and a ladder of
small models rarely shows it well enough to fit), and k changes sign so that k > 0 means
accuracy rises as the loss falls:

    Acc(L) = chance + a / (1 + exp(k (L - L0))),   0 < a <= 1 - chance,  k > 0,

a the rise above chance (the ceiling is chance + a), L0 the loss at the middle of the rise, k
its steepness. It is fitted by least squares in accuracy from a grid of starts, the best kept
(solve_sigmoid: Levenberg-Marquardt on every start at once, steps projected into the bounds).

Prediction at a new (N, D) chains the steps: the sigmoid of the law's task loss. Its intervals
come from K bootstrap resamples of the points (rows drawn with replacement, the same rows for
both steps), each refitting both steps and chaining them: the percentiles of those predictions
are the law's interval ("mean"); for one new run's outcome each is also given a step-1 log
residual and a step-2 residual of the full fit, drawn at random (each inflated by
sqrt(n / (n - p)), p the step's parameter count, as fitted residuals understate the scatter),
and clipped to [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.special import expit

from analysis.approach3 import Approach3Fit, fit_approach3, law, resample_indices
from analysis.points import check_points
from lab.errors import UserError

COLUMNS = ("N", "D", "task_loss", "accuracy")  # what a downstream points table holds
MIN_POINTS = 6  # Approach 3's five parameters and one degree of freedom for its scatter
DEFAULT_BOOTSTRAP = 200  # refits of both steps when the caller asks for none
K_MAX = 200.0  # the steepest rise, in units of 1 / (the span of the task losses)
RISE_COVERED = 0.5  # below this share of the rise between the points, warn
MAX_ITER = 500  # Levenberg-Marquardt iterations at most (a start stops on convergence first)
DRAWS = 20  # residual draws per bootstrap refit for the outcome interval


def sigmoid(L, a, k, L0, chance) -> np.ndarray:
    """Acc(L) = chance + a / (1 + exp(k (L - L0)))."""
    return chance + a * expit(-k * (np.asarray(L, np.float64) - L0))


@dataclass
class SigmoidFit:
    """Accuracy as a sigmoid of task loss with the floor at chance (step 2)."""

    a: float
    k: float
    L0: float
    chance: float
    cost: float  # half the summed squared residuals at the optimum
    residuals: np.ndarray = field(repr=False)  # measured - fitted accuracy
    loss_range: tuple[float, float] = (0.0, 0.0)  # the fitted points' lowest and highest loss
    warnings: list[str] = field(default_factory=list)

    @property
    def theta(self) -> np.ndarray:
        return np.array([self.a, self.k, self.L0])

    def predict(self, L) -> np.ndarray:
        return sigmoid(L, self.a, self.k, self.L0, self.chance)

    def rise_covered(self) -> float:
        """The share of the rise (0 to a above chance) between the highest and lowest loss."""
        lo, hi = self.loss_range
        return float(expit(-self.k * (lo - self.L0)) - expit(-self.k * (hi - self.L0)))

    def describe(self) -> str:
        return (f"accuracy = {self.chance:.3g} + {self.a:.3g} / (1 + exp({self.k:.3g} (L - "
                f"{self.L0:.4g})))")

    def to_dict(self) -> dict:
        return {"form": "chance + a / (1 + exp(k (L - L0)))", "a": self.a, "k": self.k,
                "L0": self.L0, "chance": self.chance, "ceiling": self.chance + self.a,
                "cost": self.cost, "residual_sd": float(np.std(self.residuals)),
                "rise_covered": self.rise_covered(), "residuals": self.residuals.tolist(),
                "warnings": list(self.warnings)}


def _bounds(L: np.ndarray, chance: float) -> tuple[np.ndarray, np.ndarray]:
    span = float(np.ptp(L))
    lower = np.array([1e-9, 1e-9 / span, L.min() - 3 * span])
    upper = np.array([1.0 - chance, K_MAX / span, L.max() + 3 * span])
    return lower, upper


def sigmoid_starts(L: np.ndarray, acc: np.ndarray, chance: float) -> np.ndarray:
    """Rows (a, k, L0): the rise at the best point seen and at its largest, three
    steepnesses, the midpoint at five quantiles of the losses and a span below them."""
    span = float(np.ptp(L))
    top = float(np.clip(acc.max() - chance, 1e-3, 1.0 - chance))
    mids = [*np.quantile(L, [0.0, 0.25, 0.5, 0.75, 1.0]), L.min() - span]
    rows = [(a, k / span, m) for a in {top, 1.0 - chance} for k in (1.0, 4.0, 16.0)
            for m in mids]
    return np.array(rows, dtype=np.float64)


def _residuals(theta_Mx3, L, acc, chance) -> tuple[np.ndarray, np.ndarray]:
    """Residuals (M x n) of M parameter rows, and their Jacobian (M x n x 3)."""
    a, k, L0 = (theta_Mx3[:, i:i + 1] for i in range(3))
    s = expit(-k * (L - L0))
    g = a * s * (1.0 - s)
    return chance + a * s - acc, np.stack([s, -g * (L - L0), g * k], axis=-1)


def solve_sigmoid(L, acc, chance: float, starts_Mx3: np.ndarray,
                  weights_MxN: np.ndarray | None = None,
                  max_iter: int = MAX_ITER) -> tuple[np.ndarray, np.ndarray]:
    """Least squares from every start at once (rows of starts_Mx3, each with its own point
    multiplicities): Levenberg-Marquardt with Marquardt's scaled damping, each step projected
    into the bounds and kept only if it lowers the cost; a row stops when its accepted step
    gains less than 1e-12 of its cost, or its damping runs away. Returns (M x 3, cost M)."""
    L, acc = np.asarray(L, np.float64), np.asarray(acc, np.float64)
    lower, upper = _bounds(L, chance)
    theta = np.clip(np.asarray(starts_Mx3, np.float64), lower, upper)
    w = np.ones((len(theta), len(L))) if weights_MxN is None else np.asarray(weights_MxN)
    r, J = _residuals(theta, L, acc, chance)
    cost = 0.5 * np.sum(w * r * r, axis=1)
    lam, done = np.full(len(theta), 1e-3), np.zeros(len(theta), bool)
    for _ in range(max_iter):
        JtJ = np.einsum("mni,mn,mnj->mij", J, w, J)
        grad = np.einsum("mni,mn,mn->mi", J, w, r)
        diag = np.einsum("mii->mi", JtJ) + 1e-12
        A = JtJ + (lam[:, None] * diag)[:, :, None] * np.eye(3)
        trial = np.clip(theta - _solve(A, grad), lower, upper)
        r_t, J_t = _residuals(trial, L, acc, chance)
        cost_t = 0.5 * np.sum(w * r_t * r_t, axis=1)
        better = (cost_t < cost) & ~done
        done |= better & (cost - cost_t <= 1e-12 * cost + 1e-300)
        done |= lam > 1e12
        theta[better], r[better], J[better], cost[better] = (trial[better], r_t[better],
                                                             J_t[better], cost_t[better])
        lam = np.where(better, lam / 3.0, lam * 4.0)
        if done.all():
            break
    return theta, cost


def _solve(A_Mx3x3: np.ndarray, b_Mx3: np.ndarray) -> np.ndarray:
    """A^-1 b for each row; where the damping has shrunk until some A is exactly singular in
    floats (a resample of few distinct points), the least-squares solution by pseudo-inverse."""
    try:
        return np.linalg.solve(A_Mx3x3, b_Mx3[..., None])[..., 0]
    except np.linalg.LinAlgError:
        return (np.linalg.pinv(A_Mx3x3) @ b_Mx3[..., None])[..., 0]


def check_task_points(points: pd.DataFrame, chance: float) -> None:
    """Refuse what the law cannot fit: a missing column, a chance level outside [0, 1), a
    non-positive N, D or task loss, an accuracy outside [0, 1], too few points."""
    missing = [c for c in COLUMNS if c not in points.columns]
    if missing:
        raise UserError(f"the downstream law needs column(s) {', '.join(missing)}; give N, D, "
                        "task_loss and accuracy")
    if not 0 <= chance < 1:
        raise UserError(f"--chance must be in [0, 1): the accuracy of a blind guess (0.25 for 4 "
                        f"choices, 0 for exact match), got {chance:g}")
    check_points(points, ("N", "D", "task_loss"), min_points=MIN_POINTS,
                 what=f"the downstream law ({MIN_POINTS} points for its first step)")
    acc = pd.to_numeric(points["accuracy"], errors="coerce").to_numpy(np.float64)
    bad = ~(np.isfinite(acc) & (acc >= 0) & (acc <= 1))
    if bad.any():
        row = int(np.argmax(bad))
        raise UserError(f"accuracy must be a fraction in [0, 1], row {row} has "
                        f"{points['accuracy'].iloc[row]}; give accuracies as fractions (0.43, "
                        "not 43)")
    if len(np.unique(points["task_loss"])) < 3:
        raise UserError("the sigmoid needs at least 3 distinct task losses; add runs of "
                        "other sizes or lengths")


def fit_sigmoid(L, acc, chance: float) -> SigmoidFit:
    """Step 2: accuracy as chance + a / (1 + exp(k (L - L0))), least squares from a grid."""
    L, acc = np.asarray(L, np.float64), np.asarray(acc, np.float64)
    thetas, costs = solve_sigmoid(L, acc, chance, sigmoid_starts(L, acc, chance))
    theta, cost = thetas[np.argmin(costs)], float(np.min(costs))
    fit = SigmoidFit(*map(float, theta), chance=chance, cost=cost,
                     residuals=acc - sigmoid(L, *theta, chance),
                     loss_range=(float(L.min()), float(L.max())))
    fit.warnings = _diagnose(fit, acc)
    return fit


def _diagnose(fit: SigmoidFit, acc: np.ndarray) -> list[str]:
    """Warnings about a sigmoid the points do not pin down."""
    out = []
    covered = fit.rise_covered()
    if covered < RISE_COVERED:
        lo, hi = fit.loss_range
        side = "ceiling" if fit.L0 < lo else "floor" if fit.L0 > hi else "both ends"
        out.append(f"the task losses span {covered:.0%} of the sigmoid's rise (its {side} lies "
                   "beyond the points, extrapolated): pick a task whose accuracy the ladder "
                   "takes from near chance toward its ceiling")
    if acc.max() - fit.chance < 2 * max(float(np.std(fit.residuals)), 0.005):
        out.append(f"accuracy stays within {acc.max() - fit.chance:.3g} of chance "
                   f"({fit.chance:g}) at every point: the task is too hard for these runs")
    if fit.k >= 0.99 * K_MAX / np.ptp(fit.loss_range):
        out.append("the rise is a step between two points: its steepness is at its bound")
    return out


def bootstrap_sigmoid(fit: SigmoidFit, L, acc, idx: np.ndarray) -> np.ndarray:
    """Refits of step 2 on the resampled rows `idx` (K x n), from the full fit's optimum and
    a few other starts: K x 3 (a, k, L0)."""
    L, acc = np.asarray(L, np.float64), np.asarray(acc, np.float64)
    # Every steepness and ceiling at the lowest-loss midpoint (rows vary the midpoint fastest)
    others = sigmoid_starts(L, acc, fit.chance)[::6]
    starts = np.vstack([fit.theta[None, :], others])
    m = len(starts)
    weights = np.stack([np.bincount(rows, minlength=len(L)) for rows in idx]).astype(np.float64)
    theta, cost = solve_sigmoid(L, acc, fit.chance, np.tile(starts, (len(idx), 1)),
                                np.repeat(weights, m, axis=0))
    best = np.argmin(cost.reshape(len(idx), m), axis=1)
    return theta.reshape(len(idx), m, 3)[np.arange(len(idx)), best]


@dataclass
class DownstreamFit:
    """Both steps, the points they were fitted on, and the paired bootstrap refits."""

    task: str
    loss_law: Approach3Fit  # step 1, with its bootstrap samples (K x 5) when bootstrapped
    sigmoid: SigmoidFit  # step 2
    points: pd.DataFrame = field(repr=False)
    sigmoid_samples: np.ndarray | None = field(default=None, repr=False)  # K x 3, same rows
    level: float = 0.95

    @property
    def chance(self) -> float:
        return self.sigmoid.chance

    @property
    def warnings(self) -> list[str]:
        return ([f"task loss law: {w}" for w in self.loss_law.warnings]
                + [f"sigmoid: {w}" for w in self.sigmoid.warnings])

    def predict(self, N, D, seed: int = 0) -> pd.DataFrame:
        """Accuracy at each (N, D): the chained prediction, the task loss, and with bootstrap
        refits the law's interval (mean_lo, mean_hi) and one new run's (lo, hi)."""
        N = np.atleast_1d(np.asarray(N, np.float64))
        D = np.atleast_1d(np.asarray(D, np.float64))
        task_loss = self.loss_law.predict(N, D)
        out = pd.DataFrame({"N": N, "D": D, "task_loss": task_loss,
                            "accuracy": self.sigmoid.predict(task_loss)})
        if self.sigmoid_samples is None or self.loss_law.samples is None:
            return out
        s5, s3 = self.loss_law.samples, self.sigmoid_samples
        L_k = law(N[None, :], D[None, :], *(s5[:, i:i + 1] for i in range(5)))
        keep = np.isfinite(L_k).all(axis=1)
        L_k, s3 = L_k[keep], s3[keep]
        a, k, L0 = (s3[:, i:i + 1] for i in range(3))
        q = [(1 - self.level) / 2, (1 + self.level) / 2]
        out["task_loss_lo"], out["task_loss_hi"] = np.quantile(L_k, q, axis=0)
        out["mean_lo"], out["mean_hi"] = np.quantile(sigmoid(L_k, a, k, L0, self.chance), q,
                                                     axis=0)
        out["lo"], out["hi"] = self._outcome_interval(L_k, s3, seed, q)
        return out

    def _outcome_interval(self, L_k, s3, seed: int, q) -> tuple[np.ndarray, np.ndarray]:
        """Percentiles of each refit's chained prediction with drawn residuals of both steps."""
        rng = np.random.default_rng(seed)
        r1 = _centred(np.log(self.points["task_loss"].to_numpy(np.float64))
                      - np.log(self.loss_law.predict(self.points["N"], self.points["D"])), 5)
        r2 = _centred(self.sigmoid.residuals, 3)
        shape = (len(L_k), DRAWS, L_k.shape[1])
        L = L_k[:, None, :] * np.exp(rng.choice(r1, size=shape))
        a, k, L0 = (s3[:, i, None, None] for i in range(3))
        acc = np.clip(sigmoid(L, a, k, L0, self.chance) + rng.choice(r2, size=shape), 0, 1)
        lo, hi = np.quantile(acc.reshape(-1, L_k.shape[1]), q, axis=0)
        return lo, hi

    def intervals(self) -> dict[str, list[float]]:
        """Percentile intervals of the sigmoid's parameters over the bootstrap refits."""
        if self.sigmoid_samples is None:
            return {}
        q = [(1 - self.level) / 2, (1 + self.level) / 2]
        return {name: np.quantile(col, q).tolist()
                for name, col in zip(("a", "k", "L0"), self.sigmoid_samples.T, strict=True)}

    def to_dict(self) -> dict:
        out = {"method": "downstream", "task": self.task, "chance": self.chance,
               "n_points": len(self.points), "level": self.level,
               "task_loss_law": self.loss_law.to_dict(), "sigmoid": self.sigmoid.to_dict(),
               "warnings": self.warnings}
        out["sigmoid"]["intervals"] = self.intervals()
        if self.sigmoid_samples is not None:
            out["bootstrap_samples"] = len(self.sigmoid_samples)
            out["bootstrap"] = {"task_loss_law": np.asarray(self.loss_law.samples).tolist(),
                                "sigmoid": self.sigmoid_samples.tolist()}
        return out


def _centred(r: np.ndarray, n_params: int) -> np.ndarray:
    """Residuals about their mean, inflated by sqrt(n / (n - p)) (fitted residuals understate
    the scatter of a new point)."""
    r = np.asarray(r, np.float64)
    dof = len(r) - n_params
    return (r - r.mean()) * (np.sqrt(len(r) / dof) if dof > 0 else 1.0)


def fit_downstream(points: pd.DataFrame, chance: float, *, task: str = "task",
                   bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = 0, level: float = 0.95,
                   grid: np.ndarray | None = None) -> DownstreamFit:
    """Fit both steps to a table with columns N, D, task_loss and accuracy; `bootstrap`
    resamples of its rows refit both (0: none, and no intervals); `grid`: Approach 3's starts
    (default the published 4,500)."""
    if not 0 < level < 1:
        raise UserError(f"--level must be between 0 and 1, got {level}")
    check_task_points(points, chance)
    pts = points.reset_index(drop=True)
    N, D, L, acc = (pts[c].to_numpy(np.float64) for c in COLUMNS)
    step1 = fit_approach3(N, D, L, grid=grid, bootstrap=bootstrap, seed=seed, level=level)
    step2 = fit_sigmoid(L, acc, chance)
    samples = None
    if bootstrap:  # the rows Approach 3's bootstrap drew, refitted by step 2 as well
        samples = bootstrap_sigmoid(step2, L, acc, resample_indices(len(pts), bootstrap, seed))
    return DownstreamFit(task=task, loss_law=step1, sigmoid=step2, points=pts,
                         sigmoid_samples=samples, level=level)


def heldout_accuracy(fit: DownstreamFit, heldout: pd.DataFrame, goal: float = 0.02,
                     seed: int = 0) -> dict:
    """The law's accuracy for held-out runs (columns N, D, accuracy; one row per run or per
    size with its seeds averaged) beside what they measured: errors in accuracy (0.01 = one
    point), one run's interval and whether it holds the outcome, how far each outcome is above
    chance, and whether every error is within `goal`."""
    pred = fit.predict(heldout["N"], heldout["D"], seed=seed)
    y = heldout["accuracy"].to_numpy(np.float64)
    err = pred["accuracy"].to_numpy() - y
    out = {"N": pred["N"].tolist(), "D": pred["D"].tolist(), "measured": y.tolist(),
           "predicted": pred["accuracy"].tolist(), "errors": err.tolist(),
           "above_chance": (y - fit.chance).tolist(), "mean_abs_error": float(np.mean(
               np.abs(err))), "worst_abs_error": float(np.max(np.abs(err))),
           "goal": goal, "goal_met": bool(np.max(np.abs(err)) <= goal)}
    if "lo" in pred:
        out["interval"] = pred[["lo", "hi"]].to_numpy().tolist()
        out["inside"] = ((pred["lo"] <= y) & (y <= pred["hi"])).tolist()
    return out
