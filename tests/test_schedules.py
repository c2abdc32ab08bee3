"""Schedules against their closed forms, written out here independently in float64."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lab.errors import UserError
from lab.optim.schedules import cosine, wsd

PEAK = 3e-3


def closed_wsd(step, total, warmup, decay, shape, final):
    """The documented formula, step by step in plain Python floats."""
    if step < warmup:
        return PEAK * step / warmup
    start = total - decay
    if step < start:
        return PEAK
    p = min(1.0, (step - start + 1) / decay)
    g = {"linear": 1 - p, "cosine": 0.5 * (1 + math.cos(math.pi * p)), "1-sqrt": 1 - math.sqrt(p)}
    return PEAK * (final + (1 - final) * g[shape])


def lr(schedule, step):
    return float(schedule(jnp.asarray(step, jnp.int32)))


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
@pytest.mark.parametrize("final", [0.0, 0.1])
def test_wsd_landmarks(shape, final):
    total, warmup, decay = 1000, 100, 200
    s = wsd(PEAK, total, warmup, decay, shape, final)
    start = total - decay
    # Named landmarks, each against an independent hand value.
    assert lr(s, 0) == 0.0
    assert lr(s, warmup // 2) == pytest.approx(PEAK / 2, rel=1e-6)
    assert lr(s, warmup) == pytest.approx(PEAK, rel=1e-6)
    assert lr(s, start - 1) == pytest.approx(PEAK, rel=1e-6)
    halfway = {"linear": 0.5, "cosine": 0.5, "1-sqrt": 1 - math.sqrt(0.5)}[shape]
    assert lr(s, start + decay // 2 - 1) == pytest.approx(
        PEAK * (final + (1 - final) * halfway), rel=1e-5
    )
    assert lr(s, total - 1) == pytest.approx(PEAK * final, rel=1e-6, abs=1e-12)
    assert lr(s, total + 50) == pytest.approx(PEAK * final, rel=1e-6, abs=1e-12)
    # The first decay step is already below the peak: exactly `decay` steps decay.
    assert lr(s, start) < PEAK
    # Every step against the formula.
    steps = np.arange(total + 5)
    got = np.asarray(jax.vmap(s)(jnp.asarray(steps, jnp.int32)))
    want = np.array([closed_wsd(i, total, warmup, decay, shape, final) for i in steps])
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-10)


def test_wsd_one_step_decay_and_no_warmup():
    s = wsd(PEAK, 10, 0, 1, "linear", 0.25)
    assert lr(s, 0) == pytest.approx(PEAK)
    assert lr(s, 8) == pytest.approx(PEAK)
    assert lr(s, 9) == pytest.approx(0.25 * PEAK)


def test_wsd_pure_stable_run():
    s = wsd(PEAK, 500, 50, 0)
    assert lr(s, 25) == pytest.approx(PEAK / 2, rel=1e-6)
    for step in (50, 300, 499, 10_000):
        assert lr(s, step) == pytest.approx(PEAK, rel=1e-6)


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
def test_branch_shares_the_stable_phase(shape):
    """A branch decaying from S equals the stable run before S, whatever the lengths."""
    branch_at, decay, warmup = 600, 150, 40
    steps = jnp.arange(branch_at, dtype=jnp.int32)
    branch = jax.vmap(wsd(PEAK, branch_at + decay, warmup, decay, shape, 0.0))(steps)
    for stable_total in (branch_at, 800, 5000):
        stable = jax.vmap(wsd(PEAK, stable_total, warmup, 0))(steps)
        np.testing.assert_array_equal(np.asarray(branch), np.asarray(stable))
    # ...and the branch really decays from S on.
    after = wsd(PEAK, branch_at + decay, warmup, decay, shape)(jnp.int32(branch_at))
    assert float(after) < PEAK


def test_decay_may_fill_everything_after_warmup():
    s = wsd(PEAK, 100, 20, 80, "cosine")
    assert lr(s, 19) == pytest.approx(PEAK * 19 / 20, rel=1e-6)
    assert lr(s, 20) < PEAK
    assert lr(s, 99) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("final", [0.0, 0.1])
def test_cosine_closed_form(final):
    total, warmup = 1001, 100  # an even span (900 steps), so its middle is a whole step
    s = cosine(PEAK, total, warmup, final)
    span = total - 1 - warmup
    steps = np.arange(total + 5)
    def closed(i):
        if i < warmup:
            return PEAK * i / warmup
        p = min(1, (i - warmup) / span)
        return PEAK * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * p)))

    want = [closed(i) for i in steps]
    got = np.asarray(jax.vmap(s)(jnp.asarray(steps, jnp.int32)))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-10)
    assert lr(s, warmup) == pytest.approx(PEAK, rel=1e-6)
    assert lr(s, warmup + span // 2) == pytest.approx(PEAK * (final + (1 - final) * 0.5), rel=1e-4)
    assert lr(s, total - 1) == pytest.approx(final * PEAK, rel=1e-6, abs=1e-12)


def test_cosine_agrees_with_optax_shifted_by_one():
    """optax reaches its end value at `decay_steps`; ours one step earlier, at the last update."""
    import optax

    total, warmup = 300, 30
    ours = cosine(PEAK, total, warmup, 0.1)
    theirs = optax.warmup_cosine_decay_schedule(0.0, PEAK, warmup, total - 1, 0.1 * PEAK)
    steps = jnp.arange(total, dtype=jnp.int32)
    np.testing.assert_allclose(jax.vmap(ours)(steps), jax.vmap(theirs)(steps), rtol=1e-5)


def test_schedules_jit_on_traced_steps():
    for s in (wsd(PEAK, 100, 10, 30, "1-sqrt", 0.1), cosine(PEAK, 100, 10)):
        jitted = jax.jit(s)
        for step in (0, 5, 50, 85, 99):
            assert float(jitted(jnp.int32(step))) == pytest.approx(lr(s, step), rel=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(warmup_steps=60, decay_steps=50),  # warmup + decay > total
        dict(warmup_steps=-1, decay_steps=10),
        dict(warmup_steps=0, decay_steps=-5),
        dict(warmup_steps=0, decay_steps=10, decay_shape="exp"),
        dict(warmup_steps=0, decay_steps=10, final_ratio=1.5),
        dict(warmup_steps=0, decay_steps=10, peak_lr=-1.0),
        dict(warmup_steps=0, decay_steps=0, total_steps=0),
    ],
)
def test_wsd_rejects_impossible_values(kwargs):
    args = dict(peak_lr=PEAK, total_steps=100) | kwargs
    with pytest.raises(UserError):
        wsd(**args)


def test_cosine_rejects_impossible_values():
    with pytest.raises(UserError):
        cosine(PEAK, 10, 9)
    with pytest.raises(UserError):
        cosine(PEAK, 10, -1)
