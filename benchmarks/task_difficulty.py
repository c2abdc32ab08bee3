"""How hard each downstream-task setting is for a trained model: every checkpoint of the given
runs scored on a grid of task settings (context, continuation length, distractors), so that a
study can pick settings whose accuracy rises across its ladder instead of sitting at chance or
at 1. The examples come from each run's own validation split, as in training.

    .venv/bin/python -m benchmarks.task_difficulty RUN_DIR... [--examples N] [--out FILE]
        [--grid choice:32:4:random,exact:32:2,...] [--final]

--grid replaces the default grid with settings NAME:CONTEXT:LENGTH[:DISTRACTORS]; --final
scores only each run's last checkpoint (a branch's decayed end, the point a ladder fits).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import jax

from benchmarks.common import load_note
from lab import data as labdata
from lab.accel import sharding
from lab.config import load_config
from lab.data.tasks import TaskSpec, build
from lab.model.accounting import with_vocab
from lab.run import rundir
from lab.run.checkpoint import Checkpointer, abstract_with_shardings, checkpoint_dir
from lab.run.metrics import read_metrics
from lab.train.step import build_trainer
from lab.train.tasks import task_eval

# (label, name, context, length, distractors)
GRID = [("choice c32 k4 random", "choice", 32, 4, "random"),
        ("choice c32 k16 random (default)", "choice", 32, 16, "random"),
        ("choice c32 k32 random", "choice", 32, 32, "random"),
        ("choice c32 k16 document", "choice", 32, 16, "document"),
        ("choice c96 k16 document", "choice", 96, 16, "document"),
        ("exact c32 k1", "exact", 32, 1, ""),
        ("exact c32 k2", "exact", 32, 2, ""),
        ("exact c32 k4 (default)", "exact", 32, 4, ""),
        ("exact c32 k8", "exact", 32, 8, ""),
        ("exact c96 k4", "exact", 96, 4, "")]


def parse_grid(text: str) -> list[tuple[str, str, int, int, str]]:
    """`choice:32:4:random,exact:32:2` -> GRID rows (label, name, context, length, distractors)."""
    rows = []
    for item in text.split(","):
        name, context, length, *rest = item.split(":")
        distractors = rest[0] if rest else ("random" if name == "choice" else "")
        label = f"{name} c{context} k{length}" + (f" {distractors}" if distractors else "")
        rows.append((label, name, int(context), int(length), distractors))
    return rows


def score_run(run_dir: Path, examples: int, grid=GRID,
              final: bool = False) -> list[tuple[int, float | None, list[float]]]:
    """(step, eval loss logged at that step, accuracy of each grid setting) per checkpoint
    (or the last one only)."""
    cfg = load_config(rundir.config_path(run_dir))
    dataset = labdata.open_dataset(cfg.data.path or labdata.default_data_path())
    cfg = dataclasses.replace(cfg, model=with_vocab(cfg.model, dataset.vocab_size))
    trainer = build_trainer(cfg, sharding.make_mesh(cfg.mesh))
    target = abstract_with_shardings(jax.eval_shape(trainer.init_fn), trainer.state_shardings)
    evals = [task_eval(trainer, [build(dataset, TaskSpec(name, examples, c, k, 0, d))])
             for _, name, c, k, d in grid]
    eval_loss = {r["step"]: r.get("eval_loss") for r in read_metrics(run_dir)}
    reader = Checkpointer(checkpoint_dir(str(run_dir)), read_only=True)
    rows = []
    try:
        steps = list(reader.steps())
        for step in steps[-1:] if final else steps:
            _, state = reader.restore(target, step=step)
            accuracy = [next(v for k, v in e(state["params"]).items() if k.endswith("accuracy"))
                        for e in evals]
            rows.append((step, eval_loss.get(step), accuracy))
    finally:
        reader.close()
    return rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--grid", type=parse_grid, default=GRID,
                        help="settings NAME:CONTEXT:LENGTH[:DISTRACTORS], comma-separated")
    parser.add_argument("--final", action="store_true", help="each run's last checkpoint only")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    lines = [f"accuracy on {args.examples} examples per setting (seed 0); chance: choice "
             "0.25, exact ~0", "",
             "| run | step | eval loss | " + " | ".join(g[0] for g in args.grid) + " |",
             "|---|---|---|" + "---|" * len(args.grid)]
    for run_dir in args.runs:
        for step, loss, accuracy in score_run(run_dir, args.examples, args.grid,
                                                args.final):
            shown = "-" if loss is None else f"{loss:.4f}"
            lines.append(f"| {run_dir.name} | {step} | {shown} | "
                         + " | ".join(f"{a:.3f}" for a in accuracy) + " |")
    lines += ["", f"{time.perf_counter() - started:.0f} s; {load_note()}"]
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    if args.out:
        command = " ".join(["$ .venv/bin/python -m benchmarks.task_difficulty", *sys.argv[1:]])
        args.out.write_text(command + "\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
