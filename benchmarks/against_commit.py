"""The train step of the benchmark model, this tree against another commit, in one run.

Two worker processes, one importing this checkout's `lab` and one a clean checkout of REF (a git
worktree made for the run), build the same train step (docs/performance.md's benchmark model:
d_model 512, 8 layers, seq 512, 8 sequences, AdamW) and time one step each in turn, round
after round, so both see the same machine load. Prints the median and best tokens/s of each and
their ratio, and writes the table and the raw step times to benchmarks/results/.

    .venv/bin/python -m benchmarks.against_commit REF [--rounds 12] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# A worker: build the step, then time one step per line read from stdin. Only the API that the
# lab's train step has had all along (build_trainer, init_state, train_step) is used.
WORKER = r"""
import sys, time
import jax, numpy as np
import os, lab
# The sharding module of the tree this worker runs (the editable install's finder would find
# this checkout's lab.accel for a commit from before lab/ had folders).
if os.path.isdir(os.path.join(os.path.dirname(lab.__file__), "accel")):
    from lab.accel import sharding
else:
    from lab import sharding
from lab.config import load_config
from lab.train import build_trainer

dtype = sys.argv[1]
cfg = load_config(None, ["model.vocab_size=256", "model.d_model=512", "model.n_layers=8",
                         "model.n_heads=8", "model.d_ff=1536", "train.seq_len=512",
                         "train.batch_size=8", "mesh.fsdp=1", f"model.compute_dtype={dtype}",
                         "train.steps=1000"])
trainer = build_trainer(cfg, sharding.make_mesh(cfg.mesh))
rng = np.random.default_rng(0)
batches = [sharding.global_batch(rng.integers(0, 256, (8, 513), dtype=np.int32), trainer.mesh)
           for _ in range(2)]
"""
# The timing half of a worker, after its `trainer` and two `batches`: a first (compiling) step,
# "ready", then one timed step per line read from stdin, printed as its seconds, the minor page
# faults it took and the process's peak resident memory so far in KiB (benchmarks.cpu_host_memory
# reads those).
TIMED_STEPS = r"""
import resource
with jax.set_mesh(trainer.mesh):
    state = trainer.init_state()
    state, m = trainer.train_step(state, batches[0])
    jax.block_until_ready(m)
    print("ready", flush=True)
    for i, _ in enumerate(sys.stdin):
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = time.perf_counter()
        state, m = trainer.train_step(state, batches[i % 2])
        jax.block_until_ready(m)
        seconds = time.perf_counter() - t
        usage = resource.getrusage(resource.RUSAGE_SELF)
        print(seconds, usage.ru_minflt - faults, usage.ru_maxrss, flush=True)
"""
WORKER += TIMED_STEPS
TOKENS = 8 * 512  # tokens a step of the worker trains on: 8 sequences of 512


def start(tree: Path, dtype: str, args: list[str] | None = None) -> subprocess.Popen:
    """A worker process in `tree`: the lab's step (WORKER) by default, else `python ARGS...`;
    it prints "ready", then the seconds of one step per line it reads."""
    env = {**os.environ, "PYTHONPATH": str(tree), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, *(args or ["-c", WORKER, dtype])], cwd=tree,
                            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return proc


def wait_ready(proc: subprocess.Popen) -> None:
    line = proc.stdout.readline()
    if line.strip() != "ready":
        raise RuntimeError(f"worker failed to start (exit {proc.wait()})")


def step(proc: subprocess.Popen) -> float:
    proc.stdin.write("step\n")
    proc.stdin.flush()
    return float(proc.stdout.readline().split()[0])  # the seconds, before any other figure


def time_in_turns(workers: dict[str, subprocess.Popen],
                  rounds: int) -> tuple[dict[str, list[float]], float]:
    """Once every worker is ready, one step of each in turn for `rounds` rounds (so all see
    the same machine load): each worker's step seconds, and the rounds' wall time. The
    workers are closed after."""
    for proc in workers.values():  # one at a time: compiles don't overlap the timing
        wait_ready(proc)
    times = {name: [] for name in workers}
    started = time.time()
    for _ in range(rounds):
        for name, proc in workers.items():
            times[name].append(step(proc))
    for proc in workers.values():
        proc.stdin.close()
        proc.wait()
    return times, time.time() - started


def medians(times: dict[str, list[float]], tokens: int) -> dict[str, float]:
    """Each worker's median tokens/s."""
    return {name: median for name, (median, _) in rates(times, tokens).items()}


def rates(times: dict[str, list[float]], tokens: int) -> dict[str, tuple[float, float]]:
    """Each worker's (median, best) tokens/s from its step times."""
    return {name: (tokens / statistics.median(ts), tokens / min(ts))
            for name, ts in times.items()}


def rate_table(times: dict[str, list[float]], tokens: int, label: str = "tree") -> list[str]:
    """A markdown table of each worker's median and best tokens/s."""
    return [f"| {label} | median tokens/s | best tokens/s |", "|---|---|---|",
            *(f"| {name} | {median:,.0f} | {best:,.0f} |"
              for name, (median, best) in rates(times, tokens).items())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ref", help="the commit to compare with, e.g. HEAD~1 or a hash")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    sha = subprocess.run(["git", "rev-parse", "--short", args.ref], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.strip()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        ref_tree = Path(tmp) / "ref"
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(ref_tree), sha],
                       cwd=ROOT, check=True)
        try:
            workers = {f"this tree ({head})": start(ROOT, args.dtype),
                       f"{args.ref} ({sha})": start(ref_tree, args.dtype)}
            times, seconds = time_in_turns(workers, args.rounds)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(ref_tree)], cwd=ROOT)
    load = os.getloadavg()
    lines = [f"$ .venv/bin/python -m benchmarks.against_commit {args.ref} --rounds {args.rounds}"
             f" --dtype {args.dtype}",
             f"train step, benchmark model, {args.dtype}, {args.rounds} rounds in turns, "
             f"{seconds:.0f} s, load average {load[0]:.1f}",
             *rate_table(times, TOKENS)]
    new, old = medians(times, TOKENS).values()
    lines.append(f"ratio this tree / {args.ref}: {new / old:.3f} (median)")
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"against-{sha}-{args.dtype}"
    stem.with_suffix(".txt").write_text(text + "\n")
    stem.with_suffix(".json").write_text(json.dumps(
        {"ref": sha, "head": head, "dtype": args.dtype, "step_seconds": times,
         "ratio_median": new / old}, indent=1) + "\n")


if __name__ == "__main__":
    main()
