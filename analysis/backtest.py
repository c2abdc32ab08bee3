"""How well does a law predict? A rolling-origin backtest by compute.

    bt = backtest(points, method="approach3", folds=4, level=0.9)
    bt.to_dict()["folds"][0]["law"]["mean_abs_error"]

Fold k fits the law on every point with C <= c_k and predicts every point with C > c_k, as a
user who had trained only up to c_k would have. The cuts are the compute budgets (points
grouped as analysis.points.group_budgets groups them; the largest budget is never a cut) when
the points fall into a few budgets, else quantiles of C (`folds` of them). The three naive
baselines of analysis.baselines are fitted on the same points and scored on the same
predictions. Errors are relative: predicted / measured - 1.

A method plugs in through PREDICTORS: a function from the fitted points to an object with
`predict(query)` (the loss at each query row) and `scale(query)` (the log-space standard error
of one new outcome there: the unit the interval's width is counted in). Approach 3 is
registered here; a method that predicts a loss some other way registers its own.

The folds also calibrate the intervals (analysis.predict, "calibrated"): every predicted point
gives a standardized score |log(y / ŷ)| / scale, with the fit of its own fold. A fold's own
coverage is that of the interval calibrated by the folds before it alone (scores of points at
or below its cut), so the coverage it reports is out of sample too; the first fold, with no
fold before it, reports the uncalibrated interval's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pandas as pd

from analysis.approach3 import chinchilla_grid, fit_approach3, law
from analysis.baselines import BASELINES, predict_baselines
from analysis.output import format_table, interval, warning_banner
from analysis.points import check_points, group_budgets
from analysis.predict import LossLaw, conformal_quantile, enough_scores, fit_record
from lab.errors import UserError

MIN_FIT_POINTS = 7  # Approach 3's five parameters and two degrees of freedom for its scatter
BUDGET_POINTS = 3  # points per budget on average, at least, for the cuts to be the budgets


class Fitted(Protocol):
    def predict(self, query: pd.DataFrame) -> np.ndarray: ...

    def scale(self, query: pd.DataFrame) -> np.ndarray: ...

    def interval(self, query: pd.DataFrame, level: float) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass
class Approach3Predictor:
    """Approach 3 fitted on a fold: its law's loss, residual scale and residual interval."""

    loss_law: LossLaw

    def predict(self, query: pd.DataFrame) -> np.ndarray:
        return law(query["N"].to_numpy(), query["D"].to_numpy(), *self.loss_law.theta)

    def scale(self, query: pd.DataFrame) -> np.ndarray:
        return self.loss_law.scale(query["N"].to_numpy(), query["D"].to_numpy())

    def interval(self, query: pd.DataFrame, level: float) -> tuple[np.ndarray, np.ndarray]:
        out = [self.loss_law.predict(n, d, level)
               for n, d in zip(query["N"], query["D"], strict=True)]
        return np.array([o[1] for o in out]), np.array([o[2] for o in out])


def coarse_grid() -> np.ndarray:
    """The published grid's starts with a in {0, 10, 20} and b in {5, 15, 25}, all of e, alpha
    and beta: 1,125 of its 4,500; each runs to convergence as in the full fit."""
    grid = chinchilla_grid()
    keep = np.isin(grid[:, 0], (0.0, 10.0, 20.0)) & np.isin(grid[:, 1], (5.0, 15.0, 25.0))
    return grid[keep]


def fit_approach3_fold(points: pd.DataFrame, starts: np.ndarray | None = None) -> Fitted:
    fit = fit_approach3(points["N"], points["D"], points["loss"], grid=starts)
    if fit.degenerate:
        raise UserError(f"the fit is degenerate ({fit.describe()})")
    record = fit.to_dict() | fit_record(fit, points["N"], points["D"], points["loss"])
    return Approach3Predictor(LossLaw.from_dict(record))


# name -> fit(points, starts) returning a Fitted; starts is None for the method's own default.
PREDICTORS: dict[str, Callable[..., Fitted]] = {"approach3": fit_approach3_fold}


def register_predictor(name: str, fit: Callable[..., Fitted]) -> None:
    """Let the backtest fit `name` on a fold: fit(points, starts) -> an object with
    predict(query), scale(query) and interval(query, level)."""
    if name in PREDICTORS:
        raise ValueError(f"backtest predictor {name!r} is registered twice")
    PREDICTORS[name] = fit


# ---------------------------------------------------------------------------------------------
# The cuts.


def fold_keys(points: pd.DataFrame, folds: int | None = None, rel_tol: float = 0.1,
              by_budget: bool | None = None) -> tuple[str, np.ndarray, list[float]]:
    """("budgets" | "quantiles", each point's compute key, the cuts ascending): fold k fits the
    points whose key is at most cut k and predicts the others.

    By budget (the points' `budget` column, else analysis.points.group_budgets), a point's key
    is the median C of its budget, and the cuts are every budget's key below the largest (the
    last `folds` of them when given). That is the rule for run directories (`by_budget` True),
    for a `budget` column, and for points where at least three quarters of the budgets hold
    BUDGET_POINTS points or more. Otherwise C is continuous (as in Chinchilla's digitised
    points): the key is C, and `folds` (default 4) cuts at its quantiles k / (folds + 1).
    """
    C = points["C"].to_numpy(np.float64)
    labels = (points["budget"].to_numpy() if "budget" in points.columns
              else group_budgets(C, rel_tol))
    names, index, sizes = np.unique(labels, return_inverse=True, return_counts=True)
    if by_budget is None:
        by_budget = "budget" in points.columns or np.mean(sizes >= BUDGET_POINTS) >= 0.75
    if not by_budget:
        k = folds or 4
        qs = np.quantile(C, np.arange(1, k + 1) / (k + 1))
        return "quantiles", C, sorted({float(q) for q in qs if (C > q).any()})
    if len(names) < 2:
        raise UserError("the backtest needs points at 2 or more compute budgets and all of "
                        "them share one; add runs at another budget")
    medians = np.array([np.median(C[index == i]) for i in range(len(names))])
    cuts = sorted(float(m) for m in medians)[:-1]
    return "budgets", medians[index], cuts[-folds:] if folds else cuts


# ---------------------------------------------------------------------------------------------
# Scoring.


def errors(predicted, measured, lo=None, hi=None, relative: bool = True) -> dict:
    """Relative errors (predicted / measured - 1), or absolute ones (predicted - measured, for
    accuracies): mean |e|, worst |e|, mean e (bias), and the fraction of measured values inside
    [lo, hi] (None without an interval)."""
    p, m = np.asarray(predicted, np.float64), np.asarray(measured, np.float64)
    e = p / m - 1.0 if relative else p - m
    coverage = None
    if lo is not None:
        y = np.asarray(measured, np.float64)
        coverage = float(np.mean((y >= lo) & (y <= hi)))
    return {"mean_abs_error": float(np.mean(np.abs(e))), "worst_abs_error": float(np.max(
        np.abs(e))), "bias": float(np.mean(e)), "coverage": coverage}


@dataclass
class Fold:
    cut: float
    n_fit: int
    n_predict: int
    extrapolation: dict
    law: dict
    baselines: dict
    interval: str  # "calibrated by K earlier scores" or the fold fit's own ("residual")
    key: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))  # predicted points
    scores: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))

    def to_dict(self) -> dict:
        return {"cut": self.cut, "n_fit": self.n_fit, "n_predict": self.n_predict,
                "extrapolation": self.extrapolation, "law": self.law,
                "baselines": self.baselines, "interval": self.interval}


def score_fold(points: pd.DataFrame, key: np.ndarray, cut: float,
               fitter: Callable[..., Fitted], starts, level: float,
               earlier: list[Fold]) -> Fold:
    """Fit on the points whose key is at most `cut`, predict the others, score the law and the
    baselines; the interval is calibrated by the `earlier` folds' scores at or below the cut."""
    fitted, query = points[key <= cut], points[key > cut]
    if len(fitted) < MIN_FIT_POINTS:
        raise UserError(f"{len(fitted)} points at or below the cut, {MIN_FIT_POINTS} needed")
    model = fitter(fitted, starts)
    pred, scale = model.predict(query), model.scale(query)
    y = query["loss"].to_numpy(np.float64)
    prior = np.concatenate([f.scores[f.key <= cut] for f in earlier] or [np.zeros(0)])
    if len(prior):
        half = conformal_quantile(prior, level) * scale
        lo, hi = pred * np.exp(-half), pred * np.exp(half)
        how = f"calibrated by {len(prior)} earlier scores"
    else:
        lo, hi = model.interval(query, level)
        how = "residual (uncalibrated: no earlier fold)"
    base = predict_baselines(fitted, query)
    extrapolation = {k: float(query[k].max() / fitted[k].max()) for k in ("C", "N", "D")}
    return Fold(cut=float(cut), n_fit=len(fitted), n_predict=len(query),
                extrapolation=extrapolation, law=errors(pred, y, lo, hi),
                baselines={b: errors(base[b], y) for b in BASELINES}, interval=how,
                key=key[key > cut], scores=np.abs(np.log(y / pred)) / np.maximum(scale, 1e-12))


# ---------------------------------------------------------------------------------------------
# The whole backtest.


@dataclass
class Backtest:
    method: str
    level: float
    mode: str  # how the cuts were chosen: "budgets", "quantiles" or "sizes" (distinct N)
    folds: list[Fold]
    skipped: list[dict]  # folds that could not be fitted: cut and reason
    # The naive baselines scored beside the law: name -> what it predicts, in words.
    baselines: dict[str, str] = field(default_factory=lambda: dict(BASELINE_WORDS))
    predicts: str = "unseen larger runs"  # what the folds predict, for the verdict
    error_kind: str = "relative (predicted / measured - 1)"  # how errors() measured them
    axis: str = "C"  # what the cuts cut: compute, or N for a law at one token count

    @property
    def scores(self) -> np.ndarray:
        """Every fold's standardized out-of-sample scores, which calibrate the intervals."""
        return np.concatenate([f.scores for f in self.folds])

    def summary(self) -> dict:
        """Each model's mean over folds of its mean |error|, and the baselines that beat the
        law on that measure."""
        mean = {"law": float(np.mean([f.law["mean_abs_error"] for f in self.folds]))}
        for b in self.baselines:
            mean[b] = float(np.mean([f.baselines[b]["mean_abs_error"] for f in self.folds]))
        losses = [b for b in self.baselines if mean[b] <= mean["law"]]
        folds_lost = sum(any(f.baselines[b]["mean_abs_error"] <= f.law["mean_abs_error"]
                             for b in self.baselines) for f in self.folds)
        return {"mean_abs_error": mean, "beaten_by": losses, "folds_lost": folds_lost}

    def verdict(self) -> str | None:
        """A plain warning when a naive baseline predicts as well as the law, else None."""
        s = self.summary()
        if not s["beaten_by"]:
            return None
        m = s["mean_abs_error"]
        best = min(s["beaten_by"], key=lambda b: m[b])
        return (f"the {self.method} law predicts {self.predicts} no better than a naive "
                f"guess: its mean error over the backtest's folds is {m['law']:.2%}, against "
                f"{m[best]:.2%} for the {best.replace('_', '-')} baseline "
                f"({self.baselines[best]}); do not trust its extrapolations until it beats it")

    def calibration(self) -> dict:
        """What analysis.predict needs to calibrate intervals: the scores, and how many."""
        return {"method": "split-conformal, scores |log(y/ŷ)| / scale from the backtest's "
                          "folds", "scores": self.scores.tolist(), "n_scores": len(self.scores),
                "multiplier": conformal_quantile(self.scores, self.level), "level": self.level}

    def to_dict(self) -> dict:
        return {"method": self.method, "level": self.level, "mode": self.mode,
                "folds": [f.to_dict() for f in self.folds], "skipped_folds": self.skipped,
                "summary": self.summary(), "verdict": self.verdict()}

    def describe(self) -> str:
        return describe_backtest(self)


BASELINE_WORDS = {
    "log_linear": "a straight line in log loss against log N and log D",
    "nearest": "the loss of the most similar run already trained",
    "two_point": "a line through the two largest runs at the same token count",
}


def backtest(points: pd.DataFrame, method: str = "approach3", *, folds: int | None = None,
             level: float = 0.95, rel_tol: float = 0.1, by_budget: bool | None = None,
             starts: np.ndarray | None = None) -> Backtest:
    """The rolling-origin backtest of `method` on points (columns N, D, C, loss; a `budget`
    column sets the budgets; `by_budget` as fold_keys takes it). `starts`: Approach 3's grid
    per fold (default coarse_grid())."""
    if method not in PREDICTORS:
        raise UserError(f"--backtest needs a method that predicts a loss at (N, D): "
                        f"{', '.join(PREDICTORS)}; {method} does not")
    if folds is not None and folds < 1:
        raise UserError(f"--folds must be at least 1, got {folds}")
    if not 0 < level < 1:
        raise UserError(f"--level must be between 0 and 1, got {level}")
    check_points(points, ("N", "D", "C", "loss"), min_points=MIN_FIT_POINTS + 1,
                 what="the backtest")
    points = points.sort_values("C").reset_index(drop=True)
    mode, key, cuts = fold_keys(points, folds, rel_tol, by_budget)
    starts = coarse_grid() if starts is None and method == "approach3" else starts
    done, skipped = run_folds(cuts, lambda cut, earlier: score_fold(
        points, key, cut, PREDICTORS[method], starts, level, earlier))
    return Backtest(method=method, level=level, mode=mode, folds=done, skipped=skipped)


def run_folds(cuts: list[float], fold: Callable[[float, list[Fold]], Fold],
              what: str = "the backtest", axis: str = "C") -> tuple[list[Fold], list[dict]]:
    """(folds, skipped): each cut's fold(cut, the folds before it), a cut whose fold cannot
    be fitted listed with its reason; refused when none can. `axis` names what the cuts cut."""
    done, skipped = [], []
    for cut in cuts:
        try:
            done.append(fold(cut, done))
        except UserError as err:
            skipped.append({"cut": float(cut), "reason": str(err)})
    if not done:
        why = "; ".join(f"{axis} <= {s['cut']:.3g}: {s['reason']}" for s in skipped) or "no cut"
        smaller = {"C": "budgets", "N": "sizes"}[axis]
        raise UserError(f"no fold of {what} could be fitted ({why}); add runs at the smaller "
                        f"{smaller}")
    return done, skipped


def describe_backtest(bt: Backtest) -> str:
    """The backtest as text: one row per fold, errors in percent, the verdict last."""
    by = {"C": "compute", "N": "model size"}[bt.axis]
    cuts = {"budgets": "budgets", "sizes": "sizes", "quantiles": "quantiles of C"}[bt.mode]
    head = (f"Backtest of {bt.method} by {by} ({len(bt.folds)} folds, cuts at the {cuts}): fit "
            f"on {bt.axis} <= cut, predict {bt.axis} > cut; errors {bt.error_kind}, "
            f"{bt.level:.0%} interval coverage")
    if all(f.law["coverage"] is None for f in bt.folds):
        head += " (none: the law gives no interval)"
    rows = []
    for f in bt.folds:
        x = f.extrapolation
        rows.append([f"{f.cut:.3g}", f.n_fit, f.n_predict,
                     f"{x['C']:.3g}/{x['N']:.3g}/{x['D']:.3g}",
                     _pct(f.law["mean_abs_error"]), _pct(f.law["worst_abs_error"]),
                     f"{f.law['bias']:+.2%}", _pct(f.law["coverage"]),
                     *(_pct(f.baselines[b]["mean_abs_error"]) for b in bt.baselines)])
    s = bt.summary()["mean_abs_error"]
    rows.append(["mean", "", "", "", _pct(s["law"]), "", "", "",
                 *(_pct(s[b]) for b in bt.baselines)])
    table = format_table([f"cut {bt.axis}", "fit", "predict", "x C/N/D", "law mean", "worst",
                          "bias", "coverage", *(f"{b} mean" for b in bt.baselines)], rows)
    out = [head, table]
    out += [f"fold at {bt.axis} <= {s_['cut']:.3g} skipped: {s_['reason']}" for s_ in bt.skipped]
    verdict = bt.verdict()
    out.append(f"WARNING: {verdict}" if verdict else
               f"the law beats every baseline (mean error {s['law']:.2%}, best baseline "
               f"{min(s[b] for b in bt.baselines):.2%})")
    if len(bt.scores) and not enough_scores(len(bt.scores), bt.level):
        out.append(f"note: {len(bt.scores)} backtest scores are too few for a {bt.level:.0%} "
                   "conformal interval; the calibrated interval uses the largest")
    return "\n".join(out)


def _pct(v: Any) -> str:
    return "-" if v is None else f"{v:.2%}"


def add_backtest(record: dict, text: str, bt: Backtest) -> str:
    """Add a backtest to one fit's record (`backtest`, the `calibration` of its intervals, and
    each compute-optimal budget's calibrated `loss_interval`) and to its text, a failing
    verdict first; returns the text."""
    record["backtest"] = bt.to_dict()
    if len(bt.scores):  # a law without a residual scale (downstream) is not calibrated
        record["calibration"] = bt.calibration()
    lines = [text, "", bt.describe()]
    calibrated = "calibration" in record and not record.get("degenerate")
    if calibrated and record.get("compute_optimal"):
        k = record["calibration"]["multiplier"]
        lines += ["", f"Loss of one run at each budget's optimum, {bt.level:.0%} interval "
                  f"calibrated by the backtest ({k:.3g} times the residual scale):"]
        lines.append(calibrated_table(LossLaw.from_dict(record), record["compute_optimal"],
                                      bt.level))
    verdict = bt.verdict()
    return "\n".join((warning_banner([verdict]) if verdict else []) + lines)


def calibrated_table(loss_law: LossLaw, optimal: list[dict], level: float) -> str:
    """Each compute-optimal record's calibrated interval, added to it and as a table."""
    rows = []
    for r in optimal:
        pred, lo, hi = loss_law.predict(r["N_opt"], r["D_opt"], level)
        r["loss_interval"] = [lo, hi]
        rows.append([r["C"], r["N_opt"], r["D_opt"], pred, interval((lo, hi))])
    return format_table(["C (FLOPs)", "N_opt", "D_opt", "loss", f"{level:.0%} interval"], rows)


def calibration_of(points: pd.DataFrame, level: float = 0.95) -> dict:
    """{"calibration": ...} from a backtest of Approach 3 on run directories' points, or {}
    where the points allow no backtest (one budget, too few points): the law's interval then
    stays uncalibrated, and `lab plan` says so."""
    try:
        return {"calibration": backtest(points, level=level, by_budget=True).calibration()}
    except UserError:
        return {}
