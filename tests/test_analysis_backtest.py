"""The backtest by compute (analysis.backtest), its naive baselines (analysis.baselines) and the
intervals it calibrates (analysis.predict, "calibrated").

Synthetic IsoFLOP designs at six budgets, fitted from a few starts of the published grid so
that each test takes seconds; the truths are known, so each claim is checked against them.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from analysis.approach3 import law
from analysis.backtest import backtest, fold_keys
from analysis.baselines import BASELINES, predict_baselines
from analysis.predict import LossLaw, conformal_quantile
from benchmarks.bench_backtest import BUDGETS, STARTS, TRUTH, frame, interval_coverage, isoflop
from lab.cli.fit import main as fit_main

# ---------------------------------------------------------------------------------------------
# The baselines, against predictions worked out by hand.


def test_baselines_match_their_definitions():
    fitted = pd.DataFrame({"N": [1e6, 2e6, 4e6, 1e6, 3e6], "D": [1e9, 1e9, 1.1e9, 1e10, 1e10],
                           "loss": [3.0, 2.8, 2.7, 2.6, 2.4]})
    query = pd.DataFrame({"N": [8e6, 8e6, 2e6], "D": [1.05e9, 9e9, 3e12]})
    got = predict_baselines(fitted, query)
    assert tuple(got) == BASELINES
    # log-linear: the least-squares plane in (log N, log D, log L), by the normal equations.
    X = np.column_stack([np.ones(5), np.log(fitted["N"]), np.log(fitted["D"])])
    c = np.linalg.solve(X.T @ X, X.T @ np.log(fitted["loss"]))
    Xq = np.column_stack([np.ones(3), np.log(query["N"]), np.log(query["D"])])
    np.testing.assert_allclose(got["log_linear"], np.exp(Xq @ c), rtol=1e-12)
    # nearest in (log N, log D): (4e6, 1.1e9), (3e6, 1e10), and for (2e6, 3e12), (3e6, 1e10)
    # (log 1.5 from its N, log 2 from 1e6's, the same log 300 in D from both).
    np.testing.assert_allclose(got["nearest"], [2.7, 2.4, 2.4])
    # two-point: at D near 1e9 the two largest N are 2e6 (2.8) and 4e6 (2.7, D 1.1e9 within
    # the 1.25 window); at D near 1e10 they are 1e6 (2.6) and 3e6 (2.4); a line in log-log.
    def line(n1, l1, n2, l2, n):
        return np.exp(np.log(l2) + np.log(l2 / l1) / np.log(n2 / n1) * np.log(n / n2))
    np.testing.assert_allclose(got["two_point"], [line(2e6, 2.8, 4e6, 2.7, 8e6),
                                                  line(1e6, 2.6, 3e6, 2.4, 8e6),
                                                  line(1e6, 2.6, 3e6, 2.4, 2e6)])
    # A D window with one N falls back to the nearest point.
    lone = fitted.iloc[[0, 3, 4]].assign(D=[1e7, 1e10, 1e10])
    one = predict_baselines(lone, pd.DataFrame({"N": [5e6], "D": [1e7]}))
    assert one["two_point"][0] == one["nearest"][0] == 3.0


def test_quantile_cuts_for_continuous_compute_and_budgets_otherwise():
    rng = np.random.default_rng(0)
    C = np.exp(rng.uniform(40, 50, 100))
    mode, key, cuts = fold_keys(frame(C, C, C, C), folds=3)
    assert mode == "quantiles" and (key == C).all()
    assert cuts == pytest.approx(list(np.quantile(C, [0.25, 0.5, 0.75])))
    N, D, C = isoflop(BUDGETS)
    C = C * np.exp(rng.uniform(-0.05, 0.05, len(C)))  # a budget's runs spend it within 5%
    mode, key, cuts = fold_keys(frame(N, D, C, C))
    assert mode == "budgets" and cuts == pytest.approx(list(BUDGETS[:-1]), rel=0.05)
    assert len(set(key)) == len(BUDGETS) and (key[:5] == np.median(C[:5])).all()
    assert fold_keys(frame(N, D, C, C), folds=2)[2] == cuts[-2:]
    # A `budget` column sets the budgets, whatever their C.
    labelled = frame(N, D, C, C).assign(budget=np.arange(len(C)) // 15)
    assert len(fold_keys(labelled)[2]) == 1


# ---------------------------------------------------------------------------------------------
# The backtest on a law that holds, and on one that is wrong for the data.


def test_backtest_of_a_true_law_beats_the_baselines():
    rng = np.random.default_rng(3)
    N, D, C = isoflop(BUDGETS)
    loss = law(N, D, *TRUTH) * np.exp(rng.normal(0, 0.004, len(N)))
    bt = backtest(frame(N, D, C, loss), starts=STARTS, level=0.9)
    out = json.loads(json.dumps(bt.to_dict()))  # the JSON shape lab fit writes
    folds = out["folds"]
    assert [f["cut"] for f in folds] == pytest.approx(list(BUDGETS[1:-1]))  # 5 points: skipped
    assert len(out["skipped_folds"]) == 1
    for f in folds:
        assert f["n_fit"] + f["n_predict"] == len(N)
        assert f["extrapolation"]["C"] == pytest.approx(BUDGETS[-1] / f["cut"])
        assert set(f["law"]) == {"mean_abs_error", "worst_abs_error", "bias", "coverage"}
        assert set(f["baselines"]) == set(BASELINES)
        for b in BASELINES:
            assert f["law"]["mean_abs_error"] < f["baselines"][b]["mean_abs_error"]
        # 0.4% noise; the first fold extrapolates 100x in C from 10 points (about 2.6% there).
        assert f["law"]["mean_abs_error"] < (0.03 if f["n_fit"] == 10 else 0.006)
    # The folds' own intervals: each calibrated by the folds before it (the first residual).
    hits = sum(f["law"]["coverage"] * f["n_predict"] for f in folds)
    assert 0.8 <= hits / sum(f["n_predict"] for f in folds) <= 1.0
    assert out["verdict"] is None and out["summary"]["beaten_by"] == []


def test_a_wrong_law_loses_to_a_baseline_and_the_lab_says_so(tmp_path, capsys, monkeypatch):
    """Losses from a product N^-a D^-b (log-linear, no floor): L = E + A/N^α + B/D^β cannot
    follow it far, and the log-linear baseline, exact for it, wins. `lab fit` as a user runs
    it, its grids of starts cut to STARTS to keep the test short."""
    monkeypatch.setattr("analysis.approach3.chinchilla_grid", lambda: STARTS)
    monkeypatch.setattr("analysis.backtest.coarse_grid", lambda: STARTS)
    rng = np.random.default_rng(1)
    N, D, C = isoflop(BUDGETS)
    loss = 60.0 * N ** -0.12 * D ** -0.08 * np.exp(rng.normal(0, 0.002, len(N)))
    csv = tmp_path / "points.csv"
    frame(N, D, C, loss).to_csv(csv, index=False)
    assert fit_main([str(csv), "--backtest", "--folds", "3", "--json",
                     str(tmp_path / "fit.json")]) == 0
    out = capsys.readouterr().out
    record = json.loads((tmp_path / "fit.json").read_text())
    bt = record["backtest"]
    assert "log_linear" in bt["summary"]["beaten_by"]
    assert len(bt["folds"]) == 3
    for f in bt["folds"]:
        assert f["baselines"]["log_linear"]["mean_abs_error"] < f["law"]["mean_abs_error"]
    assert bt["verdict"] and "no better than a naive guess" in bt["verdict"]
    assert out.splitlines()[1].startswith("WARNING") and "log-linear baseline" in out
    from analysis.report import banner_lines

    assert any("no better than a naive guess" in line for line in banner_lines(record))


# ---------------------------------------------------------------------------------------------
# Calibrated intervals: coverage of fresh outcomes one budget and more beyond the data.


@pytest.mark.parametrize("scenario", ["noise growing with N", "misspecified law"])
def test_calibrated_interval_holds_under_what_the_law_does_not_model(scenario):
    """Nominal 90% intervals, 80 fresh outcomes 3x and 10x beyond six fitted budgets (see
    benchmarks.bench_backtest.SCENARIOS): the calibrated interval covers 80-95%. Where noise
    grows with N, the residual interval, which assumes one scatter everywhere, undercovers:
    what the calibration repairs."""
    calibrated, residual = interval_coverage(scenario)
    assert 0.8 <= calibrated <= 0.95
    if scenario == "noise growing with N":
        assert residual < 0.8


def test_calibrated_interval_is_the_conformal_quantile_times_the_scale():
    r = np.array([0.01, -0.02, 0.015, -0.005, 0.0, 0.02, -0.01, 0.005])
    scores = np.arange(1, 20) / 10.0  # 19 scores: at 90% the 18th smallest, 1.8
    lw = LossLaw(*TRUTH, residuals=r, calibration=scores)
    pred, lo, hi = lw.predict(1e6, 1e8, level=0.9)
    s = np.sqrt(np.sum(r * r) / 3)  # no fitted points: the scale is s
    assert conformal_quantile(scores, 0.9) == pytest.approx(1.8)
    assert (lo, hi) == pytest.approx((pred * np.exp(-1.8 * s), pred * np.exp(1.8 * s)))
    assert lw.interval_method == "calibrated"


def test_lab_plan_reads_the_calibrated_interval(tmp_path, monkeypatch, capsys):
    """`lab fit --backtest --json` keeps the scores; `lab plan` on that JSON gives the calibrated
    interval (the conformal quantile times the law's scale at the planned run), and says when
    an interval is not calibrated."""
    from pathlib import Path

    from lab.cli import plan as plan_cli

    monkeypatch.setattr("analysis.approach3.chinchilla_grid", lambda: STARTS)
    monkeypatch.setattr("analysis.backtest.coarse_grid", lambda: STARTS)
    rng = np.random.default_rng(5)
    N, D, C = isoflop(BUDGETS)
    frame(N, D, C, law(N, D, *TRUTH) * np.exp(rng.normal(0, 0.004, len(N)))).to_csv(
        tmp_path / "points.csv", index=False)
    tiny = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
    plans = {}
    for name, extra in (("calibrated", ["--backtest"]), ("plain", [])):
        fit_json = tmp_path / f"{name}.json"
        assert fit_main([str(tmp_path / "points.csv"), "--json", str(fit_json), *extra]) == 0
        assert plan_cli.main([str(fit_json), "--budget", "1e14", "--out", str(tmp_path / name),
                              "--base", tiny, "--aspect-ratio", "32", "--level", "0.9"]) == 0
        plans[name] = json.loads((tmp_path / name / "plan.json").read_text())
    capsys.readouterr()
    plan = plans["calibrated"]
    record = json.loads((tmp_path / "calibrated.json").read_text())
    lw = LossLaw.from_dict(record)
    q = conformal_quantile(record["calibration"]["scores"], 0.9)
    half = q * lw.scale(plan["N"], plan["D"])[0]
    assert plan["interval_method"] == "calibrated"
    assert plan["interval"] == pytest.approx([plan["predicted_loss"] * np.exp(-half),
                                              plan["predicted_loss"] * np.exp(half)])
    assert not any("not calibrated" in w for w in plan["warnings"])
    assert plans["plain"]["interval_method"] == "residual"
    assert any("not calibrated" in w for w in plans["plain"]["warnings"])


def test_run_directories_are_cut_at_their_budgets(tmp_path, monkeypatch, capsys):
    """`lab fit RUNS --backtest --folds 2` on run directories: the cuts are the last two budgets
    below the largest (each run's C from its summary's flops)."""
    from analysis_helpers import make_run

    monkeypatch.setattr("analysis.approach3.chinchilla_grid", lambda: STARTS)
    monkeypatch.setattr("analysis.backtest.coarse_grid", lambda: STARTS)
    rng = np.random.default_rng(2)
    N, D, C = isoflop(BUDGETS)
    for i, (n, d) in enumerate(zip(N, D, strict=True)):
        make_run(tmp_path / "runs", f"r{i}", N=n, D=d,
                 loss=law(n, d, *TRUTH) * np.exp(rng.normal(0, 0.004)))
    out = tmp_path / "fit.json"
    assert fit_main([str(tmp_path / "runs"), "--backtest", "--folds", "2", "--params", "total",
                     "--json", str(out)]) == 0
    folds = json.loads(out.read_text())["backtest"]["folds"]
    assert [f["cut"] for f in folds] == pytest.approx(list(BUDGETS[-3:-1]))
    assert [f["n_fit"] for f in folds] == [20, 25]
    printed = capsys.readouterr().out
    assert "Backtest of approach3 by compute (2 folds, cuts at the budgets)" in printed
