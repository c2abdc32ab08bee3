"""The training loop: dispatch a step, then look at the one before it.

Each step is dispatched before the previous step's metrics are fetched (MetricsFetcher), so
logging never stalls the device. A non-finite loss or gradient, or a loss spike, stops the run
before anything after it is saved. Everything else the loop does is a hook (lab.train.hooks).
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable, Container, Iterator

import jax
import numpy as np

from lab.accel import sharding
from lab.accel.profiling import StepProfiler
from lab.config import Config
from lab.run.checkpoint import Checkpointer
from lab.run.metrics import MetricsLogger
from lab.run.rundir import Status
from lab.train.hooks import (
    EvalHook,
    Hooks,
    HookT,
    LogHook,
    LoopResult,
    NoiseScaleHook,
    PreemptionHook,
    ProfileHook,
    SaveHook,
    StepInfo,
    Steps,
    Stopwatch,
    When,
)
from lab.train.progress import Progress, progress_call
from lab.train.step import Trainer
from lab.train.tasks import TaskEval, TaskHook


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

    def problem(self, step: int, values: dict) -> str | None:
        """Why step `step` diverged, or None: a non-finite loss or gradient, or a spike."""
        for key in ("loss", "grad_norm"):
            if not math.isfinite(values[key]):
                return f"the {key} is {values[key]} at step {step}"
        median = self.spike(values["loss"])
        if median is None:
            return None
        return (f"the loss jumped to {values['loss']:.4g} at step {step}, over "
                f"{self.factor:g} times the median {median:.4g} of the steps before it "
                "(train.spike_factor; 0 turns this check off)")


class MetricsFetcher:
    """The newest step's metrics stay on the device until the step after it is dispatched:
    `push` hands in a step's metrics and returns the previous step's, fetched to the host now
    that fetching them no longer stalls the queue."""

    def __init__(self):
        self.pending: tuple[int, dict] | None = None

    def push(self, step: int, metrics: dict) -> StepInfo | None:
        previous = self.fetch()
        self.pending = (step, metrics)
        return previous

    def fetch(self) -> StepInfo | None:
        """The pending step's metrics on the host (waiting for the step), if one is pending."""
        if self.pending is None:
            return None
        (step, metrics), self.pending = self.pending, None
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        return StepInfo(step, {}, values)


class Loop:
    """One call of run_loop: the step, and the hooks registered around it (lab.train.hooks)."""

    def __init__(self, cfg: Config, trainer: Trainer, state: dict, batches: Iterator,
                 eval_data: list[jax.Array], logger: MetricsLogger,
                 checkpointer: Checkpointer | None, peak_flops: float, flops_per_tok: int,
                 keep_steps: tuple[int, ...], progress: Progress | None,
                 profiler: StepProfiler | None, last_checkpoint: int | None,
                 clock: Callable[[], float], tasks: TaskEval | None = None):
        tcfg = cfg.train
        self.trainer, self.batches, self.logger, self.total = trainer, batches, logger, tcfg.steps
        if progress is None:
            progress = Progress(tcfg.steps, enabled=jax.process_index() == 0)
        self.progress = progress
        self.start = int(jax.device_get(state["step"]))
        self.result = LoopResult(state, Status.FINISHED, self.start)
        self.watch, self.fetcher = Stopwatch(clock), MetricsFetcher()
        self.spikes = SpikeWatch(tcfg.spike_factor, tcfg.spike_window)
        self.compiled: dict[str, Callable] = {}
        self.checkpointer, self.profiler, self.clock = checkpointer, profiler, clock
        self.hooks = Hooks()
        # The order of each phase is the order of these lines (lab.train.hooks).
        self.add_hook(PreemptionHook(), every=1, when="before_batch")
        if profiler is not None:
            self.add_hook(ProfileHook(profiler), every=1, when="before_step")
        evaluations = Steps(tcfg.eval_every, {tcfg.steps})
        self.evaluation = self.add_hook(EvalHook(trainer, eval_data), at=evaluations)
        self.tasks = self.add_hook(TaskHook(tasks), at=evaluations) if tasks else None
        self.noise = None  # train.noise_scale_every: a second step measures on its steps
        if getattr(trainer, "noise_step", None) is not None:
            self.noise = self.add_hook(NoiseScaleHook(tcfg.noise_scale_every),
                                       every=1)
        # A record carries its step's evaluation, tasks and noise scale.
        self.add_hook(LogHook(logger, self.progress, self.start, tcfg.batch_size * tcfg.seq_len,
                              flops_per_tok, peak_flops), every=tcfg.log_every, at=evaluations)
        self.save = self.add_hook(SaveHook(checkpointer, batches, logger, clock, last_checkpoint),
                                  every=cfg.checkpoint.every_steps, at={*keep_steps, tcfg.steps})

    def add_hook(self, hook: HookT, every: int = 0, at: Container[int] = (),
                 when: When = "after_step") -> HookT:
        """Run `hook` every `every` steps (0 = none) and at the steps in `at`, in phase `when`,
        after the hooks added before it; returns the hook."""
        return self.hooks.add(hook, every, at, when)

    def run(self) -> LoopResult:
        """Train from the state's step to train.steps."""
        result = self.result
        try:
            with jax.set_mesh(self.trainer.mesh):
                for step in range(self.start, self.total):
                    before = StepInfo(step, result.state, watch=self.watch)
                    self.hooks.run("before_batch", before)
                    if before.stop:
                        self.preempted(step)
                        break
                    tokens = sharding.global_batch(next(self.batches), self.trainer.mesh)
                    step_fn = self.step_function(step, tokens)
                    self.hooks.run("before_step", before)
                    result.state, metrics = step_fn(result.state, tokens)
                    result.step = step + 1
                    late = self.fetcher.push(step + 1, metrics)  # the step before this one
                    if late is not None and not self.after_step(late):
                        break
                    if self.hooks.need_state(step + 1):
                        if not self.after_step(self.fetcher.fetch()):
                            break
                        self.watch.other()  # evaluating and saving are not training
            if result.status == Status.FINISHED and (late := self.fetcher.fetch()) is not None:
                self.after_step(late)
            if self.start >= self.total and self.evaluation.loss is None:  # restored at the end
                self.final_evaluation()
        finally:
            self.close()
        return result

    def final_evaluation(self) -> None:
        params = self.result.state["params"]
        self.evaluation.measure(params)
        if self.tasks is not None:
            self.tasks.measure(params)

    def after_step(self, info: StepInfo) -> bool:
        """Check a fetched step and run the hooks due at it; False if it diverged."""
        problem = self.spikes.problem(info.step, info.values)
        if problem is not None:
            self.diverged(info, problem)
            return False
        self.watch.train()  # the step ends here
        info.state, info.watch = self.result.state, self.watch
        self.hooks.run("after_step", info)
        return True

    def step_function(self, step: int, tokens: jax.Array) -> Callable:
        """The compiled step that runs step `step`: the one that also measures the noise scale
        where that is due, else the plain one (compiled once each, when first needed)."""
        name = "noise" if self.noise is not None and self.noise.measures(step + 1) else "train"
        if name not in self.compiled:
            jitted = self.trainer.noise_step if name == "noise" else self.trainer.train_step
            self.compiled[name] = self.compile(tokens, jitted)
        return self.compiled[name]

    def compile(self, tokens: jax.Array, jitted: Callable) -> Callable:
        self.watch.train()  # the batch so far
        progress_call(self.progress, "compiling")
        step_fn = jitted.lower(self.result.state, tokens).compile()
        seconds = self.watch.other()
        self.result.compile_seconds += seconds
        progress_call(self.progress, "compiled", seconds)
        return step_fn

    def preempted(self, step: int) -> None:
        """Log the pending step, save a checkpoint at `step` and stop."""
        late = self.fetcher.fetch()
        if late is not None and not self.after_step(late):
            return
        self.result.status, self.result.step = Status.PREEMPTED, step
        if step > self.start:
            self.save.save(step, self.result.state)
            self.result.message = (f"preempted: checkpoint saved at step {step}; run the same "
                                   "command again to continue")
        else:  # nothing trained: what is on disk (or the start) is this state
            self.result.message = (f"preempted at step {step} before training; run the same "
                                   "command again to continue")

    def diverged(self, info: StepInfo, problem: str) -> None:
        result = self.result
        result.status, result.step = Status.DIVERGED, info.step - 1
        last = self.save.last_checkpoint
        kept = (f"its last checkpoint (step {last}) is intact" if last is not None
                else "no checkpoint was saved before it")
        result.message = (f"{problem}; the run stopped (status '{Status.DIVERGED}') and {kept}. "
                          "Lower optim.lr or raise schedule.warmup_steps")
        self.logger.log(info.step, info.values)

    def close(self) -> None:
        self.result.train_seconds = self.watch.train_seconds
        self.hooks.report(self.result)
        progress_call(self.progress, "close")
        if self.profiler is not None:
            self.profiler.stop(wait_for=self.result.state)
        if self.checkpointer is not None:
            t = self.clock()
            self.checkpointer.wait()
            self.result.checkpoint_seconds += self.clock() - t


def run_loop(cfg: Config, trainer: Trainer, state: dict, batches: Iterator[np.ndarray],
             eval_data: list[jax.Array], logger: MetricsLogger,
             checkpointer: Checkpointer | None, peak_flops: float,
             flops_per_tok: int, keep_steps: tuple[int, ...] = (),
             progress: Progress | None = None,
             profiler: StepProfiler | None = None,
             last_checkpoint: int | None = None,
             clock: Callable[[], float] = time.perf_counter,
             tasks: TaskEval | None = None) -> LoopResult:
    """Train from state["step"] to cfg.train.steps.

    Each step is dispatched before the previous step's metrics are fetched. Checkpoints are
    saved at checkpoint.every_steps, at every kept step and at the end; a non-finite loss or
    gradient, or a loss spike, stops the run before anything after it is saved. SIGTERM or
    SIGINT (lab.run.preemption) saves a checkpoint at the next step boundary and stops.

    `last_checkpoint` is the step of the checkpoint the run was restored from, if any; `clock`
    measures the time by activity (tests pass a fake one); `tasks` scores the downstream tasks
    at every evaluation (lab.train.tasks).
    """
    return Loop(cfg, trainer, state, batches, eval_data, logger, checkpointer, peak_flops,
                flops_per_tok, keep_steps, progress, profiler, last_checkpoint, clock,
                tasks).run()
