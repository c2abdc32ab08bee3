"""The training step and loop: `lab train CONFIG [key=value ...]`.

The state is a plain pytree {"params", "opt", "step"} sharded by `lab.sharding`; the step is
jitted once with explicit input and output shardings and donates the old state. Each step is
dispatched before the previous step's metrics are fetched, so logging never stalls the device.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lab import sharding
from lab.config import Config, dump_config
from lab.errors import UserError
from lab.metrics import MetricsLogger, read_json, write_json_atomic
from lab.model import Transformer, flops_per_token, loss_fn, mup_lr_scales, param_counts
from lab.optim import build_optimizer, describe_routing, lr_schedule


@dataclasses.dataclass
class Trainer:
    """Everything built from a config and a mesh: the model's structure, the optimizer and the
    jitted step functions with their shardings."""

    cfg: Config
    mesh: jax.sharding.Mesh
    graphdef: Any
    abstract_params: dict
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    state_shardings: Any
    init_fn: Callable
    train_step: Callable
    eval_step: Callable

    def init_state(self) -> dict:
        with jax.set_mesh(self.mesh):
            return self.init_fn()


def build_trainer(cfg: Config, mesh: jax.sharding.Mesh) -> Trainer:
    """Build the model structure, the optimizer and the jitted, sharded step functions."""
    mcfg, tcfg = cfg.model, cfg.train
    divisor = sharding.batch_size_divisor(mesh)
    if tcfg.batch_size % (divisor * tcfg.grad_accum):
        raise UserError(
            f"train.batch_size ({tcfg.batch_size}) must divide by the data-parallel size "
            f"(mesh.data x mesh.fsdp = {divisor}) times train.grad_accum ({tcfg.grad_accum}); "
            "change the batch size or the mesh")
    if jax.process_count() > 1 and tcfg.batch_size % jax.process_count():
        raise UserError(f"train.batch_size ({tcfg.batch_size}) must divide by the number of "
                        f"processes ({jax.process_count()})")

    abstract_model = nnx.eval_shape(lambda: Transformer(mcfg, nnx.Rngs(0)))
    graphdef, abstract_params = nnx.split(abstract_model)
    abstract_params = nnx.to_pure_dict(abstract_params)
    schedule = lr_schedule(cfg.schedule, cfg.optim.lr, tcfg.steps)
    tx = build_optimizer(cfg.optim, cfg.schedule, tcfg.steps, abstract_params,
                         lr_scales=mup_lr_scales(mcfg, abstract_params))

    def init_fn() -> dict:
        model = Transformer(mcfg, nnx.Rngs(params=cfg.run.seed))
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        return {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32)}

    abstract_state = jax.eval_shape(init_fn)
    state_sh = state_shardings(abstract_state, mesh)
    batch_sh = sharding.batch_sharding(mesh)
    repl = sharding.replicated(mesh)

    def model_loss(params, tokens):
        return loss_fn(nnx.merge(graphdef, params), tokens)

    grad_fn = jax.value_and_grad(model_loss, has_aux=True)

    def train_step(state: dict, tokens_BxL1: jax.Array) -> tuple[dict, dict]:
        params = state["params"]
        A = tcfg.grad_accum
        if A == 1:
            (loss, aux), grads = grad_fn(params, tokens_BxL1)
            ce = aux["ce"]
        else:
            # Micro-batch a takes rows a, a+A, a+2A, ...: every device keeps its own rows.
            B, L1 = tokens_BxL1.shape
            micro_AxBAxL1 = tokens_BxL1.reshape(B // A, A, L1).swapaxes(0, 1)

            def accumulate(carry, tokens):
                (loss, aux), grads = grad_fn(params, tokens)
                return jax.tree.map(jnp.add, carry, (grads, loss, aux["ce"])), None

            zeros = (jax.tree.map(jnp.zeros_like, params), jnp.zeros(()), jnp.zeros(()))
            (grads, loss, ce), _ = jax.lax.scan(accumulate, zeros, micro_AxBAxL1)
            grads, loss, ce = jax.tree.map(lambda x: x / A, (grads, loss, ce))
        updates, opt = tx.update(grads, state["opt"], params)
        new_params = optax.apply_updates(params, updates)
        metrics = {
            "loss": loss,
            "ce": ce,
            "lr": schedule(state["step"]),
            "grad_norm": optax.tree.norm(grads),
            "update_norm": optax.tree.norm(updates),
            "param_norm": optax.tree.norm(new_params),
        }
        return {"params": new_params, "opt": opt, "step": state["step"] + 1}, metrics

    def eval_step(params: dict, tokens_BxL1: jax.Array) -> jax.Array:
        return model_loss(params, tokens_BxL1)[1]["ce"]

    with jax.set_mesh(mesh):
        jit_init = jax.jit(init_fn, out_shardings=state_sh)
        jit_train = jax.jit(train_step, in_shardings=(state_sh, batch_sh),
                            out_shardings=(state_sh, repl), donate_argnums=0)
        jit_eval = jax.jit(eval_step, in_shardings=(state_sh["params"], batch_sh),
                           out_shardings=repl)
    return Trainer(cfg, mesh, graphdef, abstract_params, tx, schedule, state_sh, jit_init,
                   jit_train, jit_eval)


def state_shardings(abstract_state: dict, mesh: jax.sharding.Mesh) -> dict:
    """Parameters by their names; optimizer moments like the parameter they belong to
    (matched by the end of their tree path); scalars replicated."""
    param_sh = sharding.param_shardings(abstract_state["params"], mesh)
    by_path = {
        tuple(sharding._key_name(k) for k in path): sh
        for path, sh in jax.tree_util.tree_flatten_with_path(param_sh)[0]
    }
    repl = sharding.replicated(mesh)

    def opt_leaf(path, leaf):
        names = tuple(sharding._key_name(k) for k in path)
        for i in range(len(names)):
            sh = by_path.get(names[i:])
            if sh is not None and len(sh.spec) <= len(leaf.shape):
                return sh
        return repl

    return {
        "params": param_sh,
        "opt": jax.tree_util.tree_map_with_path(opt_leaf, abstract_state["opt"]),
        "step": repl,
    }


# ----------------------------------------------------------------------------- the loop


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """One line per logged step: loss, learning rate, tokens/s and the time left."""

    def __init__(self, total_steps: int, enabled: bool):
        self.total = total_steps
        self.enabled = enabled

    def show(self, step: int, metrics: dict, seconds_per_step: float) -> None:
        if not self.enabled:
            return
        eta = _format_eta((self.total - step) * seconds_per_step)
        extra = f" | eval {metrics['eval_loss']:.4f}" if "eval_loss" in metrics else ""
        print(f"step {step:>6}/{self.total} | loss {metrics['loss']:.4f}{extra} | "
              f"lr {metrics['lr']:.2e} | {metrics['tokens_per_second']:,.0f} tok/s | "
              f"ETA {eta}", flush=True)


def evaluate(trainer: Trainer, params: dict, batches: list[jax.Array]) -> float:
    losses = [trainer.eval_step(params, b) for b in batches]
    return float(np.mean(jax.device_get(losses)))


def run_training(cfg: Config, trainer: Trainer, state: dict,
                 batches: Iterator[np.ndarray], eval_data: list[jax.Array],
                 run_dir: Path, summary_base: dict) -> dict:
    """Train from state["step"] to cfg.train.steps, logging and evaluating; returns the summary."""
    tcfg = cfg.train
    is_main = jax.process_index() == 0
    logger = MetricsLogger(run_dir, enabled=is_main)
    progress = Progress(tcfg.steps, enabled=is_main)
    tokens_per_step = tcfg.batch_size * tcfg.seq_len
    start = int(jax.device_get(state["step"]))
    pending: tuple[int, dict] | None = None
    last_time, last_step = time.perf_counter(), start
    last_eval = None

    def flush(step: int, metrics: dict, eval_loss: float | None = None) -> None:
        nonlocal last_time, last_step
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        per_step = (now - last_time) / max(step - last_step, 1)
        last_time, last_step = now, step
        metrics["tokens"] = step * tokens_per_step
        metrics["tokens_per_second"] = tokens_per_step / per_step
        if eval_loss is not None:
            metrics["eval_loss"] = eval_loss
        logger.log(step, metrics)
        progress.show(step, metrics, per_step)

    with jax.set_mesh(trainer.mesh):
        for step in range(start, tcfg.steps):
            tokens = sharding.global_batch(next(batches), trainer.mesh)
            state, metrics = trainer.train_step(state, tokens)
            if pending is not None:  # the next step is already queued: fetching won't stall
                flush(*pending)
                pending = None
            done = step + 1
            if (tcfg.eval_every and done % tcfg.eval_every == 0) or done == tcfg.steps:
                last_eval = evaluate(trainer, state["params"], eval_data)
                flush(done, metrics, last_eval)
                last_time = time.perf_counter()  # evaluation is not training time
            elif done % tcfg.log_every == 0:
                pending = (done, metrics)
        if pending is not None:
            flush(*pending)
    logger.close()
    summary = {**summary_base, "status": "finished", "final_eval_loss": last_eval,
               "steps": tcfg.steps, "tokens": tcfg.steps * tokens_per_step}
    summary["flops"] = summary["flops_per_token"] * summary["tokens"]
    return summary


def train(cfg: Config) -> dict:
    """`lab train`: set up the run directory, data, mesh and state, then train."""
    from lab import data as labdata
    from lab.model import with_vocab

    run_dir = Path(cfg.run.dir)
    summary_path = run_dir / "summary.json"
    existing = read_json(summary_path)
    if existing and existing.get("status") == "finished":
        print(f"{run_dir} is already finished (status 'finished'); nothing to do. "
              "Use another run.dir to train again.")
        return existing

    data_path = cfg.data.path or labdata.default_data_path()
    dataset = labdata.open_dataset(data_path)
    cfg = dataclasses.replace(cfg, model=with_vocab(cfg.model, dataset.vocab_size))
    labdata.check_vocab(dataset, cfg.model.vocab_size)

    mesh = sharding.make_mesh(cfg.mesh)
    trainer = build_trainer(cfg, mesh)
    is_main = jax.process_index() == 0
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(cfg))
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        print(f"run {run_dir}: mesh {dict(mesh.shape)}, "
              f"{param_counts(cfg.model)['params']:,} parameters, data {data_path}")
        print(describe_routing(trainer.abstract_params) if cfg.optim.name == "muon"
              else "optimizer: adamw on every parameter")

    counts = param_counts(cfg.model)
    summary_base = {
        "params": counts["params"],
        "non_embedding_params": counts["non_embedding_params"],
        "flops_per_token": flops_per_token(cfg.model, cfg.train.seq_len),
        "name": cfg.run.name or run_dir.name,
        "data": str(data_path),
    }
    if is_main:
        write_json_atomic(summary_path, {**summary_base, "status": "running", "tokens": 0,
                                         "flops": 0, "final_eval_loss": None})
    stream = labdata.TrainStream(dataset, cfg.train.seq_len, cfg.train.batch_size, cfg.run.seed)
    eval_local = labdata.eval_batches(dataset, cfg.train.seq_len, cfg.train.batch_size,
                                      cfg.train.eval_batches)
    eval_data = [sharding.global_batch(b, mesh) for b in eval_local]
    state = trainer.init_state()
    try:
        summary = run_training(cfg, trainer, state, stream.iterator(0), eval_data, run_dir,
                               summary_base)
    except BaseException:
        if is_main:
            write_json_atomic(summary_path, {**summary_base, "status": "failed", "tokens": 0,
                                             "flops": 0, "final_eval_loss": None})
        raise
    if is_main:
        write_json_atomic(summary_path, summary)
        print(f"finished: final eval loss {summary['final_eval_loss']:.4f}, "
              f"{summary['tokens']:,} tokens, {summary['flops']:.3g} FLOPs", file=sys.stdout)
    return summary
