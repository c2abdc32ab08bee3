"""Newton-Schulz and Muon against float64 numpy, optax's own Newton-Schulz, and the scalar map."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from optax.contrib import _muon as optax_muon

from benchmarks import muon_split, ns_accuracy
from lab.accel.sharding import BATCH_AXES
from lab.errors import UserError
from lab.optim.muon import NS_COEFFS, muon, newton_schulz, shape_scale, uses_gram

A, B, C = NS_COEFFS


def scalar_map(s, steps=5):
    """What Newton-Schulz does to each singular value of the normalised matrix, in float64."""
    for _ in range(steps):
        s = A * s + B * s**3 + C * s**5
    return s


def ns64(x, steps=5):
    """Newton-Schulz on the last two axes in float64 numpy, written from the formula."""
    x = np.asarray(x, np.float64)
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = np.swapaxes(x, -1, -2)
    x = x / np.linalg.norm(x, axis=(-2, -1), keepdims=True)
    for _ in range(steps):
        gram = x @ np.swapaxes(x, -1, -2)
        x = A * x + (B * gram + C * gram @ gram) @ x
    return np.swapaxes(x, -1, -2) if tall else x


def svals(x):
    return np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)


# Wide, tall, stacked; the last near square (the others take the Gram form by default).
SHAPES = [(64, 256), (256, 64), (4, 96, 192), (3, 160, 48), (2, 80, 64)]


def test_scalar_map_band():
    """The band quoted in the docstring, measured on the scalar map itself."""
    s0 = np.logspace(-4, 0, 200_001)
    out = scalar_map(s0)
    inside = out[s0 >= 0.006]
    assert 0.68 <= inside.min() < 0.69 and 1.13 < inside.max() <= 1.14
    assert out[(s0 >= 0.0015) & (s0 < 0.006)].max() < 1.21
    assert out[s0 < 0.0014].max() < 0.68


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_singular_values_follow_the_quintic(shape, dtype):
    x = jax.random.normal(jax.random.key(0), shape, jnp.float32).astype(dtype)
    out = jax.jit(newton_schulz)(x)
    assert out.dtype == dtype and out.shape == shape
    got = svals(out.astype(jnp.float32))
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    s_in = svals(x64) / np.linalg.norm(x64, axis=(-2, -1))[..., None]
    assert s_in.min() > 0.006  # these aspect ratios keep Gaussian matrices well conditioned
    want = np.sort(scalar_map(s_in), axis=-1)
    # bfloat16 output: a relative rounding of 2^-9 per entry moves singular values ~0.01.
    tol = 1e-4 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.sort(got, axis=-1), want, atol=tol)
    assert got.min() >= 0.68 - tol and got.max() <= 1.14 + tol


@pytest.mark.parametrize("method", ["standard", "gram"])
def test_ill_conditioned_input_follows_the_scalar_map(method):
    """Singular values from 3e-4 to 1 of the norm: small ones end below the band, as predicted.

    The Gram form without its restart is off by 1.2e-4 here; with it, by 1.5e-6."""
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.normal(size=(96, 48)))
    v, _ = np.linalg.qr(rng.normal(size=(48, 48)))
    s = np.logspace(-3.5, 0, 48)
    x = (u * s) @ v.T
    got = np.sort(svals(newton_schulz(jnp.asarray(x, jnp.float32), method=method)))
    want = np.sort(scalar_map(s / np.linalg.norm(s)))
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert want.min() < 0.68  # the test covers values outside the band too


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", ["auto", "standard", "gram"])
def test_matches_float64_and_optax(shape, method):
    x = jax.random.normal(jax.random.key(1), shape, jnp.float32)
    ours = np.asarray(newton_schulz(x, eps=1e-8, method=method))
    np.testing.assert_allclose(ours, ns64(x), atol=2e-5)
    dims = optax_muon.MuonDimensionNumbers(len(shape) - 2, len(shape) - 1)
    theirs = optax_muon.orthogonalize_via_newton_schulz(
        x, jnp.asarray(NS_COEFFS), 5, "frobenius", 1e-8, dims
    )
    np.testing.assert_allclose(ours, np.asarray(theirs), atol=2e-5)


def test_bfloat16_compute_option():
    x = jax.random.normal(jax.random.key(2), (2, 128, 384), jnp.float32)
    fast = newton_schulz(x, compute_dtype=jnp.bfloat16)
    assert fast.dtype == jnp.float32
    got = svals(fast)
    assert got.min() > 0.6 and got.max() < 1.2
    np.testing.assert_allclose(np.asarray(fast), ns64(x), atol=2e-2)


@pytest.mark.parametrize(
    "spec", [P(None, "data", "model"), P("data", None, "model"), P("data", "model", None)]
)
@pytest.mark.parametrize("method", ["standard", "gram"])
def test_sharded_equals_unsharded(spec, method):
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto))
    x = jax.random.normal(jax.random.key(3), (4, 64, 128), jnp.float32)
    xs = jax.device_put(x, NamedSharding(mesh, spec))
    assert len(xs.sharding.device_set) == 8
    ns = jax.jit(lambda x: newton_schulz(x, method=method))
    got = ns(xs)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ns(x)), atol=1e-5)


def test_shape_scales():
    assert shape_scale((512, 1536), "moonlight") == pytest.approx(0.2 * np.sqrt(1536))
    assert shape_scale((8, 1536, 512), "moonlight") == pytest.approx(0.2 * np.sqrt(1536))
    assert shape_scale((512, 1536), "shape") == pytest.approx(np.sqrt(3))  # fan_out > fan_in
    assert shape_scale((1536, 512), "shape") == 1.0
    with pytest.raises(UserError):
        shape_scale((4, 4), "spectral")


def hand_muon(params, grads_seq, lrs, momentum, wd, scaling, nesterov=True):
    """Muon in float64 numpy, with Keller Jordan's EMA form of the momentum."""
    params = {k: np.asarray(v, np.float64) for k, v in params.items()}
    bufs = {k: np.zeros_like(v) for k, v in params.items()}
    for grads, lr in zip(grads_seq, lrs, strict=True):
        for k, p in params.items():
            g = np.asarray(grads[k], np.float64)
            bufs[k] = momentum * bufs[k] + (1 - momentum) * g
            u = momentum * bufs[k] + (1 - momentum) * g if nesterov else bufs[k]
            fan_in, fan_out = p.shape[-2:]
            scale = (
                0.2 * np.sqrt(max(fan_in, fan_out))
                if scaling == "moonlight"
                else np.sqrt(max(1, fan_out / fan_in))
            )
            params[k] = p - lr * (scale * ns64(u) + wd * p)
    return params


@pytest.mark.parametrize("scaling", ["moonlight", "shape"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_updates_equal_hand_computation(scaling, nesterov):
    keys = jax.random.split(jax.random.key(4), 8)
    params = {
        "wide": jax.random.normal(keys[0], (16, 48)),
        "stacked": jax.random.normal(keys[1], (3, 40, 24)),
    }
    names = list(params)
    grads_seq = [
        {k: jax.random.normal(keys[2 + 2 * i + j], params[k].shape) for j, k in enumerate(names)}
        for i in range(3)
    ]
    schedule = optax.linear_schedule(0.02, 0.01, 2)  # 0.02, 0.015, 0.01: checks the step count
    tx = muon(schedule, momentum=0.9, nesterov=nesterov, scaling=scaling, weight_decay=0.1)
    state = tx.init(params)
    p = params
    step = jax.jit(tx.update)
    for grads in grads_seq:
        updates, state = step(grads, state, p)
        p = optax.apply_updates(p, updates)
    want = hand_muon(params, grads_seq, [0.02, 0.015, 0.01], 0.9, 0.1, scaling, nesterov)
    for k in params:
        np.testing.assert_allclose(np.asarray(p[k]), want[k], atol=2e-6, rtol=0)
        # the update is not negligible next to the tolerance
        assert np.abs(want[k] - np.asarray(params[k], np.float64)).max() > 1e-2


def test_muon_rejects_an_unknown_scaling():
    # Its other settings are checked where a config is read (tests/test_optim.py).
    with pytest.raises(UserError):
        muon(0.1, scaling="spectral")



@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (1, 8, 1), (2, 4, 1), (2, 2, 2)])
def test_newton_schulz_is_split_among_batch_parallel_devices(mesh_shape):
    """Along data and fsdp every device would take part in every Newton-Schulz: repeated on
    each data replica, partitioned with collectives inside each iteration under FSDP. With
    the split (the default, over sharding.BATCH_AXES) whole matrices are dealt out among all
    data x fsdp devices (the layers of a stacked leaf and same-shaped leaves, padded to a
    multiple): the step still equals the one-device step, at a share of its FLOPs and with a
    few collectives instead of some in every iteration."""
    params, grads = muon_split.inputs()
    want_params, want_updates, flops_one, _ = muon_split.muon_step(None, (), params, grads)
    mesh = jax.make_mesh(mesh_shape, ("data", "fsdp", "tensor"),
                         axis_types=(AxisType.Auto,) * 3)
    got_params, got_updates, flops_split, collectives_split = muon_split.muon_step(
        mesh, BATCH_AXES, params, grads)
    _, _, _, collectives_whole = muon_split.muon_step(mesh, (), params, grads)
    # Only the summation order of the matmuls differs (contractions split over devices,
    # matrices batched differently). Newton-Schulz carries float32 roundoff to about 3e-6 of
    # its result (its error against float64, benchmarks/results/ns-accuracy.txt), which moves
    # the update's entries (about 5e-3) by ~1e-8 and the O(1) parameters by an ulp (1.2e-7).
    for k in params:
        assert got_params[k].shape == want_params[k].shape
        np.testing.assert_allclose(
            np.asarray(got_params[k]), np.asarray(want_params[k]), atol=1e-6, rtol=0)
        np.testing.assert_allclose(
            np.asarray(got_updates[k]), np.asarray(want_updates[k]), atol=1e-7, rtol=0)
    norm = lambda tree: float(optax.tree.norm(tree))  # noqa: E731
    assert norm(got_updates) == pytest.approx(norm(want_updates), rel=1e-6)
    assert norm(want_updates) > 0.1  # a real step, far above the tolerances
    # 6 matrices of one shape, 1 of the other, dealt among R = data x fsdp devices: each
    # does ceil(6 / R) + ceil(1 / R) of the 7 (the tensor axis may split them further).
    replicas = mesh_shape[0] * mesh_shape[1]
    share = (-(-6 // replicas) + 1) / 7
    assert flops_split < (share + 0.05) * flops_one, (flops_split, flops_one)
    if mesh_shape[1] > 1:
        # Without the split, FSDP-sharded matrices need collectives inside every iteration.
        assert collectives_split * 4 < collectives_whole, (collectives_split, collectives_whole)


def test_precision_reaches_every_matmul():
    """Float32 Newton-Schulz asks for HIGHEST in every product (a TPU's default is one bf16
    pass, a GPU's TF32); a lower precision when asked; bfloat16 operands when asked."""
    x = jnp.ones((2, 64, 192), jnp.float32)

    def dots(**kwargs):
        text = jax.jit(lambda x: newton_schulz(x, **kwargs)).lower(x).as_text()
        found = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
        assert found
        return found

    for method in ("standard", "gram"):
        assert all("HIGHEST" in line for line in dots(method=method))
        assert not any("HIGHEST" in line for line in dots(method=method, precision="default"))
        assert all("bf16" in line for line in dots(method=method, compute_dtype=jnp.bfloat16))


def test_auto_uses_gram_only_where_exact():
    assert uses_gram((512, 1536)) and uses_gram((4, 3072, 1024))
    assert not uses_gram((512, 512)) and not uses_gram((512, 1000))  # no FLOPs to save
    assert not uses_gram((512, 1536), precision="default")
    assert not uses_gram((512, 1536), precision=jax.lax.Precision.HIGH)
    assert not uses_gram((512, 1536), compute_dtype=jnp.bfloat16)


# The presets' hidden-matrix shapes, read from configs/gpu and configs/tpu and the model.
PRESET_SHAPES = ns_accuracy.preset_shapes()
# Relative Frobenius error against float64 that each matmul precision allows, 1.5 to 2 times
# the largest measured (benchmarks/results/ns-accuracy.txt): float32 1.6e-5 (the Gram form;
# the standard loop 5e-6), TF32 2.9e-3, bfloat16 operands 2.3e-2 (the standard loop).
TOLERANCE = {"float32": 3e-5, "tf32": 5e-3, "bfloat16": 3.5e-2}


def _preset_cases():
    for shape, presets in PRESET_SHAPES.items():
        for kind in ns_accuracy.KINDS:
            slow = "debug" not in presets or kind == "gaussian"
            marks = [pytest.mark.slow] if slow else []
            yield pytest.param(shape, kind, marks=marks, id=f"{shape[0]}x{shape[1]}-{kind}")


def test_presets_have_both_kinds_of_matrix():
    assert {(512, 512), (512, 1536), (1024, 1024), (1024, 3072)} <= set(PRESET_SHAPES)


@pytest.mark.parametrize("shape, kind", list(_preset_cases()))
def test_auto_stays_accurate_on_preset_shapes(shape, kind):
    """Standard and Gram forms against the float64 iteration at each matmul precision: auto's
    choice stays within the precision's tolerance, and where it declines the Gram form
    (TF32, bfloat16) the Gram form is the less accurate one."""
    errors = ns_accuracy.measure(shape, kind)
    for mode in ns_accuracy.MODES:
        standard, gram, auto = (errors[mode, m] for m in ("standard", "gram", "auto"))
        picked = ns_accuracy.auto_method(shape, mode)
        assert auto == (gram if picked == "gram" else standard)
        assert auto <= TOLERANCE[mode], (mode, errors)
        assert standard <= TOLERANCE[mode], (mode, errors)
        if mode == "float32":
            assert gram <= TOLERANCE[mode], errors  # where auto may take it, it is exact
            assert picked == ("gram" if shape[1] >= 2 * shape[0] else "standard")
        else:
            assert picked == "standard"
    if kind == "log-spectrum":
        # The reason for the rule: at the lower precisions the Gram form's rounding builds up.
        for mode in ("tf32", "bfloat16"):
            assert errors[mode, "gram"] > 2 * errors[mode, "standard"], (mode, errors)
