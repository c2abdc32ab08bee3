"""The rolling-origin backtest of the downstream law by compute.

    bt = backtest_downstream(points, chance=0.25, folds=3)    # N, D, C, task_loss, accuracy
    bt.to_dict()["folds"][-1]["law"]["mean_abs_error"]        # in accuracy (0.02 = 2 points)

As analysis.backtest does for the loss laws: fold k fits both steps of the law (with the
coarse grid of Approach 3 starts, and as many bootstrap refits for its interval as the full
fit) on every point with
C <= c_k, and predicts the accuracy of every point beyond, cut at the budgets or at quantiles
of C (analysis.backtest.fold_keys). Errors are absolute, predicted - measured accuracy.
The baselines know the same points:
- "log_linear": accuracy linear in log N and log D, least squares;
- "nearest": the accuracy of the fitted point nearest in (log N, log D);
- "loss_linear": accuracy linear in task loss through the fitted points, at the task loss
  that the fold's own step 1 predicts: the law with a line where the sigmoid is.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.backtest import Backtest, Fold, coarse_grid, errors, fold_keys, run_folds
from analysis.baselines import nearest
from analysis.downstream import (
    DEFAULT_BOOTSTRAP,
    MIN_POINTS,
    check_task_points,
    fit_downstream,
)
from analysis.points import check_points
from lab.errors import UserError

ACCURACY_BASELINES = {
    "log_linear": "accuracy linear in log N and log D",
    "nearest": "the accuracy of the most similar run already trained",
    "loss_linear": "accuracy linear in task loss, at the law's predicted task loss",
}
MIN_FIT_POINTS = MIN_POINTS + 1  # points at or below a cut for a fold to be fitted


def _line(X: np.ndarray, y: np.ndarray, Xq: np.ndarray) -> np.ndarray:
    """Least squares of y on [1, X], evaluated at Xq (minimum-norm where X is degenerate)."""
    coef, *_ = np.linalg.lstsq(np.column_stack([np.ones(len(X)), X]), y, rcond=None)
    return np.column_stack([np.ones(len(Xq)), Xq]) @ coef


def accuracy_baselines(fitted: pd.DataFrame, query: pd.DataFrame,
                       task_loss: np.ndarray) -> dict[str, np.ndarray]:
    """Each baseline's accuracy at the query rows (clipped to [0, 1]); `task_loss` is the
    fold's predicted task loss there."""
    acc = fitted["accuracy"].to_numpy(np.float64)
    logs = np.log(fitted[["N", "D"]].to_numpy(np.float64))
    logs_q = np.log(query[["N", "D"]].to_numpy(np.float64))
    out = {"log_linear": _line(logs, acc, logs_q),
           "nearest": nearest(fitted.assign(loss=acc), query),
           "loss_linear": _line(fitted[["task_loss"]].to_numpy(np.float64), acc,
                                np.asarray(task_loss, np.float64)[:, None])}
    return {k: np.clip(v, 0.0, 1.0) for k, v in out.items()}


def _fold(points: pd.DataFrame, key: np.ndarray, cut: float, chance: float, level: float,
          bootstrap: int, seed: int) -> Fold:
    fitted, query = points[key <= cut], points[key > cut]
    if len(fitted) < MIN_FIT_POINTS:
        raise UserError(f"{len(fitted)} points at or below the cut, {MIN_FIT_POINTS} needed")
    law = fit_downstream(fitted, chance, bootstrap=bootstrap, seed=seed, level=level,
                         grid=coarse_grid())
    if law.loss_law.degenerate:
        raise UserError(f"the task loss law is degenerate ({law.loss_law.describe()})")
    pred = law.predict(query["N"], query["D"], seed=seed)
    y = query["accuracy"].to_numpy(np.float64)
    base = accuracy_baselines(fitted, query, pred["task_loss"].to_numpy())
    extrapolation = {k: float(query[k].max() / fitted[k].max()) for k in ("C", "N", "D")}
    return Fold(cut=float(cut), n_fit=len(fitted), n_predict=len(query),
                extrapolation=extrapolation,
                law=errors(pred["accuracy"], y, pred["lo"], pred["hi"], relative=False),
                baselines={b: errors(v, y, relative=False) for b, v in base.items()},
                interval=f"bootstrap ({bootstrap} refits of both steps)")


def backtest_downstream(points: pd.DataFrame, chance: float, *, folds: int | None = None,
                        level: float = 0.95, rel_tol: float = 0.1,
                        by_budget: bool | None = None, bootstrap: int = DEFAULT_BOOTSTRAP,
                        seed: int = 0) -> Backtest:
    """The backtest of the downstream law on points (N, D, C, task_loss, accuracy; a
    `budget` column sets the budgets; `by_budget` as analysis.backtest.fold_keys takes it);
    each fold's interval from `bootstrap` refits of both steps."""
    if folds is not None and folds < 1:
        raise UserError(f"--folds must be at least 1, got {folds}")
    check_task_points(points, chance)
    check_points(points, ("C",), min_points=MIN_FIT_POINTS + 1, what="the downstream backtest")
    points = points.sort_values("C").reset_index(drop=True)
    mode, key, cuts = fold_keys(points, folds, rel_tol, by_budget)
    done, skipped = run_folds(cuts, lambda cut, _: _fold(points, key, cut, chance, level,
                                                         bootstrap, seed),
                              "the downstream backtest")
    return Backtest(method="downstream", level=level, mode=mode, folds=done, skipped=skipped,
                    baselines=dict(ACCURACY_BASELINES),
                    predicts="the accuracy of unseen larger runs",
                    error_kind="absolute in accuracy (predicted - measured; 1.00% = 1 point)")
