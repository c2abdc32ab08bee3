"""Fits that say loudly what is weak: stable parents left out, warnings first, degenerate laws
never printed as laws, no NaN intervals, bootstrap intervals in the allocation table, one N."""

import json

import numpy as np
import pandas as pd
import yaml
from analysis_helpers import TRUTH, law_points, make_run
from matplotlib.figure import Figure

from analysis import plots
from analysis.approach3 import Approach3Fit, law, optimal_allocation
from analysis.isoflop import fit_isoflop
from analysis.report import SMOKE_TEST, banner_lines
from analysis.report_page import render_html
from lab.cli.fit import load_inputs, main


def stable_with_branches(root, decays=(10, 20, 30, 40, 50)):
    """A stable WSD run (no decay) and its branches beneath it, as `lab branch` lays them out."""
    stable = make_run(root, "stable", N=1e7, D=1e9, loss=3.0)
    cfg = yaml.safe_load((stable / "config.yaml").read_text())
    cfg["schedule"]["decay_steps"] = 0
    (stable / "config.yaml").write_text(yaml.safe_dump(cfg))
    for d in decays:
        # The parent spelled as the child's config gives it: a different string, the same run.
        make_run(stable / "branches", f"step100-decay{d}", N=1e7, D=1e9 * (1 + d / 100),
                 loss=2.9 - d / 1000, parent=str(stable) + "/./", branch_step=100,
                 decay_steps=d)
    return stable


def test_stable_parent_is_left_out_when_its_branches_are_fitted(tmp_path):
    stable = stable_with_branches(tmp_path / "runs")
    alone = make_run(tmp_path / "runs", "stable-alone", N=2e7, D=1e9, loss=2.95)
    (alone / "config.yaml").write_text((stable / "config.yaml").read_text())
    inputs = load_inputs([str(tmp_path / "runs")])
    kept = set(inputs.points["run"])
    assert str(stable) not in kept and str(alone) in kept  # no branches: nothing replaces it
    assert len(kept) == 6
    assert [r for r, _ in inputs.skipped] == [str(stable)]
    everything = load_inputs([str(tmp_path / "runs")], include_stable_parents=True)
    assert str(stable) in set(everything.points["run"]) and len(everything.points) == 7


def test_a_stable_run_and_its_branches_at_one_size_are_refused(tmp_path, capsys):
    """The case that printed alpha 6874 as a normal table: one N cannot give a law."""
    stable_with_branches(tmp_path / "runs")
    assert _exit_code([str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: Approach 3 needs at least 2 distinct N")
    assert "1 undecayed stable run(s) with branches were left out" in err[0]
    assert "--include-stable-parents" in err[0]


def _exit_code(argv):
    from lab.cli import main as lab_main

    return lab_main(["fit", *argv])


def test_n_is_non_embedding_by_default_and_named(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for i, (n, d, loss) in enumerate(zip(*law_points(rng, 30), strict=True)):
        make_run(tmp_path / "runs", f"r{i:02d}", N=n, D=d, loss=loss)
    inputs = load_inputs([str(tmp_path / "runs")])
    assert np.allclose(inputs.points["N"], inputs.points["non_embedding_params"])
    assert inputs.n_label == "N (non-embedding parameters)"
    total = load_inputs([str(tmp_path / "runs")], params="total")
    assert total.n_label == "N (total parameters)"
    assert np.allclose(total.points["N"] * 0.8, total.points["non_embedding_params"])
    out = tmp_path / "fit.json"
    assert main([str(tmp_path / "runs"), "--json", str(out)]) == 0
    assert "N_opt, N (non-embedding parameters)" in capsys.readouterr().out
    assert json.loads(out.read_text())["N_definition"] == "N (non-embedding parameters)"


def test_warnings_come_first_as_a_banner(tmp_path, capsys):
    """A nearly collinear design (D about 20 N) is fitted, but the warning leads the output."""
    rng = np.random.default_rng(1)
    N = np.logspace(6, 8, 30)
    D = 20 * N * np.exp(rng.normal(0, 0.02, 30))
    pd.DataFrame({"N": N, "D": D, "loss": law(N, D, *TRUTH)}).to_csv(tmp_path / "p.csv")
    assert main([str(tmp_path / "p.csv")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "!" * 78 and lines[1].startswith("WARNING:")
    first_number = next(i for i, x in enumerate(lines) if x.startswith("Approach 3"))
    assert any("nearly collinear" in x for x in lines[:first_number])
    assert not any(x.startswith("warning:") for x in lines[first_number:])


def test_compute_optimal_table_shows_bootstrap_intervals(tmp_path, capsys):
    N, D, L = law_points(np.random.default_rng(2), 30)
    pd.DataFrame({"N": N, "D": D, "loss": L}).to_csv(tmp_path / "p.csv", index=False)
    out = tmp_path / "fit.json"
    assert main([str(tmp_path / "p.csv"), "--bootstrap", "20", "--budgets", "1e21",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    table = text.split("Compute-optimal allocation:")[1].strip().splitlines()
    assert table[0].split("  ")[0] == "C (FLOPs)" and table[0].count("95% interval") == 3
    row = json.loads(out.read_text())["compute_optimal"][0]
    assert row["N_opt_lo"] < row["N_opt"] < row["N_opt_hi"]
    assert f"[{row['N_opt_lo']:.4e}, {row['N_opt_hi']:.4e}]" in table[2]
    # Without --bootstrap, no interval column.
    assert main([str(tmp_path / "p.csv"), "--budgets", "1e21"]) == 0
    assert "interval" not in capsys.readouterr().out.split("Compute-optimal")[1]


def _fit(**changes) -> Approach3Fit:
    E, A, B, alpha, beta = TRUTH
    values = dict(E=E, A=A, B=B, alpha=alpha, beta=beta, objective=1e-4, n_points=12,
                  n_starts=1, n_converged=1) | changes
    return Approach3Fit(**values)


class _Captured:
    """Titles and legend texts of every figure saved while it is installed."""

    def __init__(self, monkeypatch):
        self.titles, self.legends = [], []

        def save(fig, path, **_):
            for ax in fig.axes:
                self.titles.append(ax.get_title())
                legend = ax.get_legend()
                self.legends += [t.get_text() for t in legend.get_texts()] if legend else []

        monkeypatch.setattr(Figure, "savefig", save)


def test_a_degenerate_law_is_never_printed_raw(tmp_path, monkeypatch):
    good, bad = _fit(), _fit(A=9.7e116, alpha=6874.0)
    assert not good.degenerate and "482/N^0.348" in good.describe()
    assert bad.degenerate and bad.describe().startswith("degenerate fit")
    assert _fit(beta=0.001).degenerate and _fit(B=float("nan")).degenerate
    seen = _Captured(monkeypatch)
    N, D, L = law_points(np.random.default_rng(3), 12)
    plots.plot_approach3(bad, pd.DataFrame({"N": N, "D": D, "loss": L}), str(tmp_path))
    assert seen.titles and not any("e+116" in t or "9.7" in t for t in seen.titles)
    assert "degenerate" in seen.titles[0]
    assert not any("optimal allocation" in x for x in seen.legends)


def test_allocation_legend_shows_no_nan_interval(tmp_path, monkeypatch):
    """Two budgets leave the power laws no degree of freedom: no interval, never [nan, nan]."""
    rows = []
    for C in (1e18, 1e19):
        n_opt, _, _ = optimal_allocation(C, *TRUTH)
        for n in n_opt * np.logspace(-0.6, 0.6, 7):
            rows.append({"N": n, "C": C, "D": C / (6 * n), "loss": law(n, C / (6 * n), *TRUTH)})
    fit = fit_isoflop(pd.DataFrame(rows))
    assert np.isnan(fit.N_opt.exponent_interval).all()
    seen = _Captured(monkeypatch)
    plots.plot_isoflop(fit, str(tmp_path), "N (non-embedding parameters)")
    labels = [x for x in seen.legends if "∝ C^" in x]
    assert len(labels) == 2 and not any("nan" in x or "[" in x for x in labels)
    assert f"N_opt ∝ C^{fit.N_opt.exponent:.3f}" in labels


def _result(**extra) -> dict:
    """The smallest analyse_study result render_html reads."""
    held = {"sizes": ["s3"], "N": [2e5], "D": [4e6], "measured": [1.5], "predicted": [1.51],
            "measured_seeds": [[1.5]], "errors": [0.0067], "error": 0.0067, "bias": 0.0067,
            "worst": 0.0067, "baselines": {"nearest": 0.02},
            "baseline_predicted": {"nearest": [1.53]}, "baseline_errors": {"nearest": [0.02]},
            "seed_spread": None, "extrapolation": [{"N": 1.0, "D": 1.0, "C": 1.0}],
            "beyond_both": [False], "goal": {"error_below_1pct": True}}
    return {"E": 1.0, "A": 50.0, "B": 500.0, "alpha": 0.3, "beta": 0.5, "a": 0.6, "b": 0.4,
            "n_points": 11, "heldout": held, "isoflop": {"error": "one budget"},
            "prediction": {"C": 1e15, "multiple_of_largest": 10, "N_opt": 1e5, "D_opt": 2e6,
                           "loss": 1.4},
            "study_points": [{"size": "s3", "N": 2e5, "D": 4e6, "C": 4.8e12, "loss": 1.5,
                        "budget": 0, "held_out": True}],
            "fit_text": "", "isoflop_text": "", "figures": [], "commands": {"fit": []},
            **extra}


def test_quick_demo_report_opens_with_the_smoke_test_notice_and_warnings():
    compute = {"flops_branched": 1.0, "flops_from_scratch": 2.0, "saving": 0.5}
    result = _result(warnings=["alpha=6.87e+03 is beyond the grid of starts (0 to 2)"])
    page = render_html(result, compute=compute, commands={}, timing={}, title="t",
                       smoke_test=True)
    summary = page.index("<p class='lead'>")  # the held-out verdict, then the figures
    assert page.index("class='banner'") < summary
    assert page.index("SMOKE TEST") < summary and page.index("beyond the grid") < summary
    assert page.count("beyond the grid") == 1  # not repeated as a grey paragraph further down
    assert banner_lines(result, smoke_test=True)[0] == SMOKE_TEST
    plain = render_html(_result(), compute=compute, commands={}, timing={}, title="t")
    assert "class='banner'" not in plain and "SMOKE TEST" not in plain
