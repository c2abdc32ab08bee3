"""Scaling-law analysis: collect runs, fit Chinchilla's three approaches and hyperparameter laws.

    from analysis import collect_runs, fit_approach3
    runs = collect_runs("runs/")
    fit = fit_approach3(runs["N"], runs["D"], runs["loss"], bootstrap=1000)
    fit.compute_optimal([1e21, 1e22])

`lab fit` (analysis.cli.main) is the command-line face of the same functions.
"""

from analysis.approach3 import (
    Approach3Fit,
    bootstrap_approach3,
    chinchilla_grid,
    compute_optimal,
    fit_approach3,
    huber_objective,
    law,
    optimal_allocation,
)
from analysis.envelope import EnvelopeFit, fit_envelope
from analysis.hparams import HparamLaws, fit_hparam_laws
from analysis.isoflop import IsoflopFit, fit_isoflop
from analysis.points import check_points, drop_highest_loss, group_budgets, read_points_csv
from analysis.powerlaw import PowerLaw, fit_power_law
from analysis.runs import collect_curves, collect_runs, read_curve, read_run

__all__ = [
    "Approach3Fit",
    "EnvelopeFit",
    "HparamLaws",
    "IsoflopFit",
    "PowerLaw",
    "bootstrap_approach3",
    "check_points",
    "chinchilla_grid",
    "collect_curves",
    "collect_runs",
    "compute_optimal",
    "drop_highest_loss",
    "fit_approach3",
    "fit_envelope",
    "fit_hparam_laws",
    "fit_isoflop",
    "fit_power_law",
    "group_budgets",
    "huber_objective",
    "law",
    "optimal_allocation",
    "read_curve",
    "read_points_csv",
    "read_run",
]
