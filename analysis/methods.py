"""The fitting methods by name, registered once: what each fits, how it is described, plotted
and recorded. `lab fit`, `lab plan` and the study report all go through here.

    from analysis import fit
    law = fit("approach3", points, bootstrap=200)       # points: N, D, loss (and C)
    iso = fit("isoflop", points, rel_tol=0.1)

`analyse(method, inputs, ...)` is the whole of one `lab fit`: the fit on the table the method
reads, its record (JSON-ready) and its printed text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from analysis.approach3 import fit_approach3
from analysis.critical_batch import fit_critical_batch
from analysis.envelope import fit_envelope
from analysis.hparams import fit_hparam_laws, fit_stepfun_laws
from analysis.inputs import Inputs
from analysis.irreducible import approach3_caveats
from analysis.isoflop import fit_isoflop
from analysis.moe_backtest import backtest_moe
from analysis.moe_law import MoEFit, fit_moe
from analysis.output import format_table, interval, jsonable, warning_banner
from analysis.points import drop_highest_loss
from analysis.predict import fit_record
from lab.errors import UserError, shown


@dataclass(frozen=True)
class Method:
    """One way of fitting a scaling law.

    `fit(table, **options)` returns the fit object, which has `to_dict()` and `warnings`;
    `table` names what it reads from the inputs: "points" (one row per run), "curves" (every
    logged step of every run) or "batch_curves" (one model size's batch sweep). `options` are
    the keywords `fit` takes. `describe(fit)` is the text of its numbers; `allocation` says it
    answers compute_optimal(budgets); `plot(fit, table, out_dir, label)` writes its figures.
    """

    name: str
    fit: Callable[..., Any]
    table: str
    options: tuple[str, ...]
    describe: Callable[[Any], str]
    allocation: bool = False
    plot: Callable[..., list[str]] | None = None
    record: Callable[[Any, pd.DataFrame], dict] | None = None  # extra fields of the record
    # Warnings about its predictions at the budgets: caveats(fit, points, budgets).
    caveats: Callable[[Any, pd.DataFrame, list[float]], list[str]] | None = None
    tokens: bool = True  # it reads D: a CSV needs D or C (a law at one token count does not)
    params: str = "non_embedding"  # the parameter count that is a run's N by default
    # A backtest of its own, backtest(points, options, folds=, level=, rel_tol=) -> Backtest;
    # without, --backtest cuts by compute (analysis.backtest, for its PREDICTORS' methods).
    backtest: Callable[..., Any] | None = None


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"fit method {method.name!r} is registered twice")
    METHODS[method.name] = method
    return method


def method_named(name: str) -> Method:
    if name not in METHODS:
        raise UserError(f"unknown fit method {shown(name)}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def fit(method: str, points: pd.DataFrame, **options: Any) -> Any:
    """Fit `method` to a table (see Method.table for what each reads); returns its fit."""
    m = method_named(method)
    unknown = sorted(set(options) - set(m.options))
    if unknown:
        raise TypeError(f"fit method {method!r} takes the options {', '.join(m.options)}, not "
                        f"{', '.join(unknown)}")
    return m.fit(points, **options)


# ---------------------------------------------------------------------------------------------
# The hyperparameter laws: two forms, each fitted when the runs support it.


@dataclass
class HparamFits:
    """The hyperparameter laws a grid of runs supports: in C (DeepSeek), in N and D (StepFun)."""

    deepseek: Any | None
    stepfun: Any | None

    @property
    def warnings(self) -> list[str]:
        return [w for f in (self.deepseek, self.stepfun) if f is not None for w in f.warnings]

    def to_dict(self) -> dict:
        out = {"method": "hparams"}
        if self.deepseek is not None:
            out |= self.deepseek.to_dict()
        if self.stepfun is not None:
            out["stepfun"] = self.stepfun.to_dict()
        return out


def fit_hparams(points: pd.DataFrame, *, rel_tol: float = 0.1, level: float = 0.95,
                bootstrap: int = 0, seed: int = 0, params: str = "total") -> HparamFits:
    """Both forms of the hyperparameter laws; a form the runs cannot support is left out
    (intervals take 1,000 resamples of the groups unless `bootstrap` says otherwise)."""
    kw = {"rel_tol": rel_tol, "level": level, "bootstrap": bootstrap or 1000, "seed": seed}
    fits, why = {}, {}
    for name, fn, extra in (("deepseek", fit_hparam_laws, {}),
                            ("stepfun", fit_stepfun_laws, {"params": params})):
        try:
            fits[name] = fn(points, **kw, **extra)
        except UserError as err:
            fits[name], why[name] = None, str(err)
    if fits["deepseek"] is None and fits["stepfun"] is None:
        raise UserError(f"no hyperparameter law fits these runs: in C, {why['deepseek']}; in "
                        f"N and D, {why['stepfun']}")
    return HparamFits(**fits)


# ---------------------------------------------------------------------------------------------
# What each method prints.


def _law_rows(name: str, law) -> list[list]:
    return [
        [f"{name} exponent", law.exponent, interval(law.exponent_interval)],
        [f"{name} coefficient", law.coef, interval(law.coef_interval)],
    ]


def _describe_approach3(fit) -> str:
    head = (f"Approach 3 (parametric): {fit.n_points} points, {fit.n_starts} starts "
            f"({fit.n_converged} converged), Huber objective {fit.objective:.6e}")
    iv = fit.intervals
    rows = [[k, getattr(fit, k), interval(iv.get(k))] for k in ("E", "A", "B", "alpha", "beta")]
    rows += [
        ["a (N_opt ∝ C^a)", fit.a, interval(iv.get("a"))],
        ["b (D_opt ∝ C^b)", fit.b, interval(iv.get("b"))],
    ]
    if iv:
        table = format_table(["parameter", "value", f"{fit.level:.0%} interval"], rows)
    else:  # no bootstrap: no interval column
        table = format_table(["parameter", "value"], [r[:2] for r in rows])
    return f"{head}\n{table}"


def _describe_allocation_laws(title: str, count: int, what: str) -> Callable[[Any], str]:
    def describe(fit) -> str:
        rows = _law_rows("N_opt", fit.N_opt) + _law_rows("D_opt", fit.D_opt)
        table = format_table(["quantity", "value", f"{fit.N_opt.level:.0%} interval"], rows)
        return f"{title}: {count(fit)} {what}\n{table}"
    return describe


def _vertex_table(vertices: pd.DataFrame, keys: tuple[str, ...]) -> str:
    """Each group's optimum (the vertex of its quadratic), its curvature and any problem."""
    def cell(x):
        return "-" if pd.isna(x) else x
    return format_table(
        [*keys, "runs", "lr_opt", "batch_opt (tokens)", "loss at optimum", "curvature in ln lr",
         "problem"],
        [[*(r[k] for k in keys), int(r["n_runs"]), cell(r["lr_opt"]), cell(r["batch_opt"]),
          cell(r["loss_opt"]), cell(r["h_lr"]), r["problem"] or "-"]
         for _, r in vertices.iterrows()])


def _describe_hparams(fits: HparamFits) -> str:
    out, fit, sf = [], fits.deepseek, fits.stepfun
    how = ("the vertex of a quadratic in ln lr (and ln batch) per {group}, power laws through "
           "the vertices, intervals from resampling whole {group}s")
    if fit is not None:
        out.append(f"Hyperparameter laws in C (DeepSeek LLM's form): {len(fit.vertices)} "
                   f"budgets; {how.format(group='budget')}")
        rows = []
        for name, law in (("lr", fit.lr), ("batch (tokens)", fit.batch)):
            rows += _law_rows(name, law) if law is not None else [[name, "no law", ""]]
        rows += [["DeepSeek LLM lr", "0.3118·C^-0.1250", ""],
                 ["DeepSeek LLM batch", "0.2920·C^0.3271", ""]]
        level = (fit.lr or fit.batch).level
        out.append(format_table(["quantity", "value", f"{level:.0%} interval"], rows))
        out.append("each budget's optimum:")
        out.append(_vertex_table(fit.vertices, ("C",)))
    if sf is not None:
        out.append(f"\nHyperparameter laws in N and D (StepFun's form, Li et al. 2025): "
                   f"{len(sf.vertices)} (N, D) cells; {how.format(group='cell')}")
        rows = []
        for name, law in (("lr", sf.lr), ("batch (tokens)", sf.batch)):
            if law is None:
                rows.append([name, "no law", ""])
                continue
            rows.append([f"{name} coefficient", law.coef, interval(law.coef_interval)])
            for v, p, iv in zip(law.variables, law.exponents, law.exponent_intervals,
                                strict=True):
                rows.append([f"{name} exponent of {v}", p, interval(iv)])
        rows.append(["Li et al. 2025 lr", "1.79·N^-0.713·D^0.307", ""])
        rows.append(["Li et al. 2025 batch", "0.58·D^0.571", ""])
        level = (sf.lr or sf.batch).level
        out.append(format_table(["quantity", "value", f"{level:.0%} interval"], rows))
        out.append("each cell's optimum:")
        out.append(_vertex_table(sf.vertices, ("N", "D")))
    return "\n".join(out)


def _describe_critical_batch(fit) -> str:
    from analysis.noise_scale import describe_noise_scale

    out = []
    if fit.law is not None:
        law = fit.law
        out.append(f"Critical batch size (McCandlish et al. 2018): {len(fit.table)} target "
                   "losses")
        out.append(format_table(
            ["target loss", "S_min (steps)", "E_min (tokens)", "B_crit (tokens)", "batch sizes"],
            [[r["loss"], r["S_min"], r["E_min"], r["B_crit"], int(r["n_batches"])]
             for _, r in fit.table.iterrows()]))
        out.append(format_table(
            ["quantity", "value", f"{law.level:.0%} interval"],
            [["B_crit(L) exponent", law.exponent, interval(law.exponent_interval)],
             ["B_crit(L) coefficient", law.coef, interval(law.coef_interval)]]))
    if fit.noise is not None:
        out.append(describe_noise_scale(fit.noise))
    both = fit.comparison()
    if len(both):
        out.append("the batch sweep's critical batch against the noise scale (tokens):")
        out.append(format_table(
            ["target loss", "B_crit (sweep)", "B_noise (law)", "B_noise (measured)",
             "law / sweep", "measured / sweep"],
            [list(r) for r in both.itertuples(index=False)]))
    return "\n".join(out)


def allocation_table(opt: pd.DataFrame, label: str = "N", level: float | None = None) -> str:
    """The compute-optimal table; with bootstrap bounds (*_lo, *_hi) an interval column
    follows each quantity."""
    names = ["N_opt", "D_opt"] + (["loss"] if "loss" in opt.columns else [])
    ivs = level is not None and all(f"{n}_lo" in opt.columns for n in names)
    headers = ["C (FLOPs)"]
    for name in names:
        head = {"N_opt": f"N_opt, {label}", "D_opt": "D_opt (tokens)"}.get(name, name)
        headers += [head] + ([f"{level:.0%} interval"] if ivs else [])
        if name == "D_opt":
            headers.append("tokens/param")
    rows = []
    for _, r in opt.iterrows():
        row = [r["C"]]
        for name in names:
            row.append(r[name])
            if ivs:
                row.append(interval((r[f"{name}_lo"], r[f"{name}_hi"])))
            if name == "D_opt":
                row.append(r["D_opt"] / r["N_opt"])
        rows.append(row)
    return format_table(headers, rows)


def describe(method: str, fit, budgets: list[float], label: str = "N",
             caveats: list[str] = ()) -> str:
    """The printed report of one fit: warnings (the fit's, then its predictions' caveats)
    first, its numbers, the allocation it implies."""
    m = method_named(method)
    out = warning_banner([*fit.warnings, *caveats]) + [m.describe(fit)]
    if m.allocation:
        if getattr(fit, "degenerate", False):
            out.append("\nCompute-optimal allocation: not shown, the fit is degenerate")
        else:
            out.append("\nCompute-optimal allocation:")
            level = fit.level if getattr(fit, "samples", None) is not None else None
            out.append(allocation_table(fit.compute_optimal(budgets), label, level))
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# The registry. Plots import matplotlib only when asked for.


def _plot(name: str, *, data: bool = True) -> Callable[..., list[str]]:
    def plot(fit, table: pd.DataFrame, out_dir: str, label: str) -> list[str]:
        from analysis import plots

        fn = getattr(plots, name)
        return fn(fit, table, out_dir, label) if data else fn(fit, out_dir, label)
    return plot


def _plot_hparams(fits: HparamFits, table: pd.DataFrame, out_dir: str, label: str) -> list[str]:
    from analysis import plots

    if fits.deepseek is None:
        return []  # no figure for StepFun's laws yet
    return plots.plot_hparams(fits.deepseek, table, out_dir)


BOOTSTRAP = ("bootstrap", "seed", "level")

register(Method(
    name="approach3",
    fit=lambda points, **kw: fit_approach3(points["N"], points["D"], points["loss"], **kw),
    table="points", options=(*BOOTSTRAP, "max_iter"), describe=_describe_approach3,
    allocation=True, plot=_plot("plot_approach3"),
    record=lambda fit, points: fit_record(fit, points["N"], points["D"], points["loss"]),
    caveats=approach3_caveats))
register(Method(
    name="isoflop", fit=fit_isoflop, table="points", options=(*BOOTSTRAP, "rel_tol"),
    describe=_describe_allocation_laws("Approach 2 (IsoFLOP)", lambda f: len(f.budgets),
                                       "budgets"),
    allocation=True, plot=_plot("plot_isoflop", data=False)))
register(Method(
    name="envelope", fit=fit_envelope, table="curves", options=(*BOOTSTRAP, "n_bins", "smooth"),
    describe=_describe_allocation_laws("Approach 1 (envelope)", lambda f: len(f.frontier),
                                       "frontier points"),
    allocation=True, plot=_plot("plot_envelope")))
register(Method(
    name="hparams", fit=fit_hparams, table="points",
    options=(*BOOTSTRAP, "rel_tol", "params"), describe=_describe_hparams,
    plot=_plot_hparams))
register(Method(
    name="moe", fit=fit_moe, table="points", options=(*BOOTSTRAP, "transform", "at", "params"),
    describe=MoEFit.report, tokens=False, params="active", backtest=backtest_moe))
register(Method(
    name="critical-batch", fit=fit_critical_batch, table="batch_curves",
    options=("level", "targets", "window"), describe=_describe_critical_batch))


# ---------------------------------------------------------------------------------------------
# One whole analysis: what `lab fit` does after reading its arguments.


def planned_runs(points: pd.DataFrame) -> pd.DataFrame:
    """The rows of runs that `lab plan` planned (a predicted loss in their summary)."""
    if "predicted_loss" not in points.columns:
        return points.iloc[:0]
    pred = pd.to_numeric(points["predicted_loss"], errors="coerce")
    return points[np.isfinite(pred) & (pred > 0)]


def describe_predictions(runs: pd.DataFrame) -> str:
    """Every planned run (one whose summary carries a predicted loss) against its outcome."""
    rows, inside = [], 0
    for _, r in runs.sort_values("C").iterrows():
        lo, hi = r["predicted_lo"], r["predicted_hi"]
        hit = bool(lo <= r["loss"] <= hi) if np.isfinite(lo) and np.isfinite(hi) else None
        inside += bool(hit)
        rows.append([str(r["run"]), r["N"], r["D"], r["predicted_loss"], interval((lo, hi)),
                     r["loss"], f"{r['loss'] / r['predicted_loss'] - 1:+.2%}",
                     "-" if hit is None else ("yes" if hit else "NO")])
    head = (f"Planned runs (lab plan): prediction against outcome, {inside} of {len(rows)} "
            "inside their intervals")
    return head + "\n" + format_table(
        ["run", "N", "D", "predicted", "interval", "outcome", "error", "inside"], rows)


@dataclass
class FitResult:
    """One analysis: the fit object, its JSON-ready record and its printed text."""

    fit: Any
    record: dict
    text: str


def analyse(method: str, inputs: Inputs, *, options: dict | None = None,
            budgets: list[float] | None = None, drop_highest: int = 0,
            curve_loss: str = "loss", params: str = "non_embedding",
            plots_dir: str | None = None, sources: list[str] = (),
            backtest: dict | None = None) -> FitResult:
    """Fit `method` to the inputs and describe it. `budgets` (FLOPs) are where the allocation
    is reported (default: the largest compute in the data times 1, 10 and 100); the K highest-
    loss points are left out first with `drop_highest`; `plots_dir` receives the figures;
    `backtest` (the keywords of analysis.backtest.backtest) adds its backtest and calibrates
    the prediction intervals by it."""
    try:
        return _analyse(method_named(method), inputs, options or {}, budgets, drop_highest,
                        curve_loss, params, plots_dir, list(sources), backtest)
    except UserError as err:
        parents = sum("stable" in why for _, why in inputs.skipped)
        if not parents:
            raise
        raise UserError(f"{err} ({parents} undecayed stable run(s) with branches were left "
                        "out; --include-stable-parents keeps them)") from None


def _analyse(m: Method, inputs: Inputs, options: dict, budgets: list[float] | None,
             drop_highest: int, curve_loss: str, params: str, plots_dir: str | None,
             sources: list[str], backtest: dict | None = None) -> FitResult:
    points = drop_highest_loss(inputs.points, drop_highest)
    checked = None
    if backtest is not None and m.backtest is not None:  # folds of its own
        from analysis.backtest import add_backtest

        checked = m.backtest(points, options, **backtest)
    elif backtest is not None:  # first: its mistakes are found before the full fit
        from analysis.backtest import add_backtest
        from analysis.backtest import backtest as run_backtest

        by_budget = True if inputs.csv.empty else None  # run directories: cut at budgets
        checked = run_backtest(points, m.name, by_budget=by_budget, **backtest)
    tables = {"points": lambda: points, "curves": lambda: inputs.curves(curve_loss),
              "batch_curves": lambda: inputs.batch_curves(curve_loss)}
    data = tables[m.table]()
    result = fit(m.name, data, **options)
    if m.allocation:
        budgets = budgets or [float(points["C"].max()) * k for k in (1, 10, 100)]
    record = result.to_dict()
    record["params"] = params  # which parameter count N is, for lab plan
    if m.record is not None:
        record |= m.record(result, points)
    if m.allocation:
        record["compute_optimal"] = result.compute_optimal(budgets).to_dict(orient="records")
    caveats = m.caveats(result, points, budgets) if m.caveats is not None else []
    if caveats:  # the report's banner reads the record's warnings
        record["warnings"] = [*record.get("warnings", []), *caveats]
    record["N_definition"] = inputs.n_label
    planned = planned_runs(points)
    record["planned_runs"] = planned[
        ["run", "N", "D", "C", "loss", "predicted_loss", "predicted_lo", "predicted_hi"]
    ].to_dict(orient="records") if len(planned) else []
    record["inputs"] = sources
    record["skipped_runs"] = [{"run": r, "reason": why} for r, why in inputs.skipped]
    if plots_dir and m.plot is not None:
        record["plots"] = m.plot(result, data, plots_dir, inputs.n_label)
    elif plots_dir:
        record["plots"] = []
    text = describe(m.name, result, budgets, inputs.n_label, caveats)
    if checked is not None:
        text = add_backtest(record, text, checked)
    if len(planned):
        text += "\n\n" + describe_predictions(planned)
    return FitResult(result, jsonable(record), text)
