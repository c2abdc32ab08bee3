"""Next-token cross-entropy (with z-loss), optionally in chunks of the sequence.

In one piece the (B, L, V) float32 logits and their gradient exist whole, the largest
activations of a model with a big vocabulary. In chunks, a scan computes each chunk's logits,
adds up its losses and drops them; jax.checkpoint makes the backward pass recompute them chunk
by chunk (one more head matmul) instead of keeping them.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def _sums(logits_fn: Callable, x_BxCxD: jax.Array, targets_BxC: jax.Array,
          weight_BxC: jax.Array) -> jax.Array:
    """Summed cross-entropy and summed squared log-normaliser of one chunk, float32."""
    logits_BxCxV = logits_fn(x_BxCxD).astype(jnp.float32)
    lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
    target_BxC = jnp.take_along_axis(logits_BxCxV, targets_BxC[..., None], axis=-1)[..., 0]
    return jnp.stack([jnp.sum((lse_BxC - target_BxC) * weight_BxC),
                      jnp.sum(lse_BxC**2 * weight_BxC)])


def cross_entropy(logits_fn: Callable[[jax.Array], jax.Array], x_BxLxD: jax.Array,
                  targets_BxL: jax.Array, z_loss: float = 0.0,
                  chunk: int = 0) -> tuple[jax.Array, jax.Array]:
    """(loss, ce): mean cross-entropy of logits_fn(x) against targets, plus z_loss times the
    mean squared log-sum-exp, in float32.

    chunk = 0: the logits in one piece. chunk > 0: about `chunk` tokens at a time, every row of
    the batch in each chunk (so a batch-sharded x stays sharded), the sequence cut into pieces
    of max(1, chunk // B) positions; a short last piece is padded and weighted out.
    """
    B, L, D = x_BxLxD.shape
    if not chunk:
        logits_BxLxV = logits_fn(x_BxLxD)
        lse_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
        target_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
        ce = jnp.mean(lse_BxL - target_BxL)
        return (ce + z_loss * jnp.mean(lse_BxL**2) if z_loss else ce), ce
    C = min(max(1, chunk // B), L)  # a chunk longer than the sequence would only add padding
    n = -(-L // C)
    pad = n * C - L
    weight_BxL = jnp.ones((B, L), jnp.float32)
    if pad:
        x_BxLxD = jnp.pad(x_BxLxD, ((0, 0), (0, pad), (0, 0)))
        targets_BxL = jnp.pad(targets_BxL, ((0, 0), (0, pad)))
        weight_BxL = jnp.pad(weight_BxL, ((0, 0), (0, pad)))
    # Chunks lead: (n, B, C, ...), scanned one at a time.
    x_nxBxCxD = x_BxLxD.reshape(B, n, C, D).swapaxes(0, 1)
    targets_nxBxC = targets_BxL.reshape(B, n, C).swapaxes(0, 1)
    weight_nxBxC = weight_BxL.reshape(B, n, C).swapaxes(0, 1)
    # Inside the scan no optimization barrier is needed to keep the recomputation apart.
    piece = jax.checkpoint(lambda *chunk_: _sums(logits_fn, *chunk_), prevent_cse=False)

    def step(total, chunk_):
        return total + piece(*chunk_), None

    total, _ = jax.lax.scan(step, jnp.zeros(2, jnp.float32),
                            (x_nxBxCxD, targets_nxBxC, weight_nxBxC))
    ce, z = total[0] / (B * L), total[1] / (B * L)
    return (ce + z_loss * z if z_loss else ce), ce
