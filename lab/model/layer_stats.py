"""Statistics that the model's blocks report beside their output (router load, attention logit
maxima, auxiliary losses): one convention for how they are named, combined and logged.

A block returns a dict of float32 arrays. Stacked over layers (scan or loop) each gains a
leading layer axis N. A name that starts with "max_" is a maximum, combined over micro-batches
and layers by max; every other statistic is a mean, averaged. "aux_loss" (one scalar per layer)
is added to the training loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

AUX_LOSS = "aux_loss"
MAX_LOGIT = "max_logit"  # the attention's largest logit per sequence and head (lab.optim.qk_clip)


def is_max(name: str) -> bool:
    return name.startswith("max_")


def auxiliary_loss(stats_N: dict) -> jax.Array | float:
    """The blocks' auxiliary losses summed over layers; 0 when no block reports one."""
    return jnp.sum(stats_N[AUX_LOSS]) if AUX_LOSS in stats_N else 0.0


def initial(shapes: dict) -> dict:
    """The running total before the first micro-batch: -inf for maxima, 0 for the others."""
    return {name: jnp.full(s.shape, -jnp.inf if is_max(name) else 0.0, s.dtype)
            for name, s in shapes.items()}


def accumulate(total: dict, stats: dict) -> dict:
    """Combine one micro-batch's stats into a running total (max for maxima, sum otherwise)."""
    return {name: (jnp.maximum if is_max(name) else jnp.add)(total[name], stats[name])
            for name in stats}


def finish(total: dict, micro_batches: int) -> dict:
    """The running total of `accumulate` over `micro_batches` as per-step stats."""
    return {name: value if is_max(name) else value / micro_batches
            for name, value in total.items()}


def step_metrics(stats_N: dict) -> dict:
    """One scalar metric per statistic that is a scalar per layer: the max over layers of a
    maximum, the mean of the others. Wider statistics (per head, per expert) are left to the
    code that logs them."""
    return {name: (jnp.max if is_max(name) else jnp.mean)(value)
            for name, value in stats_N.items() if value.ndim == 1}
