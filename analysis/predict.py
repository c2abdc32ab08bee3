"""Predicted losses with intervals from a fitted L(N, D) = E + A/N^alpha + B/D^beta.

The interval is for the outcome of one new run, not only for the law's mean: it adds the
scatter of runs around the law to the uncertainty of the law itself.

- "bootstrap": each bootstrap refit of the law (`lab fit --bootstrap K`) predicts the point,
  and each prediction is multiplied by a log residual of the full fit drawn at random (inflated
  by sqrt(n / (n - 5)), since fitted residuals understate the scatter); the interval is the
  percentiles of those outcomes.
- "residual": without bootstrap samples, the least-squares prediction interval in log space,
  the prediction times exp(± t s sqrt(1 + g' (J'J)^-1 g)): s the standard deviation of the log
  residuals on n - 5 degrees of freedom, t Student's quantile, J the gradient of the log law
  in (log A, log B, log E, alpha, beta) at the fitted points and g at the new one (the delta
  method; linear in the parameters, so it can still be narrow far outside the fitted range).
- "calibrated": after a backtest (`lab fit --backtest`), the residual interval's shape with its
  width set by out-of-sample errors: the prediction times exp(± q s sqrt(1 + g' (J'J)^-1 g)),
  q the split-conformal quantile of the backtest's standardized scores |log(y / ŷ)| / (s
  sqrt(1 + g' (J'J)^-1 g)), each scored with the fit of its own fold (analysis.backtest). The
  scale still grows with the distance from the fitted points; q carries what the law's own
  residuals cannot: its misspecification and noise it does not model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from analysis.approach3 import law, optimal_allocation
from lab.errors import UserError

N_PARAMS = 5  # E, A, B, alpha, beta


@dataclass(frozen=True)
class LossLaw:
    """A fitted loss law with what an interval needs: log residuals and bootstrap samples."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    residuals: np.ndarray  # log(loss) - log(law) at the fitted points
    samples: np.ndarray | None = None  # K x 5 (E, A, B, alpha, beta) bootstrap refits
    points: np.ndarray | None = None  # n x 2: the fitted points' N and D
    params: str = "total"  # which parameter count N is: total or non_embedding
    calibration: np.ndarray | None = None  # out-of-sample standardized scores of a backtest

    @property
    def theta(self) -> tuple[float, float, float, float, float]:
        return (self.E, self.A, self.B, self.alpha, self.beta)

    @property
    def interval_method(self) -> str:
        if self.calibration is not None and len(self.calibration):
            return "calibrated"
        return "bootstrap" if self.samples is not None and len(self.samples) >= 2 else "residual"

    def optimum(self, C: float) -> tuple[float, float, float]:
        """(N_opt, D_opt, loss) at budget C = 6 N D."""
        if not (np.isfinite(self.theta).all() and min(self.A, self.B, self.alpha, self.beta) > 0):
            raise UserError(
                f"the loss law (A={self.A:g}, B={self.B:g}, alpha={self.alpha:g}, "
                f"beta={self.beta:g}) has no compute-optimal allocation: A, B, alpha and beta "
                "must be positive; refit on runs spanning more N and D")
        N, D, L = optimal_allocation(C, *self.theta)
        return float(N), float(D), float(L)

    def predict(self, N, D, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
        """(predicted loss, lo, hi) for one run of N parameters and D tokens."""
        if not 0 < level < 1:
            raise UserError(f"the interval level must be between 0 and 1, got {level}")
        pred = float(law(N, D, *self.theta))
        q = [(1 - level) / 2, (1 + level) / 2]
        if self.interval_method == "calibrated":
            half = conformal_quantile(self.calibration, level) * float(self.scale(N, D)[0])
            return pred, pred * math.exp(-half), pred * math.exp(half)
        r = np.asarray(self.residuals, dtype=np.float64)
        n, dof = len(r), len(r) - N_PARAMS
        if self.interval_method == "bootstrap":
            s = np.asarray(self.samples, dtype=np.float64)
            preds = law(N, D, *(s[:, i] for i in range(5)))
            preds = preds[np.isfinite(preds)]
            rng = np.random.default_rng(seed)
            draws = 20  # residual draws per bootstrap sample
            inflate = np.sqrt(n / dof) if dof > 0 else 1.0
            noise = rng.choice(r - r.mean(), size=(len(preds), draws)) * inflate
            outcomes = preds[:, None] * np.exp(noise)
            lo, hi = np.quantile(outcomes, q)
            return pred, float(lo), float(hi)
        half = float(stats.t.ppf(q[1], dof)) * float(self.scale(N, D)[0])
        return pred, pred * math.exp(-half), pred * math.exp(half)

    def scale(self, N, D) -> np.ndarray:
        """s sqrt(1 + g' (J'J)^-1 g) at each (N, D): the log-space standard error of one new
        outcome (s from the residuals on n - 5 degrees of freedom, g the log law's gradient);
        without the fitted points, s alone."""
        r = np.asarray(self.residuals, dtype=np.float64)
        dof = len(r) - N_PARAMS
        if dof < 1:
            raise UserError(
                f"a residual interval needs more than {N_PARAMS} fitted points, the fit has "
                f"{len(r)}; add runs or fit with --bootstrap"
            )
        s = float(np.sqrt(np.sum(r * r) / dof))
        N, D = np.atleast_1d(np.asarray(N, np.float64)), np.atleast_1d(np.asarray(D, np.float64))
        if self.points is None:
            return np.full(len(N), s)
        J = self.gradient(self.points[:, 0], self.points[:, 1])
        g = self.gradient(N, D)
        leverage = np.einsum("ij,jk,ik->i", g, np.linalg.pinv(J.T @ J), g)
        return s * np.sqrt(1.0 + leverage)

    def gradient(self, N, D) -> np.ndarray:
        """d log L / d (log A, log B, log E, alpha, beta) at each (N, D): rows of J."""
        x, z = np.log(np.asarray(N, np.float64)), np.log(np.asarray(D, np.float64))
        terms = np.stack([self.A * np.exp(-self.alpha * x), self.B * np.exp(-self.beta * z),
                          np.full_like(x, self.E)], axis=1)
        p = terms / terms.sum(axis=1, keepdims=True)  # softmax weights of the three terms
        return np.column_stack([p[:, 0], p[:, 1], p[:, 2], -x * p[:, 0], -z * p[:, 1]])

    @classmethod
    def from_dict(cls, d: dict, where: str = "the fit") -> LossLaw:
        """From the JSON `lab fit --method approach3 --json` writes."""
        missing = [k for k in ("E", "A", "B", "alpha", "beta", "residuals") if d.get(k) is None]
        if missing:
            raise UserError(
                f"{where} lacks {', '.join(missing)}; refit with `lab fit RUNS --json OUT` "
                "(approach3) from this version of the lab"
            )
        samples = d.get("bootstrap_params")
        return cls(
            E=float(d["E"]),
            A=float(d["A"]),
            B=float(d["B"]),
            alpha=float(d["alpha"]),
            beta=float(d["beta"]),
            residuals=np.asarray(d["residuals"], dtype=np.float64),
            samples=None if not samples else np.asarray(samples, dtype=np.float64),
            params=str(d.get("params", "total")),
            points=None if not d.get("points") else np.asarray(d["points"], dtype=np.float64),
            calibration=_scores(d.get("calibration")),
        )


def _scores(calibration: dict | None) -> np.ndarray | None:
    scores = (calibration or {}).get("scores")
    return None if not scores else np.asarray(scores, dtype=np.float64)


def conformal_quantile(scores, level: float) -> float:
    """The split-conformal quantile of `scores` at `level`: the ceil((n + 1) level)-th smallest
    (Vovk et al.; Lei et al. 2018), which covers a new exchangeable score with probability at
    least `level`. With too few scores for that rank, the largest (see enough_scores)."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    k = math.ceil((len(s) + 1) * level)
    return float(s[min(k, len(s)) - 1])


def enough_scores(n: int, level: float) -> bool:
    """Whether n scores give a conformal quantile at `level` (else it is capped at the largest)."""
    return math.ceil((n + 1) * level) <= n


def fit_record(fit, N, D, loss) -> dict:
    """What a loss law needs beyond Approach3Fit.to_dict(): the fitted points (N, D) and their
    log residuals, and the bootstrap refits (K x 5: E, A, B, alpha, beta): predictive intervals."""
    resid = np.log(np.asarray(loss, dtype=np.float64)) - np.log(fit.predict(N, D))
    points = np.column_stack([np.asarray(N, np.float64), np.asarray(D, np.float64)])
    out = {"residuals": resid.tolist(), "points": points.tolist()}
    if fit.samples is not None:
        out["bootstrap_params"] = np.asarray(fit.samples).tolist()
    return out
