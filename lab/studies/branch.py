"""Branch-and-decay: many token counts from one WSD run (Hägele et al. 2024).

`lab branch RUN_DIR --at S1,S2 --decay-steps D1,D2 [--shape 1-sqrt] [--final-ratio R]` makes one
child run directory per (S, D) under RUN_DIR/branches/. A child is an ordinary run whose config
says `run.parent=RUN_DIR run.parent_step=S train.steps=S+D schedule.decay_steps=D`: it starts
from the parent's checkpoint at S (model, optimizer and data-iterator state) and trains the
decay. Since the WSD decay starts at the absolute step train.steps - decay_steps, the child's
first S learning rates are the parent's, so the child equals a run trained straight through.
Children resume, skip when finished, and can be run anywhere with `lab train CHILD/config.yaml`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from lab import paths
from lab.config import Config, dump_config, load_config
from lab.errors import UserError
from lab.model.accounting import flops_per_token
from lab.run import preemption, rundir
from lab.run.rundir import Status, Summary, write_json_atomic


def compute_report(parent: Config, pairs: list[tuple[int, int]]) -> dict:
    """What the branches cost (the parent's stable phase up to the last branch point, plus every
    decay) against training each point from scratch."""
    fpt = flops_per_token(parent.model, parent.train.seq_len)
    tokens_per_step = parent.train.batch_size * parent.train.seq_len
    rows = [{"branch_step": s, "decay_steps": d, "tokens": (s + d) * tokens_per_step,
             "flops_from_scratch": fpt * (s + d) * tokens_per_step,
             "flops_spent": fpt * d * tokens_per_step} for s, d in pairs]
    stable = fpt * max((s for s, _ in pairs), default=0) * tokens_per_step
    branched = stable + sum(r["flops_spent"] for r in rows)
    scratch = sum(r["flops_from_scratch"] for r in rows)
    return {"points": rows, "flops_stable_phase": stable, "flops_branched": branched,
            "flops_from_scratch": scratch,
            "saving": 1 - branched / scratch if scratch else 0.0}


def format_report(report: dict) -> str:
    lines = [f"{'branch step':>11} {'decay':>6} {'tokens':>12} {'FLOPs spent':>12} "
             f"{'from scratch':>12}"]
    for r in report["points"]:
        lines.append(f"{r['branch_step']:>11} {r['decay_steps']:>6} {r['tokens']:>12,} "
                     f"{r['flops_spent']:>12.3g} {r['flops_from_scratch']:>12.3g}")
    lines.append(f"stable phase {report['flops_stable_phase']:.3g} FLOPs + decays = "
                 f"{report['flops_branched']:.3g} FLOPs, against {report['flops_from_scratch']:.3g}"
                 f" from scratch: {report['saving']:.0%} saved")
    return "\n".join(lines)


def write_branch_files(parent_dir: str, report: dict, children: list[Config]) -> None:
    """branches.json and each child's config.yaml (kept if it exists: a rerun resumes it)."""
    write_json_atomic(paths.join(parent_dir, rundir.BRANCH_REPORT), report)
    for child in children:
        paths.makedirs(child.run.dir)
        if not paths.exists(rundir.config_path(child.run.dir)):
            paths.write_text(rundir.config_path(child.run.dir), dump_config(child))


def train_runs(configs: list[Config], report: Callable[[str, Config, Summary | None], None],
               progress=None, stop_on_failure: bool = False) -> dict[str, str]:
    """Train each run in turn, skipping those finished already; {run name: status}.

    `report(event, config, summary)` is told of each run: "skipped" (finished already, with its
    summary), "starting" (before it trains) and "trained" (with the summary it ended with).
    `progress` goes to lab.train.train; with `stop_on_failure` the first run that does not
    finish (failed, diverged, preempted) ends the list.

    SIGTERM / SIGINT stop the list: the signal handler is held across the runs, so a signal that
    lands after a run's loop (its last save) or between runs is not lost with the next run's
    start; the runs not started then count as preempted."""
    from lab.train import train

    statuses = {}
    with preemption.caught() as stop:
        for cfg in configs:
            if stop.requested:
                statuses[paths.name(cfg.run.dir)] = str(Status.PREEMPTED)
                continue
            summary = rundir.read_summary(cfg.run.dir)
            if summary is not None and summary.finished:
                report("skipped", cfg, summary)
            else:
                report("starting", cfg, None)
                summary = Summary.from_dict(train(cfg, progress=progress))
                report("trained", cfg, summary)
            statuses[paths.name(cfg.run.dir)] = str(summary.status)
            if stop_on_failure and not summary.finished:
                break
    return statuses


def load_parent(run_dir: str) -> tuple[str, Config]:
    """The parent's directory as given (a URL kept as it is) and its config."""
    parent_dir = run_dir if paths.is_remote(run_dir) else str(Path(run_dir))
    if not paths.is_file(rundir.config_path(parent_dir)):
        raise UserError(f"{parent_dir} is not a run directory (no {rundir.CONFIG}); pass the "
                        "directory of a `lab train` run")
    parent = load_config(rundir.config_path(parent_dir))
    if parent.run.parent:
        raise UserError(f"{parent_dir} is itself a branch; branch its parent {parent.run.parent}")
    return parent_dir, parent


def check_checkpoints(parent_dir: str, pairs: list[tuple[int, int]]) -> None:
    """The parent must have kept a checkpoint at every branch point."""
    from lab.run.checkpoint import Checkpointer, checkpoint_dir

    reader = Checkpointer(checkpoint_dir(parent_dir), read_only=True)
    try:
        saved = reader.steps()
    finally:
        reader.close()
    missing = sorted({s for s, _ in pairs} - set(saved))
    if missing:
        raise UserError(f"{parent_dir} has no checkpoint at step {missing[0]} (it has "
                        f"{saved or 'none'}); declare branch points in branch.at_steps before "
                        "training so their checkpoints are kept")


def check_existing_children(children: list[Config]) -> None:
    """An existing child must be the same run: checked for all before any trains."""
    from lab.train import RESUMABLE_CHANGES, check_resumable

    for child in children:
        if paths.is_file(rundir.config_path(child.run.dir)):
            saved_child = load_config(rundir.config_path(child.run.dir))
            if not child.model.vocab_size:  # resolved from the data when the child started
                child_model = dataclasses.replace(child.model,
                                                  vocab_size=saved_child.model.vocab_size)
                child = dataclasses.replace(child, model=child_model)
            check_resumable(saved_child, child, allowed=RESUMABLE_CHANGES + ("run.parent",),
                            what=f"the existing branch {child.run.dir}")
