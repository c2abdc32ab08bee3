"""The hand-written backward passes of lab.model.kernels.cpu: dense and blocked causal attention,
each
against a float64 NumPy reference of the plain (unblocked, untransposed) formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lab.model.kernels.cpu import causal_attention, dense


def _dense_reference(x, w, dy):
    x, w, dy = (np.asarray(a, np.float64) for a in (x, w, dy))
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    return x @ w, (dy2 @ w.T).reshape(x.shape), x2.T @ dy2


@pytest.mark.parametrize("d_in,d_out", [(8, 24), (24, 8)])  # both transposition branches
def test_dense_value_and_grads_match_float64(d_in, d_out):
    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k[0], (3, 5, d_in))
    w = jax.random.normal(k[1], (d_in, d_out))
    dy = jax.random.normal(k[2], (3, 5, d_out))
    y, vjp = jax.vjp(lambda x, w: dense(x, w, jnp.float32), x, w)
    dx, dw = jax.jit(vjp)(dy)
    ref_y, ref_dx, ref_dw = _dense_reference(x, w, dy)
    assert y.dtype == dx.dtype == dw.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), ref_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dx), ref_dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dw), ref_dw, rtol=1e-5, atol=1e-5)


def test_dense_bfloat16_operands_stay_close():
    k = jax.random.split(jax.random.key(1), 3)
    x, w, dy = (jax.random.normal(k[0], (64, 32)), jax.random.normal(k[1], (32, 48)),
                jax.random.normal(k[2], (64, 48)))
    _, vjp = jax.vjp(lambda x, w: dense(x, w, jnp.bfloat16), x, w)
    dx, dw = vjp(dy)
    _, ref_dx, ref_dw = _dense_reference(x, w, dy)
    assert dw.dtype == jnp.float32  # float32 accumulation, float32 gradient
    for got, ref in ((dx, ref_dx), (dw, ref_dw)):
        err = np.abs(np.asarray(got) - ref).max() / np.abs(ref).max()
        assert 0 < err < 2e-2  # bf16 operands: close, but not float32-exact


def _attention_reference(q, k, v, dout):
    """Unblocked causal attention and its gradients in float64, one query head at a time."""
    q, k, v, dout = (np.asarray(a, np.float64) for a in (q, k, v, dout))
    B, K, G, L, E = q.shape
    mask = np.tril(np.ones((L, L), bool))
    out, dq = np.zeros_like(q), np.zeros_like(q)
    dk, dv = np.zeros_like(k), np.zeros_like(v)
    for b in range(B):
        for h in range(K):
            for g in range(G):
                s = np.where(mask, q[b, h, g] @ k[b, h].T, -np.inf)
                p = np.exp(s - s.max(-1, keepdims=True))
                p /= p.sum(-1, keepdims=True)
                out[b, h, g] = p @ v[b, h]
                dp = dout[b, h, g] @ v[b, h].T
                ds = p * (dp - (dp * p).sum(-1, keepdims=True))
                dq[b, h, g] = ds @ k[b, h]
                dk[b, h] += ds.T @ q[b, h, g]
                dv[b, h] += p.T @ dout[b, h, g]
    return out, dq, dk, dv


@pytest.mark.parametrize("L,block,G", [(11, 4, 2), (16, 4, 1), (9, 64, 3)])
def test_blocked_attention_matches_float64(L, block, G):
    # Uneven last block, even blocks, and one block larger than the sequence; G > 1 is GQA.
    B, K, E = 2, 2, 8
    keys = jax.random.split(jax.random.key(2), 4)
    q = jax.random.normal(keys[0], (B, K, G, L, E))
    k = jax.random.normal(keys[1], (B, K, L, E))
    v = jax.random.normal(keys[2], (B, K, L, E))
    dout = jax.random.normal(keys[3], (B, K, G, L, E))
    out, vjp = jax.vjp(lambda q, k, v: causal_attention(q, k, v, jnp.float32, block), q, k, v)
    grads = jax.jit(vjp)(dout)
    ref = _attention_reference(q, k, v, dout)
    for got, want in zip((out, *grads), ref, strict=True):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


def test_blocked_attention_is_causal():
    q, k, v = (jax.random.normal(jax.random.key(i), (1, 1, 1, 10, 4)) for i in range(3))
    k, v = k[:, :, 0], v[:, :, 0]
    changed = v.at[:, :, 6].add(1.0)  # a later value must not reach earlier positions
    a = causal_attention(q, k, v, jnp.float32, 4)
    b = causal_attention(q, k, changed, jnp.float32, 4)
    np.testing.assert_array_equal(np.asarray(a[..., :6, :]), np.asarray(b[..., :6, :]))
    assert not np.allclose(np.asarray(a[..., 6:, :]), np.asarray(b[..., 6:, :]))


def test_blocked_attention_bfloat16_stays_close():
    # bfloat16 matmul operands (and residuals kept as their bits): gradients come back float32
    # and within bfloat16 rounding of the float64 reference.
    B, K, G, L, E = 1, 2, 2, 12, 8
    keys = jax.random.split(jax.random.key(3), 4)
    q = jax.random.normal(keys[0], (B, K, G, L, E))
    k, v = (jax.random.normal(keys[i], (B, K, L, E)) for i in (1, 2))
    dout = jax.random.normal(keys[3], (B, K, G, L, E))
    out, vjp = jax.vjp(lambda q, k, v: causal_attention(q, k, v, jnp.bfloat16, 4), q, k, v)
    grads = vjp(dout)
    for got, want in zip((out, *grads), _attention_reference(q, k, v, dout), strict=True):
        assert got.dtype == jnp.float32
        err = np.abs(np.asarray(got) - want).max() / np.abs(want).max()
        assert 0 < err < 3e-2
