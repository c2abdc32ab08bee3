"""Training: `lab train CONFIG [key=value ...]`.

    step.py      the model, the optimizer and the jitted, sharded step (build_trainer)
    loop.py      the loop: dispatch a step, fetch the one before it, run the hooks
    hooks.py     what the loop does every N steps, registered with loop.add_hook: preemption,
                 profiling, evaluation, logging, saving
    progress.py  the live line (or plain lines) a run shows
    run.py       a whole run: the checks, the run directory, resuming, the summary (train)
"""

from lab.train.hooks import Hook, LoopResult, StepInfo, evaluate
from lab.train.loop import MetricsFetcher, SpikeWatch, run_loop
from lab.train.progress import Progress, progress_call
from lab.train.run import (
    BRANCH_CHANGES,
    RESUMABLE_CHANGES,
    Setup,
    check_resumable,
    prepare,
    train,
)
from lab.train.step import Trainer, build_trainer, state_shardings

__all__ = [
    "BRANCH_CHANGES",
    "RESUMABLE_CHANGES",
    "Hook",
    "LoopResult",
    "MetricsFetcher",
    "Progress",
    "Setup",
    "SpikeWatch",
    "StepInfo",
    "Trainer",
    "build_trainer",
    "check_resumable",
    "evaluate",
    "progress_call",
    "prepare",
    "run_loop",
    "state_shardings",
    "train",
]
