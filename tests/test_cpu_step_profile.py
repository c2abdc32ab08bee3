"""benchmarks.cpu_step_profile counts the matmul FLOPs of a compiled program the way the step
does them: dense and batched dots apart, a dot inside a scanned loop once per iteration."""

import jax
import jax.numpy as jnp

from benchmarks.cpu_step_profile import _dot_flops, _kind


def test_dot_flops_count_a_scanned_programs_matmuls_against_the_closed_form():
    N, D, F, B, L, E, layers = 64, 32, 48, 2, 16, 8, 3

    def program(x_NxD, w_LAYERSxDxF, q_BxLxE):
        def layer(x, w_DxF):
            y_NxF = x @ w_DxF
            s_BxLxL = jnp.einsum("ble,bse->bls", q_BxLxE, q_BxLxE * y_NxF.sum())
            return x + (y_NxF @ w_DxF.T) + s_BxLxL.sum(), None

        return jax.lax.scan(layer, x_NxD, w_LAYERSxDxF)[0]

    args = (jnp.ones((N, D)), jnp.ones((layers, D, F)), jnp.ones((B, L, E)))
    hlo = jax.jit(program).lower(*args).compile().as_text()
    flops = _dot_flops(hlo, layers)
    assert flops["dense"] == layers * 2 * (2 * N * D * F)  # x @ w and y @ w^T
    assert flops["attention"] == layers * 2 * B * L * L * E


def test_op_kinds_by_fusion_name_and_shape():
    shapes = {"ynn_fusion.3": [4096, 512], "ynn_fusion.4": [8, 8, 128, 64],
              "bitcast_bitcast_fusion.2": [512, 4096], "wrapped_broadcast.7": [8, 4096]}
    assert _kind("ynn_fusion.3", shapes) == "dense matmuls"
    assert _kind("ynn_fusion.4", shapes) == "attention matmuls"
    assert _kind("bitcast_bitcast_fusion.2", shapes) == "layout copies and transposes"
    assert _kind("wrapped_broadcast.7", shapes) == "scan buffers (broadcast, dynamic slices)"
    assert _kind("multiply_add_fusion", shapes) == "elementwise and reductions"
