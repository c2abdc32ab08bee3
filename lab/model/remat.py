"""Remat policies: what a block keeps for its backward pass, by `model.remat` name.

The names are the checkpoint_name tags of lab.model.transformer's Attention and MLP.
`save_attention` keeps
what `dots` keeps and the attention kernel's outputs besides: its result and, for the fused
kernels, the softmax statistics (logsumexp) they hand their own backward pass. Those kernels
are custom VJPs whose residuals are outputs of their forward primitive (cuDNN's
`dot_product_attention_fwd_wrapper`, the Pallas `pallas_call` of splash attention), so the
policy saves by primitive: a policy that saved only the named result would still run the
forward kernel again to get the statistics. `auto` is resolved per chip by lab.model.memory.
"""

from __future__ import annotations

from typing import Any

import jax

_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")
ATTENTION_OUT = "attention_out"
# Forward primitives of the fused attention kernels (jax.nn.dot_product_attention's cuDNN
# kernel; Pallas kernels, of which the forward pass holds only splash attention's).
ATTENTION_FORWARD_PRIMITIVES = frozenset({"dot_product_attention_fwd_wrapper",
                                          "dot_product_attention_fwd", "pallas_call"})
_dots = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
_attention_named = jax.checkpoint_policies.save_only_these_names(ATTENTION_OUT)


def save_attention(prim: Any, *avals: Any, **params: Any) -> bool:
    """dots, the named attention result, and every output of a fused attention kernel."""
    return (prim.name in ATTENTION_FORWARD_PRIMITIVES or _dots(prim, *avals, **params)
            or _attention_named(prim, *avals, **params))


POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": _dots,
    "save_attention": save_attention,
    "save_qkv_proj": jax.checkpoint_policies.save_only_these_names(*_PROJECTIONS[:3]),
    "save_out_proj": jax.checkpoint_policies.save_only_these_names("out_proj"),
    "minimal": jax.checkpoint_policies.save_only_these_names(
        *_PROJECTIONS, "mlp_gate", "mlp_up", "mlp_out"),
}
# What `model.remat=auto` tries, least recomputation first; the first that fits is taken.
AUTO_ORDER = ("none", "save_attention", "dots", "save_qkv_proj", "full")
