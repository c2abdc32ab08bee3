"""A run: `lab train CONFIG [key=value ...]`. Every check before the run directory is touched
(prepare), then the directory, the loop and the summary (train).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from typing import Any

import jax

from lab import paths
from lab.accel import sharding
from lab.accel.mfu import total_peak_flops
from lab.accel.profiling import StepProfiler
from lab.config import Config, dump_config, load_config, to_dict, validate
from lab.data.tasks import final_task_metrics, load_or_build, task_specs
from lab.errors import UserError, shown
from lab.model.accounting import flops_per_token, param_counts
from lab.model.memory import preflight
from lab.optim import noise_scale
from lab.optim.optimizers import describe_routing
from lab.run import checkpoint, preemption, rundir
from lab.run.branch_points import check_branch_points, planned_pairs, planned_steps
from lab.run.checkpoint import Checkpointer, abstract_with_shardings
from lab.run.metrics import MetricsLogger, read_metrics
from lab.run.rundir import Status, Summary
from lab.train.hooks import LoopResult
from lab.train.loop import run_loop
from lab.train.progress import Progress
from lab.train.step import Trainer, build_trainer
from lab.train.tasks import TaskEval, task_eval

# Keys a resumed run may change; anything else would make it a different run.
RESUMABLE_CHANGES = ("run.dir", "run.name", "run.peak_tflops", "train.steps", "train.log_every",
                     "train.eval_every", "train.eval_batches", "train.spike_", "mesh.", "eval.",
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
                f"{key} is {shown(new.get(key))} but {what} was started with "
                f"{shown(old.get(key))}; "
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
    tasks: TaskEval | None = None  # the downstream tasks (eval.tasks), if any


def prepare(cfg: Config) -> Setup:
    """Every check and every read a run needs, before anything in its directory is written:
    the data, the plan, the config against a resumed run's or the parent's, the mesh, the
    batch, the evaluation set and the state to start from."""
    from lab import data as labdata
    from lab.model.accounting import with_vocab

    run_dir = cfg.run.dir
    data_path = cfg.data.path or labdata.default_data_path()
    dataset = labdata.open_dataset(data_path)
    cfg = dataclasses.replace(cfg, model=with_vocab(cfg.model, dataset.vocab_size))
    labdata.check_vocab(dataset, cfg.model.vocab_size)
    counts = param_counts(cfg.model)
    branch_points = planned_steps(cfg, counts["params"])
    check_branch_points(cfg, planned_pairs(cfg, counts["params"]), branch_points)
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
        # Checkpoints written before the noise scale's averages were part of the state.
        fresh = ({"noise": jax.jit(noise_scale.initial_averages,
                                   out_shardings=trainer.state_shardings["noise"])}
                 if "noise" in target else None)
        if resuming:
            restored = reader.restore(target, batches, fresh=fresh)
            if restored is not None:
                (step, state), restored_own = restored, True
                if step > cfg.train.steps:
                    raise UserError(f"the run is at step {step}, beyond train.steps="
                                    f"{cfg.train.steps}; raise train.steps or use another "
                                    "run.dir")
        elif parent_dir is not None:
            parent_ckpt = Checkpointer(checkpoint.checkpoint_dir(parent_dir), read_only=True)
            try:
                step, state = parent_ckpt.restore(target, batches, step=cfg.run.parent_step,
                                                  fresh=fresh)
            finally:
                parent_ckpt.close()
        if state is None:
            state = trainer.init_state()
        unreadable = set(reader.unreadable) if reader is not None else set()
    finally:
        if reader is not None:
            reader.close()
    # Last, so that no refused run leaves task files beside the data.
    task_sets = [load_or_build(dataset, spec) for spec in task_specs(cfg.eval)]
    return Setup(cfg, str(data_path), counts, keep_steps, mesh, trainer, batches, eval_data,
                 state, step, resuming, restored_own, parent_dir, unreadable, memory_line,
                 task_eval(trainer, task_sets) if task_sets else None)


def train(cfg: Config, progress: Progress | None = None) -> dict:
    """`lab train`: check everything, then prepare the run directory, resume if a checkpoint
    exists, train, and write the summary. Returns the summary.

    Nothing in an existing run directory changes before every check has passed, and one process
    at a time uses a run directory (lab.run.rundir.RunLock). SIGTERM / SIGINT from here to the last
    save stop the run cleanly (lab.run.preemption).

    `progress` replaces the default display: anything with
    `show(step, metrics, seconds_per_step)` (the demo shows one live line for a whole study).
    """
    validate(cfg)  # a config made in code (dataclasses.replace) is held to a file's rules
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
        if is_main:
            _open_run_dir(setup)
        summary = _first_summary(setup)
        result, peak = _train_logged(setup, summary, progress, is_main)
        return _finish(setup, summary, result, peak, is_main).to_dict()


def _open_run_dir(setup: Setup) -> None:
    """Write the resolved config, drop a resumed run's records past its checkpoint (or a fresh
    run's old ones), and say what the run is."""
    cfg, run_dir, step = setup.cfg, setup.cfg.run.dir, setup.step
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
        where = f"branching from {setup.parent_dir} at step {step}"
    print(f"run {run_dir} ({where}): mesh {dict(setup.mesh.shape)}, "
          f"{_describe_params(setup.counts)}, data {setup.data_path}")
    print(setup.memory_line)
    if cfg.optim.name == "muon":
        print(describe_routing(setup.trainer.abstract_params, setup.trainer.param_specs))


def _describe_params(counts: dict) -> str:
    if counts["active_params"] == counts["params"]:
        return f"{counts['params']:,} parameters"
    return f"{counts['params']:,} parameters ({counts['active_params']:,} active)"


def _first_summary(setup: Setup) -> Summary:
    """The summary of a run that has just started."""
    cfg = setup.cfg
    summary = Summary(
        params=setup.counts["params"],
        non_embedding_params=setup.counts["non_embedding_params"],
        total_params=setup.counts["total_params"],
        active_params=setup.counts["active_params"],
        flops_per_token=flops_per_token(cfg.model, cfg.train.seq_len),
        name=cfg.run.name or paths.name(cfg.run.dir),
        data=setup.data_path,
        status=Status.RUNNING,
        tokens=0,
        flops=0,
        **cfg.run.prediction(),  # a planned run's predicted loss (lab plan), for lab fit
    )
    if setup.parent_dir is None:
        return summary
    return dataclasses.replace(
        summary, parent=setup.parent_dir, branch_step=cfg.run.parent_step,
        decay_steps=cfg.schedule.decay_steps, decay_shape=cfg.schedule.decay_shape)


def _train_logged(setup: Setup, summary: Summary, progress: Progress | None,
                  is_main: bool) -> tuple[LoopResult, tuple[float, str]]:
    """The loop with its logger and checkpointer; an exception leaves the status 'failed'.
    Returns the loop's result and the peak FLOP/s (and where that number came from)."""
    cfg, run_dir = setup.cfg, setup.cfg.run.dir
    peak = total_peak_flops(cfg.model.compute_dtype, cfg.run.peak_tflops)
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
        result = run_loop(cfg, setup.trainer, setup.state, setup.batches, setup.eval_data,
                          logger, checkpointer, peak[0], summary.flops_per_token,
                          setup.keep_steps, progress,
                          StepProfiler(default_dir=paths.join(run_dir, rundir.PROFILE)),
                          last_checkpoint=setup.step if setup.restored_own else None,
                          tasks=setup.tasks)
    except BaseException:
        if is_main:
            with contextlib.suppress(OSError):  # a full disk may refuse this too
                rundir.write_summary(run_dir, dataclasses.replace(summary, status=Status.FAILED))
        raise
    finally:
        if logger is not None:
            logger.close()
        if checkpointer is not None:
            checkpointer.close()
    return result, peak


def _finish(setup: Setup, summary: Summary, result: LoopResult, peak: tuple[float, str],
            is_main: bool) -> Summary:
    """The summary of the run the loop ended, written and told."""
    cfg = setup.cfg
    tokens = result.step * cfg.train.batch_size * cfg.train.seq_len
    own_tokens = (result.step - cfg.run.parent_step) * cfg.train.batch_size * cfg.train.seq_len
    finished = result.status == Status.FINISHED
    summary = dataclasses.replace(
        summary, status=result.status, steps=result.step, tokens=tokens,
        flops=summary.flops_per_token * tokens, flops_spent=summary.flops_per_token * own_tokens,
        final_eval_loss=result.eval_loss if finished else None,
        peak_flops=peak[0], peak_source=peak[1],
        train_seconds=round(result.train_seconds, 3),
        compile_seconds=round(result.compile_seconds, 3),
        eval_seconds=round(result.eval_seconds, 3),
        checkpoint_seconds=round(result.checkpoint_seconds, 3), noise_scale=result.noise_scale)
    if finished and setup.tasks is not None:  # final values, by the metrics' names
        summary = dataclasses.replace(summary, extra={
            **summary.extra, **final_task_metrics(setup.tasks.task_sets, result.task_metrics),
            "task_seconds": round(result.task_seconds, 3)})
    if is_main:
        rundir.write_summary(cfg.run.dir, summary)
        diverged = result.status == Status.DIVERGED
        if finished:
            tasks = "".join(f", {key.split('/')[1]} accuracy {value:.3f}"
                            for key, value in result.task_metrics.items()
                            if key.endswith("/accuracy"))
            print(f"{Status.FINISHED}: final eval loss {result.eval_loss:.4f}, {tokens:,} tokens, "
                  f"{summary.flops:.3g} FLOPs{tasks}")
        elif result.message:
            print(("error: " if diverged else "") + result.message,
                  file=sys.stderr if diverged else sys.stdout)
    return summary
