"""`lab branch --predict`: the schedule law (analysis.schedule_law, Tissue et al. 2024) fitted
on a stable run and its finished branches, read from their run directories, and the predicted
end loss of each planned branch and of a cosine run of the same length."""

from __future__ import annotations

import numpy as np

from analysis.schedule_law import Curve, ScheduleLaw, fit_schedule_law
from lab import paths
from lab.config import Config, load_config, replace
from lab.optim.optimizers import lr_schedule
from lab.run import rundir
from lab.run.branch_points import child_config
from lab.run.metrics import read_metrics

MIN_EVALS = 4  # eval losses along a stable run needed to fit them instead of training losses


def lr_sequence(cfg: Config) -> np.ndarray:
    """The learning rate of every update of a run, from the schedule the run trains with."""
    fn = lr_schedule(cfg.schedule, cfg.optim.lr, cfg.train.steps)
    return np.asarray(fn(np.arange(cfg.train.steps)), dtype=np.float64)


def load_curve(run_dir: str, use_eval: bool = False) -> Curve:
    """A run directory's curve: its training losses, or with `use_eval` its eval losses.

    A logged row at `step` k holds the training loss of the batch seen by update k, on the
    parameters after k - 1 updates (lab.train logs before updating), and an `eval_loss` measured
    after update k; the final eval loss (summary.json) is after every update of the run."""
    cfg = load_config(rundir.config_path(run_dir))
    key, shift = ("eval_loss", 0) if use_eval else ("loss", 1)
    rows = [m for m in read_metrics(run_dir) if isinstance(m.get(key), (int, float))]
    n = np.array([int(m["step"]) - shift for m in rows], dtype=np.int64)
    loss = np.array([float(m[key]) for m in rows])
    summary = rundir.read_summary(run_dir)
    final = summary.final_eval_loss if summary is not None and summary.finished else None
    return Curve(paths.name(run_dir), lr_sequence(cfg), n, loss,
                 None if final is None else float(final))


def eval_points(run_dir: str) -> int:
    """How many eval losses a run logged along its curve."""
    return sum(isinstance(m.get("eval_loss"), (int, float)) for m in read_metrics(run_dir))


def run_curves(run_dir: str) -> list[Curve]:
    """A stable run's curve and those of its finished branches (under RUN_DIR/branches/).
    Eval losses are used when the stable run logged at least MIN_EVALS of them
    (train.eval_every): on a fixed validation set they are far quieter than the training loss
    of one batch; otherwise every curve is the training loss."""
    runs = [run_dir]
    branches = paths.join(run_dir, rundir.BRANCHES)
    if paths.is_dir(branches):
        for child in sorted(paths.parent(p) for p in paths.find(branches, rundir.SUMMARY)):
            if rundir.is_finished(child):
                runs.append(child)
    use_eval = eval_points(run_dir) >= MIN_EVALS
    return [load_curve(r, use_eval) for r in runs]


def default_start(cfg: Config) -> int:
    """Where the fitted window starts: past twice the warmup, where the power law holds."""
    return max(2 * cfg.schedule.warmup_steps, 1)


def predict_branches(run_dir: str, pairs: list[tuple[int, int]], shape: str,
                     final_ratio: float, curves: list[Curve] | None = None) -> tuple[
                         ScheduleLaw, list[dict]]:
    """Fit the law on a run and its finished branches, then predict the final eval loss of
    each planned branch (step, decay) and of a cosine run of the same length."""
    parent = load_config(rundir.config_path(run_dir))
    curves = curves if curves is not None else run_curves(run_dir)
    law = fit_schedule_law(curves, start=default_start(parent),
                           train_loss=eval_points(run_dir) < MIN_EVALS)
    rows = []
    for step, decay in pairs:
        child = child_config(parent, run_dir, step, decay, shape, final_ratio)
        total = child.train.steps
        cos = replace(child, schedule={"name": "cosine", "decay_steps": 0})
        rows.append({"branch_step": step, "decay_steps": decay, "shape": shape,
                     "steps": total, "predicted": law.final(lr_sequence(child)),
                     "cosine_predicted": law.final(lr_sequence(cos))})
    return law, rows


def format_predictions(law: ScheduleLaw, rows: list[dict]) -> str:
    lines = [f"schedule law (Tissue et al. 2024) fitted on {', '.join(law.curves)}:",
             f"  {law.describe()}",
             f"{'branch step':>11} {'decay':>6} {'shape':>7} {'steps':>6} "
             f"{'predicted eval loss':>19} {'cosine, same steps':>18}"]
    for r in rows:
        lines.append(f"{r['branch_step']:>11} {r['decay_steps']:>6} {r['shape']:>7} "
                     f"{r['steps']:>6} {r['predicted']:>19.4f} {r['cosine_predicted']:>18.4f}")
    return "\n".join(lines)
