"""The lab's CPU train step under three ways of handling its host memory: the page faults a
step takes, its speed and the process's peak memory.

XLA's CPU runtime allocates a step's temporaries afresh at every step. With glibc's default
settings the large buffers get an mmap of their own (or come from an arena trimmed after), so
every step faults their pages in again, 4 KiB at a time and zeroed (about 2 GiB a step on the
benchmark model). Two ways around it, each measured here against glibc's defaults:

- GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (glibc 2.35 or later, transparent huge pages in
  `madvise` mode, the usual default): malloc asks for 2 MiB pages, 512 times fewer faults;
- freed memory kept: glibc's mallopt with one arena, no mmap and no trimming, set in the
  worker before JAX starts its backend (too late after), so the next step reuses the pages.

Each variant runs alone, in processes one after another (alternating, `--pairs` times), as a
training run uses the machine. Each process builds the benchmark model's step
(benchmarks.against_commit's worker: d_model 512, 8 layers, seq 512, 8 sequences, AdamW),
compiles it and times `--steps` steps, counting the minor page faults of each and the process's
peak resident memory. With torch installed, its twin (benchmarks.torch_twin) runs the same
way, as a reference that does not depend on the lab. Writes
benchmarks/results/cpu-host-memory.txt.

    .venv/bin/python -m benchmarks.cpu_host_memory [--pairs 2] [--steps 8]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys

from benchmarks.against_commit import ROOT, TOKENS, WORKER, medians, rates
from benchmarks.common import RESULTS, load_note, write_report

HUGE_PAGES = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
# Before the worker imports JAX: mallopt's M_ARENA_MAX (-8) 1, M_MMAP_MAX (-4) 0 and
# M_TRIM_THRESHOLD (-1) -1, which glibc reads as SIZE_MAX (it takes the int as a size_t).
KEEP_FREED = ("import ctypes\n"
              "_mallopt = ctypes.CDLL('libc.so.6').mallopt\n"
              "assert all(_mallopt(p, v) == 1 for p, v in ((-8, 1), (-4, 0), (-1, -1)))\n")


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env.pop("GLIBC_TUNABLES", None)
    return env | extra


def timed_steps(worker: list[str], extra_env: dict[str, str],
                steps: int) -> list[tuple[float, int | None, int | None]]:
    """(seconds, minor page faults, peak resident KiB so far; None where the worker does not
    count them) of each timed step of one fresh worker process (`python WORKER...`:
    benchmarks.against_commit's protocol, "ready" and then a line per step asked for)."""
    out = subprocess.run([sys.executable, *worker], cwd=ROOT, env=_env(extra_env),
                         input="\n" * steps, check=True, capture_output=True,
                         text=True).stdout.splitlines()
    rows = [line.split() for line in out[1:]]  # after "ready"
    return [(float(row[0]), *(int(row[i]) if len(row) > i else None for i in (1, 2)))
            for row in rows]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    lab, torch = ["-c", WORKER, "float32"], ["-m", "benchmarks.torch_twin", "float32"]
    variants = {"lab (glibc's defaults)": (lab, {}),
                "lab, hugetlb=1": (lab, HUGE_PAGES),
                "lab, freed memory kept (mallopt)": (["-c", KEEP_FREED + WORKER, "float32"], {})}
    if importlib.util.find_spec("torch") is not None:
        variants |= {"PyTorch eager": (torch, {}), "PyTorch eager, hugetlb=1": (torch, HUGE_PAGES)}
    seconds = {name: [] for name in variants}
    faults = {name: [] for name in variants}
    peak_kib = {name: 0 for name in variants}
    for _ in range(args.pairs):
        for name, (worker, extra_env) in variants.items():
            for step_seconds, step_faults, step_peak in timed_steps(worker, extra_env, args.steps):
                seconds[name].append(step_seconds)
                if step_faults is not None:
                    faults[name].append(step_faults)
                    peak_kib[name] = max(peak_kib[name], step_peak)
    lines = [f"$ .venv/bin/python -m benchmarks.cpu_host_memory --pairs {args.pairs} "
             f"--steps {args.steps}",
             f"train step, benchmark model, float32; each variant alone in {args.pairs} fresh "
             f"processes of {args.steps} timed steps, alternating; {load_note()}",
             "| step | median tokens/s | best tokens/s | minor page faults a step (median) "
             "| peak resident memory |",
             "|---|---|---|---|---|"]
    for name, (median, best) in rates(seconds, TOKENS).items():
        fault = f"{statistics.median(faults[name]):,.0f}" if faults[name] else "-"
        peak = f"{peak_kib[name] / 2**20:.2f} GiB" if peak_kib[name] else "-"
        lines.append(f"| {name} | {median:,.0f} | {best:,.0f} | {fault} | {peak} |")
    rate = medians(seconds, TOKENS)
    base = rate["lab (glibc's defaults)"]
    for name in ("lab, hugetlb=1", "lab, freed memory kept (mallopt)"):
        lines.append(f"ratio {name} / glibc's defaults: {rate[name] / base:.3f} (median)")
    return write_report("\n".join(lines) + "\n", RESULTS / "cpu-host-memory.txt")


if __name__ == "__main__":
    raise SystemExit(main())
