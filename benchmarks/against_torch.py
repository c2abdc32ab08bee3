"""The lab's CPU train step against PyTorch eager on the same model, in one run.

Two worker processes, one running the lab's train step on the benchmark model (the worker of
benchmarks.against_commit: d_model 512, 8 layers, 8 heads, SwiGLU 1536, bytes, seq 512, 8
sequences, AdamW, float32) and one its PyTorch twin (benchmarks.torch_twin: same shapes, same
AdamW, causal attention, the same model FLOPs), time one step each in turn, round after round,
so both see the same machine load. Prints the median and best tokens/s of each and their ratio,
and writes the table and the raw step times to benchmarks/results/against-torch-float32.*.
torch is optional (the `bench` extra); without it this says so and exits 0.

    .venv/bin/python -m benchmarks.against_torch [--rounds 10]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess

from benchmarks.against_commit import ROOT, TOKENS, rate_table, rates, start, time_in_turns
from benchmarks.common import RESULTS


def _version(module: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(module)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    if importlib.util.find_spec("torch") is None:
        print("against_torch: skipped, torch is not installed (pip install -e '.[bench]', or "
              "the CPU wheel: pip install torch --index-url https://download.pytorch.org/whl/cpu)")
        return 0
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout.strip()
    workers = {f"lab ({head}, jax {_version('jax')})": start(ROOT, "float32"),
               f"PyTorch {_version('torch')} eager": start(ROOT, "float32",
                                                           ["-m", "benchmarks.torch_twin"])}
    times, seconds = time_in_turns(workers, args.rounds)
    load = os.getloadavg()
    lines = [f"$ .venv/bin/python -m benchmarks.against_torch --rounds {args.rounds}",
             f"train step, benchmark model, float32, {args.rounds} rounds in turns (a lab step, "
             f"a torch step), {seconds:.0f} s, {os.cpu_count()} cores "
             f"({platform.processor() or platform.machine()}), load average {load[0]:.1f} at "
             "the end",
             *rate_table(times, TOKENS, "step")]
    (lab_median, lab_best), (torch_median, torch_best) = rates(times, TOKENS).values()
    lines.append(f"ratio lab / PyTorch: {lab_median / torch_median:.3f} (median), "
                 f"{lab_best / torch_best:.3f} (best)")
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / "against-torch-float32"
    stem.with_suffix(".txt").write_text(text + "\n")
    stem.with_suffix(".json").write_text(json.dumps(
        {"head": head, "step_seconds": times, "load_average": load,
         "ratio_median": lab_median / torch_median, "ratio_best": lab_best / torch_best},
        indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
