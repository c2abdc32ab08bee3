"""StepFun's hyperparameter laws and the critical batch, recovered from synthetic grids with a
known law."""

import json

import numpy as np
import pandas as pd
import pytest

from analysis.cli import main
from analysis.critical_batch import fit_critical_batch, fit_steps_examples, steps_to_reach
from analysis.hparams import fit_stepfun_laws
from tests.analysis_helpers import make_run

# Li et al. 2025's fitted laws, used as the truth.
LR = (1.79, -0.713, 0.307)  # a, alpha (N), beta (D)
BATCH = (0.58, 0.571)  # c, gamma (D), batch in tokens


def stepfun_grid(noise: float, seed: int = 0) -> pd.DataFrame:
    """A (N, D, lr, batch) grid around the true optimum of each cell; the loss is a bowl in
    log lr and log batch around it, plus log-normal noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for N in (1e5, 3e5, 1e6, 3e6):
        for D in (1e7, 3e7, 1e8, 3e8):
            eta, b_opt = LR[0] * N ** LR[1] * D ** LR[2], BATCH[0] * D ** BATCH[1]
            for lr in 2.0 ** np.arange(-16, 2, 0.5):
                for b in 2.0 ** np.arange(8, 20, 0.5):
                    if abs(np.log(lr / eta)) > 1.6 or abs(np.log(b / b_opt)) > 1.6:
                        continue
                    loss = 3 + 50 * N**-0.3 + 0.02 * np.log(lr / eta) ** 2
                    loss += 0.01 * np.log(b / b_opt) ** 2
                    rows.append({"run": f"N{N:g}-D{D:g}-lr{lr:.3g}-b{b:g}", "N": N, "D": D,
                                 "lr": lr, "batch_tokens": b,
                                 "loss": loss * np.exp(rng.normal(0, noise))})
    return pd.DataFrame(rows)


def test_stepfun_recovers_the_exponents():
    fit = fit_stepfun_laws(stepfun_grid(noise=5e-4), bootstrap=300)
    (alpha, beta), (gamma,) = fit.lr.exponents, fit.batch.exponents
    # The grid's spacing (a factor sqrt 2) limits how well a band of grid points centres on
    # the optimum: measured errors are about 0.01-0.02.
    assert alpha == pytest.approx(LR[1], abs=0.04)
    assert beta == pytest.approx(LR[2], abs=0.04)
    assert gamma == pytest.approx(BATCH[1], abs=0.04)
    for value, (lo, hi) in zip(fit.lr.exponents, fit.lr.exponent_intervals, strict=True):
        assert lo < value < hi
    # The band holds only runs within 0.25% of their cell's best, and every cell has some.
    assert (fit.band["loss"] <= fit.band["best_loss"] * 1.0025).all()
    assert fit.band["cell"].nunique() == 16


def test_lab_fit_hparams_names_the_band_runs(tmp_path, capsys):
    grid = stepfun_grid(noise=0.0).sample(frac=0.25, random_state=0)  # a sparser grid
    for i, r in enumerate(grid.itertuples()):
        make_run(tmp_path / "runs", f"r{i}", N=r.N, D=r.D, loss=r.loss, lr=r.lr,
                 batch_size=int(r.batch_tokens), seq_len=1)
    out = tmp_path / "hp.json"
    assert main([str(tmp_path / "runs"), "--method", "hparams", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    band = result["stepfun"]["band_runs"]
    assert band and all(b["run"] in printed for b in band)
    assert result["stepfun"]["lr"]["exponents"]["N"] == pytest.approx(LR[1], abs=0.15)
    assert "lr" in result  # DeepSeek's form in C fitted alongside


def synthetic_curves(noise: float, seed: int = 0, b_star=2e5, alpha_b=0.7) -> pd.DataFrame:
    """Loss curves obeying S = S_min(L) (1 + B_crit(L) / B), B_crit = b_star L^(-1/alpha_B)."""
    rng = np.random.default_rng(seed)
    rows = []
    for b in 2 ** np.arange(10, 19):
        L = np.linspace(2.2, 6.0, 400)
        S = 1e3 * (L - 2.0) ** -1.5 * (1 + b_star * L ** (-1 / alpha_b) / b)
        L = L * np.exp(rng.normal(0, noise, len(L)))
        rows += [{"run": f"b{b}", "step": s, "loss": v, "batch_tokens": b}
                 for s, v in zip(S, L, strict=True)]
    return pd.DataFrame(rows).sort_values(["run", "step"])


def test_steps_examples_closed_form():
    B = np.array([64.0, 128, 256, 512])
    s_min, e_min = 100.0, 3.2e4
    assert fit_steps_examples(B, s_min + e_min / B) == pytest.approx((s_min, e_min))
    assert steps_to_reach(np.array([0, 10, 20.0]), np.array([5, 4, 2.0]), 3.0) == 15.0


@pytest.mark.parametrize(("noise", "tol"), [(0.0, 0.01), (0.002, 0.1)])
def test_critical_batch_recovers_the_power_law(noise, tol):
    fit = fit_critical_batch(synthetic_curves(noise))
    assert fit.law.exponent == pytest.approx(-1 / 0.7, abs=tol * 1.43)
    assert fit.law.coef == pytest.approx(2e5, rel=3 * tol)


def test_lab_fit_critical_batch_from_run_directories(tmp_path, capsys):
    curves = synthetic_curves(0.0)
    for b, g in curves.groupby("batch_tokens"):
        rows = [{"step": float(s), "loss": float(v), "tokens": float(s * b)}
                for s, v in zip(g["step"], g["loss"], strict=True)]
        make_run(tmp_path / "runs", f"b{b}", N=1e6, D=rows[-1]["tokens"], loss=rows[-1]["loss"],
                 batch_size=int(b), seq_len=1, curve=rows)
    out = tmp_path / "cb.json"
    assert main([str(tmp_path / "runs"), "--method", "critical-batch", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["law"]["exponent"] == pytest.approx(-1 / 0.7, abs=0.02)
    assert "Critical batch size" in capsys.readouterr().out
