"""The rolling-origin backtest of a schedule law along one model's loss curves.

    bt = backtest_schedule(curves, law="schedule", folds=4, flops_per_step=6 * N * tokens)
    bt.to_dict()["folds"][-1]["law"]["mean_abs_error"]

The curves are one model's: a stable run first, then its branches (as `lab branch --predict`
reads them). Fold k fits the law (analysis.schedule_law, Tissue et al. 2024, or
analysis.multipower_law, Luo et al. 2025) on every curve point with at most cut_k updates done,
and predicts every later point of every curve from that curve's learning rates: what a user who
had trained only that far, and planned the rest of each schedule, would predict. The cuts are
quantiles k / (folds + 1) of the points' update counts; compute is flops_per_step times the
update count, the same for every curve of one model, so the cuts are cuts in compute too.

The baselines know a curve's past but not its schedule. A curve's past is its own points up to
the cut, after the stable run's points before the curve's first one (a branch shares the stable
run's trajectory until it branches):
- "log_linear": log L linear in log n through the curve's past points;
- "nearest": the last loss of the curve's past;
- "two_point": a line in (log n, log L) through the last two points of its past.
With a single point of past, log_linear and two_point fall back to nearest. The laws give no
prediction interval, so a fold's coverage is None.
"""

from __future__ import annotations

import numpy as np

from analysis.backtest import Backtest, Fold, errors
from analysis.multipower_law import fit_multipower_law
from analysis.schedule_law import Curve, fit_points, fit_schedule_law
from lab.errors import UserError, shown

SCHEDULE_LAWS = {"schedule": fit_schedule_law, "multipower": fit_multipower_law}
CURVE_BASELINES = {
    "log_linear": "log loss linear in log steps through the curve's past",
    "nearest": "the curve's last loss before the cut",
    "two_point": "a line in log steps through the curve's last two losses before the cut",
}
MIN_FIT_POINTS = 8  # points at or below a cut for a fold to be fitted


def _past(curves: list[Curve], curve: Curve, cut: float) -> tuple[np.ndarray, np.ndarray]:
    """A curve's points at or below the cut, after the stable run's before the curve's first."""
    stable = curves[0]
    first = curve.n.min() if len(curve.n) else np.inf
    inherit = (stable.n < first) & (stable.n <= cut) if curve is not stable else stable.n < 0
    own = curve.n <= cut
    n = np.concatenate([stable.n[inherit], curve.n[own]]).astype(np.float64)
    loss = np.concatenate([stable.loss[inherit], curve.loss[own]])
    return n[n > 0], loss[n > 0]


def _line(x: np.ndarray, y: np.ndarray, xq: np.ndarray) -> np.ndarray:
    slope, icept = np.polyfit(x, y, 1)
    return icept + slope * xq


def curve_baselines(n: np.ndarray, loss: np.ndarray, nq: np.ndarray) -> dict[str, np.ndarray]:
    """Each baseline's loss at the updates nq, from a curve's past (n, loss), n > 0 ascending."""
    last = np.full(len(nq), loss[-1])
    if len(n) < 2:
        return {"log_linear": last, "nearest": last, "two_point": last}
    x, y, xq = np.log(n), np.log(loss), np.log(nq)
    return {"log_linear": np.exp(_line(x, y, xq)), "nearest": last,
            "two_point": np.exp(_line(x[-2:], y[-2:], xq))}


def _fold(curves: list[Curve], law: str, cut: float, start: int,
          flops_per_step: float) -> Fold:
    fitted = [Curve(c.name, c.lr, c.n[c.n <= cut], c.loss[c.n <= cut]) for c in curves]
    n_fit = sum(int(np.sum(c.n >= start)) for c in fitted)
    if n_fit < MIN_FIT_POINTS:
        raise UserError(f"{n_fit} points at or below the cut, {MIN_FIT_POINTS} needed")
    model = SCHEDULE_LAWS[law](fitted, start=start)
    pred, measured, base = [], [], {b: [] for b in CURVE_BASELINES}
    for c in curves:
        later = c.n > cut
        n_past, loss_past = _past(curves, c, cut)
        if not later.any() or not len(n_past):
            continue
        pred.append(model.curve(c.lr)[c.n[later]])
        measured.append(c.loss[later])
        for name, guess in curve_baselines(n_past, loss_past, c.n[later]).items():
            base[name].append(guess)
    y, query_n = np.concatenate(measured), np.concatenate([c.n[c.n > cut] for c in curves])
    ratio = float(query_n.max() / max(max(c.n.max(initial=0) for c in fitted), 1))
    return Fold(cut=float(cut * flops_per_step), n_fit=n_fit, n_predict=len(y),
                extrapolation={"C": ratio, "N": 1.0, "D": ratio},
                law=errors(np.concatenate(pred), y),
                baselines={b: errors(np.concatenate(v), y) for b, v in base.items()},
                interval="none: the schedule law gives no interval")


def backtest_schedule(curves: list[Curve], law: str = "schedule", *, folds: int | None = None,
                      start: int = 1, flops_per_step: float = 1.0,
                      level: float = 0.95) -> Backtest:
    """The backtest of a schedule law (`law`: a key of SCHEDULE_LAWS) on one model's curves,
    the stable run first; `start` is the first update count the law is fitted from, and a
    fold's cut is reported in FLOPs (flops_per_step times the update count)."""
    if law not in SCHEDULE_LAWS:
        raise UserError(f"unknown schedule law {shown(law)}; choose one of "
                        f"{', '.join(SCHEDULE_LAWS)}")
    if folds is not None and folds < 1:
        raise UserError(f"--folds must be at least 1, got {folds}")
    fit_points(curves, start, f"{law} law", min_points=MIN_FIT_POINTS + 1)  # refuses early
    n_all = np.concatenate([c.n[c.n >= start] for c in curves]).astype(np.float64)
    k = folds or 4
    cuts = sorted({float(q) for q in np.quantile(n_all, np.arange(1, k + 1) / (k + 1))
                   if (n_all > q).any()})
    done, skipped = [], []
    for cut in cuts:
        try:
            done.append(_fold(curves, law, cut, start, flops_per_step))
        except UserError as err:
            skipped.append({"cut": float(cut * flops_per_step), "reason": str(err)})
    if not done:
        why = "; ".join(f"C <= {s['cut']:.3g}: {s['reason']}" for s in skipped)
        raise UserError(f"no fold of the {law} backtest could be fitted ({why}); train longer "
                        "or branch earlier, so that a decay ends before a cut")
    return Backtest(method=law, level=level, mode="quantiles", folds=done, skipped=skipped,
                    baselines=dict(CURVE_BASELINES), predicts="the later points of the curves")
