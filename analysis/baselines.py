"""Naive predictions of the loss at (N, D), the yardsticks a fitted scaling law must beat.

Each baseline is fitted on the same points as the law and predicts the same query points; a
law that does not predict better than these has not earned its extrapolations.

- "log_linear": log L = c0 + c1 log N + c2 log D, least squares over the fitted points (a power
  law in N and D with no floor).
- "nearest": the loss of the fitted point nearest the query in (log N, log D), natural logs,
  unscaled (a factor e in N counts as much as a factor e in D).
- "two_point": per D, a straight line in (log N, log L) through the two largest fitted N at
  that D, continued to the query's N. "At that D" means: the fitted points whose D lies within
  a factor D_WINDOW (1.25) of the fitted D nearest the query's D in log D. Among those, the two
  largest distinct N are taken (for an N with several points there, the one whose D is nearest
  the query's). Where that window holds fewer than two distinct N, the baseline falls back to
  "nearest".
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from lab.errors import UserError

BASELINES = ("log_linear", "nearest", "two_point")
D_WINDOW = 1.25  # fitted points within this factor of the nearest fitted D share "that D"


def _logs(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    return (np.log(frame["N"].to_numpy(np.float64)), np.log(frame["D"].to_numpy(np.float64)))


def log_linear(fitted: pd.DataFrame, query: pd.DataFrame) -> np.ndarray:
    """log L linear in log N and log D by least squares (minimum-norm when the fitted points do
    not pin down both slopes, e.g. a single N)."""
    x, z = _logs(fitted)
    X = np.column_stack([np.ones_like(x), x, z])
    coef, *_ = np.linalg.lstsq(X, np.log(fitted["loss"].to_numpy(np.float64)), rcond=None)
    xq, zq = _logs(query)
    return np.exp(np.column_stack([np.ones_like(xq), xq, zq]) @ coef)


def nearest(fitted: pd.DataFrame, query: pd.DataFrame) -> np.ndarray:
    """The loss of the nearest fitted point in (log N, log D)."""
    x, z = _logs(fitted)
    xq, zq = _logs(query)
    dist = (xq[:, None] - x[None, :]) ** 2 + (zq[:, None] - z[None, :]) ** 2
    return fitted["loss"].to_numpy(np.float64)[np.argmin(dist, axis=1)]


def _two_point_one(x: np.ndarray, z: np.ndarray, y: np.ndarray, xq: float,
                   zq: float) -> float | None:
    """The two-point line's prediction for one query (log N, log D), or None without one."""
    z_near = z[np.argmin(np.abs(z - zq))]
    window = np.abs(z - z_near) <= np.log(D_WINDOW)
    best: dict[float, int] = {}  # log N -> index of its point with D nearest the query's
    for i in np.flatnonzero(window):
        if x[i] not in best or abs(z[i] - zq) < abs(z[best[x[i]]] - zq):
            best[x[i]] = i
    if len(best) < 2:
        return None
    x1, x2 = sorted(best)[-2:]
    i1, i2 = best[x1], best[x2]
    slope = (y[i2] - y[i1]) / (x2 - x1)
    return float(y[i2] + slope * (xq - x2))


def two_point(fitted: pd.DataFrame, query: pd.DataFrame) -> np.ndarray:
    """Per D, a line in log N through the two largest fitted N at that D (see the module's
    docstring for what "at that D" means); "nearest" where there is no such pair."""
    x, z = _logs(fitted)
    y = np.log(fitted["loss"].to_numpy(np.float64))
    xq, zq = _logs(query)
    fallback = nearest(fitted, query)
    out = np.empty(len(xq))
    for j in range(len(xq)):
        pred = _two_point_one(x, z, y, xq[j], zq[j])
        out[j] = fallback[j] if pred is None else np.exp(pred)
    return out


PREDICT = {"log_linear": log_linear, "nearest": nearest, "two_point": two_point}


def predict_baselines(fitted: pd.DataFrame, query: pd.DataFrame) -> dict[str, np.ndarray]:
    """Every baseline fitted on `fitted` and evaluated at `query` (both frames with columns N,
    D and loss; the query's loss is not read): name -> predicted loss per query row."""
    for name, frame in (("fitted", fitted), ("query", query)):
        missing = [c for c in ("N", "D") if c not in frame.columns]
        if missing:
            raise UserError(f"the baselines' {name} points lack column(s) {', '.join(missing)}")
    if len(fitted) == 0 or "loss" not in fitted.columns:
        raise UserError("the baselines need fitted points with N, D and loss")
    return {name: PREDICT[name](fitted, query) for name in BASELINES}
