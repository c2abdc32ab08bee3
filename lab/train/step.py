"""The training step: the model's structure, the optimizer and the jitted, sharded step
functions built from a config and a mesh.

The state is a plain pytree {"params", "opt", "step"} sharded by `lab.accel.sharding`, with
"noise" (the noise scale's moving averages) besides under `train.noise_scale_every`; the step is
jitted once with explicit input and output shardings and donates the old state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lab.accel import sharding
from lab.config import Config, replace
from lab.errors import UserError
from lab.model import layer_stats, memory, moe
from lab.model.roles import specs_of
from lab.model.transformer import Transformer, loss_fn, mup_lr_scales
from lab.optim import noise_scale, qk_clip
from lab.optim.optimizers import build_optimizer, lr_schedule, map_param_copies, param_labels


@dataclasses.dataclass
class Trainer:
    """Everything built from a config and a mesh: the model's structure, the optimizer and the
    jitted step functions with their shardings."""

    cfg: Config
    mesh: jax.sharding.Mesh
    graphdef: Any
    abstract_params: dict
    param_specs: dict  # lab.model.roles.ParamSpec of each parameter, a tree like abstract_params
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    state_shardings: Any
    init_fn: Callable
    train_step: Callable
    eval_step: Callable
    remat_note: str = ""  # what model.remat=auto chose, for the run's first lines
    # The step that also measures the gradient noise scale (train.noise_scale_every), or None.
    noise_step: Callable | None = None


    def init_state(self) -> dict:
        with jax.set_mesh(self.mesh):
            return self.init_fn()


def build_trainer(cfg: Config, mesh: jax.sharding.Mesh, platform: str | None = None) -> Trainer:
    """Build the model structure, the optimizer and the jitted, sharded step functions;
    `model.remat=auto` is resolved first, for the mesh's chips (lab.model.memory.choose_remat).
    `platform` (default: the mesh's) picks the kernels, for lowering to another platform."""
    if cfg.model.remat == "auto":
        probe = build_trainer(replace(cfg, model={"remat": "none"}), mesh, platform)
        remat, note = memory.choose_remat(probe)
        return dataclasses.replace(
            build_trainer(replace(cfg, model={"remat": remat}), mesh, platform), remat_note=note)
    mcfg, tcfg = cfg.model, cfg.train
    _check_batch(cfg, mesh)
    # The target's kernels, even when compiling ahead.
    platform = platform or sharding.mesh_platform(mesh)
    abstract_model = nnx.eval_shape(lambda: Transformer(mcfg, nnx.Rngs(0), platform))
    graphdef, abstract_state = nnx.split(abstract_model)
    abstract_params, specs = nnx.to_pure_dict(abstract_state), specs_of(abstract_state)
    schedule = lr_schedule(cfg.schedule, cfg.optim.lr, tcfg.steps)
    tx = build_optimizer(cfg.optim, cfg.schedule, tcfg.steps, specs,
                         lr_scales=_lr_scales(cfg, specs), platform=platform)

    def init_fn() -> dict:
        model = Transformer(mcfg, nnx.Rngs(params=cfg.run.seed), platform)
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        state = {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32)}
        if tcfg.noise_scale_every:
            state["noise"] = noise_scale.initial_averages()
        return state

    state_sh = state_shardings(jax.eval_shape(init_fn), specs, mesh)
    batch_sh = sharding.batch_sharding(mesh)
    repl = sharding.replicated(mesh)

    def model_loss(params, tokens):
        return loss_fn(nnx.merge(graphdef, params), tokens)

    balance = None
    if mcfg.moe.experts and mcfg.moe.router == "sigmoid" and mcfg.moe.bias_rate:
        def balance(params, stats_N):  # the MoE router's biases, moved outside the gradient
            return moe.balance_biases(params, specs, stats_N, mcfg.moe.bias_rate), {}

    grad_fn = jax.value_and_grad(model_loss, has_aux=True)
    after = _chain(qk_clip.after_update(mcfg, cfg.optim.qk_clip), balance)
    train_step, noise_step = (
        make_train_step(grad_fn, tx, schedule, tcfg.grad_accum, bool(mcfg.z_loss), after, measure)
        for measure in (False, True))

    def eval_step(params: dict, tokens_BxL1: jax.Array) -> jax.Array:
        return model_loss(params, tokens_BxL1)[1]["ce"]

    with sharding.mesh_context(mesh):
        jit_init = jax.jit(init_fn, out_shardings=state_sh)
        jit_train = jax.jit(train_step, in_shardings=(state_sh, batch_sh),
                            out_shardings=(state_sh, repl), donate_argnums=0)
        jit_eval = jax.jit(eval_step, in_shardings=(state_sh["params"], batch_sh),
                           out_shardings=repl)
        jit_noise = None
        if tcfg.noise_scale_every:  # a second program, for the steps that measure
            jit_noise = jax.jit(noise_step, in_shardings=(state_sh, batch_sh),
                                out_shardings=(state_sh, repl), donate_argnums=0)
    return Trainer(cfg, mesh, graphdef, abstract_params, specs, tx, schedule, state_sh,
                   jit_init, jit_train, jit_eval, noise_step=jit_noise)


def _chain(*updates: Callable | None) -> Callable | None:
    """The `after_update`s that are given, one after the other, their metrics merged."""
    given = [u for u in updates if u is not None]
    if not given:
        return None

    def after_update(params, stats_N):
        metrics = {}
        for update in given:
            params, extra = update(params, stats_N)
            metrics.update(extra)
        return params, metrics

    return after_update


def _check_batch(cfg: Config, mesh: jax.sharding.Mesh) -> None:
    """The batch must split evenly over the data-parallel devices, micro-batches and hosts."""
    tcfg = cfg.train
    divisor = sharding.batch_size_divisor(mesh)
    if tcfg.batch_size % (divisor * tcfg.grad_accum):
        raise UserError(
            f"train.batch_size ({tcfg.batch_size}) must divide by the data-parallel size "
            f"(mesh.data x mesh.fsdp x mesh.expert = {divisor}) times train.grad_accum "
            f"({tcfg.grad_accum}); "
            "change the batch size or the mesh")
    if tcfg.noise_scale_every and tcfg.grad_accum == 1 and tcfg.batch_size % (2 * divisor):
        raise UserError(
            f"train.noise_scale_every splits the batch in two halves on the steps it measures, "
            f"so train.batch_size ({tcfg.batch_size}) must divide by 2 x the data-parallel size "
            f"({divisor}); change the batch size or the mesh, or set train.grad_accum")
    if jax.process_count() > 1 and tcfg.batch_size % jax.process_count():
        raise UserError(f"train.batch_size ({tcfg.batch_size}) must divide by the number of "
                        f"processes ({jax.process_count()})")


def _lr_scales(cfg: Config, specs: dict) -> dict:
    """μP's learning-rate multiplier of every parameter, as the optimizer applies them."""
    lr_scales = mup_lr_scales(cfg.model, specs)
    if cfg.optim.name == "muon" and cfg.optim.muon_scaling == "shape":
        # Muon's spectral (shape) scaling already makes its update width-independent; μP's
        # 1/width on top would count width twice. Moonlight's RMS-matched update is Adam-like
        # in size, so it keeps μP's multipliers.
        lr_scales = jax.tree.map(lambda scale, group: 1.0 if group == "muon" else scale,
                                 lr_scales, param_labels(specs))
    return lr_scales


def make_train_step(grad_fn: Callable, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, grad_accum: int, z_loss: bool,
                    after_update: Callable | None = None,
                    measure_noise: bool = False) -> Callable:
    """One optimizer step on a batch, accumulated over `grad_accum` micro-batches:
    (state, tokens_BxL1) -> (new state, metrics). `grad_fn` is the loss's value_and_grad;
    `after_update` (new params, layer stats) -> (params, metrics), if given, follows the
    optimizer's update (lab.optim.qk_clip.after_update, lab.model.moe.balance_biases).
    `measure_noise`
    adds the gradient noise scale's two estimates (lab.optim.noise_scale) from the micro-batches'
    gradients against their mean, splitting the batch in two without accumulation."""
    A = max(grad_accum, 2) if measure_noise else grad_accum

    def train_step(state: dict, tokens_BxL1: jax.Array) -> tuple[dict, dict]:
        params = state["params"]
        if A == 1:
            (loss, aux), grads = grad_fn(params, tokens_BxL1)
            ce, stats_N = aux["ce"], aux["layer_stats"]
        else:
            # Micro-batch a takes rows a, a+A, a+2A, ...: every device keeps its own rows.
            B, L1 = tokens_BxL1.shape
            micro_AxBAxL1 = tokens_BxL1.reshape(B // A, A, L1).swapaxes(0, 1)

            def accumulate(carry, tokens):
                (loss, aux), grads = grad_fn(params, tokens)
                total, stats_N = carry
                summed = (grads, loss, aux["ce"])
                if measure_noise:  # the micro-batch's squared gradient norm
                    summed += (optax.tree.norm(grads, squared=True),)
                return (jax.tree.map(jnp.add, total, summed),
                        layer_stats.accumulate(stats_N, aux["layer_stats"])), None

            zeros = (jax.tree.map(jnp.zeros_like, params), jnp.zeros(()), jnp.zeros(()))
            zeros += (jnp.zeros(()),) if measure_noise else ()
            stats_shape = jax.eval_shape(grad_fn, params, micro_AxBAxL1[0])[0][1]["layer_stats"]
            (sums, stats_N), _ = jax.lax.scan(
                accumulate, (zeros, layer_stats.initial(stats_shape)), micro_AxBAxL1)
            grads, loss, ce, *micro_sq = jax.tree.map(lambda x: x / A, sums)
            stats_N = moe.with_step_max_load(layer_stats.finish(stats_N, A))
        updates, opt = tx.update(grads, state["opt"], params)
        new_params = optax.apply_updates(params, updates)
        extra = {}
        if after_update is not None:
            new_params, extra = after_update(new_params, stats_N)
        metrics = {
            "loss": loss,
            "lr": schedule(state["step"]),
            "grad_norm": optax.tree.norm(grads),
            "update_norm": optax.tree.norm(updates),
            "param_norm": optax.tree.norm(new_params),
        }
        if z_loss:  # otherwise the cross-entropy is the loss
            metrics["ce"] = ce
        metrics.update(layer_stats.step_metrics(stats_N), **extra)
        if measure_noise:
            B = tokens_BxL1.shape[0]
            metrics |= noise_scale.step_estimates(
                micro_sq[0], optax.tree.norm(grads, squared=True), B // A, B)
        new_state = {"params": new_params, "opt": opt, "step": state["step"] + 1}
        if "noise" in state:  # train.noise_scale_every: every step reports the smoothed value
            averages = state["noise"]
            if measure_noise:
                averages = noise_scale.update_averages(averages, metrics[noise_scale.GRAD_SQ],
                                                       metrics[noise_scale.TRACE])
            new_state["noise"] = averages
            metrics["noise_scale"] = noise_scale.smoothed_value(averages,
                                                                tokens_BxL1.shape[1] - 1)
        return new_state, metrics

    return train_step


def state_shardings(abstract_state: dict, specs: dict, mesh: jax.sharding.Mesh) -> dict:
    """Parameters by their declared axes; the optimizer's copies of the parameter tree (its
    moments) like the parameters, leaf for leaf; scalars, and moments of another shape than
    their parameter, replicated."""
    params = abstract_state["params"]
    param_sh = sharding.param_shardings(params, specs, mesh)
    repl = sharding.replicated(mesh)

    def moment(leaf, param, sh):
        return sh if leaf.shape == param.shape else repl

    opt_sh = map_param_copies(moment, abstract_state["opt"], params, param_sh,
                              other=lambda _: repl)
    shardings = {"params": param_sh, "opt": opt_sh, "step": repl}
    if "noise" in abstract_state:
        shardings["noise"] = jax.tree.map(lambda _: repl, abstract_state["noise"])
    return shardings
