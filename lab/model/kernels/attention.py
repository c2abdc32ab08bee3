"""Causal attention, one function per implementation, all with one signature:
q (B, L, H, E), k and v (B, L, K, E) with H = G * K (grouped-query attention), a softmax scale,
and the matmul operand dtype; the result is (B, L, H, E) in q's dtype. Scores and softmax
statistics are float32 in every implementation.

- `xla`: plain einsums differentiated by XLA; runs on every backend.
- `cudnn`: cuDNN's fused attention through jax.nn.dot_product_attention (GPU only).
- `splash`: the Pallas TPU splash-attention kernel under shard_map (interpreted on CPU).
- `blocked`: the CPU-tuned blocked attention of lab.model.kernels.cpu.

`attention` also returns each sequence's largest pre-softmax logit per query head, (B, H)
float32, a statistic for QK-clip (lab.optim.qk_clip). `xla` and `blocked` give it exactly, as a
maximum over the logits they compute anyway; cuDNN and splash never hand their logits back, so
for them it is `logit_bound`, an upper bound on every logit from the norms of q and k.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lab.accel.sharding import BATCH_AXES
from lab.errors import UserError
from lab.model.kernels import cpu

IMPLEMENTATIONS = ("xla", "cudnn", "splash", "blocked")
EXACT_MAX_LOGIT = ("xla", "blocked")  # the others report `logit_bound`
# What `auto` means on each target platform; anything else gets plain XLA attention.
AUTO = {"cpu": "blocked", "gpu": "cudnn", "cuda": "cudnn", "tpu": "splash"}


def resolve(name: str, platform: str) -> str:
    """The implementation that `model.attention=name` selects on `platform`."""
    if name == "auto":
        return AUTO.get(platform, "xla")
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {name!r}")
    return name


def xla_attention(q_BxLxHxE: jax.Array, k_BxLxKxE: jax.Array, v_BxLxKxE: jax.Array,
                  scale: float, dtype: jnp.dtype) -> jax.Array:
    return xla_attention_and_max_logit(q_BxLxHxE, k_BxLxKxE, v_BxLxKxE, scale, dtype)[0]


def xla_attention_and_max_logit(q_BxLxHxE: jax.Array, k_BxLxKxE: jax.Array,
                                v_BxLxKxE: jax.Array, scale: float, dtype: jnp.dtype
                                ) -> tuple[jax.Array, jax.Array]:
    """`xla_attention` and each sequence's largest causal logit per query head, (B, H)."""
    B, L, H, E = q_BxLxHxE.shape
    K = k_BxLxKxE.shape[2]
    q_BxLxKxGxE = (q_BxLxHxE * scale).reshape(B, L, K, H // K, E).astype(dtype)
    logits_BxKxGxLxS = jnp.einsum("blkge,bske->bkgls", q_BxLxKxGxE, k_BxLxKxE.astype(dtype),
                                  preferred_element_type=jnp.float32)
    causal_LxS = (jax.lax.broadcasted_iota(jnp.int32, (L, L), 0)
                  >= jax.lax.broadcasted_iota(jnp.int32, (L, L), 1))
    masked_BxKxGxLxS = jnp.where(causal_LxS, logits_BxKxGxLxS, -1e30)
    probs_BxKxGxLxS = jax.nn.softmax(masked_BxKxGxLxS, axis=-1)
    out_BxLxKxGxE = jnp.einsum("bkgls,bske->blkge", probs_BxKxGxLxS.astype(dtype),
                               v_BxLxKxE.astype(dtype), preferred_element_type=jnp.float32)
    max_BxKxG = jnp.max(jax.lax.stop_gradient(masked_BxKxGxLxS), axis=(-2, -1))
    return out_BxLxKxGxE.reshape(B, L, H, E).astype(q_BxLxHxE.dtype), max_BxKxG.reshape(B, H)


def logit_bound(q_BxLxHxE: jax.Array, k_BxLxKxE: jax.Array, scale: float) -> jax.Array:
    """An upper bound on each sequence's logits per query head, (B, H) float32, for kernels
    that keep their logits to themselves: |scale q.k| <= |scale| |q| |k| (Cauchy-Schwarz), so
    |scale| times the largest |q| of the head times the largest |k| of its key/value head
    bounds every logit of the sequence. It costs one pass over q and k. The bound is reached
    only when the longest query and key are parallel, so it is usually well above the true
    maximum; QK-clip on it clips earlier and harder than on exact logits."""
    B, L, H, E = q_BxLxHxE.shape
    K = k_BxLxKxE.shape[2]

    def longest(x_BxLxNxE):
        x32 = jax.lax.stop_gradient(x_BxLxNxE).astype(jnp.float32)
        return jnp.sqrt(jnp.max(jnp.sum(x32 * x32, axis=-1), axis=1))  # (B, N)

    bound_BxKxG = longest(q_BxLxHxE).reshape(B, K, H // K) * longest(k_BxLxKxE)[:, :, None]
    return abs(scale) * bound_BxKxG.reshape(B, H)


def cudnn_attention(q_BxLxHxE: jax.Array, k_BxLxKxE: jax.Array, v_BxLxKxE: jax.Array,
                    scale: float, dtype: jnp.dtype) -> jax.Array:
    # cuDNN's fused attention takes only half-precision operands: float32 runs as bfloat16.
    dtype = jnp.bfloat16 if jnp.dtype(dtype) == jnp.float32 else dtype
    q, k, v = (x.astype(dtype) for x in (q_BxLxHxE, k_BxLxKxE, v_BxLxKxE))
    out_BxLxHxE = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                               implementation="cudnn")
    return out_BxLxHxE.astype(q_BxLxHxE.dtype)


SPLASH_TILE = 128  # the kernel's key/value tiles are multiples of the TPU's 128 lanes


def splash_block(L: int) -> int:
    """The splash tile: the largest of 512, 256, 128 that divides L."""
    block = next((b for b in (512, 256, 128) if L % b == 0), 0)
    if not block:
        raise UserError(f"splash attention needs a sequence length divisible by {SPLASH_TILE}, "
                        f"got {L}; change train.seq_len or set model.attention=xla")
    return block


def splash_attention(q_BxLxHxE: jax.Array, k_BxLxKxE: jax.Array, v_BxLxKxE: jax.Array,
                     scale: float, dtype: jnp.dtype, interpret: bool = False,
                     block: int | None = None) -> jax.Array:
    """The splash kernel on each device's batch rows and heads.

    Under a mesh (jax.set_mesh) the batch is split over data x fsdp and the heads over tensor,
    as the activations are; a key/value head count the tensor axis does not divide is repeated
    up to one per query head first. `interpret` runs the Pallas kernel on any backend (slow).
    `block` (default `splash_block(L)`) must divide L and be a multiple of 128.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as masks,
    )

    B, L, H, E = q_BxLxHxE.shape
    K = k_BxLxKxE.shape[2]
    block = block or splash_block(L)
    if L % block:
        raise ValueError(f"splash attention: block {block} does not divide sequence {L}")
    mesh = jax.sharding.get_abstract_mesh()
    sizes = {} if mesh.empty else dict(mesh.shape)
    batch_size = math.prod(sizes.get(a, 1) for a in BATCH_AXES)
    tensor = sizes.get("tensor", 1)
    heads_axis = "tensor" if tensor > 1 and H % tensor == 0 else None
    if heads_axis and K % tensor:
        k_BxLxKxE, v_BxLxKxE = (jnp.repeat(x, H // K, axis=2) for x in (k_BxLxKxE, v_BxLxKxE))
    # The kernel takes heads before positions: (heads, L, E) per sequence.
    q_BxHxLxE = (q_BxLxHxE * scale).astype(dtype).transpose(0, 2, 1, 3)
    k_BxKxLxE, v_BxKxLxE = (x.astype(dtype).transpose(0, 2, 1, 3)
                            for x in (k_BxLxKxE, v_BxLxKxE))
    sizes_ = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                               block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                               block_q_dq=block, block_kv_dq=block)

    def local(q_bxhxLxE, k_bxkxLxE, v_bxkxLxE):
        h = q_bxhxLxE.shape[1]
        mask = masks.MultiHeadMask([masks.CausalMask((L, L))] * h)
        kernel = splash.make_splash_mha(mask, block_sizes=sizes_, head_shards=1, q_seq_shards=1,
                                        interpret=interpret)
        # The causal mask's query positions are an L-long numpy constant, which would make the
        # program grow with the sequence; an iota computes them instead.
        positions = jax.lax.iota(jnp.int32, L)
        for name in ("fwd_mask_info", "dq_mask_info", "dkv_mask_info"):
            info = getattr(kernel, name, None)
            if info is not None and info.q_sequence is not None:
                setattr(kernel, name, info._replace(q_sequence=positions))
        return jax.vmap(kernel)(q_bxhxLxE, k_bxkxLxE, v_bxkxLxE)

    if batch_size * (tensor if heads_axis else 1) == 1:
        out_BxHxLxE = local(q_BxHxLxE, k_BxKxLxE, v_BxKxLxE)
    else:
        batch_axes = BATCH_AXES if batch_size > 1 and B % batch_size == 0 else None
        spec = P(batch_axes, heads_axis, None, None)
        out_BxHxLxE = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec),
                                    out_specs=spec, check_vma=False)(
            q_BxHxLxE, k_BxKxLxE, v_BxKxLxE)
    return out_BxHxLxE.transpose(0, 2, 1, 3).astype(q_BxLxHxE.dtype)


def attention(impl: str, q_BxLxHxE: jax.Array, k_BxLxKxE: jax.Array, v_BxLxKxE: jax.Array,
              scale: float, dtype: jnp.dtype, platform: str) -> tuple[jax.Array, jax.Array]:
    """Causal attention by implementation name (already resolved from `auto`), and each
    sequence's largest logit per query head (B, H): exact for EXACT_MAX_LOGIT, else
    `logit_bound`."""
    if impl == "xla":
        return xla_attention_and_max_logit(q_BxLxHxE, k_BxLxKxE, v_BxLxKxE, scale, dtype)
    if impl == "blocked":
        return cpu.blocked_attention_and_max_logit(q_BxLxHxE, k_BxLxKxE, v_BxLxKxE, scale,
                                                   dtype)
    if impl == "cudnn":
        out_BxLxHxE = cudnn_attention(q_BxLxHxE, k_BxLxKxE, v_BxLxKxE, scale, dtype)
    elif impl == "splash":
        out_BxLxHxE = splash_attention(q_BxLxHxE, k_BxLxKxE, v_BxLxKxE, scale, dtype,
                                       interpret=platform == "cpu")
    else:
        raise ValueError(f"unknown attention implementation {impl!r}")
    return out_BxLxHxE, logit_bound(q_BxLxHxE, k_BxLxKxE, scale)
