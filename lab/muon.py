"""Muon: momentum orthogonalised by Newton-Schulz (Jordan et al. 2024), as optax transformations.

Muon is for hidden weight matrices only; `lab.optim` routes embeddings, the output head, norm
scales and biases to AdamW. Matrices are read with their LAST TWO axes as (fan_in, fan_out), as
Flax kernels are used (``y = x @ W``); any leading axes (the layer axis of scanned layers) are a
batch of independent matrices.

One update, for a gradient G of a matrix W:

    M <- momentum * M + G                                  (optax.trace)
    U <- G + momentum * M   (Nesterov)   or   U <- M
    O <- newton_schulz(U)                                  (about U V^T of U's SVD)
    W <- W - lr * (scale * O + weight_decay * W)

Keller Jordan writes the momentum as an EMA, ``M <- lerp(M, G, 1 - momentum)``; that is the
trace above times (1 - momentum), and Newton-Schulz divides by the Frobenius norm first, so the
two give the same update.
"""

import math

import jax
import jax.numpy as jnp
import optax

from lab.errors import UserError

# Keller Jordan's quintic: the largest slope at zero that still keeps every singular value in a
# band around 1 after five steps (see `newton_schulz`).
NS_COEFFS = (3.4445, -4.7750, 2.0315)
SCALINGS = ("moonlight", "shape")


def newton_schulz(
    x: jax.Array,
    steps: int = 5,
    eps: float = 1e-7,
    compute_dtype: jnp.dtype = jnp.float32,
) -> jax.Array:
    """Approximately orthogonalise the last two axes of `x` (batched over leading axes).

    Divides each matrix by its Frobenius norm, then applies ``steps`` times the quintic
    ``X <- a X + (b A + c A^2) X`` with ``A = X X^T`` and (a, b, c) = `NS_COEFFS`. Each singular
    value s of the normalised matrix follows the scalar map ``s <- a s + b s^3 + c s^5`` while
    the singular vectors stay put. After 5 steps every singular value that started at or above
    0.006 of the Frobenius norm lies in [0.68, 1.14]; ones between 0.0015 and 0.006 may reach
    1.21; smaller ones stay below 0.68 (the map grows small values at most a^5 ~ 485 times).

    A tall matrix (rows > cols) is transposed first, so ``A`` is the smaller Gram matrix.
    The iteration runs in float32 whatever the input dtype, and the result is cast back to it.
    ``compute_dtype=jnp.bfloat16`` feeds the matrix products bfloat16 operands (float32
    accumulation, elementwise work still float32): faster where bf16 matmuls are, less exact.
    Jittable; sharded inputs are partitioned by the compiler like any other jnp code.
    """
    if x.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix (ndim >= 2), got shape {x.shape}")
    a, b, c = NS_COEFFS
    in_dtype = x.dtype
    tall = x.shape[-2] > x.shape[-1]
    x = x.astype(jnp.float32)
    if tall:
        x = jnp.swapaxes(x, -1, -2)

    def matmul(p, q):
        return jnp.matmul(
            p.astype(compute_dtype), q.astype(compute_dtype), preferred_element_type=jnp.float32
        )

    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=(-2, -1), keepdims=True))
    x = x / (norm + eps)
    for _ in range(steps):
        gram = matmul(x, jnp.swapaxes(x, -1, -2))
        poly = b * gram + c * matmul(gram, gram)
        x = a * x + matmul(poly, x)
    if tall:
        x = jnp.swapaxes(x, -1, -2)
    return x.astype(in_dtype)


def orthogonalize(
    ns_steps: int = 5, eps: float = 1e-7, compute_dtype: jnp.dtype = jnp.float32
) -> optax.GradientTransformation:
    """A stateless transformation applying `newton_schulz` to every leaf (all must be matrices)."""

    def update_fn(updates, state, params=None):
        del params
        out = jax.tree.map(lambda u: newton_schulz(u, ns_steps, eps, compute_dtype), updates)
        return out, state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def shape_scale(shape: tuple[int, ...], scaling: str) -> float:
    """The multiplier of an orthogonalised update of a matrix with this shape.

    "moonlight" (Liu et al. 2025): ``0.2 * sqrt(max(fan_in, fan_out))``, which gives the update
    an RMS of about 0.2, like AdamW's, so AdamW's learning rate and weight decay carry over.
    "shape" (Keller Jordan): ``sqrt(max(1, fan_out / fan_in))``; Jordan writes it
    ``max(1, rows / cols) ** 0.5`` for PyTorch's (out, in) weights, the same ratio.
    """
    fan_in, fan_out = shape[-2], shape[-1]
    if scaling == "moonlight":
        return 0.2 * math.sqrt(max(fan_in, fan_out))
    if scaling == "shape":
        return math.sqrt(max(1.0, fan_out / fan_in))
    raise UserError(
        f"unknown Muon scaling {scaling!r}; set optim.muon_scaling to one of {SCALINGS}"
    )


def scale_by_shape(scaling: str = "moonlight") -> optax.GradientTransformation:
    """Multiply each leaf by `shape_scale` of its shape (stateless)."""
    if scaling not in SCALINGS:
        shape_scale((1, 1), scaling)  # raises the UserError

    def update_fn(updates, state, params=None):
        del params
        def scale(u):
            return u * jnp.asarray(shape_scale(u.shape, scaling), u.dtype)

        return jax.tree.map(scale, updates), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def muon(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    scaling: str = "moonlight",
    weight_decay: float = 0.0,
    *,
    weight_decay_mask=None,
    eps: float = 1e-7,
    mu_dtype: jnp.dtype | None = None,
    compute_dtype: jnp.dtype = jnp.float32,
) -> optax.GradientTransformation:
    """Muon for a tree of matrices (route everything else elsewhere, see `lab.optim`).

    ``learning_rate`` may be a schedule. Weight decay is decoupled and multiplied by the
    scheduled learning rate, as in ``optax.adamw``: ``W <- W - lr * (scale * O + wd * W)``.
    ``weight_decay_mask`` is passed to ``optax.add_decayed_weights``; ``mu_dtype`` is the
    momentum's dtype (default: the gradient's).
    """
    if not 0.0 <= momentum < 1.0:
        raise UserError(f"Muon momentum {momentum} must be in [0, 1); fix optim.muon_momentum")
    if ns_steps < 0:
        raise UserError(f"Newton-Schulz steps {ns_steps} must be >= 0; fix optim.muon_ns_steps")
    if weight_decay < 0:
        raise UserError(f"weight decay {weight_decay} must be >= 0; fix optim.weight_decay")
    return optax.chain(
        optax.trace(decay=momentum, nesterov=nesterov, accumulator_dtype=mu_dtype),
        orthogonalize(ns_steps, eps, compute_dtype),
        scale_by_shape(scaling),
        optax.add_decayed_weights(weight_decay, weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate),
    )
