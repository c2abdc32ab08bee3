"""The two-step downstream law (analysis.downstream): a sigmoid with known parameters is
recovered, the two steps chain, the bootstrap's intervals cover fresh outcomes about as often as
they say, and `lab fit --method downstream` reads CSVs and run directories."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from analysis_helpers import make_run
from scipy.optimize import least_squares

from analysis.approach3 import law
from analysis.backtest import coarse_grid
from analysis.downstream import (
    _bounds,
    bootstrap_sigmoid,
    fit_downstream,
    fit_sigmoid,
    heldout_accuracy,
    sigmoid,
    sigmoid_starts,
    solve_sigmoid,
)
from analysis.report import banner_lines, downstream_lines
from lab.cli.fit import main
from lab.cli.fit_downstream import TASK_KEYS, task_names
from lab.errors import UserError

# A task loss law over tiny-model sizes, and a 4-way task whose accuracy rises across it.
LOSS_TRUTH = (1.2, 60.0, 900.0, 0.45, 0.55)  # E, A, B, alpha, beta
SIG_TRUTH = (0.6, 6.0, 2.0)  # a, k, L0
CHANCE = 0.25
EXAMPLES = 1000  # a task's size: the binomial noise of a measured accuracy


def ladder(rng, n: int, loss_noise: float = 0.01) -> pd.DataFrame:
    """n runs: (N, D) log-uniform, task loss off LOSS_TRUTH with log-normal noise, accuracy the
    true sigmoid of that loss measured on EXAMPLES questions."""
    N = np.exp(rng.uniform(np.log(1e4), np.log(3e5), n))
    D = np.exp(rng.uniform(np.log(3e5), np.log(2e7), n))
    L = law(N, D, *LOSS_TRUTH) * np.exp(rng.normal(0, loss_noise, n))
    acc = rng.binomial(EXAMPLES, sigmoid(L, *SIG_TRUTH, CHANCE)) / EXAMPLES
    return pd.DataFrame({"N": N, "D": D, "C": 6 * N * D, "task_loss": L, "accuracy": acc})


def test_solver_matches_scipy_least_squares():
    rng = np.random.default_rng(0)
    L = rng.uniform(1.5, 2.6, 25)
    acc = rng.binomial(EXAMPLES, sigmoid(L, *SIG_TRUTH, CHANCE)) / EXAMPLES
    starts = sigmoid_starts(L, acc, CHANCE)
    ours, cost = solve_sigmoid(L, acc, CHANCE, starts)
    best = ours[np.argmin(cost)]
    ref = least_squares(lambda t: sigmoid(L, *t, CHANCE) - acc, best * 1.1, xtol=1e-15,
                        ftol=1e-15, gtol=1e-15)
    np.testing.assert_allclose(best, ref.x, rtol=1e-6)
    assert cost.min() == pytest.approx(ref.cost, rel=1e-9)


def test_sigmoid_recovers_known_parameters():
    """Noise-free, exactly; with binomial noise, within 4 standard errors of the truth (the
    errors from the Jacobian at the truth and the noise's own variance)."""
    L = np.linspace(1.5, 2.6, 30)
    exact = fit_sigmoid(L, sigmoid(L, *SIG_TRUTH, CHANCE), CHANCE)
    np.testing.assert_allclose(exact.theta, SIG_TRUTH, rtol=1e-6)
    p = sigmoid(L, *SIG_TRUTH, CHANCE)
    a, k, L0 = SIG_TRUTH
    s = (p - CHANCE) / a
    J = np.column_stack([s, -a * s * (1 - s) * (L - L0), a * s * (1 - s) * k])
    cov = np.linalg.inv(J.T @ J) * np.mean(p * (1 - p) / EXAMPLES)
    se = np.sqrt(np.diag(cov))
    misses = []
    for seed in range(5):
        acc = np.random.default_rng(seed).binomial(EXAMPLES, p) / EXAMPLES
        fit = fit_sigmoid(L, acc, CHANCE)
        misses.append(np.abs(fit.theta - SIG_TRUTH) / se)
        assert not fit.warnings, fit.warnings
    assert np.max(misses) < 4.0, np.round(misses, 2)
    assert np.mean(misses) > 0.1  # the noise moved them: the check is not vacuous


def test_a_sigmoid_seen_from_one_end_warns():
    L = np.linspace(2.3, 2.6, 12)  # only the floor of the rise (L0 = 2.0)
    fit = fit_sigmoid(L, sigmoid(L, *SIG_TRUTH, CHANCE) + 0.002 * np.cos(7 * L), CHANCE)
    assert any("span" in w and "ceiling" in w for w in fit.warnings), fit.warnings
    flat = fit_sigmoid(L, np.full_like(L, CHANCE) + 0.001 * np.cos(7 * L), CHANCE)
    assert any("within" in w and "of chance" in w for w in flat.warnings), flat.warnings


def test_both_steps_chain_on_synthetic_data():
    pts = ladder(np.random.default_rng(1), 20)
    fit = fit_downstream(pts, CHANCE, bootstrap=20, grid=coarse_grid())
    assert fit.loss_law.E == pytest.approx(LOSS_TRUTH[0], abs=0.25)
    np.testing.assert_allclose(fit.sigmoid.theta, SIG_TRUTH, rtol=0.15)
    N, D = np.array([5e5, 1e5, 2e4]), np.array([5e7, 1e7, 1e6])
    pred = fit.predict(N, D)
    # The chain: the sigmoid of step 1's task loss.
    np.testing.assert_allclose(pred["task_loss"], fit.loss_law.predict(N, D))
    np.testing.assert_allclose(pred["accuracy"], fit.sigmoid.predict(pred["task_loss"]))
    truth = sigmoid(law(N, D, *LOSS_TRUTH), *SIG_TRUTH, CHANCE)
    assert np.max(np.abs(pred["accuracy"] - truth)) < 0.03
    # The outcome's interval holds the law's, which holds the prediction.
    assert (pred["lo"] <= pred["mean_lo"]).all() and (pred["mean_hi"] <= pred["hi"]).all()
    assert ((pred["mean_lo"] <= pred["accuracy"]) & (pred["accuracy"] <= pred["mean_hi"])).all()
    assert (pred["hi"] - pred["lo"] < 0.15).all()
    # Held out: the same predictions beside measured outcomes, errors in accuracy points.
    measured = pred["accuracy"] + np.array([0.01, -0.03, 0.0])
    check = heldout_accuracy(fit, pd.DataFrame({"N": N, "D": D, "accuracy": measured}))
    np.testing.assert_allclose(check["errors"], [-0.01, 0.03, 0.0], atol=1e-12)
    assert check["worst_abs_error"] == pytest.approx(0.03) and not check["goal_met"]
    np.testing.assert_allclose(check["above_chance"], measured - CHANCE)
    text = "\n".join(downstream_lines(check, "mc"))
    assert "error +3.0 points" in text and "worst 3.0; goal" in text and "missed" in text
    assert "  - downstream: w" in banner_lines({"downstream": {"warnings": ["w"]}})


def test_bootstrap_intervals_cover_fresh_outcomes():
    """Over 3 ladders, the 90% interval for one new run covers fresh runs at 5 new (N, D)
    (20 each, noise as in the ladder) between 75% and 99% of the time: neither too narrow nor
    uselessly wide."""
    inside = []
    for seed in range(3):
        rng = np.random.default_rng(100 + seed)
        fit = fit_downstream(ladder(rng, 16), CHANCE, bootstrap=20, seed=seed, level=0.9,
                             grid=coarse_grid())
        N = np.array([2e4, 6e4, 2e5, 4e5, 6e5])
        D = np.array([1e7, 4e6, 1e7, 3e7, 4e7])
        pred = fit.predict(N, D)
        for _ in range(20):
            fresh = ladder_at(rng, N, D)
            inside += list((pred["lo"] <= fresh) & (fresh <= pred["hi"]))
    coverage = float(np.mean(inside))
    assert 0.75 <= coverage <= 0.99, coverage


def ladder_at(rng, N, D) -> np.ndarray:
    L = law(N, D, *LOSS_TRUTH) * np.exp(rng.normal(0, 0.01, len(N)))
    return rng.binomial(EXAMPLES, sigmoid(L, *SIG_TRUTH, CHANCE)) / EXAMPLES


def test_lab_fit_downstream_reads_runs_task_results(tmp_path, capsys):
    pts = ladder(np.random.default_rng(3), 12)
    for i, r in pts.iterrows():
        task = {TASK_KEYS[c].format(task=t): r[c] * (1 if t == "mc" else 1.5)
                for t in ("mc", "exact") for c in ("task_loss", "accuracy")}
        make_run(tmp_path / "runs", f"r{i:02d}", N=r["N"] / 0.8, D=r["D"], loss=2.0, **task)
    make_run(tmp_path / "runs", "no-tasks", N=1e5, D=1e6, loss=2.0)
    assert task_names({TASK_KEYS["accuracy"].format(task="mc"): 0.5, "loss": 2}) == ["mc"]
    runs = str(tmp_path / "runs")
    base = [runs, "--method", "downstream", "--chance", "0.25", "--bootstrap", "20"]
    with pytest.raises(UserError, match="the tasks exact, mc; choose one with --task"):
        main(base)
    out = tmp_path / "fit.json"
    assert main([*base, "--task", "mc", "--json", str(out)]) == 0
    assert "1 run(s) without task/mc/accuracy left out: " in capsys.readouterr().out
    record = json.loads(out.read_text())
    assert record["task"] == "mc" and record["n_points"] == 12
    assert [Path(r).name for r in record["runs_without_task"]] == ["no-tasks"]
    # N is the non-embedding count, as for the loss laws.
    assert record["sigmoid"]["L0"] == pytest.approx(SIG_TRUTH[2], abs=0.1)


def test_lab_fit_downstream_reads_a_csv_predicts_and_backtests(tmp_path, capsys):
    """Four budgets of 7 ladder points (D from C, no C column): both laws printed, accuracy
    predicted with intervals, the figure drawn, and the law backtested fold by fold against
    accuracy baselines, errors absolute, with its bootstrap interval's coverage."""
    rng = np.random.default_rng(4)
    parts = []
    for b, C in enumerate((1e11, 1e12, 1e13, 1e14)):
        N = np.geomspace(1.5e4, 2.5e5, 7)
        D = C / (6 * N)
        L = law(N, D, *LOSS_TRUTH) * np.exp(rng.normal(0, 0.01, len(N)))
        acc = rng.binomial(EXAMPLES, sigmoid(L, *SIG_TRUTH, CHANCE)) / EXAMPLES
        parts.append(pd.DataFrame({"N": N, "D": D, "task_loss": L, "accuracy": acc,
                                   "budget": b}))
    pd.concat(parts).to_csv(tmp_path / "t.csv", index=False)
    out = tmp_path / "fit.json"
    assert main([str(tmp_path / "t.csv"), "--method", "downstream", "--chance", "0.25",
                 "--bootstrap", "20", "--predict", "2e5:1e8,5e5:2e8", "--backtest",
                 "--json", str(out), "--plots", str(tmp_path / "plots")]) == 0
    text = capsys.readouterr().out
    assert "step 1, the task loss L(N, D)" in text and "step 2, accuracy = chance" in text
    assert "Predicted accuracy" in text and "one run's interval" in text
    assert "Backtest of downstream" in text and "absolute in accuracy" in text
    record = json.loads(out.read_text())
    assert record["method"] == "downstream" and record["chance"] == 0.25
    assert {"E", "alpha", "beta"} <= set(record["task_loss_law"])
    assert {"a", "k", "L0"} <= set(record["sigmoid"]) and record["bootstrap_samples"] == 20
    assert [p["N"] for p in record["predictions"]] == [2e5, 5e5]
    assert all(p["lo"] < p["accuracy"] < p["hi"] for p in record["predictions"])
    assert (tmp_path / "plots" / "downstream.png").stat().st_size > 10_000
    bt = record["backtest"]
    # The first budget alone has D = C / 6N: Approach 3 cannot fit it, and the fold says so.
    assert [f["n_fit"] for f in bt["folds"]] == [14, 21]
    assert "cannot separate N from D" in bt["skipped_folds"][0]["reason"]
    assert set(bt["folds"][0]["baselines"]) == {"log_linear", "nearest", "loss_linear"}
    law_error = bt["summary"]["mean_abs_error"]["law"]
    assert 0 < law_error < 0.05 and law_error < bt["summary"]["mean_abs_error"]["nearest"]
    assert all(0 < f["law"]["coverage"] <= 1 for f in bt["folds"])


def test_bootstrap_refits_survive_a_singular_step():
    """A resample of 4 distinct points (rows drawn [4, 0, 0, 1, 1, 2, 0, 0] times) drives the
    damped Gauss-Newton system to an exactly singular matrix in floats; the refit still ends at
    the weighted optimum, which scipy's bounded least squares from the same start confirms."""
    L = np.array([3.401, 1.788, 3.397, 2.124, 2.347, 3.155, 2.318, 2.599])
    acc = np.array([0.25, 0.375, 0.245, 0.375, 0.38, 0.305, 0.31, 0.28])
    fit = fit_sigmoid(L, acc, CHANCE)
    idx = np.array([[0, 0, 0, 0, 3, 4, 5, 5], [0, 1, 2, 3, 4, 5, 6, 7]])
    got = bootstrap_sigmoid(fit, L, acc, idx)
    lower, upper = _bounds(L, CHANCE)
    for theta, rows in zip(got, idx, strict=True):
        w = np.bincount(rows, minlength=len(L)).astype(np.float64)
        cost = 0.5 * np.sum(w * (sigmoid(L, *theta, CHANCE) - acc) ** 2)
        ref = least_squares(lambda t, w=w: np.sqrt(w) * (sigmoid(L, *t, CHANCE) - acc),
                            fit.theta, bounds=(lower, upper), xtol=1e-15, ftol=1e-15, gtol=1e-15)
        assert cost <= ref.cost * (1 + 1e-6) + 1e-12
