"""benchmarks.cpu_step_profile counts the matmul FLOPs of a compiled program the way the step
does them: dense and batched dots apart, a dot inside a scanned loop once per iteration."""

import jax
import jax.numpy as jnp

from benchmarks.cpu_step_profile import _call_flops, _dense_rates, _dot_flops, _kind, _shared


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


HLO = """
%fused_computation.6 (param_0.6: f32[64,32], param_1.6: f32[32,48]) -> f32[64,48] {
  %param_0.6 = f32[64,32]{1,0} parameter(0)
  %param_1.6 = f32[32,48]{1,0} parameter(1)
DOT
}

ENTRY %main (x: f32[64,32], w: f32[32,48]) -> f32[64,48] {
  %x = f32[64,32]{1,0} parameter(0)
  %w = f32[32,48]{1,0} parameter(1)
  %exp.1 = f32[64,32]{1,0} exponential(%x)
  ROOT %ynn_fusion.6 = f32[64,48]{1,0} fusion(%exp.1, %w), kind=kCustom, calls=%fused_computation.6
}
""".replace("DOT", "  ROOT %dot.17 = f32[64,48]{1,0} dot(%param_0.6, %param_1.6), "
                   "lhs_contracting_dims={1}, rhs_contracting_dims={0}")


def test_call_flops_are_the_dots_inside_the_called_computation():
    assert _call_flops(HLO) == {"ynn_fusion.6": 2 * 64 * 32 * 48}


def test_shared_is_the_part_of_each_op_spent_beside_another():
    events = [{"name": n, "ts": t, "dur": d}
              for n, t, d in (("a", 0, 10), ("b", 5, 10), ("c", 20, 10), ("d", 22, 4),
                              ("e", 24, 8))]
    # Where d and e overlap each other inside c, that time counts once: c is shared over
    # [22, 30) of [20, 30), e over [24, 30) of [24, 32).
    assert _shared(events) == [0.5, 0.5, 0.8, 1.0, 0.75]


def test_dense_rates_split_the_matmuls_that_ran_alone_from_the_shared_ones():
    shapes = {"ynn_fusion.1": [64, 48], "ynn_fusion.2": [64, 48], "add_fusion": [64, 48]}
    events = [{"name": "ynn_fusion.1", "ts": 0, "dur": 1_000_000},        # alone: 1 s
              {"name": "ynn_fusion.2", "ts": 2_000_000, "dur": 2_000_000},  # 2 s, all shared
              {"name": "add_fusion", "ts": 2_000_000, "dur": 2_000_000}]
    rates = _dense_rates(events, shapes, {"ynn_fusion.1": 3e9, "ynn_fusion.2": 4e9})
    assert rates == {"alone": (3.0, 1.0), "beside another op": (2.0, 2.0)}
