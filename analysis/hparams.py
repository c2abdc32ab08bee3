"""Hyperparameter laws: the optimal learning rate and batch size as power laws of compute.

Following DeepSeek LLM (2024): sweep learning rate and batch size at several compute budgets,
keep the near-optimal band (runs within `tolerance`, default 0.25%, of the best loss at their
budget), and fit eta_opt = k C^p and B_opt = k C^q (B in tokens, C in FLOPs) by least squares
in log-log space over all band runs. DeepSeek's published laws are eta_opt = 0.3118 C^-0.1250
and B_opt = 0.2920 C^0.3271.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.points import check_points, group_budgets
from analysis.powerlaw import PowerLaw, fit_power_law
from lab.errors import UserError

DEEPSEEK_LR = (0.3118, -0.1250)  # (coef, exponent) of eta_opt(C)
DEEPSEEK_BATCH = (0.2920, 0.3271)  # (coef, exponent) of B_opt(C), B in tokens


@dataclass
class HparamLaws:
    """eta_opt(C) and B_opt(C) with the runs they were fitted to."""

    lr: PowerLaw
    batch: PowerLaw
    band: pd.DataFrame  # the near-optimal runs, with their budget's C and best loss
    best: pd.DataFrame  # the best run at each budget
    tolerance: float
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "method": "hparams",
            "tolerance": self.tolerance,
            "lr": self.lr.to_dict(),
            "batch_tokens": self.batch.to_dict(),
            "n_band": len(self.band),
            "n_budgets": len(self.best),
            "warnings": list(self.warnings),
        }


def fit_hparam_laws(
    runs: pd.DataFrame,
    *,
    tolerance: float = 0.0025,
    rel_tol: float = 0.1,
    level: float = 0.95,
) -> HparamLaws:
    """Fit eta_opt(C) and B_opt(C) on runs with columns C, lr, loss and `batch_tokens` (or
    `batch_size` and `seq_len`); a `budget` column overrides grouping by compute."""
    df = runs.copy()
    if "batch_tokens" not in df.columns and {"batch_size", "seq_len"} <= set(df.columns):
        df["batch_tokens"] = df["batch_size"] * df["seq_len"]
    check_points(df, ("C", "lr", "batch_tokens", "loss"), min_points=2, what="hparam laws")
    if not tolerance >= 0:
        raise UserError(f"the near-optimal tolerance must be >= 0, got {tolerance}")
    if "budget" not in df.columns:
        df["budget"] = group_budgets(df["C"], rel_tol)
    if df["budget"].nunique() < 2:
        raise UserError(
            "hyperparameter laws need sweeps at two or more compute budgets, found one; "
            "add runs at other budgets"
        )
    warns = []
    band, best = [], []
    for _, g in df.groupby("budget"):
        C = float(np.exp(np.log(g["C"]).mean()))
        top_row = g.loc[[g["loss"].idxmin()]]
        top = top_row.iloc[0]
        keep = g[g["loss"] <= top["loss"] * (1 + tolerance)].assign(C=C, best_loss=top["loss"])
        band.append(keep)
        best.append(top_row.assign(C=C))
        for col, name in (("lr", "learning rate"), ("batch_tokens", "batch size")):
            if g[col].nunique() > 1 and top[col] in (g[col].min(), g[col].max()):
                warns.append(
                    f"at C={C:.3g} the best {name} ({top[col]:.3g}) is at the edge of the "
                    "sweep; widen the sweep so the optimum is bracketed"
                )
    band = pd.concat(band, ignore_index=True)
    best = pd.concat(best, ignore_index=True)
    return HparamLaws(
        lr=fit_power_law(band["C"], band["lr"], level),
        batch=fit_power_law(band["C"], band["batch_tokens"], level),
        band=band,
        best=best,
        tolerance=tolerance,
        warnings=warns,
    )
