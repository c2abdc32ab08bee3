"""The accelerators' dense op (lab.model.kernels.matmul): values and gradients against float64
NumPy,
compute-dtype operands in every backward matmul, and a whole model's gradients with the new
backward against the float32 model, next to XLA's own (float32) backward."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lab.config import ModelConfig
from lab.model.kernels import Kernels, matmul
from lab.model.transformer import Transformer, loss_fn


def _reference(x, w, dy):
    x, w, dy = (np.asarray(a, np.float64) for a in (x, w, dy))
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    return x @ w, (dy2 @ w.T).reshape(x.shape), x2.T @ dy2


def _operands(seed=0, shape=(3, 40, 32), d_out=48):
    k = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(k[0], shape), jax.random.normal(k[1], (shape[-1], d_out)),
            jax.random.normal(k[2], (*shape[:-1], d_out)))


def test_float32_dense_matches_float64():
    x, w, dy = _operands()
    y, vjp = jax.vjp(lambda x, w: matmul.dense(x, w, "float32", "float32"), x, w)
    for got, want in zip((y, *vjp(dy)), _reference(x, w, dy), strict=True):
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)


def test_bfloat16_dense_is_within_bfloat16_rounding_of_float64():
    x, w, dy = _operands(1)
    x = x.astype(jnp.bfloat16)  # a bfloat16 residual stream; float32 parameters
    y, vjp = jax.vjp(lambda x, w: matmul.dense(x, w, "bfloat16", "bfloat16"), x, w)
    dx, dw = vjp(dy.astype(jnp.bfloat16))
    # Each gradient in its primal's dtype: dX bfloat16, dW float32 (accumulated in float32).
    assert (y.dtype, dx.dtype, dw.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float32)
    for got, want in zip((y, dx, dw), _reference(x, w, dy), strict=True):
        err = np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want)
        assert 1e-4 < err < 1e-2, err  # bfloat16 operands: close, and not float32-exact


def _dot_operand_dtypes(fn, *args) -> list[tuple[str, str]]:
    jaxpr = jax.make_jaxpr(fn)(*args)
    found = []

    def walk(j):
        for eqn in j.eqns:
            if eqn.primitive.name == "dot_general":
                found.append(tuple(str(v.aval.dtype) for v in eqn.invars[:2]))
            for value in eqn.params.values():
                inner = getattr(value, "jaxpr", value)
                if hasattr(inner, "eqns"):
                    walk(inner)

    walk(jaxpr.jaxpr)
    return found


@pytest.mark.parametrize("out_dtype", ["bfloat16", "float32"])  # a block's and the head's
def test_every_matmul_of_the_backward_pass_takes_bfloat16(out_dtype):
    x, w, _ = _operands(2)
    x = x.astype(jnp.bfloat16)

    def loss(kernels):
        return jax.grad(lambda x, w: kernels.dense(x, w, out_dtype).astype(jnp.float32).sum(),
                        argnums=(0, 1))

    new = Kernels("gpu", "xla", "bfloat16", "bfloat16", "compute")
    old = dataclasses.replace(new, backward_dtype="float32")
    assert _dot_operand_dtypes(loss(new), x, w) == [("bfloat16", "bfloat16")] * 3
    # XLA's transpose of a float32-result einsum: both backward matmuls mix in float32 (which
    # the GPU lowering turns into float32 x float32).
    mixed = [pair for pair in _dot_operand_dtypes(loss(old), x, w) if "float32" in pair]
    assert len(mixed) == 2, mixed


BASE = ModelConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                   qk_norm=True, z_loss=1e-3, attention="xla")
TOKENS = jax.random.randint(jax.random.key(6), (4, 33), 0, 64)


def _loss_and_grads(cfg):
    # Platform "tpu" with xla attention: the accelerator kernels, runnable on a CPU.
    model = Transformer(cfg, nnx.Rngs(0), "tpu")
    graphdef, params = nnx.split(model, nnx.Param)
    fn = jax.jit(jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p), TOKENS)[0]))
    loss, grads = fn(params)
    return float(loss), jax.tree.leaves(nnx.to_pure_dict(grads))


def _errors(grads, ref):
    """(relative error of the gradient norm, largest relative error of a leaf)."""
    def norm(leaves):
        return np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in leaves))

    leaf = max(np.linalg.norm(np.asarray(g, np.float64) - r) / np.linalg.norm(r)
               for g, r in zip(grads, ref, strict=True))
    return abs(norm(grads) / norm(ref) - 1), leaf


@pytest.mark.slow
def test_bfloat16_backward_gradients_match_the_float32_model():
    # The reference: the same weights and tokens in float32 throughout, differentiated by JAX
    # (the float64 tests above and in test_model.py pin the float32 model down). The bfloat16
    # model with the new backward must be as close to it as with XLA's float32 backward, within
    # bfloat16's rounding: about 2^-8 per operand, a few percent over a 2-layer model. The
    # reference is XLA's own differentiation: no custom backward pass in it.
    ref_loss, ref = _loss_and_grads(dataclasses.replace(BASE, backward_dtype="float32"))
    ref = [np.asarray(r, np.float64) for r in ref]
    bf16 = dataclasses.replace(BASE, compute_dtype="bfloat16", activation_dtype="bfloat16")
    new_loss, new = _loss_and_grads(bf16)
    old_loss, old = _loss_and_grads(dataclasses.replace(bf16, backward_dtype="float32"))
    assert all(g.dtype == jnp.float32 for g in new)
    np.testing.assert_allclose(new_loss, ref_loss, rtol=1e-2)
    assert new_loss == old_loss  # the same forward pass
    (new_norm, new_leaf), (old_norm, old_leaf) = _errors(new, ref), _errors(old, ref)
    assert 0 < new_norm < 1e-2 and 0 < new_leaf < 6e-2, (new_norm, new_leaf)
    assert new_norm < 2 * old_norm + 1e-3 and new_leaf < 2 * old_leaf + 1e-2, (
        new_norm, old_norm, new_leaf, old_leaf)
