"""The demo: total time and where it goes.

Runs `lab demo` (the full study of configs/demo.yaml; `--quick`: configs/demo-quick.yaml) into a
temporary directory as a subprocess, then splits its wall clock from the demo's own fit.json and
the runs' summary.json files: the runs' training loops (each run's `train_seconds`: the steps,
with the first one's compilation, and the evaluations and checkpoint saves inside the loop), the
rest of the runs (building the trainer, restoring a parent's checkpoint, writing the summary),
and the analysis (fits, bootstrap, figures, report). The total is compared with the issue's
budget of 15 minutes on 2 cores.

    .venv/bin/python -m benchmarks.bench_demo [--quick]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, load_note, print_rows, row

BUDGET_SECONDS = 15 * 60


def run(quick: bool = False) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "demo"
        cmd = [sys.executable, "-m", "lab.cli", "demo", "--out", str(out)]
        if quick:
            cmd.append("--quick")
        load = load_note()
        started = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            raise RuntimeError(f"lab demo exited {proc.returncode}: {proc.stderr[-500:]}")
        fit = json.loads((out / "fit.json").read_text())
        summaries = [json.loads(p.read_text()) for p in (out / "runs").rglob("summary.json")]
    timing = fit["timing"]
    steps = sum(s.get("train_seconds", 0.0) for s in summaries)
    runs, total = timing["runs_seconds"], timing["total_seconds"]
    held = fit.get("heldout", {})
    name = "demo --quick" if quick else "demo"
    return [
        row(f"{name}: wall clock", wall, "s", "budget: 15 minutes on 2 cores", BUDGET_SECONDS,
            f"{len(summaries)} runs; CPU time {timing['cpu_seconds']:.0f} s; held-out mean |error| "
            f"{100 * held.get('error', float('nan')):.2f}%; {load}"),
        row(f"{name}: the runs' training loops", steps, "s", "the demo's own total", total,
            "sum of the runs' train_seconds: steps, the first step's compilation, the "
            "evaluations and checkpoint saves inside the loop"),
        row(f"{name}: the runs outside their loops", runs - steps, "s", "the demo's own total",
            total, "building the trainer, restoring, summaries: "
            f"{(runs - steps) / len(summaries):.1f} s a run"),
        row(f"{name}: analysis and report", total - runs, "s", "the demo's own total", total,
            "Approach 3 fit and bootstrap, IsoFLOP fit, figures, report.html"),
        row(f"{name}: peak memory", timing["peak_memory_gb"] * 1024, "MiB", "", None,
            "maximum resident set size of the demo process"),
    ]


if __name__ == "__main__":
    print_rows("demo", run(quick="--quick" in sys.argv))
