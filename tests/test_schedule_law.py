"""The schedule laws (Tissue et al. 2024 and the multi-power law of Luo et al. 2025): their areas
and loss reductions against direct sums, recovery of known parameters from synthetic curves,
prediction of held-out decays and of a cosine run, the bounds and the warning when one binds, the
refusal when no fitted curve anneals, and the benchmark's scores on a hand-computed case."""

import numpy as np
import pytest

from analysis.multipower_law import MultiPowerLaw, fit_multipower_law
from analysis.schedule_law import ALPHA_RANGE, Curve, ScheduleLaw, areas, fit_schedule_law
from benchmarks.bench_schedule_law import (
    eval_noise,
    gain_errors,
    ranking_agreement,
    relative_errors,
    stable_at,
)
from lab.errors import UserError
from lab.optim import schedules

TRUE = {"L0": 1.2, "A": 0.9, "alpha": 0.45, "C": 3.0, "lam": 0.95}
PEAK, WARMUP = 0.03, 20


def wsd(total: int, decay: int, shape: str = "1-sqrt") -> np.ndarray:
    fn = schedules.wsd(PEAK, total, WARMUP, decay, shape, 0.0)
    return np.asarray(fn(np.arange(total)), dtype=np.float64)


def cosine(total: int) -> np.ndarray:
    return np.asarray(schedules.cosine(PEAK, total, WARMUP)(np.arange(total)), np.float64)


def true_law() -> ScheduleLaw:
    return ScheduleLaw(**TRUE, gap=0.0, rms=0.0, n_points=0, curves=())


def synthetic(name: str, lr: np.ndarray, first: int, noise: float, rng) -> Curve:
    """Every step's training loss from the true law, with relative noise, and the exact end."""
    n = np.arange(first, len(lr) + 1)
    loss = true_law().curve(lr)[n] * (1 + noise * rng.standard_normal(len(n)))
    return Curve(name, lr, n, loss, final_eval=float(true_law().curve(lr)[-1]))


def test_areas_match_the_double_sum():
    lr = wsd(60, 25, "cosine")
    lam = 0.9
    s1, s2 = areas(lr, lam)
    ref1 = [sum(lr[:n]) for n in range(61)]
    # S2(n) = sum_{i<n} sum_{k<=i} delta_k lam^(i-k), delta_k the drop at update k (rises = 0).
    delta = [0.0] + [max(lr[k - 1] - lr[k], 0.0) for k in range(1, 60)]
    ref2 = [sum(delta[k] * lam ** (i - k) for i in range(n) for k in range(i + 1))
            for n in range(61)]
    np.testing.assert_allclose(s1, ref1, rtol=1e-12)
    np.testing.assert_allclose(s2, ref2, rtol=1e-12, atol=1e-15)
    assert s2[35] == 0 and s2[36] > 0  # nothing before the decay: the warmup does not count
    # Without momentum S2 is simply the drop so far: peak - lr of the last update.
    _, s2_0 = areas(lr, 0.0)
    assert s2_0[60] == pytest.approx(lr[34] - lr[-1], rel=1e-12)  # the peak, in float32


def test_recovers_parameters_and_predicts_held_out_schedules():
    rng = np.random.default_rng(0)
    curves = [synthetic("stable", wsd(400, 0), 40, 3e-3, rng),
              synthetic("decay 60", wsd(260, 60), 201, 3e-3, rng),
              synthetic("decay 120", wsd(400, 120), 281, 3e-3, rng)]
    law = fit_schedule_law(curves, start=40)
    assert law.alpha == pytest.approx(TRUE["alpha"], abs=0.05)
    assert law.L0 == pytest.approx(TRUE["L0"], abs=0.05)
    assert law.C == pytest.approx(TRUE["C"], rel=0.1)
    assert law.lam == TRUE["lam"]
    assert law.rms == pytest.approx(3e-3 * 1.3, rel=0.3)  # the noise, nothing more
    # Held out: another length, another shape, a cosine and a longer run than any fitted.
    for lr in (wsd(330, 30), wsd(400, 80, "linear"), cosine(400), wsd(600, 150)):
        truth = float(true_law().curve(lr)[-1])
        assert law.final(lr) == pytest.approx(truth, rel=2e-3)


def test_eval_gap_is_carried_only_for_training_losses():
    rng = np.random.default_rng(1)
    curves = [synthetic("stable", wsd(300, 0), 40, 0.0, rng),
              synthetic("decay", wsd(300, 60), 241, 0.0, rng)]
    shifted = [Curve(c.name, c.lr, c.n, c.loss, c.final_eval + 0.05) for c in curves]
    lr = wsd(300, 100)
    law = fit_schedule_law(shifted, start=40, train_loss=True)
    assert law.gap == pytest.approx(0.05, abs=1e-4)
    assert law.final(lr) == pytest.approx(true_law().curve(lr)[-1] + 0.05, rel=1e-4)
    # Eval points are fitted as they are: no gap term, whatever the final evals say.
    law = fit_schedule_law(shifted, start=40)
    assert law.gap == 0.0
    assert law.final(lr) == pytest.approx(true_law().curve(lr)[-1], rel=1e-4)


def log_curves() -> list[Curve]:
    """Curves whose best unbounded Tissue fit is a logarithm with no floor: L0 far below 0
    and alpha near 0 (as the lab's short runs gave: L0 = -20.5, alpha 0.015)."""
    out = []
    for name, lr, first in (("stable", wsd(400, 0), 40), ("decay 60", wsd(260, 60), 201),
                            ("decay 120", wsd(400, 120), 281)):
        s1, s2 = areas(lr, 0.9)
        n = np.arange(first, len(lr) + 1)
        out.append(Curve(name, lr, n, 2.0 - 0.3 * np.log(s1[n]) - 2.0 * s2[n]))
    return out


def test_bounds_bind_on_a_floorless_curve_and_say_so():
    curves = log_curves()
    law = fit_schedule_law(curves, start=40)
    assert law.L0 >= 0 and ALPHA_RANGE[0] <= law.alpha <= ALPHA_RANGE[1]
    assert law.A >= 0 and law.C >= 0
    assert law.warnings, "a bound binds, and the law must say which"
    assert any(w.startswith(("L0", "alpha")) for w in law.warnings)
    assert "warning: " in law.describe()
    # The reference, computed without bounds: a plain least-squares solve at alpha 0.02 fits
    # better than the bounded law, with a negative floor (so the bound did bind).
    rows, ys = [], []
    for c in curves:
        s1, s2 = areas(c.lr, law.lam)
        rows.append(np.stack([np.ones(len(c.n)), s1[c.n] ** -0.02, -s2[c.n]], 1)
                    / np.sqrt(len(c.n)))
        ys.append(c.loss / np.sqrt(len(c.n)))
    X, y = np.concatenate(rows), np.concatenate(ys)
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    free_sse = float(np.sum((X @ coef - y) ** 2))
    bounded_sse = sum(float(np.mean((law.curve(c.lr)[c.n] - c.loss) ** 2)) for c in curves)
    assert coef[0] < -5 and free_sse < bounded_sse
    # A law inside its bounds warns of nothing; a given floor is kept exactly.
    rng = np.random.default_rng(3)
    good = [synthetic("stable", wsd(400, 0), 40, 0.0, rng),
            synthetic("decay", wsd(300, 80), 221, 0.0, rng)]
    assert fit_schedule_law(good, start=40).warnings == ()
    tied = fit_schedule_law(good, start=40, L0=TRUE["L0"])
    assert tied.L0 == TRUE["L0"] and tied.alpha == pytest.approx(TRUE["alpha"], abs=0.01)
    with pytest.raises(UserError, match="L0 must be >= 0"):
        fit_schedule_law(good, start=40, L0=-1.0)


MPL = {"L0": 1.3, "A": 0.8, "alpha": 0.5, "B": 12.0, "C": 2.0, "beta": 0.6, "gamma": 0.5}


def mpl_true() -> MultiPowerLaw:
    return MultiPowerLaw(**MPL, gap=0.0, rms=0.0, n_points=0, curves=())


def test_multipower_curve_matches_the_papers_sums():
    """L(t) = L0 + A (S1 + S_W)^-alpha - B sum_k (eta_{k-1} - eta_k) G(eta_k^-gamma S_k(t)),
    summed term by term in plain Python."""
    lr = wsd(120, 50, "cosine")
    law = mpl_true()
    got = law.curve(lr)
    for t in (2, 30, 75, 100, 119, 120):
        ld = 0.0
        for k in range(1, t):
            drop = max(lr[k - 1] - lr[k], 0.0)
            if drop > 0 and sum(lr[k:t]) > 0:  # the last drop, to a rate of 0, adds nothing
                x = lr[k] ** -MPL["gamma"] * sum(lr[k:t])
                ld += drop * (1 - (MPL["C"] * x + 1) ** -MPL["beta"])
        want = MPL["L0"] + MPL["A"] * sum(lr[:t]) ** -MPL["alpha"] - MPL["B"] * ld
        assert got[t] == pytest.approx(want, rel=1e-10)


def test_multipower_recovers_parameters_and_predicts_held_out_schedules():
    truth = mpl_true()
    curves = [Curve(name, lr, n, truth.curve(lr)[n]) for name, lr, n in (
        ("stable", wsd(600, 0), np.arange(40, 601, 10)),
        ("decay 60", wsd(360, 60), np.arange(300, 361, 5)),
        ("decay 150", wsd(450, 150), np.arange(300, 451, 5)))]
    law = fit_multipower_law(curves, start=40)
    assert law.rms < 1e-4 and law.warnings == ()
    assert law.L0 == pytest.approx(MPL["L0"], abs=0.02)
    assert law.alpha == pytest.approx(MPL["alpha"], abs=0.03)
    assert law.A == pytest.approx(MPL["A"], rel=0.05)
    for lr in (wsd(600, 200), wsd(500, 100, "linear"), wsd(720, 120, "cosine"), cosine(600)):
        assert law.final(lr) == pytest.approx(truth.final(lr), rel=1e-3)
    # Tissue's law, fitted to the same curves, misses the saturating gain of a whole cosine run.
    tissue = fit_schedule_law(curves, start=40)
    assert abs(tissue.final(cosine(600)) / truth.final(cosine(600)) - 1) > 2e-3


def test_benchmark_scores_on_a_hand_computed_case():
    # Final losses: 2.02 against 2.00 is +1%, 1.98 against 2.00 is -1%.
    np.testing.assert_allclose(relative_errors([2.02, 1.98], [2.0, 2.0]), [0.01, -0.01])
    # Gains: predicted 2.30 - 2.02 = 0.28 against measured 2.25 - 2.00 = 0.25: +12%.
    np.testing.assert_allclose(gain_errors([2.30], [2.02], [2.25], [2.00]), [0.12])
    # Ranking: predicted order a < b < c, measured a < c < b: 2 of 3 pairs right.
    assert ranking_agreement([1.0, 2.0, 3.0], [1.0, 3.0, 2.0]) == (2, 3)
    assert ranking_agreement([1.0, 2.0, 3.0], [1.5, 2.5, 3.5]) == (3, 3)
    # The stable loss at step T from a line through the evals within the window: exact on a
    # line, at the centre or at the end (one-sided); at the centre of symmetric points, their
    # mean (1, 3, 2 at 80, 100, 120: 2), whatever lies outside the window (9 at 140).
    n = np.arange(0, 201, 20)
    assert stable_at(n, 3.0 - 0.001 * n, 100) == pytest.approx(2.9)
    assert stable_at(n, 3.0 - 0.001 * n, 200) == pytest.approx(2.8)
    assert stable_at(np.array([80, 100, 120, 140]), np.array([1.0, 3.0, 2.0, 9.0]), 100,
                     window=20) == pytest.approx(2.0)
    # Eval noise from second differences: white noise of 0.01 on a straight line.
    rng = np.random.default_rng(0)
    noisy = np.linspace(3, 2, 20000) + 0.01 * rng.standard_normal(20000)
    assert eval_noise(noisy) == pytest.approx(0.01, rel=0.03)


def test_a_stable_curve_alone_is_refused():
    rng = np.random.default_rng(2)
    stable = synthetic("stable", wsd(300, 0), 40, 1e-3, rng)
    with pytest.raises(UserError, match="annealing term is unidentified"):
        fit_schedule_law([stable], start=40)
