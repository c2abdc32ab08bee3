"""The rolling-origin backtest of the MoE law (analysis.moe_law) by model size.

    bt = backtest_moe(points, folds=2, level=0.9)     # points: N (active), E, loss

Fold k fits the law on every point of the k smallest sizes and predicts every larger one, at
every expert count: what a user who had trained only the smaller models would predict. A size
is a group of active counts within `rel_tol` of each other (analysis.points.group_budgets; one
size's MoE runs differ from its dense run by their routers), cut at its median N; the cuts are
every size but the largest (the last `folds` of them when given).
The law holds at one token count, where training compute is proportional to N, so cuts in N are
the cuts in compute that analysis.backtest makes for Approach 3; its scoring and interval
calibration serve here unchanged (analysis.backtest.score_fold), with the expert count E where
they read the token count D, so the baselines are analysis.baselines' three in (N, E), as
MOE_BASELINES words them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.backtest import Backtest, Fold, run_folds, score_fold
from analysis.moe_law import SIZE_TOLERANCE, MoEFit, check_moe_points, fit_moe
from analysis.points import group_budgets
from lab.errors import UserError

MOE_BASELINES = {
    "log_linear": "a straight line in log loss against log N and log E (no interaction)",
    "nearest": "the loss of the largest smaller model with the same experts",
    "two_point": "per expert count, a line in log N through the two largest sizes",
}


class MoEPredictor:
    """A fold's MoE law, asked at query rows whose D column holds the expert count."""

    def __init__(self, fit: MoEFit):
        self.fit = fit

    def predict(self, query: pd.DataFrame) -> np.ndarray:
        return self.fit.predict(query["N"].to_numpy(), query["D"].to_numpy())

    def scale(self, query: pd.DataFrame) -> np.ndarray:
        return self.fit.scale(query["N"].to_numpy(), query["D"].to_numpy())

    def interval(self, query: pd.DataFrame, level: float) -> tuple[np.ndarray, np.ndarray]:
        return self.fit.interval(query["N"].to_numpy(), query["D"].to_numpy(), level)


def backtest_moe(points: pd.DataFrame, options: dict | None = None, *,
                 folds: int | None = None, level: float = 0.95,
                 rel_tol: float = SIZE_TOLERANCE) -> Backtest:
    """The backtest by N of the MoE law on points (N, E, loss); `options` are fit_moe's (the
    transform; the bootstrap is not used: a fold's interval is its residual one)."""
    transform = check_moe_points(points, (options or {}).get("transform", "auto"))
    if folds is not None and folds < 1:
        raise UserError(f"--folds must be at least 1, got {folds}")
    N = points["N"].to_numpy(np.float64)
    frame = pd.DataFrame({"N": N, "D": pd.to_numeric(points["E"]).to_numpy(np.float64),
                          "C": N, "loss": points["loss"].to_numpy(np.float64)})
    labels = group_budgets(N, rel_tol)
    medians = np.array([np.median(N[labels == i]) for i in range(labels.max() + 1)])
    key = medians[labels]
    cuts = sorted(medians.tolist())[:-1]
    cuts = cuts[-folds:] if folds else cuts

    def fitter(fitted: pd.DataFrame, _starts) -> MoEPredictor:
        return MoEPredictor(fit_moe(fitted.rename(columns={"D": "E"}), transform=transform,
                                    level=level))

    def fold(cut: float, earlier: list) -> Fold:
        scored = score_fold(frame, key, cut, fitter, None, level, earlier)
        ratio = float(N.max() / N[key <= cut].max())
        scored.extrapolation = {"C": ratio, "N": ratio, "D": 1.0}  # at one token count
        return scored

    done, skipped = run_folds(cuts, fold, "the MoE backtest", axis="N")
    return Backtest(method="moe", level=level, mode="sizes", folds=done, skipped=skipped,
                    baselines=dict(MOE_BASELINES), predicts="unseen larger models", axis="N")
