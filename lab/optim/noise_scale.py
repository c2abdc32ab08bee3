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

Batch sizes here are in rows (sequences); `NoiseScaleEMA` reports B_simple in tokens, rows
times the sequence length, the unit of lab fit's batch_tokens (Kaplan et al. 2020 count B_crit
in tokens the same way).
"""

from __future__ import annotations

import math

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


class NoiseScaleEMA:
    """Moving averages of the |G|² and tr(Σ) estimates (bias-corrected, as Adam's moments, so
    the first measurements are not pulled toward zero) and B_simple as their ratio."""

    def __init__(self, tokens_per_row: int, decay: float = EMA_DECAY):
        self.tokens_per_row, self.decay = tokens_per_row, decay
        self.grad_sq = self.trace = 0.0
        self.count = 0

    def update(self, grad_sq: float, trace: float) -> None:
        if not (math.isfinite(grad_sq) and math.isfinite(trace)):
            return  # a non-finite step stops the run anyway; keep the averages clean
        d = self.decay
        self.grad_sq = d * self.grad_sq + (1 - d) * grad_sq
        self.trace = d * self.trace + (1 - d) * trace
        self.count += 1

    def value(self) -> float | None:
        """B_simple in tokens; None before the first measurement or while the smoothed |G|²
        is not positive (the noise swamps the signal: B_simple is beyond measuring)."""
        if not self.count or self.grad_sq <= 0:
            return None
        return self.tokens_per_row * self.trace / self.grad_sq  # the bias corrections cancel
