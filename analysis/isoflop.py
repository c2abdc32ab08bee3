"""Approach 2 of Hoffmann et al. (2022): IsoFLOP profiles.

Runs are grouped by compute budget; at each budget a parabola in log N is fitted to the loss and
its vertex is that budget's optimal model size. Power laws N_opt(C) and D_opt(C) are then
fitted in log-log space across budgets, with regression or bootstrap intervals.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.points import check_points, group_budgets
from analysis.powerlaw import Allocation, PowerLaw, fit_power_law, loglog_line, with_bootstrap
from lab.errors import UserError


@dataclass
class IsoflopFit(Allocation):
    """Per-budget optima and the power laws through them."""

    budgets: pd.DataFrame  # C, N_opt, D_opt, loss_opt, n_runs, N_min, N_max, c0, c1, c2
    N_opt: PowerLaw
    D_opt: PowerLaw
    points: pd.DataFrame = field(repr=False)  # the input with a `budget` label column
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            **self.allocation_dict("isoflop"),
            "n_points": len(self.points),
            "n_budgets": len(self.budgets),
            "budgets": self.budgets[["C", "N_opt", "D_opt", "loss_opt", "n_runs"]].to_dict(
                orient="records"
            ),
            "warnings": list(self.warnings),
        }


def _vertex(logn: np.ndarray, logd: np.ndarray, loss: np.ndarray):
    """Parabola vertex of loss over log N: (log N_opt, log D_opt, loss_opt, (c0, c1, c2)), or
    None when there is no minimum strictly inside the sampled sizes."""
    c2, c1, c0 = np.polyfit(logn, loss, 2)
    if not c2 > 0:
        return None
    x = -c1 / (2 * c2)
    if not logn.min() < x < logn.max():
        return None
    # Within one budget log D is (close to) linear in log N; read D_opt off that line.
    slope, icpt = np.polyfit(logn, logd, 1)
    return x, icpt + slope * x, c0 + c1 * x + c2 * x * x, (c0, c1, c2)


def fit_isoflop(points: pd.DataFrame, *, rel_tol: float = 0.1, bootstrap: int = 0,
                seed: int = 0, level: float = 0.95) -> IsoflopFit:
    """Approach 2 on a frame with columns N, D, C, loss (and optionally `budget` labels).

    Runs whose compute lies within a factor (1 + rel_tol) of each other form one budget unless
    a `budget` column says otherwise. Every budget needs three or more model sizes and its
    minimum strictly inside them; otherwise UserError names the budget.
    """
    check_points(points, ("N", "D", "C", "loss"), min_points=3, what="Approach 2 (IsoFLOP)")
    df = points.copy()
    if "budget" not in df.columns:
        df["budget"] = group_budgets(df["C"], rel_tol)
    groups = sorted(df.groupby("budget"), key=lambda kv: kv[1]["C"].median())
    if len(groups) < 2:
        raise UserError(
            f"Approach 2 needs runs at two or more compute budgets, found one "
            f"(C about {df['C'].median():.3g}); add runs at other budgets"
        )
    rows = []
    for label, g in groups:
        C = float(np.exp(np.log(g["C"]).mean()))
        logn = np.log(g["N"].to_numpy(np.float64))
        if len(np.unique(logn)) < 3:
            raise UserError(
                f"budget C={C:.3g} has {len(np.unique(logn))} model size(s); a parabola "
                "needs three or more, so add runs of other sizes at that budget"
            )
        v = _vertex(logn, np.log(g["D"].to_numpy(np.float64)), g["loss"].to_numpy(np.float64))
        if v is None:
            raise UserError(
                f"budget C={C:.3g}: the loss has no minimum inside the sampled sizes "
                f"(N from {g['N'].min():.3g} to {g['N'].max():.3g}); add runs beyond the "
                "lowest-loss size so the minimum is bracketed"
            )
        x, logd, loss_opt, (c0, c1, c2) = v
        rows.append(
            {
                "budget": label,
                "C": C,
                "N_opt": np.exp(x),
                "D_opt": np.exp(logd),
                "loss_opt": loss_opt,
                "n_runs": len(g),
                "N_min": g["N"].min(),
                "N_max": g["N"].max(),
                "c0": c0,
                "c1": c1,
                "c2": c2,
            }
        )
    budgets = pd.DataFrame(rows)
    n_law = fit_power_law(budgets["C"], budgets["N_opt"], level)
    d_law = fit_power_law(budgets["C"], budgets["D_opt"], level)
    warns = []
    if len(budgets) == 2:
        warns.append("only two budgets: the power laws pass exactly through them, no interval")
    if bootstrap:
        n_law, d_law, failed = _bootstrap(df, groups, n_law, d_law, bootstrap, seed)
        if failed:
            warns.append(
                f"{failed} of {bootstrap} bootstrap resamples had a budget without an "
                "interior minimum and were left out"
            )
    return IsoflopFit(budgets=budgets, N_opt=n_law, D_opt=d_law, points=df, warnings=warns)


def _bootstrap(df, groups, n_law, d_law, k, seed):
    """Resample runs within each budget, redo the vertices and the power laws."""
    rng = np.random.default_rng(seed)
    arrays = [
        (
            np.exp(np.log(g["C"]).mean()),
            np.log(g["N"].to_numpy(np.float64)),
            np.log(g["D"].to_numpy(np.float64)),
            g["loss"].to_numpy(np.float64),
        )
        for _, g in groups
    ]
    out = np.full((k, 4), np.nan)
    failed = 0
    for i in range(k):
        cs, ns, ds = [], [], []
        for C, logn, logd, loss in arrays:
            pick = rng.integers(0, len(logn), len(logn))
            v = None
            if len(np.unique(logn[pick])) >= 3:
                v = _vertex(logn[pick], logd[pick], loss[pick])
            if v is None:
                break
            cs.append(C)
            ns.append(np.exp(v[0]))
            ds.append(np.exp(v[1]))
        if len(cs) < len(arrays):
            failed += 1
            continue
        out[i, :2] = loglog_line(cs, ns)
        out[i, 2:] = loglog_line(cs, ds)
    n_law = with_bootstrap(n_law, np.exp(out[:, 0]), out[:, 1])
    d_law = with_bootstrap(d_law, np.exp(out[:, 2]), out[:, 3])
    return n_law, d_law, failed
