"""The training step and loop: `lab train CONFIG [key=value ...]`.

The state is a plain pytree {"params", "opt", "step"} sharded by `lab.sharding`; the step is
jitted once with explicit input and output shardings and donates the old state. Each step is
dispatched before the previous step's metrics are fetched, so logging never stalls the device.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lab import checkpoint, paths, sharding
from lab.branch import check_plan, planned_pairs, planned_steps
from lab.checkpoint import Checkpointer, abstract_with_shardings
from lab.config import Config, dump_config, load_config, to_dict
from lab.errors import UserError
from lab.memory import preflight
from lab.metrics import MetricsLogger, read_json, read_metrics, write_json_atomic
from lab.mfu import total_peak_flops
from lab.model import Transformer, flops_per_token, loss_fn, mup_lr_scales, param_counts
from lab.optim import build_optimizer, describe_routing, lr_schedule, param_labels
from lab.profiling import StepProfiler
from lab.tree import path_names


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

    platform = sharding.mesh_platform(mesh)  # the target's kernels, even when compiling ahead
    abstract_model = nnx.eval_shape(lambda: Transformer(mcfg, nnx.Rngs(0), platform))
    graphdef, abstract_params = nnx.split(abstract_model)
    abstract_params = nnx.to_pure_dict(abstract_params)
    schedule = lr_schedule(cfg.schedule, cfg.optim.lr, tcfg.steps)
    lr_scales = mup_lr_scales(mcfg, abstract_params)
    if cfg.optim.name == "muon" and cfg.optim.muon_scaling == "shape":
        # Muon's spectral (shape) scaling already makes its update width-independent; μP's
        # 1/width on top would count width twice. Moonlight's RMS-matched update is Adam-like
        # in size, so it keeps μP's multipliers.
        lr_scales = jax.tree.map(lambda scale, group: 1.0 if group == "muon" else scale,
                                 lr_scales, param_labels(abstract_params))
    tx = build_optimizer(cfg.optim, cfg.schedule, tcfg.steps, abstract_params,
                         lr_scales=lr_scales)

    def init_fn() -> dict:
        model = Transformer(mcfg, nnx.Rngs(params=cfg.run.seed), platform)
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

    with sharding.mesh_context(mesh):
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
        path_names(path): sh
        for path, sh in jax.tree_util.tree_flatten_with_path(param_sh)[0]
    }
    repl = sharding.replicated(mesh)

    def opt_leaf(path, leaf):
        names = path_names(path)
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
    """One line per logged step: loss, learning rate, tokens/s, MFU and the time left."""

    def __init__(self, total_steps: int, enabled: bool):
        self.total = total_steps
        self.enabled = enabled

    def show(self, step: int, metrics: dict, seconds_per_step: float) -> None:
        if not self.enabled:
            return
        eta = _format_eta((self.total - step) * seconds_per_step)
        extra = f" | eval {metrics['eval_loss']:.4f}" if "eval_loss" in metrics else ""
        mfu = f" | MFU {metrics['mfu']:.1%}" if metrics.get("mfu") else ""
        print(f"step {step:>6}/{self.total} | loss {metrics['loss']:.4f}{extra} | "
              f"lr {metrics['lr']:.2e} | {metrics['tokens_per_second']:,.0f} tok/s{mfu} | "
              f"ETA {eta}", flush=True)


class PreemptionWatch:
    """SIGTERM or SIGINT asks the run to checkpoint and stop at the next step boundary.

    With several processes every host must stop at the same step, so the decision goes through
    JAX's preemption sync point (the coordination service); one process uses its own flag.
    """

    def __init__(self):
        self.flag = False
        self.multi = jax.process_count() > 1
        self.previous = {}
        if not self.multi:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.flag = True

    def requested(self, step: int) -> bool:
        if self.multi:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.flag

    def close(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def evaluate(trainer: Trainer, params: dict, batches: list[jax.Array]) -> float:
    losses = [trainer.eval_step(params, b) for b in batches]
    return float(np.mean(jax.device_get(losses)))


@dataclasses.dataclass
class LoopResult:
    state: dict
    status: str  # finished | preempted | diverged
    step: int  # steps done
    eval_loss: float | None = None
    message: str = ""
    checkpoint_seconds: float = 0.0
    train_seconds: float = 0.0


def run_loop(cfg: Config, trainer: Trainer, state: dict, batches: Iterator[np.ndarray],
             eval_data: list[jax.Array], logger: MetricsLogger,
             checkpointer: Checkpointer | None, peak_flops: float,
             flops_per_tok: int, keep_steps: tuple[int, ...] = (),
             progress: Progress | None = None,
             profiler: StepProfiler | None = None) -> LoopResult:
    """Train from state["step"] to cfg.train.steps.

    Each step is dispatched before the previous step's metrics are fetched. Checkpoints are
    saved at checkpoint.every_steps, at every kept step and at the end; a non-finite loss or
    gradient stops the run before anything after it is saved.
    """
    tcfg, ccfg = cfg.train, cfg.checkpoint
    if progress is None:
        progress = Progress(tcfg.steps, enabled=jax.process_index() == 0)
    tokens_per_step = tcfg.batch_size * tcfg.seq_len
    start = int(jax.device_get(state["step"]))
    result = LoopResult(state, "finished", start)
    watch = PreemptionWatch()
    unchecked: tuple[int, dict] | None = None  # a step whose metrics are not yet fetched
    last_time, last_step = time.perf_counter(), start

    def fetch(done: int, metrics: dict) -> dict | None:
        """Host copy of a step's metrics; None (and the result marked diverged) if not finite."""
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not (math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])):
            result.status, result.step = "diverged", done - 1
            bad = "loss" if not math.isfinite(values["loss"]) else "grad_norm"
            result.message = (f"the {bad} is {values[bad]} at step {done}; the run stopped "
                              "(status 'diverged') and its last checkpoint is intact. Lower "
                              "optim.lr or raise schedule.warmup_steps")
            logger.log(done, values)
            return None
        return values

    def log(done: int, values: dict, eval_loss: float | None = None) -> None:
        nonlocal last_time, last_step
        now = time.perf_counter()
        per_step = (now - last_time) / max(done - last_step, 1)
        result.train_seconds += now - last_time
        last_time, last_step = now, done
        values["tokens"] = done * tokens_per_step
        values["tokens_per_second"] = tokens_per_step / per_step
        if peak_flops:
            values["mfu"] = values["tokens_per_second"] * flops_per_tok / peak_flops
        if eval_loss is not None:
            values["eval_loss"] = eval_loss
        logger.log(done, values)
        progress.show(done, values, per_step)

    def save(done: int) -> None:
        logger.flush()  # a remote log must not fall behind the checkpoint that covers it
        if checkpointer is None:
            return
        t = time.perf_counter()
        checkpointer.save(done, result.state, batches)
        result.checkpoint_seconds += time.perf_counter() - t

    log_pending = False
    try:
        with jax.set_mesh(trainer.mesh):
            for step in range(start, tcfg.steps):
                if watch.requested(step):
                    if unchecked is not None and fetch(*unchecked) is None:
                        break
                    save(step)
                    result.status, result.step = "preempted", step
                    result.message = (f"preempted: checkpoint saved at step {step}; run the same "
                                      "command again to continue")
                    break
                tokens = sharding.global_batch(next(batches), trainer.mesh)
                if profiler is not None:
                    profiler.step(step, wait_for=result.state)
                result.state, metrics = trainer.train_step(result.state, tokens)
                done = step + 1
                if unchecked is not None:  # this step is already queued: fetching won't stall
                    values = fetch(*unchecked)
                    if values is None:
                        break
                    if log_pending:
                        log(unchecked[0], values)
                unchecked = (done, metrics)
                result.step = done
                eval_due = (tcfg.eval_every and done % tcfg.eval_every == 0) or done == tcfg.steps
                save_due = ((ccfg.every_steps and done % ccfg.every_steps == 0)
                            or done in keep_steps or done == tcfg.steps)
                log_pending = done % tcfg.log_every == 0
                if eval_due or save_due:
                    values = fetch(*unchecked)  # must be finite before it is saved
                    unchecked = None
                    if values is None:
                        break
                    if eval_due:
                        result.eval_loss = evaluate(trainer, result.state["params"], eval_data)
                    if eval_due or log_pending:
                        log(done, values, result.eval_loss if eval_due else None)
                    if eval_due:
                        last_time = time.perf_counter()  # evaluation is not training time
                    if save_due:
                        save(done)
            if unchecked is not None and result.status == "finished":
                values = fetch(*unchecked)
                if values is not None and log_pending:
                    log(unchecked[0], values)
            if start >= tcfg.steps and result.eval_loss is None:  # restored at the very end
                result.eval_loss = evaluate(trainer, result.state["params"], eval_data)
    finally:
        watch.close()
        if profiler is not None:
            profiler.stop(wait_for=result.state)
        if checkpointer is not None:
            t = time.perf_counter()
            checkpointer.wait()
            result.checkpoint_seconds += time.perf_counter() - t
    return result


# ----------------------------------------------------------------------------- the run


# Keys a resumed run may change; anything else would make it a different run.
RESUMABLE_CHANGES = ("run.dir", "run.name", "run.peak_tflops", "train.steps", "train.log_every",
                     "train.eval_every", "train.eval_batches", "mesh.", "checkpoint.", "branch.")
# ... and what a branch may change from its parent: the decay, and where it starts.
BRANCH_CHANGES = RESUMABLE_CHANGES + ("run.parent", "schedule.decay_steps",
                                      "schedule.decay_shape", "schedule.final_ratio")


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_resumable(saved: Config, current: Config, allowed: tuple[str, ...] = RESUMABLE_CHANGES,
                    what: str = "") -> None:
    """Refuse to resume a run (or start a branch) under a config that changes what it
    computes."""
    old, new = _flatten(to_dict(saved)), _flatten(to_dict(current))
    what = what or f"the run in {current.run.dir}"
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key) and not key.startswith(allowed):
            raise UserError(
                f"{key} is {new.get(key)!r} but {what} was started with {old.get(key)!r}; "
                "use the same value, or another run.dir")


def _truncate_metrics(run_dir: str, step: int) -> None:
    """Drop records after the restored step, so a resumed run's log reads as one run."""
    path = paths.join(run_dir, "metrics.jsonl")
    if not paths.exists(path):
        return
    keep = [json.dumps(r) for r in read_metrics(run_dir) if r["step"] <= step]
    paths.write_text(path, "".join(line + "\n" for line in keep))


def train(cfg: Config, progress: Progress | None = None) -> dict:
    """`lab train`: prepare the run directory, data, mesh and state; resume if a checkpoint
    exists; train; write the summary. Returns the summary.

    `progress` replaces the default one-line-per-log display: anything with
    `show(step, metrics, seconds_per_step)` (the demo shows one live line for a whole study).
    """
    from lab import data as labdata
    from lab.model import with_vocab

    run_dir = cfg.run.dir  # a local path or a URL (gs://): files go through lab.paths
    summary_path = paths.join(run_dir, "summary.json")
    existing = read_json(summary_path)
    if existing and existing.get("status") == "finished":
        print(f"{run_dir} is already finished (status 'finished'); nothing to do. "
              "Use another run.dir to train again.")
        return existing

    data_path = cfg.data.path or labdata.default_data_path()
    dataset = labdata.open_dataset(data_path)
    cfg = dataclasses.replace(cfg, model=with_vocab(cfg.model, dataset.vocab_size))
    labdata.check_vocab(dataset, cfg.model.vocab_size)
    saved_cfg_path = paths.join(run_dir, "config.yaml")
    counts = param_counts(cfg.model)
    branch_points = planned_steps(cfg, counts["params"])
    check_plan(cfg, planned_pairs(cfg, counts["params"]), branch_points)
    keep_steps = tuple(sorted(set(cfg.checkpoint.keep_steps) | set(branch_points)))
    mesh = sharding.make_mesh(cfg.mesh)
    trainer = build_trainer(cfg, mesh)
    memory_line = preflight(trainer)  # a run that cannot fit stops before touching run_dir
    checkpointer = Checkpointer(checkpoint.checkpoint_dir(run_dir), cfg.checkpoint.keep_last,
                                keep_steps)
    resuming = bool(checkpointer.steps())
    if resuming:
        check_resumable(load_config(saved_cfg_path), cfg)
    parent_dir = paths.join(cfg.run.parent) if cfg.run.parent else None  # normalised
    if parent_dir is not None and not resuming:
        check_resumable(load_config(paths.join(parent_dir, "config.yaml")), cfg, BRANCH_CHANGES,
                        what=f"the parent run {parent_dir}")

    stream = labdata.TrainStream(dataset, cfg.train.seq_len, cfg.train.batch_size, cfg.run.seed)
    batches = stream.iterator(0)
    state = None
    if resuming:
        target = abstract_with_shardings(jax.eval_shape(trainer.init_fn),
                                         trainer.state_shardings)
        restored = checkpointer.restore(target, batches)
        if restored is not None:
            step, state = restored
            if step > cfg.train.steps:
                raise UserError(f"the run is at step {step}, beyond train.steps="
                                f"{cfg.train.steps}; raise train.steps or use another run.dir")
    elif parent_dir is not None:
        target = abstract_with_shardings(jax.eval_shape(trainer.init_fn),
                                         trainer.state_shardings)
        parent_ckpt = Checkpointer(checkpoint.checkpoint_dir(parent_dir), read_only=True)
        step, state = parent_ckpt.restore(target, batches, step=cfg.run.parent_step)
        parent_ckpt.close()
    is_main = jax.process_index() == 0
    if is_main:
        paths.makedirs(run_dir)
        paths.write_text(saved_cfg_path, dump_config(cfg))
        if state is None:
            paths.remove(paths.join(run_dir, "metrics.jsonl"))
        else:
            _truncate_metrics(run_dir, step)
        where = "starting"
        if resuming and state is not None:
            where = f"resuming at step {step}"
        elif state is not None:
            where = f"branching from {parent_dir} at step {step}"
        print(f"run {run_dir} ({where}): mesh {dict(mesh.shape)}, {counts['params']:,} "
              f"parameters, data {data_path}")
        print(memory_line)
        if cfg.optim.name == "muon":
            print(describe_routing(trainer.abstract_params))
    if state is None:
        state = trainer.init_state()

    summary = {
        "params": counts["params"],
        "non_embedding_params": counts["non_embedding_params"],
        "flops_per_token": flops_per_token(cfg.model, cfg.train.seq_len),
        "name": cfg.run.name or paths.name(run_dir),
        "data": str(data_path),
        "status": "running",
        "tokens": 0,
        "flops": 0,
        "final_eval_loss": None,
        **cfg.run.prediction(),  # a planned run's predicted loss (lab plan), for lab fit
    }
    if parent_dir is not None:
        summary.update(parent=parent_dir, branch_step=cfg.run.parent_step,
                       decay_steps=cfg.schedule.decay_steps,
                       decay_shape=cfg.schedule.decay_shape)
    if is_main:
        write_json_atomic(summary_path, summary)
    peak, peak_source = total_peak_flops(cfg.model.compute_dtype, cfg.run.peak_tflops)
    eval_data = [sharding.global_batch(b, mesh) for b in labdata.eval_batches(
        dataset, cfg.train.seq_len, cfg.train.batch_size, cfg.train.eval_batches)]
    logger = MetricsLogger(run_dir, enabled=is_main)
    try:
        result = run_loop(cfg, trainer, state, batches, eval_data, logger, checkpointer, peak,
                          summary["flops_per_token"], keep_steps, progress,
                          StepProfiler(default_dir=paths.join(run_dir, "profile")))
    except BaseException:
        if is_main:
            write_json_atomic(summary_path, {**summary, "status": "failed"})
        raise
    finally:
        logger.close()
        checkpointer.close()

    tokens = result.step * cfg.train.batch_size * cfg.train.seq_len
    own_tokens = (result.step - cfg.run.parent_step) * cfg.train.batch_size * cfg.train.seq_len
    summary.update(status=result.status, steps=result.step, tokens=tokens,
                   flops=summary["flops_per_token"] * tokens,
                   flops_spent=summary["flops_per_token"] * own_tokens,
                   final_eval_loss=result.eval_loss if result.status == "finished" else None,
                   peak_flops=peak, peak_source=peak_source,
                   checkpoint_seconds=round(result.checkpoint_seconds, 3),
                   train_seconds=round(result.train_seconds, 3))
    if is_main:
        write_json_atomic(summary_path, summary)
        if result.status == "finished":
            print(f"finished: final eval loss {result.eval_loss:.4f}, {tokens:,} tokens, "
                  f"{summary['flops']:.3g} FLOPs")
        elif result.message:
            print(("error: " if result.status == "diverged" else "") + result.message,
                  file=sys.stderr if result.status == "diverged" else sys.stdout)
    return summary
