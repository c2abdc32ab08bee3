"""`lab fit STABLE_RUN --method schedule --backtest`: the schedule law backtested by compute along a
stable run and its branches (analysis.schedule_backtest), on run directories whose eval losses
follow the Tissue et al. law exactly for the learning rates their configs give."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from analysis.schedule_backtest import curve_baselines
from lab.cli import main
from lab.config import dump_config, load_config
from lab.run import rundir
from lab.run.branch_points import child_config
from lab.studies.branch_predict import lr_sequence

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
L0, A, ALPHA, C, LAM = 2.0, 1.5, 0.5, 10.0, 0.9  # LAM is on the fit's grid of momenta
EVAL_EVERY, STEPS, FLOPS_PER_STEP = 10, 800, 3e9
BRANCHES = ((300, 100), (500, 100), (600, 150))  # (branch step, decay steps)


def tissue_loss(lr_T: np.ndarray, n: np.ndarray) -> np.ndarray:
    """L0 + A S1^-alpha - C S2 after n updates, S2 by its closed form (not the fit's recursion):
    S2(n) = sum_{k<n} delta_k (1 - lam^(n-k)) / (1 - lam)."""
    delta = np.maximum(np.concatenate([[0.0], lr_T[:-1] - lr_T[1:]]), 0.0)
    s1 = np.array([lr_T[:k].sum() for k in n])
    s2 = np.array([sum(delta[j] * (1 - LAM ** (k - j)) / (1 - LAM) for j in range(k))
                   for k in n])
    return L0 + A * s1**-ALPHA - C * s2


def write_run(run_dir: str, cfg, first: int) -> None:
    """A finished run directory: its config, summary and an eval loss every EVAL_EVERY updates
    from `first` on."""
    Path(run_dir).mkdir(parents=True)
    Path(rundir.config_path(run_dir)).write_text(dump_config(cfg))
    lr = lr_sequence(cfg)
    n = np.arange(first, cfg.train.steps + 1, EVAL_EVERY)
    rows = [{"step": int(k), "eval_loss": float(v)} for k, v in zip(n, tissue_loss(lr, n),
                                                                   strict=True)]
    Path(rundir.metrics_path(run_dir)).write_text("".join(json.dumps(r) + "\n" for r in rows))
    steps = cfg.train.steps
    rundir.write_summary(run_dir, rundir.Summary(
        status=rundir.Status.FINISHED, steps=steps, flops=int(FLOPS_PER_STEP * steps),
        tokens=steps * 1000, final_eval_loss=float(rows[-1]["eval_loss"])))


@pytest.fixture(scope="module")
def stable_run(tmp_path_factory) -> str:
    run_dir = str(tmp_path_factory.mktemp("schedule") / "stable")
    cfg = load_config(TINY, [f"train.steps={STEPS}", f"train.eval_every={EVAL_EVERY}",
                             "schedule.name=wsd", "schedule.warmup_steps=20",
                             "schedule.decay_steps=0", f"run.dir={run_dir}"])
    write_run(run_dir, cfg, EVAL_EVERY)
    for step, decay in BRANCHES:
        child = child_config(cfg, run_dir, step, decay, "linear", 0.0)
        write_run(child.run.dir, child, step + EVAL_EVERY)
    return run_dir


def test_the_law_predicts_the_later_points_and_beats_the_baselines(stable_run, tmp_path):
    out = tmp_path / "bt.json"
    code = main(["fit", stable_run, "--method", "schedule", "--backtest", "--folds", "4",
                 "--json", str(out)])
    assert code == 0
    bt = json.loads(out.read_text())["backtest"]
    # The first cut (at the 20% quantile of the steps) comes before any decay has ended.
    assert [s["reason"] for s in bt["skipped_folds"]] and all(
        "annealing term is unidentified" in s["reason"] for s in bt["skipped_folds"])
    folds = bt["folds"]
    assert len(folds) >= 2
    for f in folds:
        assert f["law"]["mean_abs_error"] < 1e-4 and f["law"]["worst_abs_error"] < 5e-4
        assert f["law"]["coverage"] is None  # the schedule law gives no interval
        # every point is fitted or predicted but the stable run's 3 before step 2 x warmup
        assert f["n_fit"] + f["n_predict"] == STEPS // EVAL_EVERY + sum(
            d // EVAL_EVERY for _, d in BRANCHES) - 3
        # a baseline knows a curve's past, not its schedule: each misses the unseen decays
        for name, base in f["baselines"].items():
            assert base["mean_abs_error"] > 10 * f["law"]["mean_abs_error"], name
    # the cuts: quantiles k / 5 of the fitted window's update counts, in FLOPs
    n = np.concatenate([np.arange(40, STEPS + 1, EVAL_EVERY)] + [
        np.arange(s + EVAL_EVERY, s + d + 1, EVAL_EVERY) for s, d in BRANCHES])
    cuts = [f["cut"] for f in folds] + [s["cut"] for s in bt["skipped_folds"]]
    assert sorted(cuts) == pytest.approx(FLOPS_PER_STEP * np.quantile(n, [0.2, 0.4, 0.6, 0.8]))
    assert bt["verdict"] is None and bt["summary"]["folds_lost"] == 0


def test_the_multipower_law_is_backtested_too(stable_run, capsys):
    assert main(["fit", stable_run, "--method", "multipower", "--backtest"]) == 0
    text = capsys.readouterr().out
    assert "Backtest of multipower by compute" in text and "beats every baseline" in text


def test_curve_baselines_against_their_definitions():
    n, loss = np.array([100.0, 200.0, 400.0]), np.array([3.0, 2.8, 2.5])
    got = curve_baselines(n, loss, np.array([800.0]))
    assert got["nearest"][0] == 2.5
    assert got["two_point"][0] == pytest.approx(2.5 * (2.5 / 2.8))  # one more doubling of n
    slope = np.polyfit(np.log(n), np.log(loss), 1)[0]  # least squares, all three points
    assert got["log_linear"][0] == pytest.approx(np.exp(np.log(loss).mean() + slope * (
        np.log(800.0) - np.log(n).mean())))
    one = curve_baselines(n[:1], loss[:1], np.array([800.0]))
    assert all(v[0] == 3.0 for v in one.values())
