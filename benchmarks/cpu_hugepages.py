"""The lab's CPU train step with and without transparent huge pages for its large buffers.

XLA's CPU runtime allocates a step's temporaries afresh at every step; glibc serves each large
buffer with its own mmap and returns it at the end, so every step faults its pages in again,
4 KiB at a time (about 2 GiB a step on the benchmark model). GLIBC_TUNABLES=glibc.malloc.hugetlb=1
(glibc 2.35 or later, with transparent huge pages in `madvise` mode, the usual default) makes
malloc ask for 2 MiB pages for those buffers instead.

Each variant runs alone, in processes one after another (alternating, `--pairs` times), because
two processes that allocate and return huge pages in turn slow each other down; that is also
how a training run uses the machine. Each process builds the benchmark model's step
(benchmarks.against_commit's worker: d_model 512, 8 layers, seq 512, 8 sequences, AdamW),
compiles it and times `--steps` steps, counting the minor page faults of each. With torch
installed, its twin (benchmarks.torch_twin) runs the same way, as a reference that does not
depend on the lab. Writes benchmarks/results/cpu-hugepages.txt.

    .venv/bin/python -m benchmarks.cpu_hugepages [--pairs 2] [--steps 6]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys

from benchmarks.against_commit import ROOT, WORKER
from benchmarks.common import RESULTS, load_note, write_report

TOKENS = 8 * 512
HUGE_PAGES = "glibc.malloc.hugetlb=1"


def _env(huge_pages: bool) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env.pop("GLIBC_TUNABLES", None)
    return {**env, "GLIBC_TUNABLES": HUGE_PAGES} if huge_pages else env


def timed_steps(worker: list[str], huge_pages: bool, steps: int) -> list[tuple[float, int | None]]:
    """(seconds, minor page faults, or None where the worker does not count them) of each timed
    step of one fresh worker process (`python WORKER...`: benchmarks.against_commit's protocol,
    "ready" and then a line per step asked for)."""
    out = subprocess.run([sys.executable, *worker], cwd=ROOT, env=_env(huge_pages),
                         input="\n" * steps, check=True, capture_output=True,
                         text=True).stdout.splitlines()
    rows = [line.split() for line in out[1:]]  # after "ready"
    return [(float(row[0]), int(row[1]) if len(row) > 1 else None) for row in rows]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    lab, torch = ["-c", WORKER, "float32"], ["-m", "benchmarks.torch_twin", "float32"]
    variants = {"lab": (lab, False), f"lab, {HUGE_PAGES}": (lab, True)}
    if importlib.util.find_spec("torch") is not None:
        variants |= {"PyTorch eager": (torch, False), f"PyTorch eager, {HUGE_PAGES}": (torch, True)}
    seconds = {name: [] for name in variants}
    faults = {name: [] for name in variants}
    for _ in range(args.pairs):
        for name, (worker, huge_pages) in variants.items():
            for step_seconds, step_faults in timed_steps(worker, huge_pages, args.steps):
                seconds[name].append(step_seconds)
                if step_faults is not None:
                    faults[name].append(step_faults)
    lines = [f"$ .venv/bin/python -m benchmarks.cpu_hugepages --pairs {args.pairs} "
             f"--steps {args.steps}",
             f"train step, benchmark model, float32; each variant alone in {args.pairs} fresh "
             f"processes of {args.steps} timed steps, alternating; {load_note()}",
             "| step | median tokens/s | best tokens/s | minor page faults a step (median) |",
             "|---|---|---|---|"]
    for name, ts in seconds.items():
        fault = f"{statistics.median(faults[name]):,.0f}" if faults[name] else "-"
        lines.append(f"| {name} | {TOKENS / statistics.median(ts):,.0f} | "
                     f"{TOKENS / min(ts):,.0f} | {fault} |")
    base, huge = (statistics.median(seconds[n]) for n in ("lab", f"lab, {HUGE_PAGES}"))
    lines.append(f"ratio lab with / without huge pages: {base / huge:.3f} (median)")
    return write_report("\n".join(lines) + "\n", RESULTS / "cpu-hugepages.txt")


if __name__ == "__main__":
    raise SystemExit(main())
