"""The study's downstream check: the two-step law (analysis.downstream) fitted on the ladder's
task results, then predicting the held-out runs' accuracy.

    result = downstream_study(points, out_dir, bootstrap=200)

`points` are the study's points (analysis.report), one row per branch or run with N, D,
held_out, size and seed and, for every task NAME the runs scored, the columns
task/NAME/accuracy, task/NAME/loss and task/NAME/chance (from each run's summary.json). Per
task, both steps are fitted on the rows not held out (written to out/downstream-NAME-points.csv
beside the `lab fit --method downstream` command that refits them); each held-out size (its
seeds' accuracy averaged, as the loss check averages them) is predicted beside the naive
baselines of the downstream backtest fitted on the same points (log_linear, nearest and
loss_linear: analysis.downstream_backtest.accuracy_baselines), and
out/plots/downstream-NAME/downstream.png shows the sigmoid with the points and the
predictions beside the outcomes.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.downstream import MIN_POINTS, fit_downstream, heldout_accuracy
from analysis.downstream_backtest import accuracy_baselines
from analysis.plots import plot_downstream
from lab.paths import shown_path

GOAL = 0.02  # every held-out size's accuracy within 2 points (issue 23)
_ACCURACY = re.compile(r"^task/(.+)/accuracy$")


def study_tasks(points: pd.DataFrame) -> list[str]:
    """The tasks every point has an accuracy, a loss and a chance level for."""
    names = sorted(m.group(1) for c in points.columns if (m := _ACCURACY.match(str(c))))
    return [t for t in names if all(
        f"task/{t}/{k}" in points and points[f"task/{t}/{k}"].notna().all()
        for k in ("accuracy", "loss", "chance"))]


def _task_frame(points: pd.DataFrame, task: str) -> pd.DataFrame:
    out = points.copy()
    out["accuracy"] = out[f"task/{task}/accuracy"].astype(float)
    out["task_loss"] = out[f"task/{task}/loss"].astype(float)
    return out


def _by_size(held: pd.DataFrame) -> pd.DataFrame:
    """One row per held-out size: N, D, the mean accuracy and task loss over its seeds, and
    each seed's accuracy."""
    rows = []
    for n, g in held.groupby("N", sort=True):
        g = g.sort_values("seed") if "seed" in g else g
        rows.append({"size": str(g["size"].iloc[0]), "N": float(n), "D": float(g["D"].mean()),
                     "accuracy": float(g["accuracy"].mean()),
                     "task_loss": float(g["task_loss"].mean()),
                     "seed_accuracy": [float(x) for x in g["accuracy"]]})
    return pd.DataFrame(rows)


def task_check(points: pd.DataFrame, task: str, out: Path, bootstrap: int) -> dict:
    """One task: the law fitted on the ladder (as the `lab fit` command it returns does it on
    the CSV it writes), its held-out check and baselines, the figure."""
    df = _task_frame(points, task)
    fitted, held = df[~df["held_out"]], _by_size(df[df["held_out"]])
    chance = float(df[f"task/{task}/chance"].iloc[0])
    csv = out / f"downstream-{task}-points.csv"
    fitted[["N", "D", "task_loss", "accuracy"]].to_csv(csv, index=False)
    command = shlex.join(["lab", "fit", shown_path(csv), "--method", "downstream", "--chance",
                          f"{chance:g}", "--bootstrap", str(bootstrap), "--predict",
                          ",".join(f"{n:.0f}:{d:.0f}" for n, d in zip(held["N"], held["D"],
                                                                      strict=True))])
    seed = 0  # lab fit's default --seed, so that the command gives the same numbers
    # A bootstrap refit that did not converge overflows numpy; the law's warnings count them.
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        fit = fit_downstream(fitted[["N", "D", "task_loss", "accuracy"]], chance, task=task,
                             bootstrap=bootstrap, seed=seed)
        h = heldout_accuracy(fit, held, goal=GOAL, seed=seed)
        pred = fit.predict(held["N"], held["D"], seed=seed)
    h.update(sizes=held["size"].tolist(), seed_accuracy=held["seed_accuracy"].tolist(),
             task_loss_measured=held["task_loss"].tolist(),
             task_loss_predicted=pred["task_loss"].tolist())
    predicted = accuracy_baselines(fitted, held, pred["task_loss"].to_numpy())
    h["baseline_predicted"] = {k: v.tolist() for k, v in predicted.items()}
    h["baselines"] = {k: float(np.mean(np.abs(v - held["accuracy"].to_numpy())))
                      for k, v in predicted.items()}
    record = {k: v for k, v in fit.to_dict().items() if k != "bootstrap"}
    figure = plot_downstream(fit, str(out / "plots" / f"downstream-{task}"), pred,
                             outcome=held["accuracy"].to_numpy())[0]
    return {"task": task, "chance": chance, "fit": record, "heldout": h,
            "ladder_accuracy": [float(fitted["accuracy"].min()), float(fitted["accuracy"].max())],
            "ladder_task_loss": [float(fitted["task_loss"].min()),
                                 float(fitted["task_loss"].max())],
            "warnings": [f"{task}: {w}" for w in fit.warnings], "figure": figure,
            "command": command}


def task_cost(run_dirs: list[str]) -> dict | None:
    """The tasks' share of the runs' training loops: summed task_seconds (building the scorer
    and scoring, summary.json) over summed train_seconds (the loop, evaluations included) of
    every run and its branches; None where no run timed its tasks."""
    from lab.run.rundir import branch_dirs, read_summary

    task = train = 0.0
    for run_dir in run_dirs:
        for r in [run_dir, *branch_dirs(run_dir)]:
            summary = read_summary(r)
            if summary is not None and summary.train_seconds:
                task += float(summary.extra.get("task_seconds", 0.0))
                train += summary.train_seconds
    if not task:
        return None
    return {"task_seconds": task, "train_seconds": train, "share": task / train}


def downstream_study(points: pd.DataFrame, out: Path, bootstrap: int,
                     run_dirs: list[str] = ()) -> dict | None:
    """Every task of the study checked (task_check) and their cost in the runs `run_dirs`
    (with their branches), or None where the runs scored no task or the ladder has too few
    points for the law."""
    tasks = study_tasks(points)
    if not tasks or (~points["held_out"]).sum() < MIN_POINTS:
        return None
    checks = {t: task_check(points, t, out, bootstrap) for t in tasks}
    return {"tasks": checks, "goal": GOAL,
            "goal_met": all(c["heldout"]["goal_met"] for c in checks.values()),
            "cost": task_cost(list(run_dirs)),
            "warnings": [w for c in checks.values() for w in c["warnings"]]}
