"""`lab fit INPUT... --method downstream --chance P [--task NAME] [--predict N:D,...]`: the
two-step downstream law (analysis.downstream) from a CSV or from run directories.

A CSV has the columns N, D (or C, then D = C / 6N), task_loss and accuracy. A run directory
(searched recursively, as `lab fit` searches) gives each finished run's N (non-embedding
unless --params total), D (tokens) and, from its summary.json, the task's final loss and
accuracy under TASK_KEYS; --task names the task (needed when the runs hold several).
"""

from __future__ import annotations

import argparse
import io
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.downstream import DEFAULT_BOOTSTRAP, DownstreamFit, fit_downstream
from analysis.inputs import load_inputs
from analysis.irreducible import NearE, near_e_warning
from analysis.methods import FitResult, _describe_approach3
from analysis.output import format_table, interval, jsonable, warning_banner
from analysis.points import complete_points
from lab import paths
from lab.errors import UserError
from lab.run.rundir import read_summary

DOWNSTREAM = "downstream"
# Where training writes a task's final numbers in summary.json (and each evaluation's in
# metrics.jsonl): the only place the analysis names them.
TASK_KEYS = {"accuracy": "task/{task}/accuracy", "task_loss": "task/{task}/loss"}
_TASK_NAME = re.compile("^" + re.escape(TASK_KEYS["accuracy"]).replace(r"\{task\}", "(.+)") + "$")


# ---------------------------------------------------------------------------------------------
# Options.


def _queries(text: str) -> list[tuple[float, float]]:
    """N:D[,N:D...] as (N, D) pairs of positive numbers."""
    out = []
    for item in (t for t in text.split(",") if t.strip()):
        try:
            n, d = (float(v) for v in item.split(":"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"not N:D (e.g. 1e6:2e7): {item}") from None
        if not (n > 0 and d > 0 and np.isfinite(n) and np.isfinite(d)):
            raise argparse.ArgumentTypeError(f"N and D must be positive: {item}")
        out.append((n, d))
    if not out:
        raise argparse.ArgumentTypeError(f"no N:D pair in {text!r}")
    return out


def add_options(p: argparse.ArgumentParser) -> None:
    """The options of --method downstream."""
    p.add_argument("--chance", type=float, metavar="P",
                   help="downstream: the task's chance accuracy, the sigmoid's floor (0.25 for "
                        "4 choices, 0 for exact match); required")
    p.add_argument("--task", metavar="NAME",
                   help="downstream: which task of the runs' summaries (task/NAME/accuracy and "
                        "task/NAME/loss); needed when they hold several")
    p.add_argument("--predict", type=_queries, action="append", metavar="N:D,...",
                   help="downstream: predict the accuracy of runs of N parameters and D tokens "
                        "(repeatable)")


def check_args(args: argparse.Namespace) -> None:
    """The downstream options make sense with --method downstream, and it has --chance."""
    given = [f"--{k}" for k in ("chance", "task", "predict") if getattr(args, k) is not None]
    if args.method != DOWNSTREAM:
        if given:
            raise UserError(f"{', '.join(given)} belong(s) to --method downstream; add it or "
                            "drop them")
        return
    if args.chance is None:
        raise UserError("--method downstream needs --chance P, the task's chance accuracy (0.25 "
                        "for 4 choices, 0 for exact match)")
    if not 0 <= args.chance < 1:
        raise UserError(f"--chance must be in [0, 1): the accuracy of a blind guess, got "
                        f"{args.chance:g}")


# ---------------------------------------------------------------------------------------------
# Reading the points.


def read_task_csv(path: str) -> pd.DataFrame:
    """A CSV of N, D (or C), task_loss and accuracy."""
    try:
        df = pd.read_csv(io.StringIO(paths.read_input(path)))
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        reason = " ".join(str(err).split())
        raise UserError(f"{path} is not a readable CSV ({reason}); give a CSV with a header "
                        "row") from None
    missing = [c for c in ("N", "task_loss", "accuracy") if c not in df.columns]
    if "D" not in df.columns and "C" not in df.columns:
        missing.append("D or C")
    if missing:
        raise UserError(f"{path} lacks column(s) {', '.join(missing)}; a downstream CSV needs "
                        "N, D (or C), task_loss and accuracy")
    df = complete_points(df)
    for col in ("task_loss", "accuracy"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    return df.assign(source=str(path))


def task_names(summary_extra: dict) -> list[str]:
    """The tasks a run's summary holds an accuracy for."""
    return sorted(m.group(1) for k in summary_extra if (m := _TASK_NAME.match(k)))


@dataclass
class TaskPoints:
    """What the INPUT arguments give the downstream law."""

    points: pd.DataFrame  # N, D, C, task_loss, accuracy (and a run's other columns)
    task: str
    skipped: list = field(default_factory=list)  # (run, why): unfinished, undecayed parents
    without_task: list = field(default_factory=list)  # finished runs without the task's keys
    n_label: str = "N"


def read_task_runs(run_dirs: list[str], task: str | None, args: argparse.Namespace) -> TaskPoints:
    """The runs' task results from their summaries (N as --params counts it)."""
    inputs = load_inputs(run_dirs, include_unfinished=args.include_unfinished,
                         params=args.params, include_stable_parents=args.include_stable_parents)
    runs = inputs.points
    extras = [read_summary(r).extra for r in runs["run"]]
    if task is None:
        names = sorted({t for e in extras for t in task_names(e)})
        if not names:
            raise UserError(f"no run under {', '.join(run_dirs)} has task results in its "
                            "summary.json; train with eval.tasks set")
        if len(names) > 1:
            raise UserError(f"the runs hold the tasks {', '.join(names)}; choose one with "
                            "--task NAME")
        task = names[0]
    keys = {col: key.format(task=task) for col, key in TASK_KEYS.items()}
    has = np.array([all(k in e for k in keys.values()) for e in extras], dtype=bool)
    if not has.any():
        raise UserError(f"no run under {', '.join(run_dirs)} has {keys['accuracy']} in its "
                        "summary.json; check --task or train with eval.tasks set")
    points = runs[has].reset_index(drop=True)
    for col, key in keys.items():
        points[col] = [float(e[key]) for e, h in zip(extras, has, strict=True) if h]
    return TaskPoints(points, task, list(inputs.skipped), list(runs.loc[~has, "run"]))


def read_task_points(args: argparse.Namespace) -> TaskPoints:
    """The points of CSV files and run directories among the INPUT arguments."""
    for item in args.inputs:
        if not paths.exists(item):
            raise UserError(f"no such file or directory: {item}; give a run directory or a CSV")
    dirs = [i for i in args.inputs if paths.is_dir(i)]
    got = read_task_runs(dirs, args.task, args) if dirs else TaskPoints(pd.DataFrame(),
                                                                         args.task or "task")
    csvs = [read_task_csv(i) for i in args.inputs if i not in dirs]
    got.points = pd.concat([f for f in (got.points, *csvs) if not f.empty], ignore_index=True)
    got.n_label = "N (" + ", ".join(([f"{args.params.replace('_', '-')} parameters"]
                                     if dirs else []) + (["as in the CSV"] if csvs else [])) + ")"
    return got


# ---------------------------------------------------------------------------------------------
# The text.


def _sigmoid_table(fit: DownstreamFit) -> str:
    s, iv = fit.sigmoid, fit.intervals()
    ceiling = [fit.chance + x for x in iv["a"]] if iv else None
    rows = [["a (rise above chance)", s.a, interval(iv.get("a"))],
            ["k (steepness)", s.k, interval(iv.get("k"))],
            ["L0 (loss at mid-rise)", s.L0, interval(iv.get("L0"))],
            ["ceiling (chance + a)", fit.chance + s.a, interval(ceiling)]]
    if not iv:
        return format_table(["parameter", "value"], [r[:2] for r in rows])
    return format_table(["parameter", "value", f"{fit.level:.0%} interval"], rows)


def _predictions_table(pred: pd.DataFrame, level: float) -> str:
    ivs = "lo" in pred.columns
    heads = ["N", "D", "task loss"] + ([f"{level:.0%} interval"] if ivs else []) + ["accuracy"]
    heads += ["law's interval", "one run's interval"] if ivs else []
    rows = []
    for _, r in pred.iterrows():
        row = [r["N"], r["D"], r["task_loss"]]
        row += [interval((r["task_loss_lo"], r["task_loss_hi"]))] if ivs else []
        row.append(r["accuracy"])
        row += [interval((r["mean_lo"], r["mean_hi"])), interval((r["lo"], r["hi"]))] if ivs \
            else []
        rows.append(row)
    return format_table(heads, rows)


def describe_downstream(fit: DownstreamFit, pred: pd.DataFrame | None,
                        caveats: list[str] = ()) -> str:
    """Both laws, how well the points pin the sigmoid, and the predictions; warnings first."""
    s, pts = fit.sigmoid, fit.points
    k = fit.sigmoid_samples
    how = (f", {fit.level:.0%} intervals from {len(k)} bootstrap refits of both steps"
           if k is not None else ", no intervals (--bootstrap 0)")
    out = warning_banner([*fit.warnings, *caveats]) + [
        f"Downstream law (Bhagia et al. 2024, two steps), task {fit.task}: {len(pts)} points, "
        f"chance {fit.chance:g}{how}",
        "step 1, the task loss L(N, D) = E + A/N^alpha + B/D^beta by " +
        _describe_approach3(fit.loss_law),
        f"step 2, accuracy = chance + a / (1 + exp(k (L - L0))), least squares, floor fixed at "
        f"chance: {s.describe()}",
        _sigmoid_table(fit),
        f"residual sd {np.std(s.residuals):.3g} (accuracy); the task losses "
        f"{s.loss_range[0]:.4g} to {s.loss_range[1]:.4g} span {s.rise_covered():.0%} of the "
        f"rise; accuracy {pts['accuracy'].min():.3g} to {pts['accuracy'].max():.3g}",
    ]
    if pred is not None:
        out += ["", "Predicted accuracy (the sigmoid of the predicted task loss):",
                _predictions_table(pred, fit.level)]
    return "\n".join(out)


def task_loss_caveats(fit: DownstreamFit, pred: pd.DataFrame | None) -> list[str]:
    """The near-E warning (analysis.irreducible) for the predicted task losses."""
    if pred is None or fit.loss_law.degenerate:
        return []
    iv = fit.loss_law.intervals.get("E")
    best = float(fit.points["task_loss"].min())
    checks = [NearE(f"at N = {r['N']:.3g}, D = {r['D']:.3g} (task loss)", float(r["task_loss"]),
                    fit.loss_law.E, iv, best) for _, r in pred.iterrows()]
    warning = near_e_warning(checks)
    return [warning] if warning else []


# ---------------------------------------------------------------------------------------------
# The command.


def fit_downstream_command(args: argparse.Namespace) -> FitResult:
    """What `lab fit --method downstream` does after checking its arguments."""
    got = read_task_points(args)
    points = got.points
    bootstrap = args.bootstrap or DEFAULT_BOOTSTRAP
    checked = None
    if args.backtest:  # first: its mistakes are found before the full fit
        from analysis.downstream_backtest import backtest_downstream

        checked = backtest_downstream(
            points, args.chance, folds=args.folds, level=args.level, rel_tol=args.budget_tolerance,
            by_budget=True if "run" in points.columns else None, bootstrap=bootstrap,
            seed=args.seed)
    fit = fit_downstream(points, args.chance, task=got.task, bootstrap=bootstrap, seed=args.seed,
                         level=args.level)
    queries = [q for group in (args.predict or []) for q in group]
    pred = fit.predict(*zip(*queries, strict=True), seed=args.seed) if queries else None
    caveats = task_loss_caveats(fit, pred)
    record = fit.to_dict() | {"params": args.params, "N_definition": got.n_label,
                              "inputs": list(args.inputs),
                              "skipped_runs": [{"run": r, "reason": w} for r, w in got.skipped],
                              "runs_without_task": got.without_task,
                              "predictions": [] if pred is None else
                              pred.to_dict(orient="records")}
    record["warnings"] = [*record["warnings"], *caveats]
    if args.plots:
        from analysis.plots import plot_downstream

        record["plots"] = plot_downstream(fit, args.plots, pred)
    text = describe_downstream(fit, pred, caveats)
    if got.without_task:
        key = TASK_KEYS["accuracy"].format(task=got.task)
        text += (f"\n{len(got.without_task)} run(s) without {key} left out: "
                 + ", ".join(got.without_task))
    if checked is not None:
        from analysis.backtest import add_backtest

        text = add_backtest(record, text, checked)
    return FitResult(fit, jsonable(record), text)
