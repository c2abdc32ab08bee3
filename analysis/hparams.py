"""Hyperparameter laws: the optimal learning rate and batch size as power laws of compute.

Following DeepSeek LLM (2024): sweep learning rate and batch size at several compute budgets,
keep the near-optimal band (runs within `tolerance`, default 0.25%, of the best loss at their
budget), and fit eta_opt = k C^p and B_opt = k C^q (B in tokens, C in FLOPs) by least squares
in log-log space over all band runs. DeepSeek's published laws are eta_opt = 0.3118 C^-0.1250
and B_opt = 0.2920 C^0.3271.
"""

from __future__ import annotations

from collections.abc import Callable
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


def _grid_runs(runs: pd.DataFrame, columns: tuple[str, ...], *, min_points: int, what: str,
               tolerance: float) -> pd.DataFrame:
    """A checked copy of a grid of runs, with `batch_tokens` from batch_size x seq_len when the
    runs give those instead."""
    df = runs.copy()
    if "batch_tokens" not in df.columns and {"batch_size", "seq_len"} <= set(df.columns):
        df["batch_tokens"] = df["batch_size"] * df["seq_len"]
    check_points(df, columns, min_points=min_points, what=what)
    if not tolerance >= 0:
        raise UserError(f"the near-optimal tolerance must be >= 0, got {tolerance}")
    return df


def _near_optimal(
    df: pd.DataFrame,
    by: str,
    tolerance: float,
    where: Callable[[pd.Series], str],
    widen: str,
) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Per group of runs sharing `by`: the near-optimal band (runs within `tolerance` of the
    group's best loss, with that loss as `best_loss`) and the best run. A warning names the
    group (`where`, given its best run) whose best learning rate or batch size is at the edge
    of its sweep; `widen` is what the warning asks to widen."""
    band, best, warns = [], [], []
    for _, g in df.groupby(by):
        top_row = g.loc[[g["loss"].idxmin()]]
        top = top_row.iloc[0]
        band.append(g[g["loss"] <= top["loss"] * (1 + tolerance)].assign(best_loss=top["loss"]))
        best.append(top_row)
        for col, name in (("lr", "learning rate"), ("batch_tokens", "batch size")):
            if g[col].nunique() > 1 and top[col] in (g[col].min(), g[col].max()):
                warns.append(
                    f"{where(top)} the best {name} ({top[col]:.3g}) is at the edge of the "
                    f"sweep; widen {widen} so the optimum is bracketed"
                )
    return pd.concat(band, ignore_index=True), pd.concat(best, ignore_index=True), warns


def fit_hparam_laws(
    runs: pd.DataFrame,
    *,
    tolerance: float = 0.0025,
    rel_tol: float = 0.1,
    level: float = 0.95,
) -> HparamLaws:
    """Fit eta_opt(C) and B_opt(C) on runs with columns C, lr, loss and `batch_tokens` (or
    `batch_size` and `seq_len`); a `budget` column overrides grouping by compute."""
    df = _grid_runs(runs, ("C", "lr", "batch_tokens", "loss"), min_points=2,
                    what="hparam laws", tolerance=tolerance)
    if "budget" not in df.columns:
        df["budget"] = group_budgets(df["C"], rel_tol)
    if df["budget"].nunique() < 2:
        raise UserError(
            "hyperparameter laws need sweeps at two or more compute budgets, found one; "
            "add runs at other budgets"
        )
    # Each budget's runs are placed at its geometric-mean compute.
    df["C"] = df.groupby("budget")["C"].transform(lambda c: float(np.exp(np.log(c).mean())))
    band, best, warns = _near_optimal(
        df, "budget", tolerance, lambda top: f"at C={top['C']:.3g}", "the sweep"
    )
    return HparamLaws(
        lr=fit_power_law(band["C"], band["lr"], level),
        batch=fit_power_law(band["C"], band["batch_tokens"], level),
        band=band,
        best=best,
        tolerance=tolerance,
        warnings=warns,
    )


# ---------------------------------------------------------------------------------------------
# StepFun's form (Li et al. 2025, "Predictable Scale"): the optimum in N and D separately.


@dataclass(frozen=True)
class LogLinearLaw:
    """y = coef * prod(x_i ^ exponent_i), fitted in log space, with bootstrap intervals."""

    variables: tuple[str, ...]  # the names of x_i, e.g. ("N", "D")
    coef: float
    exponents: tuple[float, ...]
    coef_interval: tuple[float, float]
    exponent_intervals: tuple[tuple[float, float], ...]
    level: float

    def __call__(self, **x) -> float:
        out = self.coef
        for name, p in zip(self.variables, self.exponents, strict=True):
            out *= float(x[name]) ** p
        return out

    def to_dict(self) -> dict:
        return {
            "variables": list(self.variables),
            "coef": self.coef,
            "exponents": dict(zip(self.variables, self.exponents, strict=True)),
            "coef_interval": list(self.coef_interval),
            "exponent_intervals": {
                v: list(iv) for v, iv in zip(self.variables, self.exponent_intervals, strict=True)
            },
            "level": self.level,
            "interval_method": "bootstrap over (N, D) cells",
        }

    @classmethod
    def from_dict(cls, d: dict) -> LogLinearLaw:
        names = tuple(d["variables"])
        return cls(
            variables=names,
            coef=float(d["coef"]),
            exponents=tuple(float(d["exponents"][v]) for v in names),
            coef_interval=tuple(d["coef_interval"]),
            exponent_intervals=tuple(tuple(d["exponent_intervals"][v]) for v in names),
            level=float(d.get("level", 0.95)),
        )


def _loglinear(X_RxK: np.ndarray, y_R: np.ndarray) -> np.ndarray:
    """Least squares of log y on [1, log X]: (log coef, exponents...)."""
    A = np.column_stack([np.ones(len(y_R)), np.log(X_RxK)])
    return np.linalg.lstsq(A, np.log(y_R), rcond=None)[0]


def _fit_loglinear(band: pd.DataFrame, target: str, variables: tuple[str, ...], level: float,
                   n_boot: int, seed: int) -> LogLinearLaw:
    """Fit on every band run; intervals from resampling whole (N, D) cells with replacement
    (runs of one cell share its noise, so resampling runs would understate the spread)."""
    X, y = band[list(variables)].to_numpy(np.float64), band[target].to_numpy(np.float64)
    theta = _loglinear(X, y)
    cells = band["cell"].to_numpy()
    ids = np.unique(cells)
    rows = [np.flatnonzero(cells == c) for c in ids]
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(n_boot):
        take = np.concatenate([rows[i] for i in rng.integers(0, len(ids), len(ids))])
        if np.linalg.matrix_rank(np.column_stack([np.ones(len(take)), np.log(X[take])])) \
                < len(variables) + 1:
            continue  # a resample without spread in some variable pins nothing down
        boot.append(_loglinear(X[take], y[take]))
    boot = np.array(boot).reshape(-1, len(variables) + 1)
    q = [(1 - level) / 2, (1 + level) / 2]
    iv = np.quantile(boot, q, axis=0) if len(boot) >= 2 else np.full((2, len(theta)), np.nan)
    return LogLinearLaw(
        variables=variables,
        coef=float(np.exp(theta[0])),
        exponents=tuple(float(v) for v in theta[1:]),
        coef_interval=(float(np.exp(iv[0, 0])), float(np.exp(iv[1, 0]))),
        exponent_intervals=tuple((float(iv[0, i]), float(iv[1, i]))
                                 for i in range(1, len(theta))),
        level=level,
    )


@dataclass
class StepFunLaws:
    """eta_opt = a N^alpha D^beta and B_opt = c D^gamma (Li et al. 2025), with the near-optimal
    runs of each (N, D) cell they were fitted to."""

    lr: LogLinearLaw
    batch: LogLinearLaw  # batch in tokens
    band: pd.DataFrame
    tolerance: float
    params: str = "total"
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "form": "Li et al. 2025: lr = a N^alpha D^beta, batch_tokens = c D^gamma",
            "params": self.params,
            "tolerance": self.tolerance,
            "lr": self.lr.to_dict(),
            "batch_tokens": self.batch.to_dict(),
            "n_cells": int(self.band["cell"].nunique()),
            "band_runs": [
                {k: (r[k] if k == "run" else float(r[k]))
                 for k in ("run", "N", "D", "lr", "batch_tokens", "loss", "best_loss")}
                for _, r in self.band.iterrows()
            ],
            "warnings": list(self.warnings),
        }


def fit_stepfun_laws(
    runs: pd.DataFrame,
    *,
    tolerance: float = 0.0025,
    rel_tol: float = 0.1,
    level: float = 0.95,
    bootstrap: int = 1000,
    seed: int = 0,
    params: str = "total",
) -> StepFunLaws:
    """Fit Li et al.'s eta_opt(N, D) and B_opt(D) on a grid of runs with columns N, D, lr,
    loss and batch_tokens (or batch_size and seq_len), and a `run` name if there is one.

    Runs sharing N and D (within a factor 1 + rel_tol) form a cell; in each, the runs within
    `tolerance` of the cell's best loss are near-optimal, and both laws are fitted by least
    squares in log space over all of them (as DeepSeek LLM fit theirs over C).
    """
    df = _grid_runs(runs, ("N", "D", "lr", "batch_tokens", "loss"), min_points=4,
                    what="StepFun's hyperparameter laws", tolerance=tolerance)
    if "run" not in df.columns:
        df["run"] = [f"row {i}" for i in range(len(df))]
    n_cell, d_cell = group_budgets(df["N"], rel_tol), group_budgets(df["D"], rel_tol)
    df["cell"] = n_cell * (d_cell.max() + 1) + d_cell
    if len(np.unique(n_cell)) < 2 or len(np.unique(d_cell)) < 2:
        raise UserError(
            "StepFun's laws need runs at two or more model sizes and two or more token counts; "
            f"found {len(np.unique(n_cell))} and {len(np.unique(d_cell))}"
        )
    band, _, warns = _near_optimal(
        df, "cell", tolerance, lambda top: f"at N={top['N']:.3g}, D={top['D']:.3g}", "it"
    )
    return StepFunLaws(
        lr=_fit_loglinear(band, "lr", ("N", "D"), level, bootstrap, seed),
        batch=_fit_loglinear(band, "batch_tokens", ("D",), level, bootstrap, seed + 1),
        band=band,
        tolerance=tolerance,
        params=params,
        warnings=warns,
    )
