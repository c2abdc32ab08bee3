"""Kernels tuned for XLA's CPU backend: a dense layer and causal attention with hand-written
backward passes whose matmuls read row-major operands.

XLA's CPU backend runs a matmul slowly when an operand is a transposed view rather than
row-major data (and a bfloat16 one in float32). The autodiff transposes of x @ w and of
attention break that form, so the backward passes here copy the narrow operand into row-major
order themselves; what a matmul contracts over matters less (the attention backward's dk and dv
contract over a block's rows, as fast as the plain form and cheaper than transposing the
results). None of this helps on GPU or TPU, whose compilers choose layouts themselves: there
the model uses plain einsums (lab.model.kernels.Kernels).

Tensor names: B batch, L sequence, K key/value heads, G query heads per key/value head, E head
dim, R rows of a query block (G heads x C positions), S keys, N rows, D in, F out.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def matmul(a: jax.Array, b: jax.Array, spec: str, dtype: jnp.dtype) -> jax.Array:
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def row_major(x: jax.Array) -> jax.Array:
    """x itself, materialised in row-major order before a matmul reads it.

    XLA gives a transposed array a permuted layout instead of moving data; a bfloat16 matmul
    that reads such an operand is then run in float32 by XLA's CPU backend (half the speed),
    and a transpose it can see is folded back into the matmul (a slow form). Going through a
    unit axis and an optimisation barrier makes XLA copy the data once, in row-major order.
    """
    return jax.lax.optimization_barrier(x[..., None])[..., 0]


def transposed(x: jax.Array) -> jax.Array:
    """x with its last two axes swapped, as a real row-major copy."""
    return row_major(x.swapaxes(-1, -2))


def stash(x: jax.Array) -> jax.Array:
    """A residual kept for the backward pass; bfloat16 as its uint16 bit pattern.

    Under `scan_layers` the residuals of every layer are stacked by the loop, and XLA's CPU
    backend converts a stacked bfloat16 array to float32 and back (a full copy each way, and
    twice the memory); an integer array passes through untouched.
    """
    return jax.lax.bitcast_convert_type(x, jnp.uint16) if x.dtype == jnp.bfloat16 else x


def unstash(x: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(x, jnp.bfloat16) if x.dtype == jnp.uint16 else x


# ----------------------------------------------------------------------------- dense


def dense(x: jax.Array, w: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """x @ w with operands in `dtype` and a float32 result.

    The backward pass is written by hand so that every matmul is a plain row-major product:
    the weight gradient x^T @ dy would otherwise contract over the leading axis of both
    operands and run at half speed (and XLA may transpose the large operand to get there). We
    transpose the narrower of x and dy ourselves. The operands are kept for the backward pass
    already cast to `dtype`, so they are cast once, not twice.
    """
    return _dense(x, w, jnp.dtype(dtype), x.dtype, w.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _dense(x, w, dtype, x_dtype, w_dtype):
    return matmul(x, w, "...d,df->...f", dtype)


def _dense_fwd(x, w, dtype, x_dtype, w_dtype):
    x_lo, w_lo = x.astype(dtype), w.astype(dtype)
    return matmul(x_lo, w_lo, "...d,df->...f", dtype), (stash(x_lo), stash(w_lo))


def _dense_bwd(dtype, x_dtype, w_dtype, residuals, dy):
    x_lo, w_lo = (unstash(r) for r in residuals)
    d_in, d_out = w_lo.shape
    x_NxD = x_lo.reshape(-1, d_in)
    dy_NxF = dy.reshape(-1, d_out).astype(dtype)
    dx = matmul(dy_NxF, w_lo, "nf,df->nd", dtype).reshape(x_lo.shape).astype(x_dtype)
    if d_in <= d_out:
        dw_DxF = matmul(transposed(x_NxD), dy_NxF, "dn,nf->df", dtype)
    else:  # transpose the narrower dy, and the small result back
        dw_DxF = row_major(matmul(transposed(dy_NxF), x_NxD, "fn,nd->fd", dtype)).T
    return dx, dw_DxF.astype(w_dtype)


_dense.defvjp(_dense_fwd, _dense_bwd)


# ----------------------------------------------------------------------------- attention

# Query block of causal attention: blocks skip the keys after them (about half the scores at
# long sequences) and keep each block's slab of scores small.
ATTENTION_BLOCK = 128


def blocked_attention(q_BxLxHxE: jax.Array, k_BxLxKxE: jax.Array, v_BxLxKxE: jax.Array,
                      scale: float, dtype: jnp.dtype, block: int = ATTENTION_BLOCK) -> jax.Array:
    """Causal softmax(scale q k^T) v, (B, L, H, E) in and out, by `causal_attention`."""
    return blocked_attention_and_max_logit(q_BxLxHxE, k_BxLxKxE, v_BxLxKxE, scale, dtype,
                                           block)[0]


def blocked_attention_and_max_logit(q_BxLxHxE: jax.Array, k_BxLxKxE: jax.Array,
                                    v_BxLxKxE: jax.Array, scale: float, dtype: jnp.dtype,
                                    block: int = ATTENTION_BLOCK) -> tuple[jax.Array, jax.Array]:
    """`blocked_attention` and each sequence's largest logit per query head, (B, H) float32:
    the softmax's own row maxima, reduced (exact, and almost free)."""
    B, L, H, E = q_BxLxHxE.shape
    K = k_BxLxKxE.shape[2]
    G = H // K
    # Heads first: (B, K, G, L, E), so each key/value head is one batched matmul.
    q_BxKxGxLxE = row_major((q_BxLxHxE * scale).reshape(B, L, K, G, E).transpose(0, 2, 3, 1, 4))
    k_BxKxLxE = row_major(k_BxLxKxE.transpose(0, 2, 1, 3))
    v_BxKxLxE = row_major(v_BxLxKxE.transpose(0, 2, 1, 3))
    out_BxKxGxLxE, max_BxKxG = _attention(q_BxKxGxLxE, k_BxKxLxE, v_BxKxLxE, jnp.dtype(dtype),
                                          block, q_BxKxGxLxE.dtype)
    return (out_BxKxGxLxE.transpose(0, 3, 1, 2, 4).reshape(B, L, H, E),
            jax.lax.stop_gradient(max_BxKxG).reshape(B, H))


def _query_blocks(L: int, block: int) -> list[tuple[int, int]]:
    return [(s, min(s + block, L)) for s in range(0, L, block)]


def _block_rows(x_BxKxGxLxE: jax.Array, s: int, e: int) -> jax.Array:
    """Rows s:e of every query head, the G heads of a key/value head stacked: (B, K, G*C, E)."""
    B, K, G, _, E = x_BxKxGxLxE.shape
    return x_BxKxGxLxE[:, :, :, s:e].reshape(B, K, G * (e - s), E)


def _masked_logits(q_BxKxRxE, k_BxKxSxE, s: int, e: int, G: int, dtype) -> jax.Array:
    logits_BxKxRxS = matmul(q_BxKxRxE, k_BxKxSxE, "bkre,bkse->bkrs", dtype)
    # Row r is query position s + r mod (e - s) (the G heads stacked); key j is position j.
    # Built from iotas inside the computation, not as an (R, S) constant in the program.
    shape = (G * (e - s), e)
    query_RxS = s + jax.lax.broadcasted_iota(jnp.int32, shape, 0) % (e - s)
    causal_RxS = query_RxS >= jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    return jnp.where(causal_RxS, logits_BxKxRxS, -1e30)


def causal_attention(q_BxKxGxLxE: jax.Array, k_BxKxLxE: jax.Array, v_BxKxLxE: jax.Array,
                     dtype: jnp.dtype, block: int = ATTENTION_BLOCK) -> jax.Array:
    """softmax(q k^T + causal mask) v with float32 scores, in query blocks of `block` rows.

    Query block [s, e) attends to keys [0, e) only, so most of the masked upper triangle is
    never computed. The G query heads that share a key/value head are the rows of one matmul.
    Matmul operands are cast to `dtype`; the softmax stays float32. The backward pass
    recomputes each block's probabilities from the saved log-sum-exp instead of keeping
    them (as flash attention does): on a CPU the (L, L) slabs cost more in memory traffic
    than the extra q k^T costs in FLOPs. q, k and v share one dtype, as do their gradients.
    The blocks are a Python loop, so the program grows with L / block: a CPU kernel.
    """
    return _attention(q_BxKxGxLxE, k_BxKxLxE, v_BxKxLxE, jnp.dtype(dtype), block,
                      q_BxKxGxLxE.dtype)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _attention(q_BxKxGxLxE, k_BxKxLxE, v_BxKxLxE, dtype, block, in_dtype):
    """(the output, each sequence's largest logit per head (B, K, G)): the second is a
    statistic, with no gradient."""
    return _attention_fwd(q_BxKxGxLxE, k_BxKxLxE, v_BxKxLxE, dtype, block, in_dtype)[0]


def _attention_fwd(q_BxKxGxLxE, k_BxKxLxE, v_BxKxLxE, dtype, block, in_dtype):
    B, K, G, L, E = q_BxKxGxLxE.shape
    q_lo, k_lo, v_lo = (x.astype(dtype) for x in (q_BxKxGxLxE, k_BxKxLxE, v_BxKxLxE))
    outs, lses, maxima = [], [], []
    for s, e in _query_blocks(L, block):
        logits_BxKxRxS = _masked_logits(_block_rows(q_lo, s, e), k_lo[:, :, :e], s, e, G, dtype)
        max_BxKxRx1 = jnp.max(logits_BxKxRxS, axis=-1, keepdims=True)
        # Every row has its diagonal, so no masked -1e30 reaches the maximum.
        maxima.append(jnp.max(max_BxKxRx1.reshape(B, K, G, e - s), axis=-1))
        exp_BxKxRxS = jnp.exp(logits_BxKxRxS - max_BxKxRx1)
        sum_BxKxRx1 = jnp.sum(exp_BxKxRxS, axis=-1, keepdims=True)
        # Normalise after the matmul: E columns to divide instead of S.
        out_BxKxRxE = matmul(exp_BxKxRxS, v_lo[:, :, :e], "bkrs,bkse->bkre", dtype)
        outs.append((out_BxKxRxE / sum_BxKxRx1).reshape(B, K, G, e - s, E).astype(in_dtype))
        lses.append(max_BxKxRx1 + jnp.log(sum_BxKxRx1))
    out_BxKxGxLxE = jnp.concatenate(outs, axis=3) if len(outs) > 1 else outs[0]
    max_BxKxG = functools.reduce(jnp.maximum, maxima)
    # The operands are kept already cast: the backward pass needs them in `dtype` anyway.
    residuals = (stash(q_lo), stash(k_lo), stash(v_lo), stash(out_BxKxGxLxE), lses)
    return (out_BxKxGxLxE, max_BxKxG), residuals


def _attention_bwd(dtype, block, in_dtype, residuals, cotangents):
    dout_BxKxGxLxE = cotangents[0]  # the maxima are statistics: their cotangent is ignored
    q_lo, k_lo, v_lo, out_BxKxGxLxE = (unstash(r) for r in residuals[:4])
    lses = residuals[4]
    B, K, G, L, E = q_lo.shape
    dout_lo = dout_BxKxGxLxE.astype(dtype)
    dqs, dk_parts, dv_parts = [], [], []
    for (s, e), lse_BxKxRx1 in zip(_query_blocks(L, block), lses, strict=True):
        q_BxKxRxE = _block_rows(q_lo, s, e)
        dout_BxKxRxE = _block_rows(dout_lo, s, e)
        logits_BxKxRxS = _masked_logits(q_BxKxRxE, k_lo[:, :, :e], s, e, G, dtype)
        probs_BxKxRxS = jnp.exp(logits_BxKxRxS - lse_BxKxRx1)
        dprobs_BxKxRxS = matmul(dout_BxKxRxE, v_lo[:, :, :e], "bkre,bkse->bkrs", dtype)
        # Softmax statistics in float32 whatever the activations' dtype.
        delta_BxKxRx1 = jnp.sum(_block_rows(dout_BxKxGxLxE, s, e).astype(jnp.float32)
                                * _block_rows(out_BxKxGxLxE, s, e).astype(jnp.float32),
                                axis=-1, keepdims=True)
        dlogits_BxKxRxS = probs_BxKxRxS * (dprobs_BxKxRxS - delta_BxKxRx1)
        dqs.append(matmul(dlogits_BxKxRxS, k_lo[:, :, :e], "bkrs,bkse->bkre", dtype)
                   .reshape(B, K, G, e - s, E))
        # dk = dlogits^T q and dv = probs^T dout contract over the block's rows. XLA's CPU
        # matmuls (YNNPACK) take that form directly; computing dk^T and dv^T as plain products
        # instead left whole (E, L) results to transpose, which XLA fused into the rotary
        # embedding's backward as strided reads, slower than the matmuls' own gain.
        pad = ((0, 0), (0, 0), (0, L - e), (0, 0))
        dk_parts.append(jnp.pad(matmul(dlogits_BxKxRxS, q_BxKxRxE, "bkrs,bkre->bkse", dtype),
                                pad))
        dv_parts.append(jnp.pad(matmul(probs_BxKxRxS, dout_BxKxRxE, "bkrs,bkre->bkse", dtype),
                                pad))
    dq_BxKxGxLxE = jnp.concatenate(dqs, axis=3) if len(dqs) > 1 else dqs[0]
    return (dq_BxKxGxLxE.astype(in_dtype), sum(dk_parts).astype(in_dtype),
            sum(dv_parts).astype(in_dtype))


_attention.defvjp(_attention_fwd, _attention_bwd)
