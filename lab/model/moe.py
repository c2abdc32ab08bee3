"""A mixture-of-experts SwiGLU MLP: a router picks each token's top-k experts, the chosen
experts' outputs are summed weighted by the router, and shared experts (if any) see every token.

Routing (float32):
  softmax  probabilities p = softmax(x W_r); the top-k of p, weighted by p itself (Switch,
           GShard): the router learns through those weights.
  sigmoid  scores s = sigmoid(x W_r); the top-k of s + b, where b is a per-expert balancing
           bias that only chooses, weighted by the chosen s normalised to sum to 1
           (DeepSeek-V3's auxiliary-loss-free balancing). b is a parameter of role BALANCE:
           it has no gradient (it enters only the choice) and the optimizer leaves it alone;
           after each optimizer step the train step moves it by bias_rate * sign(1/E - load)
           from that step's per-expert loads (`balance_biases`), all inside the jitted step.

Capacity: with capacity_factor c > 0, an expert takes at most ceil(c * k * L / E) of one
sequence's token choices, first choices first and earlier positions first within them; the
rest are dropped (their weight is zero, the residual stream carries the token). Grouping by
sequence keeps the dropping independent of how the batch is split over devices. c = 0 is
dropless.

Dispatch, by `model.moe.dispatch`: `onehot` runs every expert on every token and weights the
results by the (mostly zero) combine matrix: exact everywhere, E / k times the active FLOPs,
the CPU's path. `ragged` sorts the token choices by expert and runs the grouped matmul
`jax.lax.ragged_dot`, GPU and TPU's path. Under a mesh whose `expert` axis holds several
devices, the experts are split over it (`expert_parallel`).

Statistics (lab.model.layer_stats): `expert_load/i` (the fraction of token choices routed to expert
i, before dropping), `max_expert_load` (E x the largest of them: 1 is balanced),
`dropped_fraction`, `router_entropy` (nats, mean over tokens) and, with model.moe.aux_loss > 0,
`aux_loss`: coef * E * sum_i f_i P_i with f_i the load above and P_i the mean router
probability (Switch Transformer, eq. 4).

Tensor names: B batch, L sequence, D model width, E experts, F expert width, K top-k,
T tokens (B L), A assignments (T K).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from lab.config import ModelConfig, MoeConfig
from lab.model.kernels import matmul
from lab.model.roles import Role, param
from lab.tree import path_names

EXPERT_AXIS = "expert"  # the mesh axis the experts are split over


def _experts(rngs: nnx.Rngs, E: int, fan_in: int, fan_out: int, axes: tuple[str, str]
             ) -> nnx.Param:
    init = jax.nn.initializers.truncated_normal(1.0 / math.sqrt(fan_in))
    return param(init(rngs.params(), (E, fan_in, fan_out), jnp.float32), ("expert", *axes),
                 Role.HIDDEN)


def capacity(moe: MoeConfig, seq_len: int) -> int:
    """Token choices one expert takes from a sequence (seq_len * top_k when dropless)."""
    if not moe.capacity_factor:
        return seq_len * moe.top_k
    return max(1, math.ceil(moe.capacity_factor * moe.top_k * seq_len / moe.experts))


def dispatch_kind(moe: MoeConfig, platform: str) -> str:
    if moe.dispatch != "auto":
        return moe.dispatch
    return "onehot" if platform == "cpu" else "ragged"


def route(logits_BxLxE: jax.Array, bias_E: jax.Array | None, moe: MoeConfig
          ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(expert indices (B, L, K), their weights (B, L, K) with dropped choices zeroed, whether
    each choice was kept (B, L, K), the router's probabilities (B, L, E)), all from float32
    logits."""
    K, E = moe.top_k, moe.experts
    if moe.router == "softmax":
        probs_BxLxE = jax.nn.softmax(logits_BxLxE, axis=-1)
        _, idx_BxLxK = jax.lax.top_k(probs_BxLxE, K)
        weights_BxLxK = jnp.take_along_axis(probs_BxLxE, idx_BxLxK, axis=-1)
    else:
        scores_BxLxE = jax.nn.sigmoid(logits_BxLxE)
        choice_BxLxE = scores_BxLxE if bias_E is None else (
            scores_BxLxE + jax.lax.stop_gradient(bias_E))
        _, idx_BxLxK = jax.lax.top_k(choice_BxLxE, K)
        chosen_BxLxK = jnp.take_along_axis(scores_BxLxE, idx_BxLxK, axis=-1)
        weights_BxLxK = chosen_BxLxK / jnp.sum(chosen_BxLxK, axis=-1, keepdims=True)
        probs_BxLxE = scores_BxLxE / jnp.sum(scores_BxLxE, axis=-1, keepdims=True)
    B, L, _ = logits_BxLxE.shape
    # A choice's place in its expert's queue: first choices of every position, then second...
    onehot_BxKxLxE = jax.nn.one_hot(idx_BxLxK.swapaxes(1, 2), E, dtype=jnp.int32)
    place_BxKLxE = jnp.cumsum(onehot_BxKxLxE.reshape(B, K * L, E), axis=1) - 1
    place_BxLxK = jnp.sum(place_BxKLxE.reshape(B, K, L, E) * onehot_BxKxLxE,
                          axis=-1).swapaxes(1, 2)
    kept_BxLxK = place_BxLxK < capacity(moe, L)
    return idx_BxLxK, jnp.where(kept_BxLxK, weights_BxLxK, 0.0), kept_BxLxK, probs_BxLxE


def routing_stats(idx_BxLxK: jax.Array, kept_BxLxK: jax.Array, probs_BxLxE: jax.Array,
                  moe: MoeConfig) -> dict:
    """The layer's statistics (float32 scalars): loads, drops, entropy, the auxiliary loss."""
    E = moe.experts
    load_E = jnp.mean(jax.nn.one_hot(idx_BxLxK, E, dtype=jnp.float32), axis=(0, 1, 2))
    entropy = -jnp.sum(probs_BxLxE * jnp.log(jnp.maximum(probs_BxLxE, 1e-30)), axis=-1)
    stats = {f"expert_load/{i}": load_E[i] for i in range(E)}
    stats["max_expert_load"] = E * jnp.max(load_E)
    stats["dropped_fraction"] = 1.0 - jnp.mean(kept_BxLxK.astype(jnp.float32))
    stats["router_entropy"] = jnp.mean(entropy)
    if moe.aux_loss:
        mean_prob_E = jnp.mean(probs_BxLxE, axis=(0, 1))
        stats["aux_loss"] = moe.aux_loss * E * jnp.sum(load_E * mean_prob_E)
    return stats


def expert_loads(stats_N: dict, experts: int) -> jax.Array:
    """The per-expert loads of every layer, (N, E), from stacked layer stats."""
    return jnp.stack([stats_N[f"expert_load/{i}"] for i in range(experts)], axis=-1)


def with_step_max_load(stats_N: dict) -> dict:
    """Stats averaged over a step's micro-batches with `max_expert_load` taken from the averaged
    loads, as one batch gives it: the largest of each micro-batch's overstates the step's."""
    E = sum(name.startswith("expert_load/") for name in stats_N)
    if not E:
        return stats_N
    return stats_N | {"max_expert_load": E * jnp.max(expert_loads(stats_N, E), axis=-1)}


def combine_matrix(idx_BxLxK: jax.Array, weights_BxLxK: jax.Array, E: int) -> jax.Array:
    """Each token's weight on each expert, (B, L, E): zero where not chosen or dropped."""
    onehot_BxLxKxE = jax.nn.one_hot(idx_BxLxK, E, dtype=weights_BxLxK.dtype)
    return jnp.einsum("blk,blke->ble", weights_BxLxK, onehot_BxLxKxE)


def _einsum(spec: str, a: jax.Array, b: jax.Array, dtype: str) -> jax.Array:
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def onehot_experts(x_BxLxD: jax.Array, combine_BxLxE: jax.Array, w_gate_ExDxF: jax.Array,
                   w_up_ExDxF: jax.Array, w_down_ExFxD: jax.Array, dtype: str) -> jax.Array:
    """Every expert on every token, the outputs summed with the combine weights: (B, L, D)
    float32."""
    gate_BxLxExF = checkpoint_name(_einsum("bld,edf->blef", x_BxLxD, w_gate_ExDxF, dtype),
                                   "mlp_gate")
    up_BxLxExF = checkpoint_name(_einsum("bld,edf->blef", x_BxLxD, w_up_ExDxF, dtype), "mlp_up")
    h_BxLxExF = jax.nn.silu(gate_BxLxExF) * up_BxLxExF * combine_BxLxE[..., None]
    return checkpoint_name(_einsum("blef,efd->bld", h_BxLxExF, w_down_ExFxD, dtype), "mlp_out")


def ragged_experts(x_BxLxD: jax.Array, idx_BxLxK: jax.Array, weights_BxLxK: jax.Array,
                   w_gate_ExDxF: jax.Array, w_up_ExDxF: jax.Array, w_down_ExFxD: jax.Array,
                   dtype: str, first_expert: int | jax.Array = 0) -> jax.Array:
    """The token choices sorted by expert through grouped matmuls (jax.lax.ragged_dot), each
    result weighted and added back to its token: (B, L, D) float32. The weights hold
    E_local = w_gate's first dimension experts, numbered from `first_expert`; choices of other
    experts, and dropped ones (weight zero), sort after every group and are not computed."""
    B, L, D = x_BxLxD.shape
    E_local = w_gate_ExDxF.shape[0]
    K = idx_BxLxK.shape[-1]
    x_TxD = x_BxLxD.reshape(B * L, D)
    local_A = idx_BxLxK.reshape(-1) - first_expert
    weight_A = weights_BxLxK.reshape(-1)
    live_A = (local_A >= 0) & (local_A < E_local) & (weight_A != 0)
    key_A = jnp.where(live_A, local_A, E_local)
    order_A = jnp.argsort(key_A, stable=True)
    token_A = order_A // K
    sizes_E = jnp.bincount(key_A, length=E_local + 1)[:E_local].astype(jnp.int32)
    xs_AxD = x_TxD[token_A]

    def grouped(lhs, rhs):
        return matmul.grouped(lhs, rhs, sizes_E, dtype, "float32")

    gate_AxF = checkpoint_name(grouped(xs_AxD, w_gate_ExDxF), "mlp_gate")
    up_AxF = checkpoint_name(grouped(xs_AxD, w_up_ExDxF), "mlp_up")
    out_AxD = checkpoint_name(grouped(jax.nn.silu(gate_AxF) * up_AxF, w_down_ExFxD), "mlp_out")
    # Rows past the groups (other experts' and dropped choices) carry no weight.
    out_AxD = jnp.where(live_A[order_A][:, None], out_AxD * weight_A[order_A][:, None], 0.0)
    out_TxD = jnp.zeros((B * L, D), jnp.float32).at[token_A].add(out_AxD)
    return out_TxD.reshape(B, L, D)


def _expert_mesh() -> tuple[jax.sharding.AbstractMesh | None, int]:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or EXPERT_AXIS not in mesh.axis_names:
        return None, 1
    return mesh, mesh.shape[EXPERT_AXIS]


class MoE(nnx.Module):
    """The routed experts, and the shared ones as one dense MLP of their total width, made by
    `make_mlp(width)`."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, platform: str,
                 make_mlp: Callable[[int], nnx.Module] | None = None):
        moe = cfg.moe
        D, E, F = cfg.d_model, moe.experts, cfg.expert_ff_dim
        self.router = param(jax.nn.initializers.truncated_normal(1.0 / math.sqrt(D))(
            rngs.params(), (D, E), jnp.float32), ("embed", "router"), Role.HIDDEN)
        if moe.router == "sigmoid" and moe.bias_rate:
            self.router_bias = param(jnp.zeros((E,), jnp.float32), ("router",), Role.BALANCE)
        self.w_gate = _experts(rngs, E, D, F, ("embed", "mlp"))
        self.w_up = _experts(rngs, E, D, F, ("embed", "mlp"))
        self.w_down = _experts(rngs, E, F, D, ("mlp", "embed"))
        self.shared = (make_mlp(moe.shared_experts * F) if moe.shared_experts and make_mlp
                       else None)
        self.moe, self.dispatch = moe, dispatch_kind(moe, platform)
        self.compute_dtype, self.activation_dtype = cfg.compute_dtype, cfg.activation_dtype

    def __call__(self, x_BxLxD: jax.Array) -> tuple[jax.Array, dict]:
        """The layer's output (activation dtype) and its statistics."""
        moe = self.moe
        logits_BxLxE = jnp.einsum("bld,de->ble", x_BxLxD.astype(jnp.float32), self.router[...])
        bias_E = self.router_bias[...] if hasattr(self, "router_bias") else None
        idx_BxLxK, weights_BxLxK, kept_BxLxK, probs_BxLxE = route(logits_BxLxE, bias_E, moe)
        stats = routing_stats(idx_BxLxK, kept_BxLxK, probs_BxLxE, moe)
        out_BxLxD = self.experts(x_BxLxD, idx_BxLxK, weights_BxLxK)
        if self.shared is not None:
            out_BxLxD = out_BxLxD + self.shared(x_BxLxD).astype(jnp.float32)
        return out_BxLxD.astype(self.activation_dtype), stats

    def experts(self, x_BxLxD: jax.Array, idx_BxLxK: jax.Array, weights_BxLxK: jax.Array
                ) -> jax.Array:
        """The routed experts' weighted sum (B, L, D) float32, split over the mesh's expert
        axis when it has several devices."""
        weights = (self.w_gate[...], self.w_up[...], self.w_down[...])
        mesh, ep = _expert_mesh()
        if ep == 1:
            return self._local(x_BxLxD, idx_BxLxK, weights_BxLxK, weights, 0)
        return expert_parallel(self._local, mesh, x_BxLxD, idx_BxLxK, weights_BxLxK, weights)

    def _local(self, x_BxLxD, idx_BxLxK, weights_BxLxK, weights, first_expert):
        E_local = weights[0].shape[0]
        if self.dispatch == "ragged":
            return ragged_experts(x_BxLxD, idx_BxLxK, weights_BxLxK, *weights,
                                  self.compute_dtype, first_expert)
        combine_BxLxE = combine_matrix(idx_BxLxK - first_expert, weights_BxLxK, E_local)
        return onehot_experts(x_BxLxD, combine_BxLxE, *weights, self.compute_dtype)


def expert_parallel(local, mesh, x_BxLxD, idx_BxLxK, weights_BxLxK, weights) -> jax.Array:
    """The experts split over the mesh's expert axis, inside shard_map: each device gathers the
    tokens (and their routing) of its expert group, which the expert axis splits like a data
    axis, runs its E / ep experts on all of them, and a reduce-scatter sums the experts'
    outputs and hands each device back its own tokens' rows."""
    batch = tuple(a for a in ("data", "fsdp", EXPERT_AXIS) if a in mesh.axis_names)
    token_spec = P(batch, None, None)
    weight_spec = P(EXPERT_AXIS, None, None)

    def shard(x_bxLxD, idx_bxLxK, w_bxLxK, w_gate, w_up, w_down):
        gather = lambda a: jax.lax.all_gather(a, EXPERT_AXIS, axis=0, tiled=True)  # noqa: E731
        first = jax.lax.axis_index(EXPERT_AXIS) * w_gate.shape[0]
        out = local(gather(x_bxLxD), gather(idx_bxLxK), gather(w_bxLxK),
                    (w_gate, w_up, w_down), first)
        return jax.lax.psum_scatter(out, EXPERT_AXIS, scatter_dimension=0, tiled=True)

    return jax.shard_map(shard, mesh=mesh,
                         in_specs=(token_spec, token_spec, token_spec, *(weight_spec,) * 3),
                         out_specs=token_spec, check_vma=False)(
        x_BxLxD, idx_BxLxK, weights_BxLxK, *weights)


def balance_biases(params: dict, specs: dict, stats_N: dict, rate: float) -> dict:
    """The parameters with every router balancing bias (role BALANCE) moved by
    rate * sign(1/E - load) (DeepSeek-V3): up for an under-loaded expert, down for an
    over-loaded one. `stats_N` are the step's layer stats (leading layer axis); an unrolled
    model's bias of layer i takes row i, a scanned model's stacked bias all rows."""
    def one(path, value, spec):
        if spec.role is not Role.BALANCE:
            return value
        E = value.shape[-1]
        loads_NxE = expert_loads(stats_N, E)
        layer = next((n for n in path_names(path) if isinstance(n, int)), None)
        load = loads_NxE if value.ndim == 2 else loads_NxE[layer or 0]
        return value + rate * jnp.sign(1.0 / E - load)

    return jax.tree_util.tree_map_with_path(one, params, specs)
