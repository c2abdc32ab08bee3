"""Power laws y = k x^p fitted by least squares in log-log space, with intervals.

Approaches 1 and 2 end with N_opt(C) and D_opt(C) fits of this form, and the hyperparameter
laws (eta_opt(C), B_opt(C)) are the same kind of fit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from lab.errors import UserError


@dataclass(frozen=True)
class PowerLaw:
    """y = coef * x^exponent, with `level` intervals (NaN where the data cannot give one)."""

    coef: float
    exponent: float
    coef_interval: tuple[float, float]
    exponent_interval: tuple[float, float]
    n: int
    level: float = 0.95
    interval_method: str = "ols"  # "ols" (regression standard errors) or "bootstrap"

    def __call__(self, x) -> np.ndarray:
        return self.coef * np.asarray(x, dtype=np.float64) ** self.exponent

    def to_dict(self) -> dict:
        return {
            "coef": self.coef,
            "exponent": self.exponent,
            "coef_interval": list(self.coef_interval),
            "exponent_interval": list(self.exponent_interval),
            "n": self.n,
            "level": self.level,
            "interval_method": self.interval_method,
        }


class Allocation:
    """N_opt ∝ C^a and D_opt ∝ C^b from two fitted power laws, the attributes `N_opt` and
    `D_opt` of the fits that mix this in (Approaches 1 and 2)."""

    N_opt: PowerLaw
    D_opt: PowerLaw

    @property
    def a(self) -> float:
        """N_opt is proportional to C^a."""
        return self.N_opt.exponent

    @property
    def b(self) -> float:
        """D_opt is proportional to C^b."""
        return self.D_opt.exponent

    def allocation_dict(self, method: str) -> dict:
        """The fields every allocation fit writes first: its method, a, b and both laws."""
        return {
            "method": method,
            "a": self.a,
            "b": self.b,
            "N_opt": self.N_opt.to_dict(),
            "D_opt": self.D_opt.to_dict(),
        }

    def compute_optimal(self, C) -> pd.DataFrame:
        """N_opt and D_opt from the fitted power laws at budgets C."""
        C = np.atleast_1d(np.asarray(C, dtype=np.float64))
        return pd.DataFrame({"C": C, "N_opt": self.N_opt(C), "D_opt": self.D_opt(C)})


def _loglog(x, y) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError("x and y differ in length")
    if not (np.isfinite(x).all() and np.isfinite(y).all()) or (x <= 0).any() or (y <= 0).any():
        raise UserError("a power-law fit needs finite positive values; check the input for NaN")
    return np.log(x), np.log(y)


def fit_power_law(x, y, level: float = 0.95) -> PowerLaw:
    """Ordinary least squares of log y on log x; t intervals from the regression standard errors.

    With two points the line is exact and the intervals are NaN.
    """
    lx, ly = _loglog(x, y)
    n = len(lx)
    if n < 2 or np.ptp(lx) == 0:
        raise UserError(
            f"a power law needs at least two distinct x values, got {len(np.unique(lx))}; "
            "add runs at more compute budgets"
        )
    X = np.stack([np.ones(n), lx], axis=1)
    coef, *_ = np.linalg.lstsq(X, ly, rcond=None)
    dof = n - 2
    if dof > 0:
        resid = ly - X @ coef
        s2 = float(resid @ resid) / dof
        cov = s2 * np.linalg.inv(X.T @ X)
        t = stats.t.ppf((1 + level) / 2, dof)
        half = t * np.sqrt(np.diag(cov))
    else:
        half = np.array([np.nan, np.nan])
    return PowerLaw(
        coef=float(np.exp(coef[0])),
        exponent=float(coef[1]),
        coef_interval=(float(np.exp(coef[0] - half[0])), float(np.exp(coef[0] + half[0]))),
        exponent_interval=(float(coef[1] - half[1]), float(coef[1] + half[1])),
        n=n,
        level=level,
    )


def with_bootstrap(law: PowerLaw, coefs: np.ndarray, exponents: np.ndarray) -> PowerLaw:
    """`law` with percentile intervals from bootstrap refits (NaN refits ignored)."""
    q = [(1 - law.level) / 2, (1 + law.level) / 2]
    ok = np.isfinite(coefs) & np.isfinite(exponents)
    if ok.sum() < 2:
        return law
    c_lo, c_hi = np.quantile(coefs[ok], q)
    e_lo, e_hi = np.quantile(exponents[ok], q)
    return PowerLaw(
        coef=law.coef,
        exponent=law.exponent,
        coef_interval=(float(c_lo), float(c_hi)),
        exponent_interval=(float(e_lo), float(e_hi)),
        n=law.n,
        level=law.level,
        interval_method="bootstrap",
    )


def loglog_line(x, y) -> tuple[float, float]:
    """(log k, p) of the least-squares line log y = log k + p log x, no checks, for refits."""
    lx, ly = np.log(np.asarray(x, dtype=np.float64)), np.log(np.asarray(y, dtype=np.float64))
    p, logk = np.polyfit(lx, ly, 1)
    return float(logk), float(p)
