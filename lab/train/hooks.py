"""What the training loop does besides stepping, as hooks registered with the steps they run at
(as in Levanter): `loop.add_hook(hook, every=N, at=steps, when=...)`.

A hook is one class: `__call__(info)` does its work on a `StepInfo`, the small context of one
call (the step, the state, the step's metrics, the stopwatch); what it measures stays in its
own attributes, and `report(result)` copies that into the loop's result when the loop ends.

The order rule: hooks run by phase, and within a phase in the order they were added.
- before_batch: preemption, checked before the step's batch is read, so a checkpoint saved
  then resumes at that very batch;
- before_step: profiling, just before the step is dispatched;
- after_step: evaluation, tasks, noise scale, logging and saving, so a logged record carries
  its evaluation and a checkpoint never gets ahead of the metrics it covers. A new hook that
  adds to the record is added before logging.

A hook that reads the state (`needs_state`: evaluation, tasks, saving) runs right after its
step, whose metrics are then fetched at once, so nothing is saved before its loss is known to
be finite. The others read only the metrics and run when they arrive, one step late
(lab.train.loop).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Container
from typing import Any, Literal, TypeVar

import jax
import numpy as np

from lab.accel.profiling import StepProfiler
from lab.optim.noise_scale import GRAD_SQ, TRACE
from lab.run.checkpoint import Checkpointer
from lab.run.metrics import MetricsLogger
from lab.run.preemption import PREEMPTION
from lab.run.rundir import Status
from lab.train.progress import Progress
from lab.train.step import Trainer


@dataclasses.dataclass
class LoopResult:
    state: dict
    status: Status  # finished | preempted | diverged
    step: int  # steps done
    eval_loss: float | None = None
    task_metrics: dict = dataclasses.field(default_factory=dict)  # the last evaluation's tasks
    message: str = ""
    last_checkpoint: int | None = None  # the newest step saved in this run directory
    # Wall time by activity: the steps (what tokens/s and MFU measure), the compilation of the
    # step, the evaluations (their compilation included) and the checkpoint saves.
    train_seconds: float = 0.0
    compile_seconds: float = 0.0
    eval_seconds: float = 0.0
    checkpoint_seconds: float = 0.0
    task_seconds: float = 0.0  # the downstream tasks' share of eval_seconds
    noise_scale: float | None = None  # the last smoothed gradient noise scale (tokens)


class Stopwatch:
    """Wall time by activity: each lap runs from the previous one to now and is counted as
    training or as something else (compiling, evaluating, saving)."""

    def __init__(self, clock: Callable[[], float]):
        self.clock = clock
        self.mark = clock()
        self.train_seconds = 0.0
        self.window = 0.0  # training time since the last logged step

    def train(self) -> None:
        now = self.clock()
        self.train_seconds += now - self.mark
        self.window += now - self.mark
        self.mark = now

    def other(self) -> float:
        """End a lap that was not training; its seconds."""
        now = self.clock()
        seconds, self.mark = now - self.mark, now
        return seconds

    def take_window(self) -> float:
        window, self.window = self.window, 0.0
        return window


@dataclasses.dataclass
class StepInfo:
    """A step as a hook sees it, one call's context: `step` steps are done (before a step: the
    steps so far). Hooks earlier in the order may add to `values` and set `eval_loss`."""

    step: int
    state: dict
    values: dict = dataclasses.field(default_factory=dict)  # its metrics, on the host
    eval_loss: float | None = None  # set by the evaluation hook
    stop: bool = False  # a hook before the step asks the loop to stop
    watch: Stopwatch | None = None  # the loop's time by activity (a hook ends its own lap)


class Hook:
    """Something the loop does at the steps it was registered for (loop.add_hook). A hook's
    state is its own attributes; `report` puts what it measured into the loop's result."""

    needs_state: bool = False  # must run right after its step, while the state is current

    def __call__(self, info: StepInfo) -> None:
        raise NotImplementedError

    def report(self, result: LoopResult) -> None:
        """Copy what this hook measured into the result (once, when the loop ends)."""


@dataclasses.dataclass(frozen=True)
class Steps:
    """The steps a hook runs at: every `every` steps (0 = none) and the steps in `at`
    (anything `in` works on: a set, or another Steps)."""

    every: int = 0
    at: Container[int] = ()

    def __contains__(self, step: object) -> bool:
        return (self.every > 0 and step % self.every == 0) or step in self.at


When = Literal["before_batch", "before_step", "after_step"]
HookT = TypeVar("HookT", bound=Hook)


class Hooks:
    """A loop's hooks by phase, each with its steps; within a phase, in the order added."""

    def __init__(self):
        self.phases: dict[str, list[tuple[Hook, Steps]]] = {
            "before_batch": [], "before_step": [], "after_step": []}

    def add(self, hook: HookT, every: int = 0, at: Container[int] = (),
            when: When = "after_step") -> HookT:
        self.phases[when].append((hook, Steps(every, at)))
        return hook

    def run(self, when: When, info: StepInfo) -> None:
        for hook, steps in self.phases[when]:
            if info.step in steps:
                hook(info)

    def need_state(self, step: int) -> bool:
        """Whether a hook due after step `step` reads the state."""
        return any(hook.needs_state and step in steps for hook, steps in self.phases["after_step"])

    def report(self, result: LoopResult) -> None:
        for hooks in self.phases.values():
            for hook, _ in hooks:
                hook.report(result)


def evaluate(trainer: Trainer, params: dict, batches: list[jax.Array]) -> float:
    losses = [trainer.eval_step(params, b) for b in batches]
    return float(np.mean(jax.device_get(losses)))


class PreemptionHook(Hook):
    """SIGTERM / SIGINT (lab.run.preemption) stop the run; with several processes, JAX's preemption
    sync point, so that every host stops at the same step. Every step, before its batch."""

    def __init__(self):
        self.multi = jax.process_count() > 1

    def __call__(self, info: StepInfo) -> None:
        if self.multi:
            from jax.experimental import multihost_utils

            info.stop = multihost_utils.reached_preemption_sync_point(info.step)
        else:
            info.stop = PREEMPTION.requested


class ProfileHook(Hook):
    """A jax.profiler trace of the steps lab.accel.profiling's environment variables ask for."""

    def __init__(self, profiler: StepProfiler):
        self.profiler = profiler

    def __call__(self, info: StepInfo) -> None:
        self.profiler.step(info.step, wait_for=info.state)


class EvalHook(Hook):
    """The evaluation loss (train.eval_every steps and the last step)."""

    needs_state = True

    def __init__(self, trainer: Trainer, eval_data: list[jax.Array]):
        self.trainer, self.eval_data = trainer, eval_data
        self.loss: float | None = None
        self.seconds = 0.0

    def measure(self, params: dict) -> float:
        self.loss = evaluate(self.trainer, params, self.eval_data)
        return self.loss

    def __call__(self, info: StepInfo) -> None:
        info.eval_loss = self.measure(info.state["params"])
        self.seconds += info.watch.other()

    def report(self, result: LoopResult) -> None:
        result.eval_loss = self.loss
        result.eval_seconds += self.seconds


class NoiseScaleHook(Hook):
    """The gradient noise scale (lab.optim.noise_scale), measured by the trainer's noise step every
    train.noise_scale_every steps and smoothed in the train state (so a resumed run goes on as
    an uninterrupted one): each measurement's two estimates are taken out of the metrics, and
    every record from the first measurement on carries the smoothed B_simple as `noise_scale`
    (tokens). Runs at every step, before logging."""

    def __init__(self, measure_every: int):
        self.measure_every = measure_every
        self.value: float | None = None

    def measures(self, step: int) -> bool:
        """Whether the step that makes `step` steps done is a measuring one."""
        return step % self.measure_every == 0

    def __call__(self, info: StepInfo) -> None:
        for raw in (GRAD_SQ, TRACE):  # one measurement's estimates: in the averages now
            info.values.pop(raw, None)
        value = info.values.pop("noise_scale", None)
        if value is not None and math.isfinite(value):  # NaN: nothing measured yet
            info.values["noise_scale"] = self.value = value

    def report(self, result: LoopResult) -> None:
        result.noise_scale = self.value


class LogHook(Hook):
    """A step's metrics with its throughput (training time only, since the last logged step) to
    the metrics log and the display (train.log_every steps and every evaluation)."""

    def __init__(self, logger: MetricsLogger, progress: Progress, start: int,
                 tokens_per_step: int, flops_per_tok: int, peak_flops: float):
        self.logger, self.progress, self.last_logged = logger, progress, start
        self.tokens_per_step, self.flops_per_tok = tokens_per_step, flops_per_tok
        self.peak_flops = peak_flops

    def __call__(self, info: StepInfo) -> None:
        values, step = info.values, info.step
        per_step = info.watch.take_window() / max(step - self.last_logged, 1)
        self.last_logged = step
        values["tokens"] = step * self.tokens_per_step
        values["tokens_per_second"] = self.tokens_per_step / per_step if per_step > 0 else 0.0
        if self.peak_flops:
            values["mfu"] = values["tokens_per_second"] * self.flops_per_tok / self.peak_flops
        if info.eval_loss is not None:
            values["eval_loss"] = info.eval_loss
        self.logger.log(step, values)
        self.progress.show(step, values, per_step)


class SaveHook(Hook):
    """A checkpoint (checkpoint.every_steps steps, every kept step and the last step).
    `last_checkpoint` starts at the checkpoint the run was restored from, if any."""

    needs_state = True

    def __init__(self, checkpointer: Checkpointer | None, batches: Any, logger: MetricsLogger,
                 clock: Callable[[], float], last_checkpoint: int | None):
        self.checkpointer, self.batches, self.logger, self.clock = (checkpointer, batches, logger,
                                                                    clock)
        self.last_checkpoint = last_checkpoint
        self.seconds = 0.0

    def __call__(self, info: StepInfo) -> None:
        self.save(info.step, info.state)

    def save(self, step: int, state: dict) -> None:
        self.logger.flush()  # a remote log must not fall behind the checkpoint that covers it
        if self.checkpointer is None:
            return
        t = self.clock()
        self.checkpointer.save(step, state, self.batches)
        self.last_checkpoint = step
        self.seconds += self.clock() - t

    def report(self, result: LoopResult) -> None:
        result.last_checkpoint = self.last_checkpoint
        result.checkpoint_seconds += self.seconds
