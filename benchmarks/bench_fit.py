"""Approach 3 benchmarks: the full-grid fit and the bootstrap beside a plain scipy loop.

On the 240 points of Epoch AI's chinchilla_epoch.csv (the 5 highest-loss points dropped, as
Besiroglu et al. 2024 do), read from the path in LAB_CHINCHILLA_CSV (the file has no licence and
is not in the repository); synthetic points from their law when it is not set. The
reference is `scipy.optimize.minimize(method="L-BFGS-B")` run start by start, as their notebook
runs it (finite-difference gradients), timed in the same process. In quick mode the scipy loop
runs on a random twentieth of the starts (bootstrap: 10 resamples) and the time is scaled up, as
the reference column says.

    .venv/bin/python -m benchmarks.bench_fit [--quick]
"""

from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import optimize

from analysis.approach3 import (
    NAMES,
    bootstrap_approach3,
    chinchilla_grid,
    fit_approach3,
    law,
)
from analysis.approach3_solver import huber_objective
from benchmarks.common import print_rows, row

CSV_ENV = "LAB_CHINCHILLA_CSV"
# Besiroglu et al. 2024 (arXiv:2404.10102), unrounded as their notebook prints them.
PUBLISHED = {"E": 1.81686, "A": 482.00572, "B": 2085.43420, "alpha": 0.34781, "beta": 0.36585}
NOTEBOOK_OBJECTIVE = 1.0182740346e-3  # their L-BFGS-B grid search, same objective and points


def _data() -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    path = os.environ.get(CSV_ENV, "")
    if path and Path(path).is_file():
        df = pd.read_csv(path)
        df = df.drop(index=df["loss"].nlargest(5).index)
        N = df["Model Size"].to_numpy()
        D = df["Training FLOP"].to_numpy() / (6 * N)
        return N, D, df["loss"].to_numpy(), "chinchilla_epoch.csv, 240 points"
    rng = np.random.default_rng(0)
    N = np.exp(rng.uniform(np.log(5e7), np.log(1.6e10), 240))
    D = np.exp(rng.uniform(np.log(2e8), np.log(3e11), 240))
    L = law(N, D, *(PUBLISHED[k] for k in NAMES)) * np.exp(rng.normal(0, 0.02, 240))
    return N, D, L, f"synthetic ({CSV_ENV} not set to chinchilla_epoch.csv), 240 points"


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def _scipy_grid(starts, N, D, L) -> float:
    best = np.inf
    for s in starts:
        res = optimize.minimize(huber_objective, s, args=(N, D, L), method="L-BFGS-B")
        best = min(best, res.fun)
    return best


def _fit_rows(N, D, L, source: str, quick: bool):
    """The full-grid fit timed cold and warm against scipy's loop over the same starts, its
    objective against scipy's best, and its parameters beside the published ones; returns
    (rows, the fit)."""
    grid = chinchilla_grid()
    rows = []

    fit, cold, cold_cpu = _timed(lambda: fit_approach3(N, D, L))
    fit, warm, warm_cpu = _timed(lambda: fit_approach3(N, D, L))
    # Quick: a seeded random twentieth of the starts (a regular stride picks unusual ones).
    pick = np.random.default_rng(0).choice(len(grid), len(grid) // 20, replace=False)
    subset = grid[np.sort(pick)] if quick else grid
    scipy_best, scipy_s, _ = _timed(lambda: _scipy_grid(subset, N, D, L))
    scale = len(grid) / len(subset)
    ref = "scipy L-BFGS-B loop over the same 4,500 starts"
    ref += f" ({len(subset)} timed, x{scale:.0f})" if quick else ""
    rows.append(
        row(
            "Approach 3 fit, full grid, first call",
            cold,
            "s",
            ref,
            scipy_s * scale,
            f"{source}; includes compilation; CPU {cold_cpu:.1f} s; target < 10 s",
        )
    )
    rows.append(
        row(
            "Approach 3 fit, full grid, warm",
            warm,
            "s",
            ref,
            scipy_s * scale,
            f"CPU {warm_cpu:.1f} s; {fit.n_converged} of 4500 starts converged, "
            f"at most {fit.max_iterations} iterations",
        )
    )
    rows.append(
        row(
            "Approach 3 best Huber objective",
            fit.objective,
            "",
            "best of the scipy loop" + (" (its subset of starts)" if quick else ""),
            scipy_best,
            f"published notebook: {NOTEBOOK_OBJECTIVE:.10e}",
        )
    )
    for k in NAMES:
        rows.append(
            row(
                f"Approach 3 {k}",
                getattr(fit, k),
                "",
                "Besiroglu et al. 2024 estimate",
                PUBLISHED[k],
                "published value, not measured here",
            )
        )
    return rows, fit


def _bootstrap_rows(fit, N, D, L, quick: bool) -> list[dict]:
    """The bootstrap timed cold and warm against scipy refits per resample."""
    rows = []
    k = 100 if quick else 1000
    boot, boot_s, boot_cpu = _timed(lambda: bootstrap_approach3(fit, N, D, L, n_samples=k))
    boot, warm_s, warm_cpu = _timed(lambda: bootstrap_approach3(fit, N, D, L, n_samples=k))
    rng = np.random.default_rng(0)
    n_ref = 10 if quick else 50

    def scipy_boot():
        for _ in range(n_ref):
            i = rng.integers(0, len(N), len(N))
            optimize.minimize(
                huber_objective, fit.theta, args=(N[i], D[i], L[i]), method="L-BFGS-B"
            )

    _, ref_s, _ = _timed(scipy_boot)
    ref = f"scipy L-BFGS-B from the optimum per resample ({n_ref} timed, x{k / n_ref:.0f})"
    lo, hi = boot.intervals["alpha"]
    rows.append(
        row(
            f"Approach 3 bootstrap, {k} resamples, first call",
            boot_s,
            "s",
            ref,
            ref_s * k / n_ref,
            f"includes compilation; CPU {boot_cpu:.1f} s; target < 120 s for 1000",
        )
    )
    rows.append(
        row(
            f"Approach 3 bootstrap, {k} resamples, warm",
            warm_s,
            "s",
            ref,
            ref_s * k / n_ref,
            f"CPU {warm_cpu:.1f} s; alpha 95% interval [{lo:.4f}, {hi:.4f}] "
            "(published [0.317, 0.373])",
        )
    )
    return rows


def run(quick: bool = False) -> list[dict]:
    N, D, L, source = _data()
    rows, fit = _fit_rows(N, D, L, source, quick)
    rows += _bootstrap_rows(fit, N, D, L, quick)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows.append(row("peak memory (maxrss)", peak, "MiB", "", None, "whole benchmark process"))
    return rows


if __name__ == "__main__":
    print_rows("fit", run(quick="--quick" in sys.argv))
