"""`lab fit`: fit scaling laws to run directories or CSV files and print what they imply.

    lab fit INPUT... [--method approach3|isoflop|envelope|hparams|critical-batch]
                     [--bootstrap K] [--json OUT] [--plots DIR]

An INPUT is a run directory (searched recursively for summary.json) or a CSV with columns N,
loss and either D or C (then D = C / 6N); Epoch AI's `Model Size`, `Training FLOP`, `loss`
layout is read as well. `lab.cli` dispatches here and turns a UserError into exit status 2.
Runs that `lab plan` planned carry a predicted loss; every fit prints it against the outcome.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis import paths
from analysis.approach3 import fit_approach3
from analysis.critical_batch import fit_critical_batch
from analysis.envelope import fit_envelope
from analysis.hparams import fit_hparam_laws, fit_stepfun_laws
from analysis.isoflop import fit_isoflop
from analysis.points import drop_highest_loss, read_points_csv
from analysis.predict import fit_record
from analysis.runs import collect_curves, collect_runs, read_curve
from lab.errors import UserError

METHODS = ("approach3", "isoflop", "envelope", "hparams", "critical-batch")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line as a UserError (one line, exit status 2)."""

    def error(self, message: str):
        raise UserError(f"lab fit: {message}; see lab fit --help")


def _budgets(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text}") from None
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"budgets must be positive FLOP counts: {text}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="lab fit",
        description="Fit scaling laws (Chinchilla approaches 1-3, hyperparameter laws) to runs.",
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="run directory (searched recursively for summary.json) or CSV with columns N, "
        "loss and D or C",
    )
    p.add_argument(
        "--method",
        choices=METHODS,
        default="approach3",
        help="approach3: parametric L(N, D) (default); isoflop: approach 2; "
        "envelope: approach 1 on training curves; hparams: LR and batch laws in C (DeepSeek) "
        "and in N, D (StepFun); critical-batch: B_crit(L) from a batch sweep's curves",
    )
    p.add_argument(
        "--bootstrap",
        type=int,
        default=0,
        metavar="K",
        help="resample the points K times for confidence intervals (default: none)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    p.add_argument("--level", type=float, default=0.95, help="interval level (default 0.95)")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON to OUT")
    p.add_argument("--plots", metavar="DIR", help="write PNG figures into DIR")
    p.add_argument(
        "--budgets",
        type=_budgets,
        metavar="C1,C2,...",
        help="compute budgets (FLOPs) to report the optimal N, D for; default: the "
        "largest in the data times 1, 10 and 100",
    )
    p.add_argument(
        "--drop-highest-loss",
        type=int,
        default=0,
        metavar="K",
        help="leave out the K highest-loss points first (Besiroglu et al. drop 5)",
    )
    p.add_argument(
        "--include-unfinished", action="store_true", help="keep runs whose status is not finished"
    )
    p.add_argument(
        "--params",
        choices=("non_embedding", "total"),
        default="non_embedding",
        help="which parameter count of a run is N (default: non_embedding, as sweeps and the "
        "demo count it; total as Chinchilla). A CSV's N is taken as it is",
    )
    p.add_argument(
        "--include-stable-parents",
        action="store_true",
        help="keep an undecayed stable run whose branches are among the inputs (left out by "
        "default: its loss is not that of a finished schedule)",
    )
    p.add_argument(
        "--budget-tolerance",
        type=float,
        default=0.1,
        metavar="R",
        help="runs within a factor 1+R in compute share a budget (default 0.1)",
    )
    p.add_argument(
        "--bins", type=int, default=30, help="log-uniform compute bins of the envelope (default 30)"
    )
    p.add_argument(
        "--curve-loss", default="loss", help="metrics.jsonl field the envelope reads (default loss)"
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=0.0025,
        help="near-optimal band of the hparam laws (default 0.0025 = 0.25%%)",
    )
    return p


@dataclass
class HparamFits:
    """The hyperparameter laws a grid of runs supports: in C (DeepSeek), in N and D (StepFun)."""

    deepseek: object | None
    stepfun: object | None

    def to_dict(self) -> dict:
        out = {"method": "hparams"}
        if self.deepseek is not None:
            out |= self.deepseek.to_dict()
        if self.stepfun is not None:
            out["stepfun"] = self.stepfun.to_dict()
        return out


def _fit_hparams(points: pd.DataFrame, args: argparse.Namespace) -> HparamFits:
    kw = {"tolerance": args.tolerance, "rel_tol": args.budget_tolerance, "level": args.level}
    fits, why = {}, {}
    for name, fn, extra in (
        ("deepseek", fit_hparam_laws, {}),
        ("stepfun", fit_stepfun_laws,
         {"bootstrap": args.bootstrap or 1000, "seed": args.seed, "params": args.params}),
    ):
        try:
            fits[name] = fn(points, **kw, **extra)
        except UserError as err:
            fits[name], why[name] = None, str(err)
    if fits["deepseek"] is None and fits["stepfun"] is None:
        raise UserError(f"no hyperparameter law fits these runs: in C, {why['deepseek']}; in "
                        f"N and D, {why['stepfun']}")
    return HparamFits(**fits)


def _batch_curves(inputs: Inputs, loss: str) -> pd.DataFrame:
    """Loss curves (run, step, loss, batch_tokens) of one model size's batch-size sweep."""
    runs = inputs.runs
    if runs.empty:
        raise UserError("the critical batch fit reads loss curves; give run directories")
    if runs["N"].nunique() > 1:
        sizes = ", ".join(f"{n:.3g}" for n in sorted(runs["N"].unique()))
        raise UserError(f"the critical batch fit takes one model size, got N = {sizes}; give "
                        "the runs of one size")
    parts = []
    for _, r in runs.iterrows():
        curve = read_curve(r["run"])
        if not {"step", loss} <= set(curve.columns):
            raise UserError(f"{r['run']}/metrics.jsonl lacks step or {loss}")
        parts.append(curve[["step", loss]].rename(columns={loss: "loss"})
                     .assign(run=r["run"], batch_tokens=r["batch_tokens"]))
    return pd.concat(parts, ignore_index=True)


@dataclass
class Inputs:
    """What the INPUT arguments hold: every run and CSV row as a point (N, D, C, loss, ...);
    the run-directory part (for training curves) and the CSV part; runs left out."""

    points: pd.DataFrame
    runs: pd.DataFrame
    csv: pd.DataFrame
    skipped: list
    n_label: str = "N"  # what N counts, for table headers and axes


def n_label(params: str, runs: bool, csv: bool) -> str:
    """What N counts, as table headers and axes name it."""
    kinds = ([f"{params.replace('_', '-')} parameters"] if runs else []) + (
        ["as in the CSV"] if csv else [])
    return f"N ({', '.join(kinds)})"


def _key(path: str) -> str:
    """A run directory's path in one spelling, to match a branch's `parent` with its run."""
    return path.rstrip("/") if paths.is_remote(path) else os.path.realpath(path)


def drop_stable_parents(runs: pd.DataFrame) -> tuple[pd.DataFrame, list]:
    """Leave out undecayed stable runs whose branches are in the table: their final loss is
    taken at a constant learning rate, so it sits above the law the decayed branches follow."""
    parents = {_key(str(p)) for p in runs["parent"].dropna()}
    stable = runs["stable"].fillna(False).astype(bool)
    drop = stable & runs["run"].map(lambda r: _key(str(r)) in parents)
    skipped = [(r, "an undecayed stable run whose branches are fitted instead")
               for r in runs.loc[drop, "run"]]
    return runs[~drop].reset_index(drop=True), skipped


def load_inputs(
    inputs: list[str],
    *,
    include_unfinished: bool = False,
    params: str = "non_embedding",
    include_stable_parents: bool = False,
) -> Inputs:
    """Read run directories and CSV files into one points table."""
    run_frames, csv_frames, skipped = [], [], []
    for item in inputs:
        if not paths.exists(item):
            raise UserError(f"no such file or directory: {item}; give a run directory or a CSV")
        if paths.is_dir(item):
            runs = collect_runs(item, include_unfinished=include_unfinished)
            skipped += runs.attrs.get("skipped", [])
            if params == "non_embedding":
                runs["N"] = runs["non_embedding_params"]
            # A run without flops in its summary: C = 6 N D.
            runs["C"] = runs["C"].fillna(6.0 * runs["N"] * runs["D"])
            run_frames.append(runs.assign(source=item))
        else:
            csv_frames.append(read_points_csv(item))
    runs = pd.concat(run_frames, ignore_index=True) if run_frames else pd.DataFrame()
    if not runs.empty and not include_stable_parents:
        runs, left = drop_stable_parents(runs)
        skipped += left
    csv = pd.concat(csv_frames, ignore_index=True) if csv_frames else pd.DataFrame()
    parts = [f for f in (runs, csv) if not f.empty]
    if not parts:
        raise UserError(
            "no finished runs in the inputs; pass --include-unfinished or check the paths"
        )
    points = pd.concat(parts, ignore_index=True)
    label = n_label(params, not runs.empty, not csv.empty)
    return Inputs(points=points, runs=runs, csv=csv, skipped=skipped, n_label=label)


def _curves(inputs: Inputs, loss: str) -> pd.DataFrame:
    """Training-curve points: metrics.jsonl of run directories; CSV rows as they are (a `run`
    column groups rows into curves, otherwise each row is its own)."""
    parts = []
    if not inputs.runs.empty:
        parts.append(collect_curves(inputs.runs, loss=loss))
    if not inputs.csv.empty:
        rows = inputs.csv.copy()
        if "run" not in rows.columns:
            rows["run"] = [f"{src}:{i}" for i, src in enumerate(rows["source"])]
        parts.append(rows[["run", "N", "D", "C", "loss"]])
    return pd.concat(parts, ignore_index=True)


# ---------------------------------------------------------------------------------------------
# Printing.


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, (int, np.integer)):
        return str(v)
    v = float(v)
    return f"{v:.4g}" if 1e-3 <= abs(v) < 1e5 or v == 0 else f"{v:.4e}"


def format_table(headers: list[str], rows: list[list]) -> str:
    """Rows of values as an aligned text table."""
    cells = [[str(h) for h in headers]] + [
        [c if isinstance(c, str) else _fmt(c) for c in row] for row in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _interval(iv) -> str:
    if iv is None or not all(math.isfinite(x) for x in iv):
        return "-"
    return f"[{_fmt(iv[0])}, {_fmt(iv[1])}]"


def _law_rows(name: str, law) -> list[list]:
    return [
        [f"{name} exponent", law.exponent, _interval(law.exponent_interval)],
        [f"{name} coefficient", law.coef, _interval(law.coef_interval)],
    ]


def _allocation_table(opt: pd.DataFrame, label: str = "N", level: float | None = None) -> str:
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
                row.append(_interval((r[f"{name}_lo"], r[f"{name}_hi"])))
            if name == "D_opt":
                row.append(r["D_opt"] / r["N_opt"])
        rows.append(row)
    return format_table(headers, rows)


def warning_banner(warnings: list[str]) -> list[str]:
    """The fit's warnings as the first lines of a report: visible before any number."""
    if not warnings:
        return []
    rule = "!" * 78
    head = f"WARNING: {len(warnings)} problem(s) with this fit; read its numbers with care"
    return [rule, head, *(f"  - {w}" for w in warnings), rule, ""]


def _fit_warnings(fit) -> list[str]:
    if isinstance(fit, HparamFits):
        return [w for f in (fit.deepseek, fit.stepfun) if f is not None for w in f.warnings]
    return list(fit.warnings)


def _report(method: str, fit, budgets: list[float], label: str = "N") -> str:
    out = warning_banner(_fit_warnings(fit))
    if method == "critical-batch":
        return "\n".join(out + [_critical_report(fit)])
    if method == "hparams":
        return "\n".join(out + [_hparams_report(fit)])
    if method == "approach3":
        out.append(
            f"Approach 3 (parametric): {fit.n_points} points, {fit.n_starts} starts "
            f"({fit.n_converged} converged), Huber objective {fit.objective:.6e}"
        )
        iv = fit.intervals
        rows = [
            [k, getattr(fit, k), _interval(iv.get(k))] for k in ("E", "A", "B", "alpha", "beta")
        ]
        rows += [
            ["a (N_opt ∝ C^a)", fit.a, _interval(iv.get("a"))],
            ["b (D_opt ∝ C^b)", fit.b, _interval(iv.get("b"))],
        ]
        if iv:
            out.append(format_table(["parameter", "value", f"{fit.level:.0%} interval"], rows))
        else:  # no bootstrap: no interval column
            out.append(format_table(["parameter", "value"], [r[:2] for r in rows]))
    elif method in ("isoflop", "envelope"):
        title = "Approach 2 (IsoFLOP)" if method == "isoflop" else "Approach 1 (envelope)"
        n = len(fit.budgets) if method == "isoflop" else len(fit.frontier)
        what = "budgets" if method == "isoflop" else "frontier points"
        out.append(f"{title}: {n} {what}")
        rows = _law_rows("N_opt", fit.N_opt) + _law_rows("D_opt", fit.D_opt)
        out.append(format_table(["quantity", "value", f"{fit.N_opt.level:.0%} interval"], rows))
    if method == "approach3" and fit.degenerate:
        out.append("\nCompute-optimal allocation: not shown, the fit is degenerate")
    else:
        out.append("\nCompute-optimal allocation:")
        level = getattr(fit, "level", None) if getattr(fit, "samples", None) is not None \
            else None
        out.append(_allocation_table(fit.compute_optimal(budgets), label, level))
    return "\n".join(out)


def _hparams_report(fits: HparamFits) -> str:
    out, fit, sf = [], fits.deepseek, fits.stepfun
    if fit is not None:
        out.append(
            f"Hyperparameter laws in C (DeepSeek LLM's form): {len(fit.band)} runs within "
            f"{fit.tolerance:.2%} of the best at {len(fit.best)} budgets"
        )
        rows = _law_rows("lr", fit.lr) + _law_rows("batch (tokens)", fit.batch)
        rows += [
            ["DeepSeek LLM lr", "0.3118·C^-0.1250", ""],
            ["DeepSeek LLM batch", "0.2920·C^0.3271", ""],
        ]
        out.append(format_table(["quantity", "value", f"{fit.lr.level:.0%} interval"], rows))
    if sf is not None:
        out.append(
            f"\nHyperparameter laws in N and D (StepFun's form, Li et al. 2025): "
            f"{len(sf.band)} runs within {sf.tolerance:.2%} of the best of their (N, D) cell, "
            f"{sf.band['cell'].nunique()} cells"
        )
        rows = []
        for name, law in (("lr", sf.lr), ("batch (tokens)", sf.batch)):
            rows.append([f"{name} coefficient", law.coef, _interval(law.coef_interval)])
            for v, p, iv in zip(law.variables, law.exponents, law.exponent_intervals,
                                strict=True):
                rows.append([f"{name} exponent of {v}", p, _interval(iv)])
        rows.append(["Li et al. 2025 lr", "1.79·N^-0.713·D^0.307", ""])
        rows.append(["Li et al. 2025 batch", "0.58·D^0.571", ""])
        out.append(format_table(["quantity", "value", f"{sf.lr.level:.0%} interval"], rows))
        out.append("near-optimal runs the fit used:")
        band = sf.band.sort_values(["N", "D", "loss"])
        out.append(format_table(
            ["run", "N", "D", "lr", "batch (tokens)", "loss", "over best"],
            [[str(r["run"]), r["N"], r["D"], r["lr"], r["batch_tokens"], r["loss"],
              f"{r['loss'] / r['best_loss'] - 1:.3%}"] for _, r in band.iterrows()]))
    return "\n".join(out)


def _critical_report(fit) -> str:
    law = fit.law
    out = [f"Critical batch size (McCandlish et al. 2018): {len(fit.table)} target losses"]
    out.append(format_table(
        ["target loss", "S_min (steps)", "E_min (tokens)", "B_crit (tokens)", "batch sizes"],
        [[r["loss"], r["S_min"], r["E_min"], r["B_crit"], int(r["n_batches"])]
         for _, r in fit.table.iterrows()]))
    out.append(format_table(
        ["quantity", "value", f"{law.level:.0%} interval"],
        [["B_crit(L) exponent", law.exponent, _interval(law.exponent_interval)],
         ["B_crit(L) coefficient", law.coef, _interval(law.coef_interval)]]))
    return "\n".join(out)


def _predictions_report(runs: pd.DataFrame) -> str:
    """Every planned run (one whose summary carries a predicted loss) against its outcome."""
    rows, inside = [], 0
    for _, r in runs.sort_values("C").iterrows():
        lo, hi = r["predicted_lo"], r["predicted_hi"]
        hit = bool(lo <= r["loss"] <= hi) if np.isfinite(lo) and np.isfinite(hi) else None
        inside += bool(hit)
        rows.append([str(r["run"]), r["N"], r["D"], r["predicted_loss"], _interval((lo, hi)),
                     r["loss"], f"{r['loss'] / r['predicted_loss'] - 1:+.2%}",
                     "-" if hit is None else ("yes" if hit else "NO")])
    head = (f"Planned runs (lab plan): prediction against outcome, {inside} of {len(rows)} "
            "inside their intervals")
    return head + "\n" + format_table(
        ["run", "N", "D", "predicted", "interval", "outcome", "error", "inside"], rows)


def planned_runs(points: pd.DataFrame) -> pd.DataFrame:
    """The rows of runs that `lab plan` planned (a predicted loss in their summary)."""
    if "predicted_loss" not in points.columns:
        return points.iloc[:0]
    pred = pd.to_numeric(points["predicted_loss"], errors="coerce")
    return points[np.isfinite(pred) & (pred > 0)]


def _jsonable(obj):
    """NaN and infinities become null; numpy scalars become Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# ---------------------------------------------------------------------------------------------


def run_fit(args: argparse.Namespace) -> tuple[object, dict, str]:
    """Load the inputs, fit, and return (fit, JSON-ready dict, printed report)."""
    if args.bootstrap < 0:
        raise UserError(f"--bootstrap must be 0 or more, got {args.bootstrap}")
    if not 0 < args.level < 1:
        raise UserError(f"--level must be between 0 and 1, got {args.level}")
    check_outputs(args.json, args.plots)  # before the work, not after it
    inputs = load_inputs(
        args.inputs,
        include_unfinished=args.include_unfinished,
        params=args.params,
        include_stable_parents=args.include_stable_parents,
    )
    try:
        return _fit_inputs(args, inputs)
    except UserError as err:
        parents = sum("stable" in why for _, why in inputs.skipped)
        if not parents:
            raise
        raise UserError(f"{err} ({parents} undecayed stable run(s) with branches were left "
                        "out; --include-stable-parents keeps them)") from None


def _fit_inputs(args: argparse.Namespace, inputs: Inputs) -> tuple[object, dict, str]:
    points = drop_highest_loss(inputs.points, args.drop_highest_loss)
    kw = {"bootstrap": args.bootstrap, "seed": args.seed, "level": args.level}
    if args.method == "approach3":
        fit = fit_approach3(points["N"], points["D"], points["loss"], **kw)
        data = points
    elif args.method == "isoflop":
        fit = fit_isoflop(points, rel_tol=args.budget_tolerance, **kw)
        data = points
    elif args.method == "envelope":
        data = _curves(inputs, args.curve_loss)
        fit = fit_envelope(data, n_bins=args.bins, **kw)
    elif args.method == "hparams":
        fit = _fit_hparams(points, args)
        data = points
    else:
        data = _batch_curves(inputs, args.curve_loss)
        fit = fit_critical_batch(data, level=args.level)
    budgets = args.budgets or [float(points["C"].max()) * m for m in (1, 10, 100)]
    result = fit.to_dict()
    result["params"] = args.params  # which parameter count N is, for lab plan
    if args.method == "approach3":
        result |= fit_record(fit, points["N"], points["D"], points["loss"])
    if args.method in ("approach3", "isoflop", "envelope"):
        result["compute_optimal"] = fit.compute_optimal(budgets).to_dict(orient="records")
    result["N_definition"] = inputs.n_label
    planned = planned_runs(points)
    result["planned_runs"] = planned[
        ["run", "N", "D", "C", "loss", "predicted_loss", "predicted_lo", "predicted_hi"]
    ].to_dict(orient="records") if len(planned) else []
    result["inputs"] = list(args.inputs)
    result["skipped_runs"] = [{"run": r, "reason": why} for r, why in inputs.skipped]
    if args.plots:
        result["plots"] = _plot(args.method, fit, data, args.plots, inputs.n_label)
    report = _report(args.method, fit, budgets, inputs.n_label)
    if len(planned):
        report += "\n\n" + _predictions_report(planned)
    return fit, _jsonable(result), report


def check_outputs(json_path: str | None, plots_dir: str | None) -> None:
    """Refuse outputs that cannot be written before any fitting: --json must name a file in an
    existing directory, --plots a directory (made if missing) under an existing one."""
    if json_path:
        parent = os.path.dirname(os.path.abspath(json_path))
        if os.path.isdir(json_path):
            raise UserError(f"--json {json_path} is a directory; give a file name such as "
                            "fit.json")
        if not os.path.isdir(parent):
            raise UserError(f"--json {json_path}: the folder {parent} does not exist; create "
                            "it or write elsewhere")
    if plots_dir:
        if os.path.exists(plots_dir) and not os.path.isdir(plots_dir):
            raise UserError(f"--plots {plots_dir} is a file, not a directory; give a directory "
                            "for the figures")
        ancestor = os.path.abspath(plots_dir)
        while not os.path.exists(ancestor):
            ancestor = os.path.dirname(ancestor)
        if not os.path.isdir(ancestor) or not os.access(ancestor, os.W_OK):
            raise UserError(f"--plots {plots_dir}: cannot create it under {ancestor}; give a "
                            "writable directory")


def _plot(method: str, fit, data: pd.DataFrame, out_dir: str, label: str) -> list[str]:
    from analysis import plots  # matplotlib only when asked for

    if method == "approach3":
        return plots.plot_approach3(fit, data, out_dir, label)
    if method == "isoflop":
        return plots.plot_isoflop(fit, out_dir, label)
    if method == "envelope":
        return plots.plot_envelope(fit, data, out_dir, label)
    if method == "hparams" and fit.deepseek is not None:
        return plots.plot_hparams(fit.deepseek, data, out_dir)
    return []  # no figure for StepFun's laws or the critical batch yet


def main(argv: list[str]) -> int:
    """Entry point of `lab fit`; returns the exit status. Raises UserError on bad input."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    _, result, report = run_fit(args)
    for run, why in (tuple(s.values()) for s in result["skipped_runs"]):
        flag = "--include-stable-parents" if "stable" in why else "--include-unfinished"
        print(f"left out {run} ({why}); pass {flag} to keep it", file=sys.stderr)
    print(report)
    if args.json:
        try:
            with open(args.json, "w") as fh:
                json.dump(result, fh, indent=2)
                fh.write("\n")
        except OSError as err:
            raise UserError(f"cannot write {args.json}: {err.strerror}; check the path") from None
        print(f"wrote {args.json}")
    for path in result.get("plots", []):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
