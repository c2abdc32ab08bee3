"""Scaling-law analysis: collect runs, fit Chinchilla's three approaches and hyperparameter laws.

    from analysis import collect_runs, fit_approach3
    runs = collect_runs("runs/")
    law = fit("approach3", runs, bootstrap=1000)  # or fit_approach3(N, D, loss, ...)
    law.compute_optimal([1e21, 1e22])

`fit(method, points, **options)` runs any registered method (`METHODS`: approach3, isoflop,
envelope, hparams, critical-batch, moe); `fit_downstream` is the two-step downstream law (`lab fit
--method downstream`); `analyse(method, load_inputs(paths), ...)` is one whole
`lab fit`, whose command-line face (lab.cli.fit.main) only parses and prints.
"""

from analysis.approach3 import (
    Approach3Fit,
    bootstrap_approach3,
    chinchilla_grid,
    compute_optimal,
    fit_approach3,
    law,
    optimal_allocation,
)
from analysis.approach3_solver import huber_objective
from analysis.downstream import DownstreamFit, fit_downstream
from analysis.envelope import EnvelopeFit, fit_envelope
from analysis.hparams import HparamLaws, fit_hparam_laws
from analysis.inputs import Inputs, load_inputs
from analysis.isoflop import IsoflopFit, fit_isoflop
from analysis.methods import METHODS, FitResult, Method, analyse, fit
from analysis.moe_law import MoEFit, dense_equivalent, fit_moe, moe_law
from analysis.output import format_table, jsonable
from analysis.points import check_points, drop_highest_loss, group_budgets, read_points_csv
from analysis.powerlaw import PowerLaw, fit_power_law
from analysis.runs import collect_curves, collect_runs, read_curve, read_run

__all__ = [
    "METHODS",
    "Approach3Fit",
    "DownstreamFit",
    "EnvelopeFit",
    "FitResult",
    "HparamLaws",
    "Inputs",
    "IsoflopFit",
    "Method",
    "MoEFit",
    "PowerLaw",
    "analyse",
    "bootstrap_approach3",
    "check_points",
    "chinchilla_grid",
    "collect_curves",
    "collect_runs",
    "compute_optimal",
    "dense_equivalent",
    "drop_highest_loss",
    "fit",
    "fit_approach3",
    "fit_downstream",
    "fit_envelope",
    "fit_hparam_laws",
    "fit_isoflop",
    "fit_moe",
    "fit_power_law",
    "format_table",
    "group_budgets",
    "huber_objective",
    "jsonable",
    "law",
    "load_inputs",
    "moe_law",
    "optimal_allocation",
    "read_curve",
    "read_points_csv",
    "read_run",
]
