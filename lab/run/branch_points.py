"""Branch planning, pure: the branch points and (step, decay) pairs a config declares, the
rules a plan must keep, and each child's folder and config. `lab train` checks a run's plan
before it starts (so the checkpoints at the branch points are kept); `lab branch` makes the
children from it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from lab import paths
from lab.config import Config, replace
from lab.errors import UserError, shown
from lab.run.rundir import BRANCHES


def planned_steps(cfg: Config, params: int) -> list[int]:
    """The branch points a config declares (branch.at_*), as sorted steps."""
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
    steps = set(cfg.branch.at_steps)
    steps |= {max(1, round(t / tokens_per_step)) for t in cfg.branch.at_tokens}
    steps |= {max(1, round(r * params / tokens_per_step)) for r in cfg.branch.at_tokens_per_param}
    return sorted(steps)


def planned_pairs(cfg: Config, params: int) -> list[tuple[int, int]]:
    """Every (branch step, decay steps) pair of the declared plan."""
    pairs = []
    for step in planned_steps(cfg, params):
        decays = set(cfg.branch.decay_steps)
        decays |= {max(1, round(f * step)) for f in cfg.branch.decay_fractions}
        pairs += [(step, d) for d in sorted(decays)]
    return pairs


def check_branch_points(cfg: Config, pairs: list[tuple[int, int]],
               points: list[int] | None = None) -> None:
    """A branch must start inside the parent's stable phase and decay no longer than it ran.
    `points` adds branch points declared without decay lengths yet."""
    s = cfg.schedule
    points = sorted({p for p, _ in pairs} | set(points or ()))
    if points and s.name != "wsd":
        raise UserError(f"branches need a WSD run, but schedule.name is {shown(s.name)}; set "
                        "schedule.name=wsd")
    stable_end = cfg.train.steps - s.decay_steps
    for step in points:
        if not s.warmup_steps <= step <= stable_end:
            raise UserError(
                f"branch point {step} lies outside the stable phase of the run (steps "
                f"{s.warmup_steps} to {stable_end}); choose points in it or lengthen train.steps")
    for step, decay in pairs:
        if decay > step:
            raise UserError(f"a decay of {decay} steps from step {step} is longer than the run "
                            "before it; use a shorter decay or a later branch point")


def decay_of(parent: Config, shape: str | None = None,
             final_ratio: float | None = None) -> tuple[str, float]:
    """The decay shape and final learning-rate ratio of a run's branches: the ones given (lab
    branch's --shape, --final-ratio), else the run's plan (branch.shape, branch.final_ratio),
    else its own schedule's."""
    shape = shape or parent.branch.shape or parent.schedule.decay_shape
    if final_ratio is None:
        final_ratio = (parent.branch.final_ratio if parent.branch.final_ratio >= 0
                       else parent.schedule.final_ratio)
    if not 0 <= final_ratio <= 1:
        raise UserError(f"--final-ratio must lie in [0, 1], got {final_ratio}")
    return shape, final_ratio


def branch_name(step: int, decay: int, shape: str, final_ratio: float = 0.0) -> str:
    """The child's folder: every setting that makes one child differ from another (a final
    ratio other than 0 is added as `-final0.1`)."""
    return f"step{step}-decay{decay}-{shape}" + (f"-final{final_ratio:g}" if final_ratio else "")


def child_config(parent: Config, parent_dir: str | Path, step: int, decay: int, shape: str,
                 final_ratio: float) -> Config:
    name = branch_name(step, decay, shape, final_ratio)
    return replace(
        parent,
        run={"dir": paths.join(parent_dir, BRANCHES, name),
             "name": f"{parent.run.name or paths.name(parent_dir)}/{name}",
             "parent": str(parent_dir), "parent_step": step},
        train={"steps": step + decay},
        schedule={"decay_steps": decay, "decay_shape": shape, "final_ratio": final_ratio},
        checkpoint={"keep_steps": (), "keep_last": 1},
        branch=dataclasses.asdict(type(parent.branch)()),
    )


def child_configs(parent: Config, parent_dir: str | Path, pairs: list[tuple[int, int]],
                  shape: str | None = None, final_ratio: float | None = None) -> list[Config]:
    """The config of every branch (step, decay) of a run, with the decay of `decay_of`."""
    shape, final_ratio = decay_of(parent, shape, final_ratio)
    return [child_config(parent, parent_dir, s, d, shape, final_ratio) for s, d in pairs]
