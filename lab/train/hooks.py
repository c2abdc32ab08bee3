"""What the training loop does besides stepping, as hooks run every N steps (as in Levanter).

Before a step: preemption (checked before the step's batch is read, so a checkpoint saved then
resumes at that very batch) and profiling (just before the step is dispatched). After a step:
evaluation, logging and saving, in that order, so a logged record carries its evaluation and a
checkpoint never gets ahead of the metrics it covers.

Evaluation and saving read the state (`needs_state`): they run right after their step, whose
metrics are then fetched at once, so nothing is saved before its loss is known to be finite.
Logging reads only the metrics and runs when they arrive, one step late (lab.train.loop).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from lab.checkpoint import Checkpointer
from lab.metrics import MetricsLogger
from lab.noise_scale import GRAD_SQ, TRACE, NoiseScaleEMA
from lab.preemption import PREEMPTION
from lab.profiling import StepProfiler
from lab.rundir import Status
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


@dataclasses.dataclass
class StepInfo:
    """A step as the hooks see it: `step` steps are done (before a step: the steps so far)."""

    step: int
    state: dict
    values: dict = dataclasses.field(default_factory=dict)  # its metrics, on the host
    eval_loss: float | None = None  # set by the evaluation hook
    stop: bool = False  # a hook before the step asks the loop to stop


class Hook:
    """Runs at the steps `due` says: every `every` steps (0 = never), and any the hook adds."""

    every: int = 0
    needs_state: bool = False  # must run right after its step, while the state is current

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def __call__(self, info: StepInfo) -> None:
        raise NotImplementedError


def run_hooks(hooks: list[Hook], info: StepInfo) -> None:
    for hook in hooks:
        if hook.due(info.step):
            hook(info)


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


def evaluate(trainer: Trainer, params: dict, batches: list[jax.Array]) -> float:
    losses = [trainer.eval_step(params, b) for b in batches]
    return float(np.mean(jax.device_get(losses)))


class PreemptionHook(Hook):
    """SIGTERM / SIGINT (lab.preemption) stop the run; with several processes, JAX's preemption
    sync point, so that every host stops at the same step."""

    every = 1

    def __init__(self):
        self.multi = jax.process_count() > 1

    def __call__(self, info: StepInfo) -> None:
        if self.multi:
            from jax.experimental import multihost_utils

            info.stop = multihost_utils.reached_preemption_sync_point(info.step)
        else:
            info.stop = PREEMPTION.requested


class ProfileHook(Hook):
    """A jax.profiler trace of the steps lab.profiling's environment variables ask for."""

    every = 1

    def __init__(self, profiler: StepProfiler | None):
        self.profiler = profiler

    def __call__(self, info: StepInfo) -> None:
        if self.profiler is not None:
            self.profiler.step(info.step, wait_for=info.state)


class EvalHook(Hook):
    """The evaluation loss, every train.eval_every steps and at the last step."""

    needs_state = True

    def __init__(self, every: int, last: int, trainer: Trainer, eval_data: list[jax.Array],
                 result: LoopResult, watch: Stopwatch):
        self.every, self.last, self.trainer, self.eval_data = every, last, trainer, eval_data
        self.result, self.watch = result, watch

    def due(self, step: int) -> bool:
        return super().due(step) or step == self.last

    def __call__(self, info: StepInfo) -> None:
        loss = evaluate(self.trainer, info.state["params"], self.eval_data)
        info.eval_loss = self.result.eval_loss = loss
        self.result.eval_seconds += self.watch.other()


class NoiseScaleHook(Hook):
    """The gradient noise scale (lab.noise_scale), measured by the trainer's noise step every
    train.noise_scale_every steps: each measurement's two estimates are taken out of its
    metrics into the moving averages, and every record from the first measurement on carries
    the smoothed B_simple as `noise_scale` (tokens). Runs at every step, before logging."""

    every = 1

    def __init__(self, measure_every: int, tokens_per_row: int, result: LoopResult):
        self.measure_every, self.result = measure_every, result
        self.smoothed = NoiseScaleEMA(tokens_per_row)

    def measures(self, step: int) -> bool:
        """Whether the step that makes `step` steps done is a measuring one."""
        return step % self.measure_every == 0

    def __call__(self, info: StepInfo) -> None:
        grad_sq, trace = info.values.pop(GRAD_SQ, None), info.values.pop(TRACE, None)
        if grad_sq is not None:
            self.smoothed.update(grad_sq, trace)
        value = self.smoothed.value()
        if value is not None:
            info.values["noise_scale"] = self.result.noise_scale = value


class LogHook(Hook):
    """A step's metrics with its throughput (training time only, since the last logged step) to
    the metrics log and the display: every train.log_every steps and at every evaluation."""

    def __init__(self, every: int, evaluation: Hook, watch: Stopwatch, logger: MetricsLogger,
                 progress: Progress, start: int, tokens_per_step: int, flops_per_tok: int,
                 peak_flops: float):
        self.every, self.evaluation, self.watch = every, evaluation, watch
        self.logger, self.progress, self.last_logged = logger, progress, start
        self.tokens_per_step, self.flops_per_tok = tokens_per_step, flops_per_tok
        self.peak_flops = peak_flops

    def due(self, step: int) -> bool:
        return super().due(step) or self.evaluation.due(step)

    def __call__(self, info: StepInfo) -> None:
        values, step = info.values, info.step
        per_step = self.watch.take_window() / max(step - self.last_logged, 1)
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
    """A checkpoint every checkpoint.every_steps steps, at every kept step and at the last."""

    needs_state = True

    def __init__(self, every: int, keep_steps: tuple[int, ...], last: int,
                 logger: MetricsLogger, checkpointer: Checkpointer | None, batches: Any,
                 result: LoopResult, clock: Callable[[], float]):
        self.every, self.keep_steps, self.last = every, keep_steps, last
        self.logger, self.checkpointer, self.batches = logger, checkpointer, batches
        self.result, self.clock = result, clock

    def due(self, step: int) -> bool:
        return super().due(step) or step in self.keep_steps or step == self.last

    def __call__(self, info: StepInfo) -> None:
        self.save(info.step, info.state)

    def save(self, step: int, state: dict) -> None:
        self.logger.flush()  # a remote log must not fall behind the checkpoint that covers it
        if self.checkpointer is None:
            return
        t = self.clock()
        self.checkpointer.save(step, state, self.batches)
        self.result.last_checkpoint = step
        self.result.checkpoint_seconds += self.clock() - t
