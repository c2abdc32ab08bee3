"""Approach 1 of Hoffmann et al. (2022): the envelope of training curves.

Every logged step of every run is a point (N, D = tokens so far, C = FLOPs so far, loss).
Each curve is first smoothed (a centred running mean over a few logged steps, as Hoffmann et al.
smooth theirs), since with noisy losses the lowest point of a bin is often a neighbouring size by
chance. Compute is cut into log-uniform bins; in each, the lowest-loss point is the frontier, and
power laws N_opt(C) and D_opt(C) are fitted through the frontier points.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.points import check_points
from analysis.powerlaw import Allocation, PowerLaw, fit_power_law, loglog_line, with_bootstrap
from lab.errors import UserError


@dataclass
class EnvelopeFit(Allocation):
    """The loss-compute frontier and the power laws through it."""

    frontier: pd.DataFrame  # per bin: C, loss, N, D, run
    N_opt: PowerLaw
    D_opt: PowerLaw
    n_points: int
    n_runs: int
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            **self.allocation_dict("envelope"),
            "n_points": self.n_points,
            "n_runs": self.n_runs,
            "frontier": self.frontier[["C", "loss", "N", "D"]].to_dict(orient="records"),
            "warnings": list(self.warnings),
        }


def frontier(curves: pd.DataFrame, n_bins: int = 30) -> tuple[pd.DataFrame, int]:
    """The lowest-loss point in each log-uniform compute bin, keeping only the bins between the
    last one won by the smallest model and the first one won by the largest (beyond them the
    optimum may lie outside the sizes trained).

    Returns the frontier and how many bins were left out for that reason.
    """
    logc = np.log(curves["C"].to_numpy(np.float64))
    edges = np.linspace(logc.min(), logc.max(), n_bins + 1)
    which = np.clip(np.searchsorted(edges, logc, side="right") - 1, 0, n_bins - 1)
    best = curves.assign(_bin=which).sort_values("loss").drop_duplicates("_bin")
    best = best.sort_values("C").drop(columns="_bin").reset_index(drop=True)
    n = best["N"].to_numpy()
    smallest = np.flatnonzero(n == curves["N"].min())
    largest = np.flatnonzero(n == curves["N"].max())
    lo = smallest.max() + 1 if len(smallest) else 0
    hi = largest.min() if len(largest) else len(best)
    kept = best.iloc[lo:hi].reset_index(drop=True)
    return kept, len(best) - len(kept)


def smooth_curves(curves: pd.DataFrame, window: int) -> pd.DataFrame:
    """Each run's loss replaced by its centred running mean over `window` logged steps."""
    if window <= 1:
        return curves
    df = curves.sort_values(["run", "D"]).reset_index(drop=True)
    df["loss"] = df.groupby("run")["loss"].transform(
        lambda s: s.rolling(window, center=True, min_periods=1).mean()
    )
    return df


def fit_envelope(
    curves: pd.DataFrame,
    *,
    n_bins: int = 30,
    smooth: int = 5,
    bootstrap: int = 0,
    seed: int = 0,
    level: float = 0.95,
) -> EnvelopeFit:
    """Approach 1 on training-curve points: columns N, D, C, loss, and `run` naming the curve
    each point belongs to (without it, every row is its own run). `smooth` is the running-mean
    window, in logged steps (1: no smoothing)."""
    check_points(curves, ("N", "D", "C", "loss"), min_points=2, what="Approach 1 (envelope)")
    if n_bins < 2:
        raise UserError(f"the envelope needs two or more compute bins, got {n_bins}")
    df = curves.copy()
    if "run" not in df.columns:
        df["run"] = np.arange(len(df))
    df = smooth_curves(df, smooth)
    front, n_edge = frontier(df, n_bins)
    if front["N"].nunique() < 2:
        raise UserError(
            f"the envelope visits {front['N'].nunique()} model size(s) between the smallest "
            f"and the largest of the {df['N'].nunique()} trained; Approach 1 needs two or more "
            "there, so train sizes whose optimum lies inside the range"
        )
    n_law = fit_power_law(front["C"], front["N"], level)
    d_law = fit_power_law(front["C"], front["D"], level)
    warns = []
    if n_edge:
        warns.append(
            f"{n_edge} compute bin(s) left out: at and beyond them the best run is the "
            "smallest or largest model, so the optimum may lie outside the sizes trained"
        )
    if front["N"].nunique() < 4:
        warns.append(
            f"the frontier visits only {front['N'].nunique()} model sizes; the exponents rest "
            "on few sizes, train more"
        )
    if bootstrap:
        n_law, d_law = _bootstrap(df, n_bins, n_law, d_law, bootstrap, seed)
    return EnvelopeFit(
        frontier=front,
        N_opt=n_law,
        D_opt=d_law,
        n_points=len(df),
        n_runs=df["run"].nunique(),
        warnings=warns,
    )


def _bootstrap(df, n_bins, n_law, d_law, k, seed):
    """Resample whole runs (curves) with replacement and redo the frontier and the fits."""
    rng = np.random.default_rng(seed)
    runs = [g for _, g in df.groupby("run")]
    out = np.full((k, 4), np.nan)
    for i in range(k):
        sample = pd.concat([runs[j] for j in rng.integers(0, len(runs), len(runs))])
        front, _ = frontier(sample, n_bins)
        if front["C"].nunique() < 2 or front["N"].nunique() < 2:
            continue
        out[i, :2] = loglog_line(front["C"], front["N"])
        out[i, 2:] = loglog_line(front["C"], front["D"])
    n_law = with_bootstrap(n_law, np.exp(out[:, 0]), out[:, 1])
    d_law = with_bootstrap(d_law, np.exp(out[:, 2]), out[:, 3])
    return n_law, d_law
