"""Approaches 1 and 2, the hyperparameter laws and the power-law fits, on data drawn from known
laws: each recovers what it should, within stated tolerances, over many seeded random laws."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis import fit_envelope, fit_hparam_laws, fit_isoflop, fit_power_law, group_budgets
from analysis.approach3 import law, optimal_allocation
from analysis.hparams import DEEPSEEK_BATCH, DEEPSEEK_LR, fit_vertex
from lab.errors import UserError


def random_law(rng):
    """A Chinchilla-like law whose two terms both matter between 1e7 and 1e10 parameters."""
    E, alpha, beta = rng.uniform(1.5, 2.5), rng.uniform(0.25, 0.5), rng.uniform(0.25, 0.5)
    A = E * rng.uniform(0.1, 0.5) * 1e8**alpha
    B = E * rng.uniform(0.1, 0.5) * 1e10**beta
    return E, A, B, alpha, beta


# --------------------------------------------------------------------------------------------
# Power laws.


def test_power_law_matches_linregress():
    rng = np.random.default_rng(0)
    x = np.logspace(18, 22, 12)
    y = 0.3 * x**0.5 * np.exp(rng.normal(0, 0.05, 12))
    fit = fit_power_law(x, y, level=0.9)
    ref = stats.linregress(np.log(x), np.log(y))
    assert fit.exponent == pytest.approx(ref.slope, rel=1e-10)
    assert fit.coef == pytest.approx(np.exp(ref.intercept), rel=1e-10)
    half = stats.t.ppf(0.95, 10) * ref.stderr
    assert fit.exponent_interval == pytest.approx((ref.slope - half, ref.slope + half), rel=1e-9)


def test_power_law_through_two_points_has_no_interval():
    fit = fit_power_law([1e20, 1e21], [1e9, 1e9 * 10**0.5])
    assert fit.exponent == pytest.approx(0.5)
    assert np.isnan(fit.exponent_interval).all()


def test_group_budgets():
    C = [1e20, 1.04e20, 0.97e20, 3e20, 3.1e20, 1e21]
    assert list(group_budgets(C, rel_tol=0.1)) == [0, 0, 0, 1, 1, 2]


# --------------------------------------------------------------------------------------------
# Approach 2.


def isoflop_points(rng, truth, budgets=None, sizes=9, span=0.7, noise=0.003):
    """At each budget, `sizes` models log-spaced `span` decades either side of the optimum."""
    budgets = np.logspace(18, 21, 7) if budgets is None else budgets
    rows = []
    for C in budgets:
        n_opt, _, _ = optimal_allocation(C, *truth)
        for N in n_opt * np.logspace(-span, span, sizes) * np.exp(rng.normal(0, 0.1)):
            D = C / (6 * N)
            rows.append({"N": N, "D": D, "C": C, "loss": law(N, D, *truth)})
    df = pd.DataFrame(rows)
    df["loss"] *= np.exp(rng.normal(0, noise, len(df)))
    return df


@pytest.mark.parametrize("seed", range(8))
def test_isoflop_recovers_allocation_exponents(seed):
    rng = np.random.default_rng(seed)
    truth = random_law(rng)
    E, A, B, alpha, beta = truth
    fit = fit_isoflop(isoflop_points(rng, truth))
    # A parabola in log N is only an approximation of each profile; over +-0.7 decades the
    # exponent comes out within 0.03 of beta / (alpha + beta).
    assert fit.a == pytest.approx(beta / (alpha + beta), abs=0.03)
    assert fit.a + fit.b == pytest.approx(1.0, abs=1e-9)  # D_opt = C / 6 N_opt
    # Each budget's minimum lies near the true optimum (within 15%).
    n_true, _, _ = optimal_allocation(fit.budgets["C"].to_numpy(), *truth)
    np.testing.assert_allclose(fit.budgets["N_opt"], n_true, rtol=0.15)
    lo, hi = fit.N_opt.exponent_interval
    assert lo < fit.a < hi


def test_isoflop_bootstrap_is_seeded_and_brackets_the_fit():
    rng = np.random.default_rng(11)
    pts = isoflop_points(rng, random_law(rng))
    one = fit_isoflop(pts, bootstrap=50, seed=1)
    two = fit_isoflop(pts, bootstrap=50, seed=1)
    assert one.N_opt.interval_method == "bootstrap"
    assert one.N_opt.exponent_interval == two.N_opt.exponent_interval
    lo, hi = one.N_opt.exponent_interval
    assert lo < one.a < hi


def test_isoflop_refuses_a_minimum_at_the_edge():
    rng = np.random.default_rng(3)
    truth = random_law(rng)
    pts = isoflop_points(rng, truth, noise=0.0)
    # Keep only the larger half of the sizes at the smallest budget: its minimum is not inside.
    small = pts["C"] == pts["C"].min()
    median = pts.loc[small, "N"].median()
    pts = pts[~small | (pts["N"] > median * 1.01)]
    with pytest.raises(UserError, match="no minimum inside the sampled sizes"):
        fit_isoflop(pts)


def test_isoflop_needs_two_budgets():
    rng = np.random.default_rng(4)
    pts = isoflop_points(rng, random_law(rng), budgets=[1e20])
    with pytest.raises(UserError, match="two or more compute budgets"):
        fit_isoflop(pts)


# --------------------------------------------------------------------------------------------
# Approach 1.


def training_curves(rng, truth, sizes=None, noise=0.002):
    """One curve per size: the loss of the law at every token count along training."""
    sizes = np.logspace(7, 10, 31) if sizes is None else sizes
    parts = []
    for k, N in enumerate(sizes):
        D = np.logspace(7, 14, 200)  # long enough to pass every size's optimum
        loss = law(N, D, *truth) * np.exp(rng.normal(0, noise, D.size))
        parts.append(pd.DataFrame({"run": k, "N": N, "D": D, "C": 6 * N * D, "loss": loss}))
    return pd.concat(parts, ignore_index=True)


@pytest.mark.parametrize("seed", range(8))
def test_envelope_recovers_allocation_exponents(seed):
    rng = np.random.default_rng(seed)
    truth = random_law(rng)
    E, A, B, alpha, beta = truth
    fit = fit_envelope(training_curves(rng, truth))
    # 31 sizes over 3 decades quantise N_opt to steps of 0.1 decade: the exponent comes out
    # within 0.04 of beta / (alpha + beta).
    assert fit.a == pytest.approx(beta / (alpha + beta), abs=0.04)
    assert fit.b == pytest.approx(alpha / (alpha + beta), abs=0.04)
    # Frontier points are (nearly) the compute-optimal loss at their compute: most within 1%,
    # all within 3% (the first bins hold few curves).
    _, _, best = optimal_allocation(fit.frontier["C"].to_numpy(), *truth)
    excess = np.abs(fit.frontier["loss"] / best - 1)
    assert np.quantile(excess, 0.9) < 0.01 and excess.max() < 0.03


def test_envelope_leaves_out_bins_won_by_the_end_sizes():
    rng = np.random.default_rng(5)
    curves = training_curves(rng, random_law(rng))
    fit = fit_envelope(curves)
    sizes = curves["N"].unique()
    assert not fit.frontier["N"].isin([sizes.min(), sizes.max()]).any()
    assert any("left out" in w for w in fit.warnings)


def test_envelope_bootstrap_resamples_whole_runs():
    rng = np.random.default_rng(6)
    curves = training_curves(rng, random_law(rng))
    one = fit_envelope(curves, bootstrap=30, seed=2)
    two = fit_envelope(curves, bootstrap=30, seed=2)
    assert one.N_opt.exponent_interval == two.N_opt.exponent_interval
    lo, hi = one.N_opt.exponent_interval
    assert lo <= one.a <= hi


def test_envelope_needs_crossing_curves():
    rng = np.random.default_rng(7)
    curves = training_curves(rng, random_law(rng), sizes=[1e8, 1e9])
    with pytest.raises(UserError, match="model size"):
        fit_envelope(curves)


# --------------------------------------------------------------------------------------------
# Hyperparameter laws.


def hparam_sweep(rng, lr_law, batch_law, budgets=None, noise=0.0):
    """Learning-rate x batch grids at each budget; the loss is a bowl in log lr and log batch
    around the law's optimum, deep enough that a few runs fall within 0.25% of the best."""
    budgets = np.logspace(17, 20, 6) if budgets is None else budgets
    rows = []
    for C in budgets:
        lr_opt, b_opt = lr_law[0] * C ** lr_law[1], batch_law[0] * C ** batch_law[1]
        base = 2.0 + 10 * C**-0.05
        # Grids not centred on the optimum, so that a band-mean would not recover it by symmetry.
        shift_lr, shift_b = rng.uniform(-0.1, 0.1, 2)
        for lr in lr_opt * 2.0 ** (np.arange(-4, 5) * 0.25 + shift_lr):
            for b in b_opt * 2.0 ** (np.arange(-4, 5) * 0.25 + shift_b):
                loss = base * (1 + 0.01 * np.log(lr / lr_opt) ** 2 + 0.005 * np.log(b / b_opt) ** 2)
                rows.append({"C": C, "lr": lr, "batch_tokens": b, "loss": loss})
    df = pd.DataFrame(rows)
    df["loss"] *= np.exp(rng.normal(0, noise, len(df)))
    return df


def test_hparams_recover_deepseek_laws():
    rng = np.random.default_rng(0)
    laws = fit_hparam_laws(hparam_sweep(rng, DEEPSEEK_LR, DEEPSEEK_BATCH))
    assert laws.lr.exponent == pytest.approx(DEEPSEEK_LR[1], abs=0.01)
    assert laws.batch.exponent == pytest.approx(DEEPSEEK_BATCH[1], abs=0.01)
    assert laws.lr(1e20) == pytest.approx(DEEPSEEK_LR[0] * 1e20 ** DEEPSEEK_LR[1], rel=0.1)
    assert laws.batch(1e20) == pytest.approx(DEEPSEEK_BATCH[0] * 1e20 ** DEEPSEEK_BATCH[1], rel=0.1)


@pytest.mark.parametrize("seed", range(6))
def test_hparams_recover_random_laws(seed):
    rng = np.random.default_rng(seed)
    lr_law = (np.exp(rng.uniform(-3, 1)), rng.uniform(-0.3, 0.0))
    batch_law = (np.exp(rng.uniform(-3, 1)), rng.uniform(0.2, 0.5))
    laws = fit_hparam_laws(hparam_sweep(rng, lr_law, batch_law, noise=0.0005))
    assert laws.lr.exponent == pytest.approx(lr_law[1], abs=0.03)
    assert laws.batch.exponent == pytest.approx(batch_law[1], abs=0.03)


def test_vertex_is_the_closed_form_optimum():
    """On a noiseless bowl that is exactly quadratic in (ln lr, ln batch), with a cross term,
    the vertex is the optimum and the fitted curvature the bowl's Hessian, to rounding."""
    rng = np.random.default_rng(4)
    H = np.array([[0.04, 0.01], [0.01, 0.02]])  # d2 ln L in (ln lr, ln batch)
    lr_opt, b_opt = 3e-3, 2.5e5
    u, v = np.meshgrid(np.linspace(-1.3, 1.5, 7) + rng.uniform(-0.2, 0.2),
                       np.linspace(-1.0, 1.6, 5))
    u, v = u.ravel(), v.ravel()
    z = np.stack([u, v], axis=1)
    loss = 2.5 * np.exp(0.5 * np.einsum("ra,ab,rb->r", z, H, z))
    got = fit_vertex(pd.DataFrame({"lr": lr_opt * np.exp(u), "batch_tokens": b_opt * np.exp(v),
                                   "loss": loss}))
    assert got["problem"] == ""
    assert got["lr_opt"] == pytest.approx(lr_opt, rel=1e-9)
    assert got["batch_opt"] == pytest.approx(b_opt, rel=1e-9)
    assert got["loss_opt"] == pytest.approx(2.5, rel=1e-12)
    assert (got["h_lr"], got["h_batch"], got["h_cross"]) == pytest.approx((0.04, 0.02, 0.01))


def test_vertex_guards_report_and_leave_out():
    """A bowl that opens downward, a vertex beyond the sweep, too few values: each is reported
    (a warning naming the budget) and that budget is left out of the law, not used."""
    rng = np.random.default_rng(5)
    runs = hparam_sweep(rng, DEEPSEEK_LR, DEEPSEEK_BATCH)
    budgets = sorted(runs["C"].unique())
    first, second = runs["C"] == budgets[0], runs["C"] == budgets[1]
    runs.loc[first, "loss"] = 10 - runs.loc[first, "loss"]  # a cap, not a bowl
    low = np.sort(runs[second]["lr"].unique())[3]  # 4 of 9 learning rates, all below lr*
    runs = runs[~second | (runs["lr"] <= low)]
    laws = fit_hparam_laws(runs, bootstrap=50)
    v = laws.vertices
    assert "does not open upward" in v["problem"].iloc[0] and np.isnan(v["lr_opt"].iloc[0])
    assert "lr optimum" in v["problem"].iloc[1] and "outside the sweep" in v["problem"].iloc[1]
    assert np.isnan(v["lr_opt"].iloc[1]) and not np.isnan(v["batch_opt"].iloc[1])
    assert laws.lr.n == len(budgets) - 2 and laws.batch.n == len(budgets) - 1
    assert sum("left out of the lr" in w for w in laws.warnings) == 2
    # The other budgets still give the law.
    assert laws.lr.exponent == pytest.approx(DEEPSEEK_LR[1], abs=0.01)
    two = fit_vertex(pd.DataFrame({"lr": [1e-3, 2e-3] * 3, "batch_tokens": [1e5] * 6,
                                   "loss": [3.0, 3.1, 3.0, 3.1, 3.0, 3.1]}))
    assert "3 or more values" in two["problem"] and np.isnan(two["lr_opt"])


def test_hparams_read_batch_size_times_seq_len():
    rng = np.random.default_rng(3)
    runs = hparam_sweep(rng, DEEPSEEK_LR, DEEPSEEK_BATCH)
    tokens = runs.pop("batch_tokens")
    runs["seq_len"] = 512
    runs["batch_size"] = tokens / 512
    laws = fit_hparam_laws(runs)
    assert laws.batch.exponent == pytest.approx(DEEPSEEK_BATCH[1], abs=0.01)
