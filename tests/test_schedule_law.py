"""The schedule law (Tissue et al. 2024): its areas against a direct double sum, recovery of known
parameters from synthetic curves, prediction of held-out decays and of a cosine run, and the
refusal when no fitted curve anneals."""

import numpy as np
import pytest

from analysis.schedule_law import Curve, ScheduleLaw, areas, fit_schedule_law
from lab import schedules
from lab.errors import UserError

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


def test_eval_gap_is_carried_to_predictions():
    rng = np.random.default_rng(1)
    curves = [synthetic("stable", wsd(300, 0), 40, 0.0, rng),
              synthetic("decay", wsd(300, 60), 241, 0.0, rng)]
    shifted = [Curve(c.name, c.lr, c.n, c.loss, c.final_eval + 0.05) for c in curves]
    law = fit_schedule_law(shifted, start=40)
    assert law.gap == pytest.approx(0.05, abs=1e-4)
    lr = wsd(300, 100)
    assert law.final(lr) == pytest.approx(true_law().curve(lr)[-1] + 0.05, rel=1e-4)


def test_a_stable_curve_alone_is_refused():
    rng = np.random.default_rng(2)
    stable = synthetic("stable", wsd(300, 0), 40, 1e-3, rng)
    with pytest.raises(UserError, match="annealing term is unidentified"):
        fit_schedule_law([stable], start=40)
