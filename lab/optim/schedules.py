"""Learning-rate schedules: warmup-stable-decay (WSD) and cosine, as optax schedules.

Conventions shared by both (they are the ones optax's own warmup schedules use):

- ``lr(step)`` is the learning rate of the update applied at ``step``, counted from 0; a run of
  ``total_steps`` updates uses steps ``0 .. total_steps - 1``.
- Warmup is ``optax.linear_schedule(0, peak, warmup_steps)``: ``lr(s) = peak * s / warmup_steps``
  for ``s < warmup_steps``, so step 0 has lr 0 and step ``warmup_steps`` is the first at the peak.
  ``warmup_steps = 0`` starts at the peak.
- The schedule ends exactly on the last update: ``lr(total_steps - 1) = final_ratio * peak``.
  Steps past the end keep that final value.

The pieces are glued with ``optax.join_schedules``, which hands each piece the step count since
its own boundary.
"""

import math

import jax.numpy as jnp
import optax

from lab.config import DECAY_SHAPES
from lab.errors import UserError, shown


def _check_common(peak_lr: float, total_steps: int, warmup_steps: int, final_ratio: float) -> None:
    if not (math.isfinite(peak_lr) and peak_lr >= 0):
        raise UserError(f"peak learning rate {peak_lr} must be a finite number >= 0; fix optim.lr")
    if total_steps < 1:
        raise UserError(f"total_steps={total_steps} must be >= 1; fix train.steps")
    if warmup_steps < 0:
        raise UserError(f"warmup_steps={warmup_steps} must be >= 0; fix schedule.warmup_steps")
    if not 0.0 <= final_ratio <= 1.0:
        raise UserError(
            f"final_ratio={final_ratio} must be in [0, 1]; fix schedule.final_ratio"
        )


def _decay_factor(progress: jnp.ndarray, shape: str, final_ratio: float) -> jnp.ndarray:
    """The multiplier of the peak at `progress` in [0, 1] of a decay (1 at 0, final_ratio at 1)."""
    p = jnp.clip(progress, 0.0, 1.0)
    if shape == "linear":
        remaining = 1.0 - p
    elif shape == "cosine":
        remaining = 0.5 * (1.0 + jnp.cos(jnp.pi * p))
    else:  # "1-sqrt" (Hägele et al. 2024)
        remaining = 1.0 - jnp.sqrt(p)
    return final_ratio + (1.0 - final_ratio) * remaining


def _warmup_then(peak_lr: float, warmup_steps: int, rest: list, boundaries: list) -> optax.Schedule:
    """Prepend the linear warmup (when there is one) to the pieces that follow it."""
    if warmup_steps > 0:
        rest = [optax.linear_schedule(0.0, peak_lr, warmup_steps), *rest]
        boundaries = [warmup_steps, *boundaries]
    if len(rest) == 1:
        return rest[0]
    return optax.join_schedules(rest, boundaries)


def wsd(
    peak_lr: float,
    total_steps: int,
    warmup_steps: int,
    decay_steps: int,
    decay_shape: str = "linear",
    final_ratio: float = 0.0,
) -> optax.Schedule:
    """Warmup-stable-decay: linear warmup, constant peak, then a decay of `decay_steps` updates.

    With ``S = total_steps - decay_steps`` (an absolute step) and ``D = decay_steps``:

    - ``s < warmup_steps``: ``peak * s / warmup_steps``;
    - ``warmup_steps <= s < S``: ``peak``;
    - ``S <= s``: ``peak * (r + (1 - r) * g(p))`` with ``p = min(1, (s - S + 1) / D)``,
      ``r = final_ratio`` and ``g(p) = 1 - p`` (linear), ``(1 + cos(pi p)) / 2`` (cosine) or
      ``1 - sqrt(p)`` (1-sqrt, Hägele et al. 2024).

    So the decay is exactly the D updates ``S .. total_steps - 1``, every one below the peak, and
    the last one (p = 1) is at ``final_ratio * peak``. Every step before ``S`` depends only on
    ``peak_lr`` and ``warmup_steps``: a stable run (``decay_steps=0``, any length) and a branch of
    it that starts decaying at step S share their first S learning rates exactly.
    """
    _check_common(peak_lr, total_steps, warmup_steps, final_ratio)
    if decay_shape not in DECAY_SHAPES:
        raise UserError(
            f"unknown decay shape {shown(decay_shape)}; set schedule.decay_shape to one of "
            + ", ".join(DECAY_SHAPES)
        )
    if decay_steps < 0:
        raise UserError(f"decay_steps={decay_steps} must be >= 0; fix schedule.decay_steps")
    if warmup_steps + decay_steps > total_steps:
        raise UserError(
            f"warmup_steps ({warmup_steps}) + decay_steps ({decay_steps}) exceed total_steps "
            f"({total_steps}); shorten schedule.warmup_steps or schedule.decay_steps"
        )

    def constant(step):
        return jnp.full(jnp.shape(step), peak_lr, jnp.float32)

    if decay_steps == 0:
        return _warmup_then(peak_lr, warmup_steps, [constant], [])

    def decay(steps_since_start):
        progress = (steps_since_start + 1) / decay_steps
        return peak_lr * _decay_factor(progress, decay_shape, final_ratio)

    decay_start = total_steps - decay_steps
    return _warmup_then(peak_lr, warmup_steps, [constant, decay], [decay_start])


def cosine(
    peak_lr: float, total_steps: int, warmup_steps: int, final_ratio: float = 0.0
) -> optax.Schedule:
    """Linear warmup, then a cosine from the peak to ``final_ratio * peak`` on the last update.

    ``s < warmup_steps``: ``peak * s / warmup_steps``; then, with ``W = warmup_steps`` and
    ``p = min(1, (s - W) / (total_steps - 1 - W))``:
    ``peak * (r + (1 - r) * (1 + cos(pi p)) / 2)``. So ``lr(W) = peak`` and
    ``lr(total_steps - 1) = final_ratio * peak``. Unlike ``optax.warmup_cosine_decay_schedule``,
    whose end value is reached one step after the last update, the last update here already
    uses the final value. Needs at least one step after the warmup.
    """
    _check_common(peak_lr, total_steps, warmup_steps, final_ratio)
    span = total_steps - 1 - warmup_steps
    if span < 1:
        raise UserError(
            f"a cosine schedule needs warmup_steps ({warmup_steps}) < total_steps - 1 "
            f"({total_steps - 1}); shorten schedule.warmup_steps or raise train.steps"
        )

    def decay(steps_since_peak):
        return peak_lr * _decay_factor(steps_since_peak / span, "cosine", final_ratio)

    return _warmup_then(peak_lr, warmup_steps, [decay], [])
