"""QK-clip (MuonClip, Kimi K2 2025): a cap on attention logits, applied to the weights.

After each optimizer update, every attention head whose largest pre-softmax logit of the step
exceeded τ (`optim.qk_clip`) has its query and key weights scaled down so that the step's own
inputs would give it a largest logit of exactly τ: with γ = τ / max_logit, Kimi K2 multiplies
the head's W_q and W_k by sqrt(γ) each (a logit is bilinear in them, and rotary embeddings are
linear, so the logits scale by γ). Heads at or below τ get a factor of exactly 1: untouched.

Grouped-query attention: one key head serves G query heads, which may need different factors.
Kimi K2 meets the same question in MLA, whose rotary key k_R is shared by every head: it leaves
the shared key alone and gives the head's own rotary query q_R the whole γ. We do the same:
with G > 1 a head's W_q columns take γ and the shared W_k is not touched, so every head lands
exactly on τ and the heads of its group that did not exceed τ are left as they were (scaling
the key by its worst head's factor would shrink those too). With G = 1 the key belongs to one
head and the factor is split, sqrt(γ) each, as K2 does for its per-head q_C and k_C.

qk_norm: RMSNorm of q and k removes any scale of W_q and W_k, so clipping them would do
nothing. The logits then scale with the norms' gains, which all heads of a layer share: the
clip multiplies the q and k gains by sqrt(γ) of the layer's worst head (the smallest γ), which
brings that head to τ and the layer's other heads below their maxima by the same factor.

The maxima come from the attention kernels (lab.model.kernels.attention): exact for `xla` and
`blocked`; for `cudnn` and `splash` an upper bound (`logit_bound`), on which the clip acts
earlier and harder than on the true logits. With gradient accumulation the step's maximum is
the largest over its micro-batches (lab.model.layer_stats).

Logged each step: `max_logit` (the largest over layers and heads), `max_logit/layer_<i>`, and
with the clip on, `clipped_heads` (how many (layer, head) pairs were clipped).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from lab.config import ModelConfig
from lab.model.layer_stats import MAX_LOGIT


def clip_factors(max_logit_NxH: jax.Array, tau: float) -> jax.Array:
    """γ = τ / max_logit for every head over τ, 1 elsewhere (NaN maxima included)."""
    return jnp.where(max_logit_NxH > tau, tau / max_logit_NxH, 1.0)


def _scale_heads(w_xDxC: jax.Array, factor_xH: jax.Array) -> jax.Array:
    """w (..., D, heads * E) with head h's E columns times factor[..., h]."""
    E = w_xDxC.shape[-1] // factor_xH.shape[-1]
    # Repeating the small factor, not reshaping w, keeps w's column sharding as it is.
    return w_xDxC * jnp.repeat(factor_xH, E, axis=-1)[..., None, :].astype(w_xDxC.dtype)


def clip_attention(attn: dict, gamma_xH: jax.Array, cfg: ModelConfig) -> dict:
    """One attention's parameters (with or without a leading layer axis, as gamma) clipped
    by factors γ (..., H): see the module's docstring for how GQA and qk_norm share them."""
    if cfg.qk_norm:
        root_x1 = jnp.sqrt(jnp.min(gamma_xH, axis=-1))[..., None]
        return {**attn, **{name: {**attn[name], "scale": attn[name]["scale"] * root_x1}
                           for name in ("q_norm", "k_norm")}}
    if cfg.n_heads == cfg.kv_heads:
        root_xH = jnp.sqrt(gamma_xH)
        return {**attn, "wq": _scale_heads(attn["wq"], root_xH),
                "wk": _scale_heads(attn["wk"], root_xH)}
    return {**attn, "wq": _scale_heads(attn["wq"], gamma_xH)}


def clip(params: dict, max_logit_NxH: jax.Array, tau: float, cfg: ModelConfig) -> dict:
    """The model's parameters (nested dicts) with every head over τ clipped; `max_logit_NxH`
    holds each layer's and head's largest logit of the step."""
    gamma_NxH = clip_factors(max_logit_NxH, tau)
    blocks = params["blocks"]
    if cfg.scan_layers:
        blocks = {**blocks, "attn": clip_attention(blocks["attn"], gamma_NxH, cfg)}
    else:
        blocks = {i: {**block, "attn": clip_attention(block["attn"], gamma_NxH[i], cfg)}
                  for i, block in blocks.items()}
    return {**params, "blocks": blocks}


def logit_metrics(max_logit_NxH: jax.Array) -> dict:
    """`max_logit` of the step and `max_logit/layer_<i>` of each layer."""
    max_N = jnp.max(max_logit_NxH, axis=-1)
    return {"max_logit": jnp.max(max_N),
            **{f"max_logit/layer_{i}": max_N[i] for i in range(max_N.shape[0])}}


def after_update(cfg: ModelConfig, tau: float) -> Callable[[dict, dict], tuple[dict, dict]]:
    """The step after the optimizer's update: (new params, layer stats) -> (params, metrics).
    It logs the logit maxima, and with τ > 0 clips the heads over τ; with τ = 0 the
    parameters pass through untouched."""

    def step(params: dict, stats_N: dict) -> tuple[dict, dict]:
        max_logit_NxH = jnp.max(stats_N[MAX_LOGIT], axis=1)  # over the batch's sequences
        metrics = logit_metrics(max_logit_NxH)
        if tau > 0:
            params = clip(params, max_logit_NxH, tau, cfg)
            metrics["clipped_heads"] = jnp.sum(max_logit_NxH > tau)
        return params, metrics

    return step
