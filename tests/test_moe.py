"""The mixture-of-experts MLP (lab.model.moe): both dispatch paths against a float64 loop that sends
each token through its chosen experts one at a time; the routing statistics against the same
loop; the router bias moved outside the gradient; the parameter and FLOP accounting against
hand counts; and expert parallelism (expert 4 x data 2 on 8 fake devices) against one device."""

import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lab.config import ModelConfig, MoeConfig
from lab.model.accounting import flops_per_token, param_counts
from lab.model.moe import MoE, balance_biases
from lab.model.roles import Role, specs_of
from lab.model.transformer import Transformer

D, L, B = 16, 12, 3


def moe_layer(seed: int = 0, **moe) -> MoE:
    cfg = ModelConfig(vocab_size=64, d_model=D, n_heads=2, d_ff=24,
                      moe=MoeConfig(**{"experts": 4, "top_k": 2, **moe}))
    layer = MoE(cfg, nnx.Rngs(seed), "cpu")
    if hasattr(layer, "router_bias"):  # a bias that matters for the choice
        layer.router_bias[...] = jax.random.normal(jax.random.key(seed + 7), (4,)) * 0.3
    return layer


def apply(layer: nnx.Module, x: jax.Array):
    """The layer on x, jitted (eager dispatch of every small op is slow)."""
    graphdef, state = nnx.split(layer)
    return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)


def reference(layer: MoE, x_BxLxD: np.ndarray) -> tuple[np.ndarray, dict]:
    """The layer in float64, token by token: route, then queue each sequence's choices (first
    choices first, earlier positions first) into experts of limited capacity."""
    moe = layer.moe
    E, K = moe.experts, moe.top_k
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    router, wg, wu, wd = (f64(p[...]) for p in (layer.router, layer.w_gate, layer.w_up,
                                                 layer.w_down))
    bias = f64(layer.router_bias[...]) if hasattr(layer, "router_bias") else np.zeros(E)
    cap = math.ceil(moe.capacity_factor * K * L / E) if moe.capacity_factor else K * L
    x = f64(x_BxLxD)
    out = np.zeros_like(x)
    load, kept_count, entropy, mean_prob = np.zeros(E), 0, [], np.zeros(E)
    for b in range(B):
        picks = []
        for pos in range(L):
            logits = x[b, pos] @ router
            if moe.router == "softmax":
                p = np.exp(logits - logits.max())
                p /= p.sum()
                chosen = np.argsort(-p)[:K]
                weights = p[chosen]
            else:
                s = 1 / (1 + np.exp(-logits))
                chosen = np.argsort(-(s + bias))[:K]
                weights = s[chosen] / s[chosen].sum()
                p = s / s.sum()
            picks.append((chosen, weights))
            entropy.append(-(p * np.log(p)).sum())
            mean_prob += p / (B * L)
            load[chosen] += 1 / (B * L * K)
        taken = np.zeros(E)
        for j in range(K):
            for pos in range(L):
                e, w = picks[pos][0][j], picks[pos][1][j]
                if taken[e] >= cap:
                    continue
                taken[e] += 1
                kept_count += 1
                h = x[b, pos]
                gate, up = h @ wg[e], h @ wu[e]
                out[b, pos] += w * ((gate / (1 + np.exp(-gate)) * up) @ wd[e])
    stats = {"load": load, "dropped_fraction": 1 - kept_count / (B * L * K),
             "router_entropy": np.mean(entropy),
             "aux_loss": moe.aux_loss * E * np.sum(load * mean_prob)}
    return out, stats


CASES = {
    "softmax top-2 dropless": {},
    "softmax top-1, capacity 1": {"top_k": 1, "capacity_factor": 1.0, "aux_loss": 0.01},
    "sigmoid + bias top-2, capacity 0.75": {"router": "sigmoid", "capacity_factor": 0.75},
    "sigmoid top-3 dropless": {"router": "sigmoid", "top_k": 3, "aux_loss": 0.1},
}


@pytest.mark.parametrize("case", CASES)
def test_both_dispatch_paths_match_a_float64_token_loop(case):
    x = jax.random.normal(jax.random.key(1), (B, L, D))
    layer = moe_layer(**CASES[case])
    want, want_stats = reference(layer, np.asarray(x))
    for dispatch in ("onehot", "ragged"):
        layer.dispatch = dispatch
        got, stats = apply(layer, x)
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2e-5, atol=2e-6,
                                   err_msg=dispatch)
    loads = [float(stats[f"expert_load/{i}"]) for i in range(layer.moe.experts)]
    np.testing.assert_allclose(loads, want_stats["load"], atol=1e-6)
    assert float(stats["max_expert_load"]) == pytest.approx(4 * max(want_stats["load"]))
    assert float(stats["dropped_fraction"]) == pytest.approx(want_stats["dropped_fraction"],
                                                             abs=1e-6)
    assert float(stats["router_entropy"]) == pytest.approx(want_stats["router_entropy"],
                                                           rel=1e-5)
    if layer.moe.aux_loss:
        assert float(stats["aux_loss"]) == pytest.approx(want_stats["aux_loss"], rel=1e-5)
    else:
        assert "aux_loss" not in stats
    if layer.moe.capacity_factor:  # the case drops something, or it tests nothing
        assert 0.05 < want_stats["dropped_fraction"] < 0.6


def test_the_two_paths_have_the_same_gradients():
    """Through the router weights (softmax) and every expert, both paths differentiate alike;
    the sigmoid router's bias gets no gradient (it only chooses)."""
    x = jax.random.normal(jax.random.key(2), (B, L, D))
    grads = {}
    for dispatch in ("onehot", "ragged"):
        layer = moe_layer(router="sigmoid", capacity_factor=1.0, dispatch=dispatch,
                          aux_loss=0.01)
        graphdef, params = nnx.split(layer, nnx.Param)

        def loss(p, graphdef=graphdef):
            out, stats = nnx.merge(graphdef, p)(x)
            return jnp.sum(jnp.sin(out)) + stats["aux_loss"]

        grads[dispatch] = nnx.to_pure_dict(jax.jit(jax.grad(loss))(params))
    assert float(jnp.abs(grads["onehot"]["router_bias"]).max()) == 0.0
    assert float(jnp.abs(grads["onehot"]["router"]).max()) > 1e-4
    for key in ("router", "w_gate", "w_up", "w_down"):
        np.testing.assert_allclose(grads["ragged"][key], grads["onehot"][key], rtol=1e-4,
                                   atol=1e-6, err_msg=key)


def test_shared_experts_add_a_dense_mlp_on_every_token():
    cfg = ModelConfig(vocab_size=64, d_model=D, n_heads=2, n_layers=1, d_ff=24,
                      moe=MoeConfig(experts=4, top_k=1, shared_experts=2, d_ff=8))
    model = Transformer(cfg, nnx.Rngs(0))
    graphdef, state = nnx.split(model.blocks)
    block = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], state))
    layer = block.mlp
    assert layer.shared.w_gate.shape == (D, 16)  # two experts of width 8
    x = jax.random.normal(jax.random.key(3), (B, L, D))
    routed, _ = reference(layer, np.asarray(x))
    h = np.asarray(x, np.float64)
    wg, wu, wd = (np.asarray(w[...], np.float64) for w in (layer.shared.w_gate,
                                                          layer.shared.w_up, layer.shared.w_down))
    gate = h @ wg
    shared = (gate / (1 + np.exp(-gate)) * (h @ wu)) @ wd
    got, _ = apply(layer, x)
    np.testing.assert_allclose(np.asarray(got, np.float64), routed + shared, rtol=2e-5,
                               atol=2e-6)


def test_balance_moves_each_bias_by_the_sign_of_its_load_error():
    """DeepSeek-V3: an over-loaded expert's bias goes down by the rate, an under-loaded one's
    up; an exactly balanced one stays. Scanned (stacked) and unrolled layouts alike; nothing
    else moves."""
    loads_NxE = jnp.array([[0.5, 0.25, 0.125, 0.125], [0.25, 0.25, 0.4, 0.1]])
    stats_N = {f"expert_load/{i}": loads_NxE[:, i] for i in range(4)}
    want = 0.01 * np.array([[-1, 0, 1, 1], [0, 0, -1, 1]])
    spec = specs_of(nnx.state(moe_layer(router="sigmoid"), nnx.Param))
    bias = spec["router_bias"]
    assert bias.role is Role.BALANCE
    other = spec["router"]
    scanned = {"mlp": {"router_bias": jnp.zeros((2, 4)), "router": jnp.ones((2, D, 4))}}
    scanned_specs = {"mlp": {"router_bias": bias, "router": other}}
    got = balance_biases(scanned, scanned_specs, stats_N, 0.01)
    np.testing.assert_allclose(got["mlp"]["router_bias"], want)
    assert np.all(np.asarray(got["mlp"]["router"]) == 1)
    unrolled = {"blocks": {i: {"router_bias": jnp.zeros(4)} for i in range(2)}}
    unrolled_specs = {"blocks": {i: {"router_bias": bias} for i in range(2)}}
    got = balance_biases(unrolled, unrolled_specs, stats_N, 0.01)
    for i in range(2):
        np.testing.assert_allclose(got["blocks"][i]["router_bias"], want[i])


# ----------------------------------------------------------------------------- accounting


def test_parameter_and_flop_accounting_against_hand_counts():
    """d 16, 2 layers, 4 heads (MHA), d_ff 24, vocab 64, untied; 8 experts of width 10, top-2,
    1 shared expert, sigmoid router with its bias."""
    cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=4, d_ff=24,
                      moe=MoeConfig(experts=8, top_k=2, shared_experts=1, d_ff=10,
                                    router="sigmoid"))
    attention = 4 * 16 * 16
    expert = 3 * 16 * 10
    router, bias, norms = 16 * 8, 8, 2 * 16
    layer_total = attention + router + bias + 8 * expert + expert + norms
    layer_active = attention + router + bias + 2 * expert + expert + norms
    embed = head = 64 * 16
    counts = param_counts(cfg)
    assert counts["total_params"] == counts["params"] == embed + head + 16 + 2 * layer_total
    assert counts["active_params"] == embed + head + 16 + 2 * layer_active
    model = Transformer(cfg, nnx.Rngs(0))
    assert counts["params"] == sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    matmuls = 2 * (attention + router + 3 * expert) + 16 * 64
    assert flops_per_token(cfg, 32) == 6 * matmuls + 6 * 2 * 32 * 16
    # A dense model's active parameters are all of them, its FLOPs as before.
    dense = dataclasses.replace(cfg, moe=MoeConfig())
    dense_counts = param_counts(dense)
    assert dense_counts["active_params"] == dense_counts["params"]
    assert flops_per_token(dense, 32) == 6 * (2 * (attention + 3 * 16 * 24) + 16 * 64) + 6 * 2 \
        * 32 * 16


# ----------------------------------------------------------------------------- expert parallel


def _moe_steps(small_data, devices: int, mesh_keys: list[str], steps: int = 2):
    """`steps` AdamW steps of a 1-layer MoE (4 experts, top-2, sigmoid router with its bias,
    capacity 1, an auxiliary loss) on the tiny config's batches: the per-step losses, gradient
    norms and loads, and the parameters after the last step."""
    from helpers import flat_params, tiny_trainer
    from lab.accel.sharding import global_batch

    trainer, stream = tiny_trainer(small_data, [
        "model.n_layers=1", "model.d_model=32", "model.n_heads=2", "train.seq_len=32",
        "model.moe.experts=4", "model.moe.router=sigmoid", "model.moe.capacity_factor=1.0",
        "model.moe.aux_loss=0.01", "model.moe.bias_rate=0.01", "optim.lr=1e-2", *mesh_keys],
        devices)
    mesh = trainer.mesh
    state = trainer.init_state()
    history = []
    with jax.set_mesh(mesh):
        for step in range(steps):
            state, metrics = trainer.train_step(state, global_batch(stream.batch(step), mesh))
            history.append({k: float(v) for k, v in metrics.items()})
    return history, flat_params(jax.device_get(state["params"]))


def test_expert_parallel_step_matches_one_device(small_data):
    """expert 4 x data 2 on 8 devices: each device holds one expert, the batch is split over
    all 8, and the step (loss, grad norm, routing statistics, every parameter, the balancing
    bias included) is the one-device step's."""
    one, one_params = _moe_steps(small_data, 1, ["mesh.fsdp=1"])
    eight, eight_params = _moe_steps(small_data, 8, ["mesh.fsdp=1", "mesh.data=2",
                                                     "mesh.expert=4"])
    for a, b in zip(one, eight, strict=True):
        assert set(a) == set(b) >= {"expert_load/3", "dropped_fraction", "router_entropy",
                                    "max_expert_load"}
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert 0 < one[0]["dropped_fraction"] < 0.5  # capacity 1 drops some choices
    bias = "['blocks']['mlp']['router_bias']"
    assert np.abs(one_params[bias]).max() == pytest.approx(0.02)  # two steps of 0.01 each
    assert sorted(one_params) == sorted(eight_params)
    for key in one_params:
        np.testing.assert_allclose(eight_params[key], one_params[key], rtol=1e-4, atol=1e-5,
                                   err_msg=key)


# ----------------------------------------------------------------------------- lowering


def test_the_ragged_expert_parallel_step_lowers_for_cuda():
    """`--lower cuda` of an MoE with mesh.expert=2 on the ragged path: the experts' grouped
    matmuls run on bfloat16 operands, the router's float32 dot is named as deliberate, the
    token exchange is the all-gather and reduce-scatter written in the shard_map, and the
    matmul FLOPs are the lab's active count. (The shard_map body is counted once, for one
    device; with data x fsdp = 1 each device's ragged rows are every token's top-k choices,
    so that once is the whole step's MoE FLOPs.)"""
    from lab.config import load_config
    from lab.train.lowering import lower_step

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "gpu" / "debug.yaml", [
        "model.vocab_size=320", "model.n_layers=2", "train.batch_size=4", "train.seq_len=128",
        "model.moe.experts=4", "model.moe.top_k=2", "model.moe.d_ff=64", "mesh.expert=2",
        "mesh.fsdp=1", "mesh.data=1", "model.remat=none"])
    step = lower_step(cfg, "cuda")
    assert step.devices == 2
    assert [(e.where, e.reason != "") for e in step.f32_dots] == [
        ("lab/model/moe.py:MoE.__call__", True)]
    assert step.collectives.get("all_gather", 0) >= 3  # tokens, choices, weights
    assert step.collectives.get("reduce_scatter", 0) >= 1
    tokens = cfg.train.batch_size * cfg.train.seq_len
    m = cfg.model
    attention = 6 * m.n_layers * cfg.train.seq_len * m.d_model * tokens  # in cuDNN's kernel
    expected = flops_per_token(m, cfg.train.seq_len) * tokens - attention
    total = sum(d.flops for d in step.dots.values())
    assert total == pytest.approx(expected, rel=1e-9)


@pytest.mark.slow
def test_an_expert_parallel_moe_compiles_for_a_tpu_topology():
    """`--compile-only --topology v5e:2x2` of an MoE with mesh.expert=2 (the ragged path on
    TPU): it compiles and fits, and the state the compiled step takes per chip is what the
    memory estimate counts, every expert included (each chip holds half of them)."""
    from lab.config import load_config
    from lab.train.aot import compile_report

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "tiny.yaml", [
        "model.vocab_size=320", "model.n_layers=2", "model.moe.experts=4", "mesh.expert=2"])
    report = compile_report(cfg, "v5e:2x2")
    assert report.fits and report.devices == 4
    state = report.estimate.params + report.estimate.opt_state
    assert state <= report.compiled.arguments <= 1.1 * state  # measured: 1.023
    # The experts (85% of the parameters) are split 4 ways (expert 2 x fsdp 2), the rest 2
    # ways (fsdp): a chip holds 29% of the parameters' bytes, not the 50% it would if the
    # expert axis split nothing.
    total = 4 * param_counts(cfg.model)["params"]
    assert 0.25 < report.estimate.params / total < 0.4


def test_the_memory_estimate_counts_every_expert():
    """Parameters: 4 bytes each, every expert's (the total, not the active count); AdamW's two
    moments for all but the balancing bias, which no optimizer moves; the MLP activations of
    every expert on the onehot path (CPU), of the top_k on the ragged path."""
    from lab.accel.sharding import make_mesh
    from lab.config import load_config
    from lab.model import memory
    from lab.train import build_trainer

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "tiny.yaml", [
        "model.vocab_size=320", "model.n_layers=2", "model.moe.experts=8", "model.moe.top_k=2",
        "model.moe.shared_experts=1", "model.moe.d_ff=64", "model.moe.router=sigmoid",
        "mesh.fsdp=1"])
    est = memory.estimate(build_trainer(cfg, make_mesh(cfg.mesh, jax.devices()[:1])))
    counts = param_counts(cfg.model)
    assert est.params == 4 * counts["total_params"] > 4 * counts["active_params"]
    bias = 2 * 8  # two layers of 8 experts
    assert 0 <= est.opt_state - 2 * 4 * (counts["params"] - bias) <= 16  # plus step counts
    assert memory.mlp_width(cfg, "cpu") == (8 + 1) * 64
    assert memory.mlp_width(cfg, "tpu") == (2 + 1) * 64
    dense = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, moe=MoeConfig()))
    assert memory.mlp_width(dense, "cpu") == 3 * 128


def test_max_expert_load_is_the_steps_not_a_micro_batchs():
    """Over micro-batches (train.grad_accum, or the two halves of a step that measures the noise
    scale) a step's loads are their mean, and max_expert_load is E x the largest of those, as
    without micro-batches: here 2.5, where the largest of each micro-batch's would say 4."""
    import optax

    from lab.model.moe import routing_stats
    from lab.train.step import make_train_step

    moe = MoeConfig(experts=4, top_k=1)

    def grad_fn(params, tokens_BxL1):  # token t goes to expert t % 4, one layer
        idx_BxLx1 = tokens_BxL1[:, :, None] % 4
        stats = routing_stats(idx_BxLx1, jnp.ones(idx_BxLx1.shape, bool),
                              jax.nn.one_hot(idx_BxLx1[..., 0], 4), moe)
        loss = jnp.sum(params["w"] ** 2)
        return (loss, {"ce": loss, "layer_stats": jax.tree.map(lambda v: v[None], stats)}), \
            {"w": 2 * params["w"]}

    tokens = jnp.array([[0, 0, 0, 0], [0, 1, 2, 3]])  # all to expert 0; evenly spread
    tx = optax.sgd(0.1)
    state = {"params": {"w": jnp.ones(3)}, "opt": tx.init({"w": jnp.ones(3)}),
             "step": jnp.zeros((), jnp.int32)}
    for accum, measure in ((1, False), (2, False), (1, True)):
        step = make_train_step(grad_fn, tx, optax.constant_schedule(0.1), accum, False,
                               measure_noise=measure)
        metrics = jax.jit(step)(state, tokens)[1]
        loads = [float(metrics[f"expert_load/{i}"]) for i in range(4)]
        assert loads == pytest.approx([0.625, 0.125, 0.125, 0.125])
        assert float(metrics["max_expert_load"]) == pytest.approx(2.5), (accum, measure)
