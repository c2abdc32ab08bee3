"""The gradient noise scale B_simple = tr(Σ)/|G|² (McCandlish et al. 2018, "An Empirical Model
of Large-Batch Training"), measured from the gradients a step already computes.

A batch of B examples gives a gradient estimate g_B with E|g_B|² = |G|² + tr(Σ)/B (G the true
gradient, Σ the per-example covariance). Two batch sizes B_small < B_big give two equations,
and their appendix A solves them for unbiased estimates of both:

    |G|²  ≈ (B_big |g_big|² − B_small |g_small|²) / (B_big − B_small)
    tr(Σ) ≈ (|g_small|² − |g_big|²) / (1/B_small − 1/B_big)

In the train step, the small batches are the micro-batches of gradient accumulation (A of
them, |g_small|² averaged over the A, which lowers its variance) and the big batch is their
mean, the step's gradient. Without accumulation, a measuring step splits its batch in two
micro-batches (lab.train.step): the same FLOPs in two halves, one more gradient buffer, and a
second compiled step. Each estimate is noisy and either can be negative; as the paper does, the
two are smoothed separately by exponential moving averages and B_simple is their ratio.

Batch sizes here are in rows (sequences); `smoothed_value` reports B_simple in tokens, rows
times the sequence length, the unit of lab fit's batch_tokens (Kaplan et al. 2020 count B_crit
in tokens the same way). The moving averages are arrays in the train state, so its checkpoints
keep them and a resumed run smooths on as an uninterrupted one does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The step's metrics that carry one measurement (popped from the log by the loop's hook).
GRAD_SQ, TRACE = "noise/grad_sq", "noise/trace"
# Decay of the moving averages, per measurement: about the last 10 measurements count.
EMA_DECAY = 0.9


def grad_sq_estimate(small_sq, big_sq, b_small: float, b_big: float):
    """Unbiased |G|² from the squared norms of gradients over b_small and b_big examples."""
    return (b_big * big_sq - b_small * small_sq) / (b_big - b_small)


def trace_estimate(small_sq, big_sq, b_small: float, b_big: float):
    """Unbiased tr(Σ) (per-example covariance) from the same two squared norms."""
    return (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)


def step_estimates(small_sq, big_sq, b_small: float, b_big: float) -> dict:
    """A measuring step's metrics: |G|² and tr(Σ) estimates, batch sizes in rows. Works on
    numbers and on traced arrays alike."""
    if not 0 < b_small < b_big:
        raise ValueError(f"need 0 < b_small < b_big, got {b_small}, {b_big}")
    return {GRAD_SQ: grad_sq_estimate(small_sq, big_sq, b_small, b_big),
            TRACE: trace_estimate(small_sq, big_sq, b_small, b_big)}


def initial_averages() -> dict:
    """The moving averages of the |G|² and tr(Σ) estimates before any measurement, and how
    many measurements they hold: the train state's "noise" entry."""
    return {"grad_sq": jnp.zeros((), jnp.float32), "trace": jnp.zeros((), jnp.float32),
            "count": jnp.zeros((), jnp.int32)}


def update_averages(averages: dict, grad_sq: jax.Array, trace: jax.Array,
                    decay: float = EMA_DECAY) -> dict:
    """The averages after one measurement; a non-finite one is left out (a non-finite step
    stops the run anyway, and the averages stay clean)."""
    finite = jnp.isfinite(grad_sq) & jnp.isfinite(trace)
    new = {"grad_sq": decay * averages["grad_sq"] + (1 - decay) * grad_sq,
           "trace": decay * averages["trace"] + (1 - decay) * trace,
           "count": averages["count"] + 1}
    return jax.tree.map(lambda n, old: jnp.where(finite, n, old), new, averages)


def smoothed_value(averages: dict, tokens_per_row: int) -> jax.Array:
    """B_simple in tokens from the averages (bias-corrected as Adam's moments, the corrections
    cancel in the ratio); NaN before the first measurement or while the smoothed |G|² is not
    positive (the noise swamps the signal: B_simple is beyond measuring)."""
    known = (averages["count"] > 0) & (averages["grad_sq"] > 0)
    grad_sq = jnp.where(known, averages["grad_sq"], 1.0)
    return jnp.where(known, tokens_per_row * averages["trace"] / grad_sq, jnp.nan)
