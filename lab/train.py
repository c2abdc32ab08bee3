"""The training step and loop: `lab train CONFIG [key=value ...]`.

The state is a plain pytree {"params", "opt", "step"} sharded by `lab.sharding`; the step is
jitted once with explicit input and output shardings and donates the old state. Each step is
dispatched before the previous step's metrics are fetched, so logging never stalls the device.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lab import checkpoint, paths, preemption, rundir, sharding
from lab.branch_plan import check_plan, planned_pairs, planned_steps
from lab.checkpoint import Checkpointer, abstract_with_shardings
from lab.config import Config, dump_config, load_config, to_dict
from lab.errors import UserError
from lab.memory import preflight
from lab.metrics import MetricsLogger, read_metrics
from lab.mfu import total_peak_flops
from lab.model import Transformer, flops_per_token, loss_fn, mup_lr_scales, param_counts
from lab.optim import build_optimizer, describe_routing, lr_schedule, param_labels
from lab.preemption import PREEMPTION
from lab.profiling import StepProfiler
from lab.rundir import Status, Summary
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
            "lr": schedule(state["step"]),
            "grad_norm": optax.tree.norm(grads),
            "update_norm": optax.tree.norm(updates),
            "param_norm": optax.tree.norm(new_params),
        }
        if mcfg.z_loss:  # otherwise the cross-entropy is the loss
            metrics["ce"] = ce
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


# ----------------------------------------------------------------------------- the console


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """What a run shows while it trains. On a terminal, one live line (a tqdm bar) with the
    smoothed loss, tokens/s, MFU and the time left, evaluations printed above it; otherwise
    (a log file, a pipe) one plain line per logged step. The time left counts training steps
    only: the compilation and the evaluations are left out."""

    SMOOTHING = 0.1  # weight of the newest logged loss in the smoothed loss

    def __init__(self, total_steps: int, enabled: bool, stream: TextIO | None = None,
                 live: bool | None = None):
        self.total = total_steps
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.live = enabled and (self.stream.isatty() if live is None else live)
        self.bar: Any = None
        self.smoothed: float | None = None

    def compiling(self) -> None:
        if self.enabled:
            print("compiling the training step…", end="", file=self.stream, flush=True)

    def compiled(self, seconds: float) -> None:
        if self.enabled:
            print(f" {seconds:.1f} s", file=self.stream, flush=True)

    def show(self, step: int, metrics: dict, seconds_per_step: float) -> None:
        if not self.enabled:
            return
        loss = metrics["loss"]
        self.smoothed = loss if self.smoothed is None else (
            (1 - self.SMOOTHING) * self.smoothed + self.SMOOTHING * loss)
        eta = _format_eta((self.total - step) * seconds_per_step)
        mfu = f" | MFU {metrics['mfu']:.1%}" if metrics.get("mfu") else ""
        speed = f"{metrics['tokens_per_second']:,.0f} tok/s{mfu}"
        if not self.live:
            extra = f" | eval {metrics['eval_loss']:.4f}" if "eval_loss" in metrics else ""
            print(f"step {step:>6}/{self.total} | loss {loss:.4f}{extra} | "
                  f"lr {metrics['lr']:.2e} | {speed} | ETA {eta}", file=self.stream, flush=True)
            return
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=self.total, initial=step, file=self.stream, dynamic_ncols=True,
                            bar_format="{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} {postfix}")
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix_str(f"loss {self.smoothed:.4f} | lr {metrics['lr']:.2e} | {speed}"
                                 f" | ETA {eta}")
        if "eval_loss" in metrics:
            self.bar.write(f"step {step:>6}/{self.total} | loss {loss:.4f} | eval "
                           f"{metrics['eval_loss']:.4f}", file=self.stream)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ----------------------------------------------------------------------------- the loop


def evaluate(trainer: Trainer, params: dict, batches: list[jax.Array]) -> float:
    losses = [trainer.eval_step(params, b) for b in batches]
    return float(np.mean(jax.device_get(losses)))


@dataclasses.dataclass
class LoopResult:
    state: dict
    status: Status  # finished | preempted | diverged
    step: int  # steps done
    eval_loss: float | None = None
    message: str = ""
    last_checkpoint: int | None = None  # the newest step saved in this run directory
    # Wall time by activity: the steps (what tokens/s and MFU measure), the compilation of the
    # step, the evaluations (their compilation included) and the checkpoint saves.
    train_seconds: float = 0.0
    compile_seconds: float = 0.0
    eval_seconds: float = 0.0
    checkpoint_seconds: float = 0.0


class SpikeWatch:
    """Stops a run whose loss jumps well above its recent range: above `factor` times the
    median of the last `window` losses (once at least MIN_HISTORY are known). A normal run's
    loss falls or wobbles by a few percent; twice the recent median is a divergence."""

    MIN_HISTORY = 10

    def __init__(self, factor: float, window: int):
        self.factor = factor
        self.recent: collections.deque[float] = collections.deque(maxlen=max(window, 1))

    def spike(self, loss: float) -> float | None:
        """The recent median if `loss` is a spike over it, else None (and `loss` is kept)."""
        if self.factor > 0 and len(self.recent) >= min(self.MIN_HISTORY, self.recent.maxlen):
            median = float(np.median(self.recent))
            if loss > self.factor * median:
                return median
        self.recent.append(loss)
        return None


def run_loop(cfg: Config, trainer: Trainer, state: dict, batches: Iterator[np.ndarray],
             eval_data: list[jax.Array], logger: MetricsLogger,
             checkpointer: Checkpointer | None, peak_flops: float,
             flops_per_tok: int, keep_steps: tuple[int, ...] = (),
             progress: Progress | None = None,
             profiler: StepProfiler | None = None,
             last_checkpoint: int | None = None,
             clock: Callable[[], float] = time.perf_counter) -> LoopResult:
    """Train from state["step"] to cfg.train.steps.

    Each step is dispatched before the previous step's metrics are fetched. Checkpoints are
    saved at checkpoint.every_steps, at every kept step and at the end; a non-finite loss or
    gradient, or a loss spike, stops the run before anything after it is saved. SIGTERM or
    SIGINT (lab.preemption) saves a checkpoint at the next step boundary and stops.

    `last_checkpoint` is the step of the checkpoint the run was restored from, if any; `clock`
    measures the time by activity (tests pass a fake one).
    """
    tcfg, ccfg = cfg.train, cfg.checkpoint
    if progress is None:
        progress = Progress(tcfg.steps, enabled=jax.process_index() == 0)
    tokens_per_step = tcfg.batch_size * tcfg.seq_len
    start = int(jax.device_get(state["step"]))
    result = LoopResult(state, Status.FINISHED, start, last_checkpoint=last_checkpoint)
    multi = jax.process_count() > 1
    spikes = SpikeWatch(tcfg.spike_factor, tcfg.spike_window)
    unchecked: tuple[int, dict] | None = None  # a step whose metrics are not yet fetched
    step_fn: Callable | None = None  # the compiled step, made at the first step
    mark = clock()  # the start of the time not yet attributed
    window_seconds, last_logged = 0.0, start  # training time since the last logged step

    def train_lap() -> None:
        """The time since the mark was spent training."""
        nonlocal mark, window_seconds
        now = clock()
        result.train_seconds += now - mark
        window_seconds += now - mark
        mark = now

    def other_lap() -> float:
        """The time since the mark was spent on something else (returned)."""
        nonlocal mark
        now = clock()
        seconds, mark = now - mark, now
        return seconds

    def preempted(step: int) -> bool:
        if multi:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return PREEMPTION.requested

    def stop_diverged(done: int, values: dict, problem: str) -> None:
        result.status, result.step = Status.DIVERGED, done - 1
        saved = result.last_checkpoint
        kept = (f"its last checkpoint (step {saved}) is intact" if saved is not None
                else "no checkpoint was saved before it")
        result.message = (f"{problem}; the run stopped (status 'diverged') and {kept}. Lower "
                          "optim.lr or raise schedule.warmup_steps")
        logger.log(done, values)

    def fetch(done: int, metrics: dict) -> dict | None:
        """Host copy of a step's metrics; None (and the result marked diverged) if not finite
        or a loss spike."""
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        for key in ("loss", "grad_norm"):
            if not math.isfinite(values[key]):
                stop_diverged(done, values, f"the {key} is {values[key]} at step {done}")
                return None
        median = spikes.spike(values["loss"])
        if median is not None:
            stop_diverged(done, values, f"the loss jumped to {values['loss']:.4g} at step {done}, "
                          f"over {tcfg.spike_factor:g} times the median {median:.4g} of the "
                          "steps before it (train.spike_factor; 0 turns this check off)")
            return None
        return values

    def stamp(done: int, values: dict) -> None:
        """Add the step's throughput: training time only, since the last logged step."""
        nonlocal window_seconds, last_logged
        per_step = window_seconds / max(done - last_logged, 1)
        window_seconds, last_logged = 0.0, done
        values["tokens"] = done * tokens_per_step
        values["tokens_per_second"] = tokens_per_step / per_step if per_step > 0 else 0.0
        values["seconds_per_step"] = per_step
        if peak_flops:
            values["mfu"] = values["tokens_per_second"] * flops_per_tok / peak_flops

    def emit(done: int, values: dict) -> None:
        per_step = values.pop("seconds_per_step")
        logger.log(done, values)
        progress.show(done, values, per_step)

    def save(done: int) -> None:
        logger.flush()  # a remote log must not fall behind the checkpoint that covers it
        if checkpointer is None:
            return
        t = clock()
        checkpointer.save(done, result.state, batches)
        result.last_checkpoint = done
        result.checkpoint_seconds += clock() - t

    log_pending = False
    try:
        with jax.set_mesh(trainer.mesh):
            for step in range(start, tcfg.steps):
                if preempted(step):
                    if unchecked is not None:
                        values = fetch(*unchecked)
                        if values is None:
                            break
                        train_lap()
                        if log_pending:  # the pending step is logged, not lost
                            stamp(unchecked[0], values)
                            emit(unchecked[0], values)
                        unchecked = None
                    result.status, result.step = Status.PREEMPTED, step
                    if step > start:
                        save(step)
                        result.message = (f"preempted: checkpoint saved at step {step}; run the "
                                          "same command again to continue")
                    else:  # nothing trained: what is on disk (or the start) is this state
                        result.message = (f"preempted at step {step} before training; run the "
                                          "same command again to continue")
                    break
                tokens = sharding.global_batch(next(batches), trainer.mesh)
                if step_fn is None:
                    train_lap()  # the batch so far
                    progress_call(progress, "compiling")
                    step_fn = trainer.train_step.lower(result.state, tokens).compile()
                    result.compile_seconds = other_lap()
                    progress_call(progress, "compiled", result.compile_seconds)
                if profiler is not None:
                    profiler.step(step, wait_for=result.state)
                result.state, metrics = step_fn(result.state, tokens)
                done = step + 1
                if unchecked is not None:  # this step is already queued: fetching won't stall
                    values = fetch(*unchecked)
                    if values is None:
                        break
                    if log_pending:
                        train_lap()
                        stamp(unchecked[0], values)
                        emit(unchecked[0], values)
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
                    train_lap()  # the step ends here; evaluation and saving are not training
                    if eval_due or log_pending:
                        stamp(done, values)
                    if eval_due:
                        result.eval_loss = evaluate(trainer, result.state["params"], eval_data)
                        values["eval_loss"] = result.eval_loss
                        result.eval_seconds += other_lap()
                    if eval_due or log_pending:
                        emit(done, values)
                    if save_due:
                        save(done)
                    other_lap()
            if unchecked is not None and result.status == Status.FINISHED:
                values = fetch(*unchecked)
                if values is not None and log_pending:
                    train_lap()
                    stamp(unchecked[0], values)
                    emit(unchecked[0], values)
            if start >= tcfg.steps and result.eval_loss is None:  # restored at the very end
                result.eval_loss = evaluate(trainer, result.state["params"], eval_data)
    finally:
        progress_call(progress, "close")
        if profiler is not None:
            profiler.stop(wait_for=result.state)
        if checkpointer is not None:
            t = clock()
            checkpointer.wait()
            result.checkpoint_seconds += clock() - t
    return result


def progress_call(progress: Any, method: str, *args: Any) -> None:
    """Call an optional method of a progress display (a caller's own may have only show)."""
    fn = getattr(progress, method, None)
    if fn is not None:
        fn(*args)


# ----------------------------------------------------------------------------- the run


# Keys a resumed run may change; anything else would make it a different run.
RESUMABLE_CHANGES = ("run.dir", "run.name", "run.peak_tflops", "train.steps", "train.log_every",
                     "train.eval_every", "train.eval_batches", "train.spike_", "mesh.",
                     "checkpoint.", "branch.")
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


def _check_finished(run_dir: str, saved: Config, cfg: Config) -> None:
    """A finished run is done: a rerun may only differ in what would not change it."""
    if not cfg.model.vocab_size:  # resolved from the data when the run started
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(
            cfg.model, vocab_size=saved.model.vocab_size))
    if cfg.train.steps != saved.train.steps:
        raise UserError(f"train.steps is {cfg.train.steps} but the run in {run_dir} finished "
                        f"at {saved.train.steps} steps; use the same value, or another run.dir")
    check_resumable(saved, cfg, what=f"the finished run in {run_dir}")


def _truncate_metrics(run_dir: str, step: int) -> None:
    """Drop records after the restored step, so a resumed run's log reads as one run."""
    path = rundir.metrics_path(run_dir)
    if not paths.exists(path):
        return
    keep = [json.dumps(r) for r in read_metrics(run_dir) if r["step"] <= step]
    paths.write_text(path, "".join(line + "\n" for line in keep))


@dataclasses.dataclass
class Setup:
    """A run made ready without touching its directory: everything `train` checks first."""

    cfg: Config
    data_path: str
    counts: dict
    keep_steps: tuple[int, ...]
    mesh: jax.sharding.Mesh
    trainer: Trainer
    batches: Any
    eval_data: list[jax.Array]
    state: dict | None  # restored from the run's or the parent's checkpoint; None = fresh
    step: int | None  # the restored step
    resuming: bool
    restored_own: bool  # restored from this run directory's checkpoint
    parent_dir: str | None
    unreadable: set[int]  # this run's checkpoints that could not be read
    memory_line: str  # the memory estimate against the devices'


def prepare(cfg: Config) -> Setup:
    """Every check and every read a run needs, before anything in its directory is written:
    the data, the plan, the config against a resumed run's or the parent's, the mesh, the
    batch, the evaluation set and the state to start from."""
    from lab import data as labdata
    from lab.model import with_vocab

    run_dir = cfg.run.dir
    data_path = cfg.data.path or labdata.default_data_path()
    dataset = labdata.open_dataset(data_path)
    cfg = dataclasses.replace(cfg, model=with_vocab(cfg.model, dataset.vocab_size))
    labdata.check_vocab(dataset, cfg.model.vocab_size)
    counts = param_counts(cfg.model)
    branch_points = planned_steps(cfg, counts["params"])
    check_plan(cfg, planned_pairs(cfg, counts["params"]), branch_points)
    keep_steps = tuple(sorted(set(cfg.checkpoint.keep_steps) | set(branch_points)))

    ckpt_dir = checkpoint.checkpoint_dir(run_dir)
    reader = Checkpointer(ckpt_dir, read_only=True) if paths.is_dir(ckpt_dir) else None
    try:
        resuming = reader is not None and bool(reader.steps())
        if resuming:
            check_resumable(load_config(rundir.config_path(run_dir)), cfg)
        parent_dir = paths.join(cfg.run.parent) if cfg.run.parent else None  # normalised
        if parent_dir is not None and not resuming:
            check_resumable(load_config(rundir.config_path(parent_dir)), cfg,
                            BRANCH_CHANGES, what=f"the parent run {parent_dir}")

        mesh = sharding.make_mesh(cfg.mesh)
        trainer = build_trainer(cfg, mesh)
        memory_line = preflight(trainer)  # a run that cannot fit stops here
        stream = labdata.TrainStream(dataset, cfg.train.seq_len, cfg.train.batch_size,
                                     cfg.run.seed)
        eval_data = [sharding.global_batch(b, mesh) for b in labdata.eval_batches(
            dataset, cfg.train.seq_len, cfg.train.batch_size, cfg.train.eval_batches)]
        batches = stream.iterator(0)
        state, step, restored_own = None, None, False
        target = abstract_with_shardings(jax.eval_shape(trainer.init_fn),
                                         trainer.state_shardings)
        if resuming:
            restored = reader.restore(target, batches)
            if restored is not None:
                (step, state), restored_own = restored, True
                if step > cfg.train.steps:
                    raise UserError(f"the run is at step {step}, beyond train.steps="
                                    f"{cfg.train.steps}; raise train.steps or use another "
                                    "run.dir")
        elif parent_dir is not None:
            parent_ckpt = Checkpointer(checkpoint.checkpoint_dir(parent_dir), read_only=True)
            try:
                step, state = parent_ckpt.restore(target, batches, step=cfg.run.parent_step)
            finally:
                parent_ckpt.close()
        if state is None:
            state = trainer.init_state()
        unreadable = set(reader.unreadable) if reader is not None else set()
    finally:
        if reader is not None:
            reader.close()
    return Setup(cfg, str(data_path), counts, keep_steps, mesh, trainer, batches, eval_data,
                 state, step, resuming, restored_own, parent_dir, unreadable, memory_line)


def train(cfg: Config, progress: Progress | None = None) -> dict:
    """`lab train`: check everything, then prepare the run directory, resume if a checkpoint
    exists, train, and write the summary. Returns the summary.

    Nothing in an existing run directory changes before every check has passed, and one process
    at a time uses a run directory (lab.rundir.RunLock). SIGTERM / SIGINT from here to the last
    save stop the run cleanly (lab.preemption).

    `progress` replaces the default display: anything with
    `show(step, metrics, seconds_per_step)` (the demo shows one live line for a whole study).
    """
    run_dir = cfg.run.dir  # a local path or a URL (gs://): files go through lab.paths
    rundir.check_run_dir(run_dir)
    is_main = jax.process_index() == 0
    with preemption.caught(), rundir.RunLock(run_dir, enabled=is_main):
        existing = rundir.read_summary(run_dir)
        if existing and existing.finished:
            _check_finished(run_dir, load_config(rundir.config_path(run_dir)), cfg)
            print(f"{run_dir} is already finished (status '{Status.FINISHED}'); nothing to do. "
                  "Use another run.dir to train again.")
            return existing.to_dict()
        setup = prepare(cfg)
        return _run(setup, progress, is_main)


def _run(setup: Setup, progress: Progress | None, is_main: bool) -> dict:
    """The checked run: write its directory, train, write the summary."""
    cfg, run_dir = setup.cfg, setup.cfg.run.dir
    state, step, parent_dir = setup.state, setup.step, setup.parent_dir
    if is_main:
        paths.makedirs(run_dir)
        paths.write_text(rundir.config_path(run_dir), dump_config(cfg))
        if step is None:
            paths.remove(rundir.metrics_path(run_dir))
        else:
            _truncate_metrics(run_dir, step)
        where = "starting"
        if setup.restored_own:
            where = f"resuming at step {step}"
        elif step is not None:
            where = f"branching from {parent_dir} at step {step}"
        print(f"run {run_dir} ({where}): mesh {dict(setup.mesh.shape)}, "
              f"{setup.counts['params']:,} parameters, data {setup.data_path}")
        print(setup.memory_line)
        if cfg.optim.name == "muon":
            print(describe_routing(setup.trainer.abstract_params))

    summary = Summary(
        params=setup.counts["params"],
        non_embedding_params=setup.counts["non_embedding_params"],
        flops_per_token=flops_per_token(cfg.model, cfg.train.seq_len),
        name=cfg.run.name or paths.name(run_dir),
        data=setup.data_path,
        status=Status.RUNNING,
        tokens=0,
        flops=0,
        **cfg.run.prediction(),  # a planned run's predicted loss (lab plan), for lab fit
    )
    if parent_dir is not None:
        summary = dataclasses.replace(
            summary, parent=parent_dir, branch_step=cfg.run.parent_step,
            decay_steps=cfg.schedule.decay_steps, decay_shape=cfg.schedule.decay_shape)
    peak, peak_source = total_peak_flops(cfg.model.compute_dtype, cfg.run.peak_tflops)
    checkpointer = logger = None
    try:
        if is_main:
            rundir.write_summary(run_dir, summary)
        checkpointer = Checkpointer(checkpoint.checkpoint_dir(run_dir), cfg.checkpoint.keep_last,
                                    setup.keep_steps, unreadable=setup.unreadable)
        logger = MetricsLogger(run_dir, enabled=is_main)
        logger.write_config(dump_config(cfg), _flatten(to_dict(cfg)))
        if progress is None:
            progress = Progress(cfg.train.steps, enabled=is_main)
        result = run_loop(cfg, setup.trainer, state, setup.batches, setup.eval_data, logger,
                          checkpointer, peak, summary.flops_per_token, setup.keep_steps,
                          progress, StepProfiler(default_dir=paths.join(run_dir, "profile")),
                          last_checkpoint=step if setup.restored_own else None)
    except BaseException:
        if is_main:
            rundir.write_summary(run_dir, dataclasses.replace(summary, status=Status.FAILED))
        raise
    finally:
        if logger is not None:
            logger.close()
        if checkpointer is not None:
            checkpointer.close()

    tokens = result.step * cfg.train.batch_size * cfg.train.seq_len
    own_tokens = (result.step - cfg.run.parent_step) * cfg.train.batch_size * cfg.train.seq_len
    finished = result.status == Status.FINISHED
    summary = dataclasses.replace(
        summary, status=result.status, steps=result.step, tokens=tokens,
        flops=summary.flops_per_token * tokens, flops_spent=summary.flops_per_token * own_tokens,
        final_eval_loss=result.eval_loss if finished else None,
        peak_flops=peak, peak_source=peak_source,
        train_seconds=round(result.train_seconds, 3),
        compile_seconds=round(result.compile_seconds, 3),
        eval_seconds=round(result.eval_seconds, 3),
        checkpoint_seconds=round(result.checkpoint_seconds, 3))
    if is_main:
        rundir.write_summary(run_dir, summary)
        diverged = result.status == Status.DIVERGED
        if finished:
            print(f"{Status.FINISHED}: final eval loss {result.eval_loss:.4f}, {tokens:,} tokens, "
                  f"{summary.flops:.3g} FLOPs")
        elif result.message:
            print(("error: " if diverged else "") + result.message,
                  file=sys.stderr if diverged else sys.stdout)
    return summary.to_dict()
