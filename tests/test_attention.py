"""Every attention implementation that runs on CPU (xla, blocked, splash in Pallas interpret
mode) against a float64 NumPy reference, in the output and in dq, dk, dv, with grouped-query
attention; splash under shard_map on a data x fsdp x tensor mesh against the unsharded kernel."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lab.accel.sharding import make_mesh
from lab.config import MeshConfig
from lab.model.kernels import attention
from lab.model.kernels.cpu import blocked_attention


def reference(q, k, v, dout, scale):
    """Causal grouped-query attention and its gradients in float64, one query head at a time:
    query head h reads key/value head h // G."""
    q, k, v, dout = (np.asarray(a, np.float64) for a in (q, k, v, dout))
    B, L, H, E = q.shape
    G = H // k.shape[2]
    mask = np.tril(np.ones((L, L), bool))
    out, dq, dk, dv = (np.zeros_like(a) for a in (q, q, k, v))
    for b in range(B):
        for h in range(H):
            qh, kh, vh, dh = q[b, :, h], k[b, :, h // G], v[b, :, h // G], dout[b, :, h]
            s = np.where(mask, scale * qh @ kh.T, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[b, :, h] = p @ vh
            dp = dh @ vh.T
            ds = p * (dp - (dp * p).sum(-1, keepdims=True))
            dq[b, :, h] = scale * ds @ kh
            dk[b, :, h // G] += scale * ds.T @ qh
            dv[b, :, h // G] += p.T @ dh
    return out, dq, dk, dv


def inputs(B, L, H, K, E, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    return (jax.random.normal(keys[0], (B, L, H, E)), jax.random.normal(keys[1], (B, L, K, E)),
            jax.random.normal(keys[2], (B, L, K, E)), jax.random.normal(keys[3], (B, L, H, E)))


def value_and_grads(fn, q, k, v, dout):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *jax.jit(vjp)(dout))


IMPLEMENTATIONS = {
    "xla": functools.partial(attention.xla_attention, dtype=jnp.float32),
    # Blocks of 8 over 20 positions: two full blocks and a partial one.
    "blocked": functools.partial(blocked_attention, dtype=jnp.float32, block=8),
    # The splash kernel's tiles must divide the sequence and be multiples of 128 (its key tiles
    # fill the TPU's lanes, even when interpreted): 2 tiles over 256 positions.
    "splash": functools.partial(attention.splash_attention, dtype=jnp.float32, interpret=True,
                                block=128),
}


@pytest.mark.parametrize("impl,L", [("xla", 20), ("blocked", 20), ("splash", 256)])
def test_attention_matches_float64(impl, L):
    B, H, K, E = 2, 4, 2, 8  # two query heads per key/value head
    scale = 1 / math.sqrt(E)
    q, k, v, dout = inputs(B, L, H, K, E)
    got = value_and_grads(lambda q, k, v: IMPLEMENTATIONS[impl](q, k, v, scale), q, k, v, dout)
    for name, g, want in zip(("out", "dq", "dk", "dv"), got, reference(q, k, v, dout, scale),
                             strict=True):
        assert g.shape == want.shape and g.dtype == jnp.float32, name
        np.testing.assert_allclose(np.asarray(g), want, rtol=1e-4, atol=2e-5, err_msg=name)


@pytest.mark.parametrize("impl", ["xla", "blocked"])
def test_attention_bfloat16_operands_stay_close(impl):
    B, L, H, K, E = 1, 12, 4, 2, 8
    q, k, v, dout = inputs(B, L, H, K, E, seed=1)
    fn = {"xla": attention.xla_attention, "blocked": blocked_attention}[impl]
    got = value_and_grads(lambda q, k, v: fn(q, k, v, 0.5, jnp.bfloat16), q, k, v, dout)
    for g, want in zip(got, reference(q, k, v, dout, 0.5), strict=True):
        err = np.abs(np.asarray(g) - want).max() / np.abs(want).max()
        assert 0 < err < 3e-2


@pytest.mark.parametrize("K", [2, 1])  # 1: the key/value head is repeated to shard by tensor
def test_splash_under_shard_map_matches_unsharded(K):
    B, L, H, E = 4, 128, 4, 8
    q, k, v, dout = inputs(B, L, H, K, E, seed=2)
    fn = functools.partial(attention.splash_attention, scale=0.25, dtype=jnp.float32,
                           interpret=True, block=128)
    unsharded = value_and_grads(fn, q, k, v, dout)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), jax.devices()[:8])
    with jax.set_mesh(mesh):
        # Without the mesh the kernel runs whole; under it, per device (checked in the HLO).
        hlo = jax.jit(fn).lower(q, k, v).as_text()
        sharded = value_and_grads(jax.jit(fn), q, k, v, dout)
    assert "shard_map" in hlo or "sdy.manual_computation" in hlo
    for a, b in zip(sharded, unsharded, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    for a, want in zip(sharded, reference(q, k, v, dout, 0.25), strict=True):
        np.testing.assert_allclose(np.asarray(a), want, rtol=1e-4, atol=2e-5)


def test_auto_picks_by_platform():
    assert attention.resolve("auto", "cpu") == "blocked"
    assert attention.resolve("auto", "gpu") == "cudnn"
    assert attention.resolve("auto", "tpu") == "splash"
    assert attention.resolve("xla", "tpu") == "xla"


def test_masks_are_computed_not_constants():
    # The causal masks come from iotas: no boolean matrix constant in the program (a dense
    # NumPy mask would be one per block, growing with L^2).
    B, L, H, K, E = 1, 256, 2, 1, 8
    q, k, v, _ = inputs(B, L, H, K, E)
    for fn in (attention.xla_attention, blocked_attention):
        hlo = jax.jit(lambda q, k, v, fn=fn: fn(q, k, v, 0.5, jnp.float32)).lower(
            q, k, v).as_text()
        assert "iota" in hlo
        assert not re.search(r"stablehlo.constant dense<[^>]*> : tensor<\d+x\d+xi1>", hlo)
