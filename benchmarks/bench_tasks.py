"""What the downstream tasks cost, and what the tiny config scores on them.

`configs/tiny.yaml` is trained as a `lab train` process with no tasks and with the default
tasks (`eval.tasks=[choice,exact]`: 64 choice and 128 exact examples), alternately, REPEATS
times each; the cost is the ratio of the median wall times (the best beside it), measured in
the same call. A short warm-up run first puts the prepared data, the task files and the
compiled programs in their caches, so no timed run pays for them.

    .venv/bin/python -m benchmarks.bench_tasks          # writes benchmarks/results/tasks-cost.txt
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, ROOT, load_note, print_rows, row

TINY = ROOT / "configs" / "tiny.yaml"
TASKS = "eval.tasks=[choice,exact]"
SETTINGS = {"no tasks": "eval.tasks=[]", "tasks": TASKS}
REPEATS = 3


def _train(run_dir: Path, *overrides: str) -> tuple[float, dict]:
    """Wall seconds of one `lab train` process, and its summary."""
    lab = Path(sys.executable).parent / "lab"
    started = time.perf_counter()
    subprocess.run([str(lab), "train", str(TINY), f"run.dir={run_dir}", *overrides], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - started
    return seconds, json.loads((run_dir / "summary.json").read_text())


def _loop_seconds(summary: dict) -> float:
    return sum(summary[k] for k in ("train_seconds", "compile_seconds", "eval_seconds",
                                    "checkpoint_seconds"))


def _timings(tmp: Path, repeats: int, steps: list[str]) -> tuple[dict, dict, list, dict, Path]:
    """Each setting's wall and loop seconds, alternating which goes first; each task run's
    share of its own wall time spent on the tasks; the task runs' last summary and run
    directory."""
    _train(tmp / "warm-up", TASKS, "train.steps=10", "train.eval_every=5",
           "schedule.warmup_steps=2", "schedule.decay_steps=2")
    walls = {name: [] for name in SETTINGS}
    loops = {name: [] for name in SETTINGS}
    summary, task_dir, shares = {}, tmp, []
    for rep in range(repeats):
        order = list(SETTINGS) if rep % 2 == 0 else list(SETTINGS)[::-1]
        for name in order:
            run_dir = tmp / f"{name.replace(' ', '-')}-{rep}"
            wall, s = _train(run_dir, SETTINGS[name], *steps)
            walls[name].append(wall)
            loops[name].append(_loop_seconds(s))
            if name == "tasks":
                summary, task_dir = s, run_dir
                shares.append(s["task_seconds"] / wall)
    return walls, loops, shares, summary, task_dir


def _curve(run_dir: Path) -> list[str]:
    """Each evaluation's task metrics, from the run's metrics.jsonl."""
    lines = ["| step | eval loss | choice accuracy | choice loss | exact accuracy | exact loss |",
             "|---|---|---|---|---|---|"]
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "task/choice/accuracy" in r:
            lines.append(f"| {r['step']} | {r['eval_loss']:.4f} | "
                         f"{r['task/choice/accuracy']:.3f} | {r['task/choice/loss']:.4f} | "
                         f"{r['task/exact/accuracy']:.3f} | {r['task/exact/loss']:.4f} |")
    return lines


def run(quick: bool = False) -> list[dict]:
    repeats = 1 if quick else REPEATS
    steps = ["train.steps=60", "train.eval_every=30"] if quick else []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        walls, loops, shares, summary, task_dir = _timings(Path(tmp), repeats, steps)
        curve = _curve(task_dir)
    median = {k: float(np.median(v)) for k, v in walls.items()}
    best = {k: float(np.min(v)) for k, v in walls.items()}
    loop_median = {k: float(np.median(v)) for k, v in loops.items()}
    lines = [f"configs/tiny.yaml {' '.join(steps)}, {repeats} runs per setting, alternating; "
             f"tasks = {TASKS} ({summary['task/choice/examples']} choice, "
             f"{summary['task/exact/examples']} exact examples)", "",
             "| setting | wall s (median) | best | each run | loop s (median) |",
             "|---|---|---|---|---|"]
    for name in SETTINGS:
        lines.append(f"| {name} | {median[name]:.1f} | {best[name]:.1f} | "
                     f"{', '.join(f'{w:.1f}' for w in walls[name])} | {loop_median[name]:.1f} |")
    ratio, best_ratio = median["tasks"] / median["no tasks"], best["tasks"] / best["no tasks"]
    loop_ratio = loop_median["tasks"] / loop_median["no tasks"]
    lines += ["", f"wall time with tasks / without: {ratio:.3f} (median), {best_ratio:.3f} "
              f"(best); the loop alone (train + compile + eval + checkpoint seconds from "
              f"summary.json): {loop_ratio:.3f}",
              f"within each run with tasks, the tasks' own seconds (summary.json task_seconds: "
              f"building the scorer and scoring, at every evaluation) over its wall time: "
              f"{', '.join(f'{x:.3f}' for x in shares)} (median {np.median(shares):.3f})", "",
              "the task metrics of the last run with tasks, at each evaluation "
              "(chance: choice 0.25, exact ~0):", *curve, "",
              f"{time.perf_counter() - started:.0f} s for this call; {load_note()}"]
    text = "\n".join(lines)
    print(text)
    if not quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "tasks-cost.txt").write_text(
            "$ .venv/bin/python -m benchmarks.bench_tasks\n\n" + text + "\n")
    notes = f"{repeats} runs each, alternating"
    return [row("tiny run wall time with the default tasks", median["tasks"], "s",
                "the same run without tasks", median["no tasks"], notes, best=best["tasks"]),
            row("tiny run: choice accuracy (4 choices)", summary["task/choice/accuracy"], "",
                "chance", 0.25, notes),
            row("tiny run: exact-match accuracy", summary["task/exact/accuracy"], "", "-",
                None, notes)]


if __name__ == "__main__":
    print_rows("tasks", run(quick="--quick" in sys.argv))
