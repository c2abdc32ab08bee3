"""The MoE scaling law (analysis.moe_law, Clark et al. 2022) and its way in: `lab fit --method
moe` on CSVs and run directories, `--params active|total`, its backtest by size, and the
moe-tiny sweep preset."""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from analysis_helpers import make_run
from scipy import optimize

from analysis.moe_law import dense_equivalent, fit_moe, log_e_hat, moe_law
from lab.cli.fit import main
from lab.config import ModelConfig
from lab.studies.sweep import expand_sweep, load_sweep

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs" / "sweeps" / "moe-tiny.yaml"
# A routed law near Clark et al.'s S-BASE magnitudes: a, b, c, d, E_start, E_max.
TRUTH = (-0.08, -0.1, 0.004, 2.2, 1.8, 300.0)
HAS_MOE = "moe" in {f.name for f in dataclasses.fields(ModelConfig)}


def grid_points(rng, noise: float, experts=(1, 2, 4, 8, 32, 128), sizes=(1e6, 1e7, 1e8, 1e9)):
    N = np.repeat(np.asarray(sizes), len(experts))
    E = np.tile(np.asarray(experts, dtype=float), len(sizes))
    loss = moe_law(N, E, *TRUTH) * np.exp(rng.normal(0, noise, len(N)))
    return pd.DataFrame({"N": N, "E": E, "loss": loss})


def test_the_saturating_transform_is_clarks():
    """Ê(1) = E_start, Ê tends to E_max, and E_start = 1, E_max = inf give plain E."""
    assert math.exp(log_e_hat(1.0, 1.8, 300.0)) == pytest.approx(1.8, rel=1e-12)
    assert math.exp(log_e_hat(1e12, 1.8, 300.0)) == pytest.approx(300.0, rel=1e-6)
    assert np.exp(log_e_hat([1, 4, 64])) == pytest.approx([1, 4, 64], rel=1e-12)
    # 1/Ê = 1/(E - 1 + (1/E_start - 1/E_max)^-1) + 1/E_max, written out at E = 8
    assert math.exp(log_e_hat(8.0, 2.0, 100.0)) == pytest.approx(
        1 / (1 / (7 + 1 / (0.5 - 0.01)) + 0.01), rel=1e-12)


def test_noise_free_points_give_the_law_back_exactly():
    fit = fit_moe(grid_points(np.random.default_rng(0), 0.0))
    assert fit.transform == "saturating"  # six expert counts: both E_start and E_max
    assert [fit.a, fit.b, fit.c, fit.d, fit.E_start, fit.E_max] == pytest.approx(TRUTH, rel=1e-5)
    assert not fit.warnings


def test_noisy_points_recover_the_law_within_its_bootstrap_intervals():
    """0.3% log-normal noise: every 95% interval holds the truth and is no wider than the
    noise allows; the residual scale matches the noise (both sides)."""
    noise = 0.003
    fit = fit_moe(grid_points(np.random.default_rng(3), noise), bootstrap=60, seed=1)
    iv = fit.intervals()
    widest = {"a": 0.02, "b": 0.1, "c": 0.004, "d": 0.3}
    for i, name in enumerate(("a", "b", "c", "d")):
        lo, hi = iv[name]
        assert lo <= TRUTH[i] <= hi, (name, iv[name])
        assert 0 < hi - lo < widest[name], (name, iv[name])
    assert iv["E_start"][0] <= TRUTH[4] <= iv["E_start"][1]
    s = float(np.sqrt(np.mean(fit.residuals ** 2) * 24 / 18))  # n / (n - p)
    assert 0.6 * noise < s < 1.5 * noise
    answers = fit.answers()
    row = answers[(answers.N == 1e9) & (answers.E == 8)].iloc[0]
    true_multiplier = dense_equivalent(1e9, 8, *TRUTH) / 1e9
    assert row.multiplier_lo <= true_multiplier <= row.multiplier_hi
    assert row.multiplier_hi / row.multiplier_lo < 1.15


def test_the_dense_equivalent_matches_a_hand_computation():
    """Plain E: log N_dense = ((a + c ln E) ln N + b ln E) / a; with E_start = 2 (E_max inf),
    Ê(8) = 9 and Ê(1) = 2. Each is also the root of L(N_dense, 1) = L(N, E)."""
    a, b, c, d = -0.1, -0.05, 0.002, 2.0
    x = math.log(1e8)
    plain = math.exp(((a + c * math.log(8)) * x + b * math.log(8)) / a)
    assert dense_equivalent(1e8, 8, a, b, c, d) == pytest.approx(plain, rel=1e-12)
    shifted = math.exp(((a + c * math.log(9)) * x + b * (math.log(9) - math.log(2)))
                       / (a + c * math.log(2)))
    got = float(dense_equivalent(1e8, 8, a, b, c, d, 2.0))
    assert got == pytest.approx(shifted, rel=1e-12)
    target = moe_law(1e8, 8, a, b, c, d, 2.0)
    root = optimize.brentq(lambda lx: moe_law(math.exp(lx), 1, a, b, c, d, 2.0) - target,
                           math.log(1e6), math.log(1e12), xtol=1e-14)
    assert got == pytest.approx(math.exp(root), rel=1e-9)
    assert 1 < got / 1e8 < plain / 1e8  # E_start > 1 makes the first experts worth less


def test_lab_fit_csv_method_moe_prints_and_writes_the_answer(tmp_path, capsys):
    points = grid_points(np.random.default_rng(5), 0.002, experts=(1, 2, 4, 8),
                         sizes=np.logspace(6, 8, 4))
    points["N"] *= 1 + 0.001 * points["E"]  # a router's parameters: one size, 4 counts of N
    csv = tmp_path / "moe.csv"
    points.to_csv(csv, index=False)
    out = tmp_path / "moe.json"
    assert main([str(csv), "--method", "moe", "--at", "1e9:8,1e9:64", "--json", str(out),
                 "--backtest"]) == 0
    text = capsys.readouterr().out
    assert "Clark et al. 2022" in text and "multiplier" in text and "Backtest of moe" in text
    assert "4 sizes (N = active parameters)" in text
    rec = json.loads(out.read_text())
    assert rec["method"] == "moe" and rec["transform"] == "start"  # four expert counts
    assert rec["E_max"] is None  # inf, written as null
    assert [(r["N"], r["E"]) for r in rec["answers"]] == [(1e9, 8), (1e9, 64)]
    for r in rec["answers"]:
        assert r["loss_lo"] < r["loss"] < r["loss_hi"]
        assert r["N_dense"] == pytest.approx(
            dense_equivalent(r["N"], r["E"], *(rec[k] for k in ("a", "b", "c", "d", "E_start"))))
    folds = rec["backtest"]["folds"]  # cut at the 2nd and 3rd sizes; the 1st has 4 points
    assert [(f["n_fit"], f["n_predict"]) for f in folds] == [(8, 8), (12, 4)]
    assert folds[-1]["law"]["mean_abs_error"] < 0.01


def moe_runs(root: Path, *, moe_keys: bool) -> Path:
    """Runs of 3 sizes x 3 expert counts at one token count; with `moe_keys` their summaries
    carry active_params and total_params (every expert counted), without them only params."""
    for n in (1e6, 4e6, 1.6e7):
        for experts in (0, 4, 8):
            e = max(experts, 1)
            extra = {"active_params": n, "total_params": n * (1 + 0.6 * (e - 1))} \
                if moe_keys else {}
            run = make_run(root, f"n{n:.0e}-e{experts}", N=n, D=1e8,
                           loss=float(moe_law(n, e, *TRUTH[:4])), **extra)
            cfg = yaml.safe_load((run / "config.yaml").read_text())
            cfg["model"] = {"moe": {"experts": experts, "top_k": 1}}
            (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return root


@pytest.mark.parametrize("moe_keys", [True, False], ids=["moe-summary", "dense-summary"])
def test_run_directories_fit_in_active_parameters_by_default(tmp_path, moe_keys, capsys):
    """E comes from model.moe.experts (0 = dense = 1); N is active_params for --method moe,
    total_params with --params total; runs without those keys fall back to params."""
    root = moe_runs(tmp_path / "runs", moe_keys=moe_keys)
    out = tmp_path / "fit.json"
    assert main([str(root), "--method", "moe", "--json", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["params"] == "active" and rec["transform"] == "plain"
    printed = capsys.readouterr().out
    assert "(N = active parameters)" in printed and "N (active)" in printed
    assert sorted({p[1] for p in rec["points"]}) == [1.0, 4.0, 8.0]
    assert [rec[k] for k in ("a", "b", "c", "d")] == pytest.approx(TRUTH[:4], abs=1e-6)
    assert main([str(root), "--method", "moe", "--params", "total", "--json", str(out)]) == 0
    total = json.loads(out.read_text())
    assert total["params"] == "total"
    printed = capsys.readouterr().out  # the report names what N counts, as the record does
    assert "(N = total parameters)" in printed and "N (total)" in printed
    assert "active" not in printed
    assert (total["c"] != pytest.approx(TRUTH[2], abs=1e-4)) == moe_keys


def test_sweep_params_choose_what_n_counts(tmp_path):
    sweep = tmp_path / "ladder.yaml"
    sweep.write_text(f"base: {ROOT / 'configs' / 'tiny.yaml'}\nkind: ladder\n"
                     "sizes: [{d_model: 64, n_layers: 2, n_heads: 4}]\ntokens_per_param: 4\n")
    plain, total = expand_sweep(sweep), expand_sweep(sweep, params="total")
    vocab_params = 320 * 64  # the input embedding: total minus non-embedding
    assert total.runs[0].N - plain.runs[0].N == vocab_params
    assert total.runs[0].steps > plain.runs[0].steps  # tokens_per_param follows N
    assert expand_sweep(sweep, params="active").runs[0].N == total.runs[0].N  # a dense model


def test_the_moe_tiny_preset_is_a_3_by_4_grid_at_one_token_count():
    spec = load_sweep(PRESET)
    assert spec["params"] == "active" and len(spec["sizes"]) >= 3
    assert 0 in spec["grid"]["model.moe.experts"] and len(spec["grid"]["model.moe.experts"]) >= 3
    assert spec["set"]["model.moe.top_k"] == 1  # one expert a token: the dense MLP's compute


@pytest.mark.skipif(not HAS_MOE, reason="the MoE layer's config keys (model.moe) have not "
                                        "merged yet; moe-tiny.yaml expands once they have")
def test_the_moe_tiny_preset_expands():
    sweep = expand_sweep(PRESET)
    assert len(sweep.runs) == 12 and len({r.D for r in sweep.runs}) == 1
    experts = {r.config.model.moe.experts for r in sweep.runs}
    assert experts == {0, 2, 4, 8}
    for size in range(3):  # equal active compute: the router's FLOPs aside, within 1%
        flops = [r.C for r in sweep.runs[4 * size:4 * size + 4]]
        assert max(flops) / min(flops) < 1.01
