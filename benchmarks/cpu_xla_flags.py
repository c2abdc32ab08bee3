"""XLA's CPU flags on the lab's train step, each against no flag, in one run.

One worker process per variant (benchmarks.against_commit's worker: the benchmark model, d_model
512, 8 layers, seq 512, 8 sequences, AdamW, float32), each started with its XLA_FLAGS, time one
step each in turn, round after round, so all see the same machine load. Prints each variant's
median and best tokens/s and its ratio to the step without flags, and writes
benchmarks/results/cpu-xla-flags.txt. A flag that helps on this machine may not on another
(AVX-512, more cores): run it there before setting one.

    .venv/bin/python -m benchmarks.cpu_xla_flags [--rounds 10]
"""

from __future__ import annotations

import argparse
import os
import platform

from benchmarks.against_commit import ROOT, TOKENS, medians, rate_table, start, time_in_turns
from benchmarks.common import RESULTS, load_note, write_report

# Flags of the installed jaxlib's XLA:CPU that change the program or its schedule (the list
# prints with XLA_FLAGS=--help); the experimental YNN and oneDNN fusions were tried before
# (docs/performance.md).
VARIANTS = {
    "no flags": "",
    "memory-optimized scheduler": "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
    "concurrency-optimized scheduler":
        "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED",
    "XNNPACK graph fusion, greedy":
        "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "copy insertion by region analysis": "--xla_cpu_copy_insertion_use_region_analysis=true",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    inherited = os.environ.get("XLA_FLAGS", "")
    workers = {}
    try:
        for name, flags in VARIANTS.items():
            os.environ["XLA_FLAGS"] = f"{inherited} {flags}".strip()
            workers[f"{name} ({flags or 'XLA_FLAGS unset'})"] = start(ROOT, "float32")
    finally:
        os.environ["XLA_FLAGS"] = inherited
    times, seconds = time_in_turns(workers, args.rounds)
    rate = medians(times, TOKENS)
    base = next(iter(rate.values()))
    lines = [f"$ .venv/bin/python -m benchmarks.cpu_xla_flags --rounds {args.rounds}",
             f"train step, benchmark model, float32, {len(workers)} workers alive at once, "
             f"{args.rounds} rounds in turns, {seconds:.0f} s "
             f"({platform.processor() or platform.machine()}), at the end {load_note()}",
             *rate_table(times, TOKENS, "XLA flags"),
             *(f"ratio to no flags, median: {r / base:.3f}  {name}" for name, r in rate.items())]
    return write_report("\n".join(lines) + "\n", RESULTS / "cpu-xla-flags.txt")


if __name__ == "__main__":
    raise SystemExit(main())
