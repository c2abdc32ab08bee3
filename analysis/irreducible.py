"""A warning when a prediction nears the irreducible loss E of L(N, D) = E + A/N^alpha + B/D^beta.

Power laws stop describing the loss near their floor, and near it a prediction says more about
the fitted E than about the data. A predicted loss L is "near the irreducible loss" when either:

- its reducible part is a small share of it: (L - E) / L < NEAR_E_MARGIN (10%); or
- E is too loosely known to tell: E's bootstrap interval is wider than the improvement the law
  predicts over the best run fitted (the lowest fitted loss minus L). This test needs bootstrap
  refits, and applies only to a prediction below every fitted loss (one that extrapolates
  toward E).

`lab fit` (Approach 3, at each compute-optimal budget), `lab plan` (the planned run) and the
study report put the warning in their banner; its text always contains "irreducible loss".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.approach3 import law

NEAR_E_MARGIN = 0.10  # below this share of the loss reducible, a prediction is "near E"
WORDS = "irreducible loss"  # every near-E warning says this (checked outside the repository)


@dataclass(frozen=True)
class NearE:
    """Where one prediction stands against the fitted floor E."""

    where: str  # the prediction, in words ("at C = 3.76e+13")
    loss: float
    E: float
    E_interval: tuple[float, float] | None  # bootstrap interval of E, if any
    best_loss: float | None  # the lowest fitted loss

    @property
    def reducible_share(self) -> float:
        return (self.loss - self.E) / self.loss

    @property
    def improvement(self) -> float | None:
        """The predicted drop below the best fitted run (None without one)."""
        return None if self.best_loss is None else self.best_loss - self.loss

    @property
    def within_margin(self) -> bool:
        return bool(self.reducible_share < NEAR_E_MARGIN)

    @property
    def E_too_loose(self) -> bool:
        gain = self.improvement
        if self.E_interval is None or gain is None or not gain > 0:
            return False
        lo, hi = self.E_interval
        return bool(np.isfinite(lo) and np.isfinite(hi) and hi - lo > gain)

    @property
    def fires(self) -> bool:
        return self.within_margin or self.E_too_loose

    def reasons(self) -> list[str]:
        out = []
        if self.within_margin:
            out.append(f"only {self.loss - self.E:.3g} above the fitted E = {self.E:.4g} "
                       f"({self.reducible_share:.1%} of it reducible, under the "
                       f"{NEAR_E_MARGIN:.0%} margin)")
        if self.E_too_loose:
            lo, hi = self.E_interval
            out.append(f"E's interval [{lo:.3g}, {hi:.3g}] is {hi - lo:.3g} wide, wider than "
                       f"the predicted improvement of {self.improvement:.3g} over the best "
                       f"fitted run ({self.best_loss:.4g})")
        return out

    def to_dict(self) -> dict:
        return {"where": self.where, "loss": self.loss, "E": self.E,
                "E_interval": list(self.E_interval) if self.E_interval else None,
                "best_loss": self.best_loss, "reducible_share": self.reducible_share,
                "improvement": self.improvement, "margin": NEAR_E_MARGIN,
                "within_margin": self.within_margin, "E_too_loose": self.E_too_loose}


def near_e_warning(checks: Sequence[NearE]) -> str | None:
    """One warning for the predictions that lie near the irreducible loss (the first in
    detail, the others counted), or None when none does."""
    firing = [c for c in checks if c.fires]
    if not firing:
        return None
    first = firing[0]
    more = (f" (and {len(firing) - 1} more of the {len(checks)} predictions)"
            if len(firing) > 1 else "")
    return (f"the predicted loss {first.loss:.4g} {first.where}{more} lies near the "
            f"{WORDS}: {'; and '.join(first.reasons())}. Near E the power law is an "
            "extrapolation of E more than of the data; train runs closer to the target "
            "before trusting it")


def e_interval(samples: np.ndarray | None, level: float) -> tuple[float, float] | None:
    """The percentile interval of E from bootstrap samples (K x 5, E first), or None."""
    if samples is None or len(samples) < 2:
        return None
    q = [(1 - level) / 2, (1 + level) / 2]
    lo, hi = np.nanquantile(np.asarray(samples, np.float64)[:, 0], q)
    return float(lo), float(hi)


def approach3_caveats(fit, points: pd.DataFrame, budgets: list[float]) -> list[str]:
    """The near-E warning for an Approach 3 fit's compute-optimal losses at `budgets`."""
    if getattr(fit, "degenerate", False) or not budgets:
        return []
    opt = fit.compute_optimal(budgets)
    iv = fit.intervals.get("E") if fit.samples is not None else None
    best = float(points["loss"].min()) if len(points) else None
    checks = [NearE(f"at C = {c:.3g}", float(loss), fit.E, iv, best)
              for c, loss in zip(opt["C"], opt["loss"], strict=True)]
    warning = near_e_warning(checks)
    return [warning] if warning else []


def loss_law_check(loss_law, loss: float, where: str, level: float) -> NearE:
    """A LossLaw's (analysis.predict) prediction against its E: the interval from its
    bootstrap samples, the best loss from its fitted points and their log residuals."""
    best = None
    if loss_law.points is not None and len(loss_law.residuals):
        fitted = law(loss_law.points[:, 0], loss_law.points[:, 1], *loss_law.theta)
        best = float(np.min(fitted * np.exp(np.asarray(loss_law.residuals, np.float64))))
    return NearE(where, float(loss), loss_law.E, e_interval(loss_law.samples, level), best)
