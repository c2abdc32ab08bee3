"""The warning near the irreducible loss (analysis.irreducible): it fires when a prediction's
reducible part is under NEAR_E_MARGIN of it, or when E's bootstrap interval is wider than the
predicted improvement, and not otherwise; `lab fit` and `lab plan` put it in their banner."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.approach3 import law, optimal_allocation
from analysis.irreducible import NEAR_E_MARGIN, WORDS, NearE, near_e_warning
from lab.cli import fit as fit_cli
from lab.cli import plan as plan_cli

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
BANNER = "!" * 78


def test_the_two_tests_and_their_edges():
    # Reducible share 11%: not under the 10% margin; 9%: under.
    assert not NearE("at C", 1.0, 0.89, None, None).within_margin
    assert NearE("at C", 1.0, 0.91, None, None).within_margin
    # E's interval 0.3 wide against an improvement of 0.2 (1.2 -> 1.0): too loose; of 0.4: not.
    assert NearE("at C", 1.0, 0.5, (0.3, 0.6), 1.2).E_too_loose
    assert not NearE("at C", 1.0, 0.5, (0.3, 0.6), 1.4).E_too_loose
    # A prediction above the best run is no extrapolation toward E: the interval test is off.
    assert not NearE("at C", 1.5, 0.5, (0.0, 1.0), 1.2).E_too_loose
    assert not NearE("at C", 1.0, 0.5, None, 1.2).E_too_loose  # no bootstrap, no interval
    far = NearE("at C = 1e+20", 2.0, 1.0, (0.9, 1.1), 2.5)
    assert not far.fires and near_e_warning([far]) is None
    near = NearE("at C = 1e+22", 1.05, 1.0, (0.9, 1.1), 1.1)
    text = near_e_warning([far, near, near])
    assert WORDS == "irreducible loss" and WORDS in text
    assert "1.05 at C = 1e+22 (and 1 more of the 3 predictions)" in text
    assert "4.8% of it reducible" in text and f"{NEAR_E_MARGIN:.0%} margin" in text
    assert "wider than the predicted improvement of 0.05" in text


def law_csv(path: Path, truth) -> pd.DataFrame:
    """Noise-free points of `truth` on a grid of 4 N by 4 D (N 1e7 to 1e9, D 1e8 to 1e11)."""
    N, D = (g.ravel() for g in np.meshgrid(np.logspace(7, 9, 4), np.logspace(8, 11, 4)))
    frame = pd.DataFrame({"N": N, "D": D, "loss": law(N, D, *truth)})
    frame.to_csv(path, index=False)
    return frame


def test_lab_fit_warns_in_its_banner_only_near_e(tmp_path, capsys):
    """The law's own compute-optimal loss is 23% reducible at the largest point's compute and 8%
    at 1000 times it: the first prints no banner, the second the warning, also in the JSON's
    warnings (no bootstrap here: the margin test alone)."""
    truth = (1.8, 482.0, 2085.0, 0.348, 0.366)
    points = law_csv(tmp_path / "p.csv", truth)
    top = float((6 * points["N"] * points["D"]).max())
    shares = {}
    for k in (1.0, 1e3):
        L = optimal_allocation(k * top, *truth)[2]
        shares[k] = (L - truth[0]) / L
    assert shares[1.0] > NEAR_E_MARGIN + 0.1 and shares[1e3] < NEAR_E_MARGIN - 0.015
    out = tmp_path / "fit.json"
    for k, fires in ((1.0, False), (1e3, True)):
        assert fit_cli.main([str(tmp_path / "p.csv"), "--budgets", f"{k * top:g}",
                             "--json", str(out)]) == 0
        text = capsys.readouterr().out
        lines = text.splitlines()
        assert (lines[0] == BANNER and WORDS in lines[2]) is fires, text[:600]
        assert (WORDS in text) is fires
        assert any(WORDS in w for w in json.loads(out.read_text())["warnings"]) is fires


def fit_json(path: Path, truth, E_draws=None) -> str:
    """An approach3 fit JSON of `truth` as `lab fit` writes it: residuals at the fitted points
    (zero), and optionally bootstrap draws whose E is E_draws (the rest as fitted)."""
    N, D = np.logspace(5, 5.7, 8), np.logspace(6.5, 7.3, 8)  # the best: 11.2 under truth 1
    d = dict(zip(("E", "A", "B", "alpha", "beta"), truth, strict=True))
    d |= {"method": "approach3", "params": "total", "residuals": [0.0] * 8,
          "points": np.column_stack([N, D]).tolist()}
    if E_draws is not None:
        d["bootstrap_params"] = [[e, *truth[1:]] for e in E_draws]
    path.write_text(json.dumps(d))
    return str(path)


@pytest.mark.parametrize("case, truth, E_draws, fires", [
    ("far from E", (1.8, 482.0, 2085.0, 0.348, 0.366), None, False),
    ("within the margin", (1.8, 1.5, 4.0, 0.348, 0.366), None, True),
    ("E too loosely known", (1.8, 482.0, 2085.0, 0.348, 0.366), np.linspace(0.2, 1.8, 40), True),
])
def test_lab_plan_warns_in_its_banner_only_near_e(tmp_path, capsys, case, truth, E_draws, fires):
    src = fit_json(tmp_path / "fit.json", truth, E_draws)
    out = tmp_path / "plan"
    assert plan_cli.main([src, "--budget", "1e14", "--out", str(out), "--base", TINY,
                          "--aspect-ratio", "32"]) == 0
    text = capsys.readouterr().out
    plan = json.loads((out / "plan.json").read_text())
    check = plan["near_irreducible"]
    assert (check["warning"] is not None) is fires, check
    assert (text.splitlines()[0] == BANNER and WORDS in text.splitlines()[2]) is fires, text
    assert text.count(WORDS) == int(fires)  # in the banner, not again among the warnings
    assert check["loss"] == pytest.approx(plan["predicted_loss"])
    assert check["reducible_share"] == pytest.approx(1 - truth[0] / plan["predicted_loss"])
