"""The dense op for GPUs and TPUs, and the grouped matmul of a mixture of experts: x @ w with
every matmul, forward and backward, on operands of the compute dtype.

Asking einsum for a float32 result of bfloat16 operands (`preferred_element_type`) and letting
JAX differentiate it gives float32 x float32 backward matmuls: the transpose rule reuses the
float32 result type and promotes the bfloat16 operand (jax issues 23797, 34330), and XLA's GPU
backend runs float32 matmuls as TF32, half the bfloat16 rate. `dense` writes the backward pass
itself: the incoming gradient is cast to the compute dtype, dX and dW are matmuls of
compute-dtype operands accumulated in float32 (dW is returned in float32, the parameter's
dtype), and the forward result comes out of the matmul in the output dtype directly, so what a
remat policy saves is already in that dtype. GPU and TPU matmul units accumulate bfloat16
products in float32 whatever the result type.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp


def dense(x: jax.Array, w: jax.Array, compute_dtype: str, out_dtype: str) -> jax.Array:
    """x (..., D) @ w (D, F) -> (..., F) in `out_dtype`, operands in `compute_dtype`."""
    return _dense(x, w, compute_dtype, out_dtype, x.dtype.name, w.dtype.name)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _dense(x, w, compute_dtype, out_dtype, x_dtype, w_dtype):
    return _forward(x, w, compute_dtype, out_dtype)


def _forward(x: jax.Array, w: jax.Array, compute_dtype: str, out_dtype: str) -> jax.Array:
    return jnp.einsum("...d,df->...f", x.astype(compute_dtype), w.astype(compute_dtype),
                      preferred_element_type=jnp.dtype(out_dtype))


def _dense_fwd(x, w, compute_dtype, out_dtype, x_dtype, w_dtype):
    # The operands as the matmul read them: no float32 copy of a bfloat16 tensor is kept.
    x_c, w_c = x.astype(compute_dtype), w.astype(compute_dtype)
    return _forward(x_c, w_c, compute_dtype, out_dtype), (x_c, w_c)


def _dense_bwd(compute_dtype, out_dtype, x_dtype, w_dtype, residuals, dy):
    x_c, w_c = residuals
    dy_c = dy.astype(compute_dtype)
    dx = jnp.einsum("...f,df->...d", dy_c, w_c, preferred_element_type=x_dtype)
    # The weight gradient sums over every token of the batch: accumulated and kept in float32.
    dw = jnp.einsum("...d,...f->df", x_c, dy_c, preferred_element_type=jnp.float32)
    return dx, dw.astype(w_dtype)


_dense.defvjp(_dense_fwd, _dense_bwd)


# ----------------------------------------------------------------------------- grouped


def _ragged(lhs, rhs, sizes, contract, group, out_dtype):
    """jax.lax.ragged_dot_general with lhs rows ragged over `sizes`, contracting lhs's last
    axis or first (`contract`) with rhs's axis `contract[1]`, rhs grouped on `group`."""
    numbers = jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=((contract[0], contract[1]), ((), ())),
        lhs_ragged_dimensions=(0,), rhs_group_dimensions=group)
    return jax.lax.ragged_dot_general(lhs, rhs, sizes, numbers,
                                      preferred_element_type=jnp.dtype(out_dtype))


def grouped(x_MxK: jax.Array, w_GxKxN: jax.Array, sizes_G: jax.Array, compute_dtype: str,
            out_dtype: str) -> jax.Array:
    """The grouped matmul of a mixture of experts: rows sizes_G[0] of x through w[0], the
    next sizes_G[1] through w[1], ... (rows past the groups give zeros), (M, N) in
    `out_dtype`, with the backward pass of `dense`: compute-dtype operands, dW in float32."""
    return _grouped(x_MxK, w_GxKxN, sizes_G, compute_dtype, out_dtype, x_MxK.dtype.name,
                    w_GxKxN.dtype.name)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _grouped(x, w, sizes, compute_dtype, out_dtype, x_dtype, w_dtype):
    return _grouped_fwd(x, w, sizes, compute_dtype, out_dtype, x_dtype, w_dtype)[0]


def _grouped_fwd(x, w, sizes, compute_dtype, out_dtype, x_dtype, w_dtype):
    x_c, w_c = x.astype(compute_dtype), w.astype(compute_dtype)
    y = _ragged(x_c, w_c, sizes, ((1,), (1,)), (0,), out_dtype)
    return y, (x_c, w_c, sizes)


def _grouped_bwd(compute_dtype, out_dtype, x_dtype, w_dtype, residuals, dy):
    x_c, w_c, sizes = residuals
    dy_c = dy.astype(compute_dtype)
    dx = _ragged(dy_c, w_c, sizes, ((1,), (2,)), (0,), x_dtype)
    # Each group's weight gradient sums over its rows: accumulated and kept in float32.
    dw = _ragged(x_c, dy_c, sizes, ((0,), (0,)), (), jnp.float32)
    return dx, dw.astype(w_dtype), None


_grouped.defvjp(_grouped_fwd, _grouped_bwd)
