"""The demo: its ladder meets the issue's terms, the report builder on points from a known law,
the live progress line, and `lab demo --quick` through the real command (slow): report, fit.json,
the held-out check, TensorBoard logs, and an interrupted demo that continues to the same result."""

import base64
import io
import json
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from report_helpers import check_report_page, png_size

from analysis.approach3 import optimal_allocation
from analysis.report import analyse_study, summary_lines
from analysis.report_page import write_report
from helpers import ROOT, lab_command, lab_env, run_lab
from lab.errors import UserError
from lab.model.accounting import flops_per_token, with_vocab
from lab.studies.demo import (
    QUICK_STUDY,
    STUDY,
    StudyProgress,
    check_same_study,
    load_study,
    size_runs,
)

BYTE_VOCAB = 257


def png_images(page: str) -> list[bytes]:
    """Every <img> of a page: each must be an embedded base64 PNG, returned decoded."""
    sources = re.findall(r"<img [^>]*src='([^']*)'", page)
    images = []
    for src in sources:
        assert src.startswith("data:image/png;base64,"), src[:60]
        images.append(base64.b64decode(src.split(",", 1)[1], validate=True))
    return images


def check_png(data: bytes) -> None:
    """A whole PNG (png_size) of a plausible size."""
    width, height = png_size(data)
    assert 200 <= width <= 4000 and 200 <= height <= 4000, (width, height)


# ----------------------------------------------------------------------------- the ladder


@pytest.mark.parametrize("path", [STUDY, QUICK_STUDY], ids=["full", "quick"])
def test_plan_spends_each_budget(path, tmp_path):
    study = load_study(path)
    plans = size_runs(study, tmp_path, "muon", BYTE_VOCAB)
    from lab.config import load_config

    ladder = [p for p in plans if not p.held_out]
    held = [p for p in plans if p.held_out]
    assert plans == ladder + held  # the ladder trains first
    for plan in plans:
        cfg = plan.config
        assert load_config(study.base, list(plan.words)) == cfg  # the printed command is exact
        # Recomputed from the config the stable run will train with, not from the plan.
        per_step = (flops_per_token(with_vocab(cfg.model, BYTE_VOCAB), cfg.train.seq_len)
                    * cfg.train.batch_size * cfg.train.seq_len)
        if plan.held_out:  # one straight WSD run with the branches' decay, its own budget
            (s, d), = plan.pairs
            assert d == round(study.decay_fraction * s)
            assert cfg.train.steps == s + d and cfg.schedule.decay_steps == d
            assert cfg.schedule.decay_shape == "1-sqrt" and cfg.branch.at_steps == ()
            assert (s + d) * per_step == pytest.approx(study.held_out["budget"], rel=0.02)
            assert cfg.optim.lr == study.lr["muon"] and cfg.model.parameterization == "mup"
            continue
        assert cfg.train.steps == max(s for s, _ in plan.pairs)
        assert cfg.schedule.decay_steps == 0 and cfg.optim.name == "muon"
        assert cfg.model.parameterization == "mup"
        for (s, d), budget in zip(plan.pairs, plan.budgets, strict=True):
            assert d == round(study.decay_fraction * s)
            assert (s + d) * per_step == pytest.approx(budget, rel=0.02)
    # The staircase: budget j trains sizes j .. j+k-1, three or more a budget (a profile).
    k = study.sizes_per_budget
    for j, budget in enumerate(study.budgets):
        at = [i for i, p in enumerate(ladder) if budget in p.budgets]
        assert at == list(range(j, j + k)) and k >= 3
    # Each held-out size with every seed, each seed its own run.seed and run directory.
    seeds = study.held_out["seeds"]
    assert [(p.name, p.config.run.seed) for p in held] == [
        (p.name, seed) for p in held[::len(seeds)] for seed in seeds]
    assert len({p.run_dir for p in held}) == len(held)
    # The held-out budget extrapolates: beyond the top budget, one size at least beyond every
    # fitted point in both N and D (tokens), recomputed from the configs.
    assert study.held_out["budget"] > max(study.budgets)
    n_max = max(p.non_embedding_params for p in ladder)
    d_max = max(s_ + d_ for p in ladder for s_, d_ in p.pairs) * 16 * 128
    beyond = [p for p in held if p.non_embedding_params > n_max
              and p.config.train.steps * p.config.train.batch_size * p.config.train.seq_len
              > d_max]
    assert beyond
    if path == STUDY:  # the terms: 2x+ the top budget, 3+ sizes, 2 seeds
        assert study.held_out["budget"] >= 2 * max(study.budgets)
        assert len({p.name for p in held}) >= 3 and len(seeds) == 2
        n = [p.non_embedding_params for p in ladder]
        assert len(n) >= 4 and n == sorted(n)
        assert max(p.non_embedding_params for p in held) / n[0] > 10  # over a decade of N


def test_adamw_flag_takes_its_learning_rate(tmp_path):
    study = load_study(STUDY)
    plan = size_runs(study, tmp_path, "adamw", BYTE_VOCAB)[0]
    cfg = plan.config
    assert cfg.optim.name == "adamw" and cfg.optim.lr == study.lr["adamw"]


def test_study_mistakes_are_user_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: demo-base.yaml\nsizes: []\nbudgets: [1]\ndecay_fraction: 0.2\n"
                   "lr: {muon: 0.01}\nsteps: 3\n")
    with pytest.raises(UserError, match="unknown key 'steps'"):
        load_study(bad)
    with pytest.raises(UserError, match="does not exist"):
        load_study(tmp_path / "missing.yaml")
    (tmp_path / "demo-base.yaml").write_text((ROOT / "configs/demo-base.yaml").read_text())
    for name, (old, new), message in [
            ("inside", ("budget: 1.6e+11", "budget: 4.0e+10"), "must exceed the largest fitted"),
            ("stairs", ("sizes_per_budget: 3", "sizes_per_budget: 2"), "as many sizes as"),
            ("seeds", ("seeds: [0, 1]", "seeds: [1, 1]"), "distinct run seeds")]:
        bad = tmp_path / f"{name}.yaml"
        bad.write_text(QUICK_STUDY.read_text().replace(old, new))
        with pytest.raises(UserError, match=message):
            load_study(bad)
    # Above the top budget but not beyond the fitted D at any size: no extrapolation in both.
    near = tmp_path / "near.yaml"
    near.write_text(QUICK_STUDY.read_text().replace("budget: 1.6e+11", "budget: 5.0e+10"))
    with pytest.raises(UserError, match="beyond the fitted points in both N"):
        size_runs(load_study(near), tmp_path, "muon", BYTE_VOCAB)
    check_same_study(tmp_path / "out", {"optim": "muon"})
    check_same_study(tmp_path / "out", {"optim": "muon"})  # the same plan continues
    with pytest.raises(UserError, match="other settings"):
        check_same_study(tmp_path / "out", {"optim": "adamw"})


# ----------------------------------------------------------------------------- the report

TRUE = {"E": 1.0, "A": 50.0, "B": 500.0, "alpha": 0.3, "beta": 0.5}


def synthetic_points() -> pd.DataFrame:
    """4 sizes x 3 budgets from a known law with 0.1% noise; each budget is chosen so that its
    optimal size (closed form) is 5e4, 7e4 or 1e5, inside the sizes 2.5e4 to 2e5."""
    rng = np.random.default_rng(0)
    E, A, B, alpha, beta = TRUE.values()
    G = (alpha * A / (beta * B)) ** (1 / (alpha + beta))
    rows = []
    for k, n_opt in enumerate([5e4, 7e4, 1e5]):
        C = 6 * (n_opt / G) ** ((alpha + beta) / beta)  # N_opt = G (C/6)^(beta/(alpha+beta))
        for i, N in enumerate([2.5e4, 5e4, 1e5, 2e5]):
            D = C / (6 * N)
            loss = E + A / N**alpha + B / D**beta
            rows.append({"run": f"s{i}/b{k}", "size": f"s{i}", "N": N, "D": D, "C": C,
                         "loss": loss * (1 + 1e-3 * rng.standard_normal()), "budget": k})
    return pd.DataFrame(rows)


def test_report_on_a_known_law(tmp_path, monkeypatch):
    """Without a held_out column the largest model's longest branch is left out and predicted."""
    monkeypatch.chdir(tmp_path)
    points = synthetic_points()
    result = analyse_study(points, tmp_path, bootstrap=30, extrapolate=10)
    compute = {"flops_branched": 6e12, "flops_from_scratch": 1e13, "saving": 0.4}
    commands = {"train": ["lab train x"], "branch": ["lab branch y"], "logdir": "runs"}
    data = write_report(tmp_path, result, compute=compute, commands=commands,
                        timing={"total_seconds": 1.0}, title="synthetic")

    # The held-out point is the largest model's longest run, and it is not in the fit.
    held = data["heldout"]
    assert held["N"] == [2e5] and held["D"] == [points["D"][points["N"] == 2e5].max()]
    assert data["n_points"] == len(points) - 1
    assert len(pd.read_csv(tmp_path / "fit_points.csv")) == len(points) - 1
    true_loss = TRUE["E"] + TRUE["A"] / held["N"][0] ** 0.3 + TRUE["B"] / held["D"][0] ** 0.5
    assert held["predicted"][0] == pytest.approx(true_loss, rel=5e-3)
    assert held["error"] < 5e-3
    check_held_out(tmp_path, data, "\n".join(summary_lines(data, compute, {"total_seconds": 1.0})))
    (lo, hi), = held["interval"]
    assert lo <= held["predicted"][0] <= hi
    assert held["seed_spread"] is None and held["optimum_measured_N"] is None  # one point
    for key in ("alpha", "beta"):
        assert data[key] == pytest.approx(TRUE[key], abs=0.08)
        lo, hi = data["intervals"][key]
        assert lo <= data[key] <= hi
    # The allocation at 10x the largest budget, against the law's closed form.
    pred = data["prediction"]
    assert pred["C"] == pytest.approx(10 * points["C"].max(), rel=5e-3)
    n_opt, d_opt, loss = optimal_allocation(pred["C"], *TRUE.values())
    assert pred["N_opt"] == pytest.approx(float(n_opt), rel=0.25)
    assert pred["loss"] == pytest.approx(float(loss), rel=5e-3)
    # IsoFLOP: three budgets with their minima inside; N_opt grows as C^(5/8) in truth.
    assert data["isoflop"]["n_budgets"] == 3
    assert data["isoflop"]["a"] == pytest.approx(0.625, abs=0.1)

    page = (tmp_path / "report.html").read_text()
    names = {"law.png", "contours.png", "frontier.png", "residuals.png", "isoflop.png",
             "allocation.png"}
    assert {p.rsplit("/", 1)[-1] for p in data["figures"]} == names
    # The law's figure first; then every number in an HTML table, each table once.
    parts = check_report_page(page, data["figures"], lead=("law.png",))
    tables = {t["caption"]: t for t in parts.tables}
    losses = tables["Final eval loss per size and budget (* held out of the fit)"]
    assert [r[0] for r in losses["rows"]] == ["s0", "s1", "s2", "s3"]
    assert losses["rows"][-1][-1] == f"{held['measured'][0]:.4f}*"  # s3's longest: held out
    heldout = tables["The held-out runs: measured loss against the law's and the baselines' "
                     "predictions"]
    assert heldout["rows"][-1][:1] + heldout["rows"][-1][7:8] == [
        "mean |error|", f"{held['error']:.2%}"]
    law = {r[0]: r[1:] for r in tables["Approach 3 on 11 points"]["rows"]}
    assert float(law["alpha"][0]) == pytest.approx(data["alpha"], rel=1e-3)
    assert "src='http" not in page and "<script" not in page  # self-contained
    assert data["commands"]["fit"][0].startswith("lab fit fit_points.csv --bootstrap 30")


def held_out_budget(multiple: float = 4.0, noise: float = 2e-3) -> tuple[pd.DataFrame, float]:
    """The known law's held-out budget, `multiple` times synthetic_points' largest: three sizes
    at half, once and twice its optimal N (closed form), two seeds each with `noise`."""
    rng = np.random.default_rng(1)
    E, A, B, alpha, beta = TRUE.values()
    C = multiple * synthetic_points()["C"].max()
    n_opt = float(optimal_allocation(C, *TRUE.values())[0])
    rows = []
    for i, N in enumerate([n_opt / 2, n_opt, 2 * n_opt]):
        D = C / (6 * N)
        for seed in (0, 1):
            loss = (E + A / N**alpha + B / D**beta) * (1 + noise * rng.standard_normal())
            rows.append({"run": f"held-{i}-{seed}", "size": f"h{i}", "N": N, "D": D, "C": C,
                         "loss": loss, "budget": 3, "seed": seed, "held_out": True})
    return pd.DataFrame(rows), n_opt


def test_report_on_a_held_out_budget(tmp_path, monkeypatch):
    """The demo's check: a whole budget 4x beyond the fitted ones, three sizes x two seeds,
    recomputed from outside the report: seed means, the law's predictions and errors, the
    baselines fitted on the same points, the seeds' spread, and the loss minimum over N
    against the law's closed form."""
    from analysis.baselines import predict_baselines

    monkeypatch.chdir(tmp_path)
    fitted = synthetic_points().assign(held_out=False, seed=0)
    held_rows, n_opt = held_out_budget()
    points = pd.concat([fitted, held_rows], ignore_index=True)
    result = analyse_study(points, tmp_path, bootstrap=20)
    h = result["heldout"]
    assert result["n_points"] == len(fitted)
    assert len(pd.read_csv(tmp_path / "fit_points.csv")) == len(fitted)
    means = held_rows.groupby("N")["loss"].mean()
    assert h["N"] == pytest.approx(list(means.index)) and len(h["sizes"]) == 3
    assert h["measured"] == pytest.approx(list(means.values), rel=1e-12)
    assert h["measured_seeds"] == [list(g["loss"]) for _, g in held_rows.groupby("N")]
    law = np.array([result["E"] + result["A"] / n ** result["alpha"]
                    + result["B"] / d ** result["beta"]
                    for n, d in zip(h["N"], h["D"], strict=True)])
    assert h["predicted"] == pytest.approx(list(law), rel=1e-9)
    errors = law / means.values - 1
    assert h["error"] == pytest.approx(np.abs(errors).mean(), rel=1e-9)
    assert h["bias"] == pytest.approx(errors.mean(), rel=1e-9)
    # Fitted on 0.1% noise, the law extrapolates 4x in compute within its 0.2% seed noise.
    assert h["error"] < 4e-3
    query = pd.DataFrame({"N": h["N"], "D": h["D"], "loss": h["measured"]})
    expected = predict_baselines(fitted[["N", "D", "loss"]], query)
    assert set(h["baselines"]) == set(expected) == {"log_linear", "nearest", "two_point"}
    for name, pred in expected.items():
        assert h["baseline_predicted"][name] == pytest.approx(list(pred), rel=1e-9)
        assert h["baselines"][name] == pytest.approx(
            np.mean(np.abs(pred / means.values - 1)), rel=1e-9)
    assert h["goal"]["beats_every_baseline"] and h["goal"]["error_below_1pct"]
    spread = [abs(a - b) / ((a + b) / 2) for a, b in h["measured_seeds"]]
    assert h["seed_spread"] == pytest.approx(np.mean(spread), rel=1e-9)
    # The minimum over N: the law's along the budget near the closed form, the measured
    # parabola's vertex near it too (three sizes a factor 2 apart around it).
    assert h["optimum_predicted_N"] == pytest.approx(n_opt, rel=0.15)
    assert h["optimum_measured_N"] == pytest.approx(n_opt, rel=0.25)
    assert h["goal"]["optimum_within_1.5x"]
    # How far each point lies beyond the fitted ones, and the report shows it all.
    for x, n, d in zip(h["extrapolation"], h["N"], h["D"], strict=True):
        assert x["N"] == pytest.approx(n / fitted["N"].max())
        assert x["D"] == pytest.approx(d / fitted["D"].max())
        assert x["C"] == pytest.approx(4.0)
    assert h["beyond_both"] == [x["N"] > 1 and x["D"] > 1 for x in h["extrapolation"]]
    text = "\n".join(summary_lines(result, {"flops_branched": 1, "flops_from_scratch": 2,
                                             "saving": 0.5}, {}))
    assert "3 size(s) x 2 seed(s)" in text and f"mean |error| {h['error']:.2%}" in text
    assert f"measured at N {h['optimum_measured_N']:,.0f}" in text
    figure, = [f for f in result["figures"] if f.endswith("heldout.png")]
    check_png((tmp_path / figure).read_bytes() if not figure.startswith("/") else
              open(figure, "rb").read())
    for name in expected:
        assert f"{name} {h['baselines'][name]:.2%}" in text


# A task's known two-step law: its loss L(N, D), and accuracy a sigmoid of it.
TASK_LAW = {"E": 1.5, "A": 60.0, "B": 600.0, "alpha": 0.3, "beta": 0.5}
TASK_SIGMOID = {"a": 0.6, "k": 3.0, "L0": 5.0, "chance": 0.25}


def with_task(points: pd.DataFrame, noise: float, seed: int) -> pd.DataFrame:
    """The points with the columns a run's task results give (task/choice/...): the known
    task loss (0.1% noise) and its sigmoid's accuracy with `noise` points of scatter."""
    from analysis.downstream import sigmoid

    rng = np.random.default_rng(seed)
    E, A, B, alpha, beta = TASK_LAW.values()
    loss = (E + A / points["N"] ** alpha + B / points["D"] ** beta) \
        * (1 + 1e-3 * rng.standard_normal(len(points)))
    acc = sigmoid(loss, **TASK_SIGMOID) + noise * rng.standard_normal(len(points))
    return points.assign(**{"task/choice/loss": loss, "task/choice/accuracy": acc,
                            "task/choice/chance": 0.25})


def test_report_downstream_on_a_held_out_budget(tmp_path, monkeypatch):
    """The demo's downstream check on points of a known two-step law: fitted on the ladder
    alone, the sigmoid recovered, the held-out sizes' accuracy (their seeds' mean) predicted
    within a point of the closed form, errors and baselines recomputed from outside, and
    fit.json, the printed summary and the report's figure carry it."""
    from analysis.baselines import nearest
    from analysis.downstream import sigmoid

    monkeypatch.chdir(tmp_path)
    fitted = with_task(synthetic_points().assign(held_out=False, seed=0), 0.003, 0)
    held_rows = with_task(held_out_budget()[0], 0.003, 1)
    result = analyse_study(pd.concat([fitted, held_rows], ignore_index=True), tmp_path,
                           bootstrap=0)
    c = result["downstream"]["tasks"]["choice"]
    s = c["fit"]["sigmoid"]
    assert c["fit"]["n_points"] == len(fitted) and c["chance"] == 0.25
    for key, tol in (("a", 0.05), ("k", 0.3), ("L0", 0.1)):
        assert s[key] == pytest.approx(TASK_SIGMOID[key], abs=tol), key
    h = c["heldout"]
    means = held_rows.groupby("N")["task/choice/accuracy"].mean()
    assert h["measured"] == pytest.approx(list(means.values), rel=1e-12)
    assert h["seed_accuracy"] == [list(g["task/choice/accuracy"])
                                  for _, g in held_rows.groupby("N")]
    E, A, B, alpha, beta = TASK_LAW.values()
    n, d = np.array(h["N"]), np.array(h["D"])
    truth = sigmoid(E + A / n ** alpha + B / d ** beta, **TASK_SIGMOID)
    assert np.abs(np.array(h["predicted"]) - truth).max() < 0.01
    errors = np.array(h["predicted"]) - means.values
    assert h["errors"] == pytest.approx(list(errors), rel=1e-9)
    assert h["mean_abs_error"] == pytest.approx(np.abs(errors).mean(), rel=1e-9)
    assert h["goal_met"] == (np.abs(errors).max() <= 0.02) and h["goal_met"]
    assert h["above_chance"] == pytest.approx(list(means.values - 0.25), rel=1e-12)
    # The baselines, recomputed: least squares of accuracy on log N and log D, the nearest
    # ladder point, and a line in task loss at the law's predicted task loss.
    acc, logs = fitted["task/choice/accuracy"].to_numpy(), np.log(fitted[["N", "D"]].to_numpy())
    X = np.column_stack([np.ones(len(acc)), logs])
    line = np.column_stack([np.ones(3), np.log(n), np.log(d)]) @ np.linalg.lstsq(X, acc,
                                                                                rcond=None)[0]
    slope, icept = np.polyfit(fitted["task/choice/loss"], acc, 1)
    expected = {"log_linear": line,
                "nearest": nearest(fitted.assign(loss=acc), pd.DataFrame({"N": n, "D": d})),
                "loss_linear": icept + slope * np.array(h["task_loss_predicted"])}
    for name, pred in expected.items():
        assert h["baseline_predicted"][name] == pytest.approx(list(np.clip(pred, 0, 1)),
                                                              rel=1e-9)
        assert h["baselines"][name] == pytest.approx(
            np.mean(np.abs(np.clip(pred, 0, 1) - means.values)), rel=1e-9)
    # The CSV the printed `lab fit --method downstream` command reads holds the ladder only.
    csv = pd.read_csv(tmp_path / "downstream-choice-points.csv")
    assert len(csv) == len(fitted) and list(csv.columns) == ["N", "D", "task_loss", "accuracy"]
    assert "--method downstream --chance 0.25" in c["command"]
    check_png(open(c["figure"], "rb").read())
    data = write_report(tmp_path, result, compute={"flops_branched": 1, "flops_from_scratch": 2,
                                                   "saving": 0.5},
                        commands={}, timing={}, title="synthetic downstream")
    assert data["downstream"]["tasks"]["choice"]["heldout"]["predicted"] == h["predicted"]
    text = "\n".join(summary_lines(result, data["compute"], {}))
    assert f"mean |error| {100 * h['mean_abs_error']:.1f} points" in text
    assert f"predicted {h['predicted'][0]:.3f}" in text and "goal" in text
    page = (tmp_path / "report.html").read_text()
    parts = check_report_page(page, result["figures"], lead=("law.png", "heldout.png"))
    task = {t["caption"]: t for t in parts.tables}[
        "Task choice: held-out accuracy, predicted against measured"]
    assert [float(r[4]) for r in task["rows"][:-1]] == pytest.approx(h["predicted"], abs=5e-4)
    assert task["rows"][-1][6] == f"{100 * h['mean_abs_error']:.1f}"


def test_held_out_check_flags_a_law_that_loses(tmp_path, monkeypatch):
    """Held-out losses far from the law (the truth shifted by 3%): the goal is missed, and a
    baseline that happens to sit closer is named as beating the law."""
    monkeypatch.chdir(tmp_path)
    fitted = synthetic_points().assign(held_out=False, seed=0)
    held_rows, _ = held_out_budget(noise=0.0)
    held_rows["loss"] *= 1.03
    result = analyse_study(pd.concat([fitted, held_rows], ignore_index=True), tmp_path,
                           bootstrap=0)
    h = result["heldout"]
    assert h["error"] == pytest.approx(0.03, abs=0.006) and h["bias"] < 0
    assert not h["goal"]["error_below_1pct"]
    assert h["goal"]["beats_every_baseline"] == all(h["error"] < v
                                                    for v in h["baselines"].values())
    assert "interval" not in h  # no bootstrap, no interval
    assert "missed: error_below_1pct" in "\n".join(
        summary_lines(result, {"flops_branched": 1, "flops_from_scratch": 2, "saving": 0.5}, {}))


# ----------------------------------------------------------------------------- progress


def test_progress_one_live_line_on_a_terminal():
    out = io.StringIO()
    runs = [("a stable", 0, 100, 10), ("a branch 50+10", 50, 60, 10)]
    p = StudyProgress(runs, out, tty=True)
    assert p.total_flops() == 100 * 10 + 10 * 10
    p.start(0)
    p.show(20, {"loss": 2.5}, 0.1)
    time.sleep(0.01)
    p.show(40, {"loss": 2.0}, 0.1)
    text = out.getvalue()
    assert "\n" not in text and text.count("\r") == 3
    last = text.rsplit("\r", 1)[1]
    assert "[run 1/2] a stable" in last and "step 40/100" in last and "loss 2.0000" in last
    assert re.search(r"study 36% \| ETA \d+:\d\d:\d\d", last)  # 400 of 1,100 FLOPs
    p.finish("a stable: done", trained_steps=100)
    assert out.getvalue().endswith("a stable: done\n")


def test_progress_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    p = StudyProgress([("a stable", 0, 1000, 1)], out, tty=False, every=3600)
    p.start(0)
    for step in range(10, 100, 10):
        p.show(step, {"loss": 1.0}, 0.01)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert len(lines) == 1 and lines[0].endswith("starting")  # later updates throttled


# ----------------------------------------------------------------------------- the command


def check_held_out(out, fit: dict, stdout: str) -> None:
    """The held-out check recomputed from outside the report: its points are the rows of
    points.csv marked held_out (or, unmarked, the largest model's longest run), absent from the
    fitted points; each size's measured loss is the mean over its seeds, its prediction the
    fitted law E + A / N^alpha + B / D^beta at its N and D; the printed error is that one's."""
    points = pd.read_csv(out / "points.csv")
    fitted = pd.read_csv(out / "fit_points.csv")
    held_rows = points[points["held_out"]]
    assert len(fitted) == len(points) - len(held_rows)
    assert not fitted["run"].isin(held_rows["run"]).any()
    if len(held_rows) == 1:
        largest = points[points["N"] == points["N"].max()]
        assert held_rows.index[0] == largest["D"].idxmax()
    measured = held_rows.groupby("N")["loss"].mean()
    d = held_rows.groupby("N")["D"].mean()
    h = fit["heldout"]
    assert h["N"] == pytest.approx(list(measured.index), rel=1e-12)
    assert h["measured"] == pytest.approx(list(measured.values), rel=1e-12)
    law = fit["E"] + fit["A"] / measured.index ** fit["alpha"] + fit["B"] / d ** fit["beta"]
    assert h["predicted"] == pytest.approx(list(law), rel=1e-9)
    error = np.mean(np.abs(law.values / measured.values - 1))
    printed = re.search(r"law: mean \|error\| (\d+\.\d\d)%", stdout)
    assert printed, stdout[-2000:]
    assert float(printed.group(1)) == pytest.approx(100 * error, abs=0.006)


def check_outputs(out, stdout: str) -> dict:
    fit = json.loads((out / "fit.json").read_text())
    for key in ("E", "A", "B", "alpha", "beta", "a", "b", "n_points", "intervals"):
        assert key in fit, key
    for key in ("alpha", "beta"):
        assert np.isfinite(fit[key]) and len(fit["intervals"][key]) == 2
    check_held_out(out, fit, stdout)
    assert {"C", "N_opt", "D_opt", "loss"} <= set(fit["prediction"])
    assert fit["compute"]["flops_branched"] < fit["compute"]["flops_from_scratch"]
    page = (out / "report.html").read_text()
    images = png_images(page)
    assert len(images) >= 5
    for img in images:
        check_png(img)
    check_report_page(page, fit["figures"], lead=("law.png", "heldout.png", "curves.png"))
    for cmd in ("lab train configs/demo-base.yaml", "lab branch", "lab fit"):
        assert cmd in page
    run_dirs = [p.parent for p in (out / "runs").rglob("summary.json")]
    assert len(run_dirs) == 16  # 4 stable runs, 6 branches, 3 held-out sizes x 2 seeds
    h = fit["heldout"]
    assert len(h["sizes"]) == 3 and all(len(r) == 2 for r in h["runs"])
    assert all("held-out" in r for runs in h["runs"] for r in runs)
    assert any(h["beyond_both"]) and all(x["C"] > 1 for x in h["extrapolation"])
    assert set(h["baselines"]) == {"log_linear", "nearest", "two_point"}
    assert h["seed_spread"] is not None
    for run_dir in run_dirs:
        assert list((run_dir / "tb").glob("events.out.tfevents.*")), run_dir
    check_downstream(out, fit, stdout, page)
    return fit


def check_downstream(out, fit: dict, stdout: str, page: str) -> None:
    """The quick demo's runs score both tasks (128 examples each); fit.json's downstream entry
    holds each task's law fitted on the ladder's points and the held-out sizes' predictions
    beside their seeds' mean accuracy, and the summary and the report show them."""
    points = pd.read_csv(out / "points.csv")
    assert set(fit["downstream"]["tasks"]) == {"choice", "exact"}
    for task, c in fit["downstream"]["tasks"].items():
        assert c["fit"]["n_points"] == int((~points["held_out"]).sum()) == 6
        assert c["chance"] == (0.25 if task == "choice" else 0.0)
        held = points[points["held_out"]].groupby("N")[f"task/{task}/accuracy"].mean()
        h = c["heldout"]
        assert h["measured"] == pytest.approx(list(held.values), rel=1e-12)
        assert all(0 <= x <= 1 for x in h["predicted"] + h["measured"])
        # 128 examples: every accuracy a multiple of 1/128
        acc = points[f"task/{task}/accuracy"].to_numpy()
        np.testing.assert_allclose(acc * 128, np.round(acc * 128), atol=1e-6)
        assert f"downstream, task {task}" in stdout
        assert f"mean |error| {100 * h['mean_abs_error']:.1f} points" in stdout
        assert (out / c["figure"]).is_file() or Path(c["figure"]).is_file()
    assert page.count("downstream.png:") == 2 and "Downstream tasks" in page
    assert 0 < fit["downstream"]["cost"]["share"] < 0.5


# The smallest study `lab demo` takes: the quick ladder on half its budgets, one held-out size
# with two seeds, 64 examples a task. It runs the whole path by default (about half the quick
# demo's time); the quick preset itself runs in the slow selection.
SMALL_STUDY = """\
base: {base}
sizes:
  - {{d_model: 32, n_layers: 1, n_heads: 2}}
  - {{d_model: 40, n_layers: 1, n_heads: 2}}
  - {{d_model: 48, n_layers: 1, n_heads: 4}}
  - {{d_model: 64, n_layers: 1, n_heads: 4}}
budgets: [1.0e+10, 2.0e+10]
sizes_per_budget: 3
decay_fraction: 0.25
lr: {{muon: 3.0e-2, adamw: 1.0e-2}}
held_out:
  sizes: [{{d_model: 80, n_layers: 1, n_heads: 4}}]
  budget: 8.0e+10
  seeds: [0, 1]
bootstrap: 20
overrides: [train.eval_batches=8, schedule.warmup_steps=4, checkpoint.every_steps=0,
            "eval.tasks=[choice:64,exact:64]"]
"""


def test_a_small_study_runs_end_to_end(tmp_path):
    """`lab demo --study FILE`: every run, the fit, the held-out check against its two seeds,
    both tasks' downstream predictions and the report with its figures, through the command."""
    study = tmp_path / "small.yaml"
    study.write_text(SMALL_STUDY.format(base=ROOT / "configs" / "demo-base.yaml"))
    out = tmp_path / "out"
    result = run_lab(["demo", "--study", str(study), "--out", str(out)], timeout=900)
    fit = json.loads((out / "fit.json").read_text())
    check_held_out(out, fit, result.stdout)
    assert fit["n_points"] == 6 and np.isfinite([fit["alpha"], fit["beta"]]).all()
    assert len(fit["heldout"]["runs"]) == 1 and len(fit["heldout"]["runs"][0]) == 2
    assert len(list((out / "runs").rglob("summary.json"))) == 12  # 4 stable, 6 branches, 2
    points = pd.read_csv(out / "points.csv")
    for task, c in fit["downstream"]["tasks"].items():
        held = points[points["held_out"]][f"task/{task}/accuracy"].mean()
        assert c["heldout"]["measured"] == pytest.approx([held], rel=1e-12)
        assert f"downstream, task {task}" in result.stdout
    assert set(fit["downstream"]["tasks"]) == {"choice", "exact"}
    page = (out / "report.html").read_text()
    for img in png_images(page):
        check_png(img)
    assert len(png_images(page)) >= 5 and "report:" in result.stdout
    check_report_page(page, fit["figures"], lead=("law.png", "curves.png"))


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "quick"
    started = time.perf_counter()
    result = run_lab(["demo", "--quick", "--out", str(out)], timeout=900)
    return out, result.stdout, time.perf_counter() - started


@pytest.mark.slow
def test_quick_demo_writes_the_report(quick_demo):
    out, stdout, seconds = quick_demo
    check_outputs(out, stdout)
    assert "report:" in stdout
    before = json.loads((out / "fit.json").read_text())
    # The printed `lab fit` command, run as printed, gives the fit of fit.json.
    cmd = shlex.split(before["commands"]["fit"][0])
    refit = run_lab([*cmd[1:], "--json", str(out / "refit.json")])
    assert "Approach 3" in refit.stdout
    for key in ("E", "alpha", "beta"):
        assert json.loads((out / "refit.json").read_text())[key] == pytest.approx(before[key])
    # The printed `lab fit --method downstream` command gives the demo's predictions.
    c = before["downstream"]["tasks"]["choice"]
    run_lab([*shlex.split(c["command"])[1:], "--json", str(out / "downstream.json")])
    again_fit = json.loads((out / "downstream.json").read_text())
    assert [p["accuracy"] for p in again_fit["predictions"]] == pytest.approx(
        c["heldout"]["predicted"], rel=1e-9)
    # The demo's fit.json is a fit JSON that `lab plan` reads (docs/planning.md starts there):
    # the fitted points beside the residuals, not the study's table.
    from analysis.predict import LossLaw

    law = LossLaw.from_dict(before, where="fit.json")
    assert law.points.shape == (len(law.residuals), 2)


@pytest.mark.slow
def test_a_rerun_finds_every_run_finished_and_rebuilds_the_same_analysis(quick_demo):
    out, _, _ = quick_demo
    before = json.loads((out / "fit.json").read_text())
    again = run_lab(["demo", "--quick", "--out", str(out)])
    assert again.stdout.count("finished already") == 16
    after = json.loads((out / "fit.json").read_text())
    for key in ("predicted", "error", "seed_spread", "baselines"):
        assert after["heldout"][key] == pytest.approx(before["heldout"][key], rel=1e-9)
    assert after["alpha"] == pytest.approx(before["alpha"], rel=1e-9)


@pytest.mark.slow
def test_interrupted_demo_continues_to_the_same_result(quick_demo, tmp_path):
    ref_out, _, _ = quick_demo
    out = tmp_path / "quick"
    args = ["demo", "--quick", "--out", str(out)]
    proc = subprocess.Popen(lab_command(args), cwd=ROOT, env=lab_env(1), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen = []
    for line in proc.stdout:  # stop it while the second size's stable run trains
        seen.append(line)
        if "[run 3/16] d40-l1 stable | starting" in line:
            time.sleep(8)
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.communicate(timeout=300)[0]
    assert proc.returncode == 130, "".join(seen) + rest
    assert "continues where it stopped" in rest
    assert not (out / "report.html").exists()

    again = run_lab(args, timeout=900)
    assert again.stdout.count("finished already") >= 2  # the first size and its branch
    check_outputs(out, again.stdout)
    # Interrupted and continued, every point equals the uninterrupted demo's.
    ref = pd.read_csv(ref_out / "points.csv").sort_values(["N", "budget", "seed"])
    got = pd.read_csv(out / "points.csv").sort_values(["N", "budget", "seed"])
    assert len(got) == len(ref) == 12
    np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-5)
