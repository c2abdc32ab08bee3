"""A fitted law against a whole held-out IsoFLOP budget (the demo's check).

    check = heldout_check(fitted, held, fit)

`fitted` holds the points the law was fitted to and `held` the held-out budget's runs, one row
per (size, seed), both with columns N, D and loss (`size` and `run` optional). The held-out
loss of a size is the mean over its seeds. The result (fit.json's `heldout`) has, per size,
the law's prediction with its bootstrap interval beside the measured loss and the three naive
baselines' predictions (analysis.baselines, fitted on the same points), their mean |relative
error|, the seed-to-seed spread, and where the budget's loss minimum over N lies: predicted by
the law along the budget, measured by a parabola in log N through the measured losses.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.approach3 import law

ERROR_GOAL = 0.01  # the law's mean |relative error| on the held-out budget (issue 21)
OPTIMUM_GOAL = 1.5  # the measured minimum within this factor of the predicted N


def parabola_minimum(n: np.ndarray, loss: np.ndarray) -> float | None:
    """The vertex of a parabola in log N through (N, loss) (least squares with more than three
    points; the IsoFLOP method's estimator), or None where it opens downwards."""
    if len(n) < 3:
        return None
    a, b, _ = np.polyfit(np.log(n), loss, 2)
    return float(np.exp(-b / (2 * a))) if a > 0 else None


def budget_line(n: np.ndarray, d: np.ndarray):
    """D as a function of N along the budget the points lie on: log D a line in log N through
    them (exactly C / 6N if the budget were 6ND; the lab's FLOP count also has attention, so
    its D falls a little faster)."""
    slope, icept = np.polyfit(np.log(n), np.log(d), 1)
    return lambda x: np.exp(icept + slope * np.log(x))


def law_minimum_along(n: np.ndarray, d: np.ndarray, params: tuple[float, ...]) -> float | None:
    """The N at which the law is lowest along the budget the points lie on (budget_line),
    searched up to 10x beyond their range; None if the minimum lies further out."""
    grid = np.geomspace(n.min() / 10, n.max() * 10, 4001)
    best = int(np.argmin(law(grid, budget_line(n, d)(grid), *params)))
    return float(grid[best]) if 0 < best < len(grid) - 1 else None


def _by_size(held: pd.DataFrame) -> pd.DataFrame:
    """One row per held-out size: N, D, the mean loss over seeds and each seed's loss."""
    rows = []
    for n, g in held.groupby("N", sort=True):
        g = g.sort_values("seed") if "seed" in g else g
        rows.append({"size": str(g["size"].iloc[0]) if "size" in g else f"N={n:.0f}",
                     "N": float(n), "D": float(g["D"].mean()), "loss": float(g["loss"].mean()),
                     "seed_losses": [float(x) for x in g["loss"]],
                     "seeds": [int(x) for x in g["seed"]] if "seed" in g else [],
                     "runs": [str(x) for x in g["run"]] if "run" in g else []})
    return pd.DataFrame(rows)


def _relative(predicted: np.ndarray, measured: np.ndarray) -> np.ndarray:
    return np.asarray(predicted, float) / measured - 1.0


def heldout_check(fitted: pd.DataFrame, held: pd.DataFrame, fit) -> dict:
    """The law (an Approach 3 fit, with bootstrap `samples` or without) against
    the held-out budget, point by point with the baselines; see the module's docstring."""
    from analysis.baselines import predict_baselines

    sizes = _by_size(held)
    n, d, measured = (sizes[k].to_numpy(float) for k in ("N", "D", "loss"))
    predicted = np.asarray(fit.predict(n, d), float)
    errors = _relative(predicted, measured)
    check = {
        "sizes": list(sizes["size"]), "N": list(n), "D": list(d), "C": list(6 * n * d),
        "predicted": list(predicted), "measured": list(measured),
        "measured_seeds": list(sizes["seed_losses"]), "seeds": list(sizes["seeds"]),
        "runs": list(sizes["runs"]), "errors": list(errors),
        "error": float(np.mean(np.abs(errors))), "bias": float(np.mean(errors)),
        "worst": float(np.max(np.abs(errors))),
    }
    if fit.samples is not None:
        s = fit.samples
        preds = law(n[None, :], d[None, :], *(s[:, i, None] for i in range(5)))
        lo, hi = np.nanquantile(preds, [(1 - fit.level) / 2, (1 + fit.level) / 2], axis=0)
        check["interval"] = [[float(a), float(b)] for a, b in zip(lo, hi, strict=True)]
        check["level"] = fit.level
    query = pd.DataFrame({"N": n, "D": d, "loss": measured})
    baseline = predict_baselines(fitted[["N", "D", "loss"]].reset_index(drop=True), query)
    check["baseline_predicted"] = {k: [float(x) for x in v] for k, v in baseline.items()}
    check["baseline_errors"] = {k: list(_relative(v, measured)) for k, v in baseline.items()}
    # NaN where a baseline cannot predict a point (fit.json writes null)
    check["baselines"] = {k: float(np.mean(np.abs(v)))
                          for k, v in check["baseline_errors"].items()}
    spreads = [(max(x) - min(x)) / np.mean(x) for x in sizes["seed_losses"] if len(x) > 1]
    check["seed_spreads"] = [float(x) for x in spreads]
    check["seed_spread"] = float(np.mean(spreads)) if spreads else None
    check.update(_optimum(n, d, measured, predicted, fit))
    check["extrapolation"] = [{k: float(v / fitted[k].max()) for k, v in
                               (("N", ni), ("D", di), ("C", 6 * ni * di))}
                              for ni, di in zip(n, d, strict=True)]
    check["beyond_both"] = [x["N"] > 1 and x["D"] > 1 for x in check["extrapolation"]]
    check["goal"] = {
        "error_below_1pct": check["error"] < ERROR_GOAL,
        "beats_every_baseline": all(not check["error"] >= v  # a NaN baseline loses
                                    for v in check["baselines"].values()),
        "optimum_within_1.5x": (check["optimum_ratio"] is not None
                                and 1 / OPTIMUM_GOAL <= check["optimum_ratio"] <= OPTIMUM_GOAL),
    }
    return check


def _optimum(n, d, measured, predicted, fit) -> dict:
    """Where the budget's loss is lowest over N: the law's minimum along the budget, the
    measured losses' parabola vertex, and (the same estimator on both) the vertex through the
    law's predictions at the measured sizes."""
    if len(n) < 3:
        return {"optimum_predicted_N": None, "optimum_measured_N": None, "optimum_ratio": None}
    predicted_n = law_minimum_along(n, d, (fit.E, fit.A, fit.B, fit.alpha, fit.beta))
    measured_n = parabola_minimum(n, measured)
    return {"optimum_predicted_N": predicted_n, "optimum_measured_N": measured_n,
            "optimum_predicted_N_parabola": parabola_minimum(n, predicted),
            "optimum_ratio": None if None in (measured_n, predicted_n)
            else measured_n / predicted_n,
            "optimum_measured_inside": measured_n is not None
            and bool(n.min() <= measured_n <= n.max())}
