"""Muon: momentum orthogonalised by Newton-Schulz (Jordan et al. 2024), as optax transformations.

Muon is for hidden weight matrices only; `lab.optim.optimizers` routes embeddings, the output
head, norm
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
from jax.sharding import PartitionSpec as P

from lab.accel.sharding import BATCH_AXES
from lab.config import MUON_SCALINGS as SCALINGS  # the choices of optim.muon_scaling
from lab.errors import UserError, shown

# Keller Jordan's quintic: the largest slope at zero that still keeps every singular value in a
# band around 1 after five steps (see `newton_schulz`).
NS_COEFFS = (3.4445, -4.7750, 2.0315)
METHODS = ("auto", "standard", "gram")
# Float32 matmuls at the backend's default precision are not float32: one bfloat16 pass on TPU,
# TF32 on recent NVIDIA GPUs. Newton-Schulz asks for full float32 unless told otherwise.
DEFAULT_PRECISION = jax.lax.Precision.HIGHEST


def newton_schulz(
    x: jax.Array,
    steps: int = 5,
    eps: float = 1e-7,
    compute_dtype: jnp.dtype = jnp.float32,
    method: str = "auto",
    precision: jax.lax.Precision | str = DEFAULT_PRECISION,
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

    ``precision`` (a `jax.lax.Precision` or its name) is that of the float32 matrix products;
    the default, HIGHEST, is true float32 on every backend, where the backend's own default
    is one bfloat16 pass on TPU and TF32 on recent NVIDIA GPUs. ``compute_dtype=jnp.bfloat16``
    feeds the products bfloat16 operands instead (float32 accumulation, elementwise work
    still float32; ``precision`` then plays no part): faster, less exact.

    ``method``: "standard" runs the iteration as written; "gram" runs the same iteration on
    the small Gram matrices only (see `_gram_iterations`), fewer FLOPs when the long side is
    well over 1.5 times the short one, but it carries rounding error from step to step, so it
    holds its accuracy only with float32 products. "auto" takes "gram" when the long side is
    at least twice the short one, the operands are float32 and ``precision`` is HIGHEST
    (`uses_gram`); otherwise "standard".
    Jittable; sharded inputs are partitioned by the compiler like any other jnp code.
    """
    if x.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix (ndim >= 2), got shape {x.shape}")
    if method not in METHODS:
        raise ValueError(f"unknown Newton-Schulz method {method!r}; use one of {METHODS}")
    precision = jax.lax.Precision(precision)
    in_dtype = x.dtype
    tall = x.shape[-2] > x.shape[-1]
    x = x.astype(jnp.float32)
    if tall:
        x = jnp.swapaxes(x, -1, -2)
    short, long = x.shape[-2:]
    if method == "auto":
        method = "gram" if uses_gram((short, long), compute_dtype, precision) else "standard"
    float32_operands = jnp.dtype(compute_dtype) == jnp.float32

    def matmul(p, q):
        return jnp.matmul(
            p.astype(compute_dtype),
            q.astype(compute_dtype),
            precision=precision if float32_operands else None,
            preferred_element_type=jnp.float32,
        )

    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=(-2, -1), keepdims=True))
    x = x / (norm + eps)
    if method == "gram":
        x = _gram_iterations(x, steps, matmul)
    else:
        x = _standard_iterations(x, steps, matmul)
    if tall:
        x = jnp.swapaxes(x, -1, -2)
    return x.astype(in_dtype)


def uses_gram(
    shape: tuple[int, ...],
    compute_dtype: jnp.dtype = jnp.float32,
    precision: jax.lax.Precision | str = DEFAULT_PRECISION,
) -> bool:
    """Whether method="auto" runs the Gram form for matrices of this shape (last two axes).

    Only where it saves FLOPs (long side >= 2 x short side: 8 S^2 L + 28 S^3 against
    20 S^2 L + 10 S^3 over 5 steps) and keeps the standard loop's accuracy: with float32
    operands at HIGHEST precision. With bfloat16 operands, or float32 at a lower precision
    (TPU's one bfloat16 pass, TF32), its error is several times the standard loop's
    (docs/optimization.md has the measurements, benchmarks/ns_accuracy.py makes them).
    """
    short, long = sorted(shape[-2:])
    exact = (
        jnp.dtype(compute_dtype) == jnp.float32
        and jax.lax.Precision(precision) == jax.lax.Precision.HIGHEST
    )
    return exact and long >= 2 * short


def _transpose(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, -1, -2)


def _standard_iterations(x_SxL, steps: int, matmul) -> jax.Array:
    """Keller Jordan's loop on a wide (short x long) matrix: 4 S^2 L + 2 S^3 FLOPs a step."""
    a, b, c = NS_COEFFS
    for _ in range(steps):
        gram_SxS = matmul(x_SxL, _transpose(x_SxL))
        poly_SxS = b * gram_SxS + c * matmul(gram_SxS, gram_SxS)
        x_SxL = a * x_SxL + matmul(poly_SxS, x_SxL)
    return x_SxL


def _gram_iterations(x_SxL, steps: int, matmul) -> jax.Array:
    """The same iteration on S x S matrices (Gram Newton-Schulz, Dao AI Lab 2026).

    Every iterate is ``X_k = Q_k X_0`` with ``Q_k`` a polynomial in ``A_0 = X_0 X_0^T``, so
    with ``P_k = a I + b A_k + c A_k^2``: ``Q_{k+1} = P_k Q_k`` and ``A_{k+1} = P_k A_k P_k``;
    only the first Gram matrix and the final ``Q X_0`` touch the long side. ``A`` gathers
    rounding error from step to step (100x the standard loop's on ill-conditioned inputs, in
    float32), so the loop restarts once halfway from ``X = Q X_0``, which brings it back to the
    standard loop's accuracy. For 5 steps: 8 S^2 L + 28 S^3 FLOPs against 20 S^2 L + 10 S^3.
    """
    if steps == 0:
        return x_SxL
    a, b, c = NS_COEFFS
    eye_SxS = jnp.eye(x_SxL.shape[-2], dtype=x_SxL.dtype)
    restart = steps // 2 + 1
    gram_SxS, q_SxS = matmul(x_SxL, _transpose(x_SxL)), None
    for k in range(steps):
        if k == restart:
            x_SxL = matmul(q_SxS, x_SxL)
            gram_SxS, q_SxS = matmul(x_SxL, _transpose(x_SxL)), None
        poly_SxS = a * eye_SxS + b * gram_SxS + c * matmul(gram_SxS, gram_SxS)
        q_SxS = poly_SxS if q_SxS is None else matmul(poly_SxS, q_SxS)
        if k + 1 < steps and k + 1 != restart:
            # P and A commute (both polynomials in A_0), so P A P = P (P A).
            gram_SxS = matmul(poly_SxS, matmul(poly_SxS, gram_SxS))
    return matmul(q_SxS, x_SxL)


def orthogonalize(
    ns_steps: int = 5,
    eps: float = 1e-7,
    compute_dtype: jnp.dtype = jnp.float32,
    method: str = "auto",
    split_axes: tuple[str, ...] = BATCH_AXES,
    precision: jax.lax.Precision | str = DEFAULT_PRECISION,
) -> optax.GradientTransformation:
    """A stateless transformation applying `newton_schulz` to every leaf (all must be matrices).

    ``split_axes``: the mesh's batch-parallel axes (data and fsdp). Every device along them
    would otherwise take part in the same Newton-Schulz: repeated on each data replica, and
    under FSDP partitioned by the compiler with collectives inside every iteration. Under a
    mesh (``jax.set_mesh``) where they hold more than one device, whole matrices are dealt out
    among those devices instead (`split_newton_schulz`). The tensor axis keeps the compiler's
    partitioning.
    """

    def ns(x: jax.Array) -> jax.Array:
        return newton_schulz(x, ns_steps, eps, compute_dtype, method, precision)

    def update_fn(updates, state, params=None):
        del params
        leaves, treedef = jax.tree.flatten(updates)
        axes = _present_axes(split_axes)
        if axes:
            leaves = split_newton_schulz(leaves, ns, axes)
        else:
            leaves = [ns(u) for u in leaves]
        return jax.tree.unflatten(treedef, leaves), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def _present_axes(names: tuple[str, ...]) -> tuple[str, ...]:
    """Those of `names` that are axes of more than one device in the current mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    return tuple(a for a in names if a in mesh.axis_names and mesh.shape[a] > 1)


def split_newton_schulz(leaves: list[jax.Array], ns, axes: tuple[str, ...]) -> list[jax.Array]:
    """`ns` of every leaf, with whole matrices dealt out among the devices of mesh `axes`.

    Matrices of one shape and dtype (the layers of a stacked leaf, and same-shaped leaves) are
    stacked and padded with zero matrices to a multiple of R, the product of the axes' sizes.
    The stack is viewed as (size of axes[0], ..., size of axes[-1], K / R, M, N), and its
    leading axes are sharded over `axes` one at a time: along a data axis (parameters
    replicated) that is a local slice, along fsdp (a matrix axis sharded) an all-to-all that
    gathers whole matrices. One axis per step keeps each move one the compiler's partitioner
    does directly; adding them all at once makes it fall back to replicating the whole stack
    ("involuntary full rematerialization") on a data x fsdp mesh. Each device then
    orthogonalises K / R whole matrices, and the same steps in reverse bring the results back
    to the parameters' layout. Zero matrices stay zero (the normalisation divides by
    norm + eps), and every leaf gets exactly its own `ns`.
    """
    mesh = jax.sharding.get_abstract_mesh()
    sizes = tuple(mesh.shape[a] for a in axes)
    replicas = math.prod(sizes)
    free = P.UNCONSTRAINED
    # specs[j]: the first j of `axes` shard the stack's leading axes; matrix axes left free.
    specs = [P(*axes[:j], *[None] * (len(axes) - j + 1), free, free) for j in range(len(axes) + 1)]
    groups: dict[tuple, list[int]] = {}
    for i, leaf in enumerate(leaves):
        groups.setdefault((leaf.shape[-2:], leaf.dtype), []).append(i)
    out: list[jax.Array | None] = [None] * len(leaves)
    for (matrix_shape, _), members in groups.items():
        stack_KxMxN = jnp.concatenate([leaves[i].reshape(-1, *matrix_shape) for i in members])
        count = stack_KxMxN.shape[0]
        padded = -(-count // replicas) * replicas
        stack_KxMxN = jnp.pad(stack_KxMxN, ((0, padded - count), (0, 0), (0, 0)))
        dealt = stack_KxMxN.reshape(*sizes, padded // replicas, *matrix_shape)
        for spec in specs:
            dealt = jax.lax.with_sharding_constraint(dealt, spec)
        dealt = ns(dealt)
        for spec in reversed(specs[:-1]):
            dealt = jax.lax.with_sharding_constraint(dealt, spec)
        stack_KxMxN = dealt.reshape(padded, *matrix_shape)
        start = 0
        for i in members:
            size = math.prod(leaves[i].shape[:-2])
            out[i] = stack_KxMxN[start:start + size].reshape(leaves[i].shape)
            start += size
    return out


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
        f"unknown Muon scaling {shown(scaling)}; set optim.muon_scaling to one of {SCALINGS}"
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
    ns_method: str = "auto",
    split_axes: tuple[str, ...] = BATCH_AXES,
    ns_precision: jax.lax.Precision | str = DEFAULT_PRECISION,
) -> optax.GradientTransformation:
    """Muon for a tree of matrices (route everything else elsewhere, see `lab.optim.optimizers`).

    ``learning_rate`` may be a schedule. Weight decay is decoupled and multiplied by the
    scheduled learning rate, as in ``optax.adamw``: ``W <- W - lr * (scale * O + wd * W)``.
    ``weight_decay_mask`` is passed to ``optax.add_decayed_weights``; ``mu_dtype`` is the
    momentum's dtype (default: the gradient's); ``compute_dtype``, ``ns_method`` and
    ``ns_precision`` go to `newton_schulz`; ``split_axes`` to `orthogonalize`. The settings
    of a run are checked where its config is read (lab.config.validate).
    """
    return optax.chain(
        optax.trace(decay=momentum, nesterov=nesterov, accumulator_dtype=mu_dtype),
        orthogonalize(ns_steps, eps, compute_dtype, ns_method, split_axes, ns_precision),
        scale_by_shape(scaling),
        optax.add_decayed_weights(weight_decay, weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate),
    )
