"""Muon's Newton-Schulz in float32 against bfloat16, judged by training curves, not by one
step's error: the tiny config trained with `optim.name=muon` for each dtype over several seeds
(`run.seed`, which sets the initial parameters), the final losses compared with the spread the
seeds alone give.

    nice -n 10 .venv/bin/python -m benchmarks.muon_ns_dtype_curves --jobs 3 \
        --runs-dir /tmp/muon-ns-runs --out benchmarks/results/muon-ns-dtype-tiny.txt

Each run is `lab train configs/tiny.yaml optim.name=muon optim.muon_ns_dtype=D run.seed=S
checkpoint.every_steps=0 run.dir=RUNS/D-S`, up to --jobs at once; a run already finished in
--runs-dir is read, not trained again (lab train says so and does nothing).

The rule (issue 22): if the mean final eval loss of the two dtypes differs by less than the
seed spread (the sample standard deviation over seeds, pooled over both dtypes), bfloat16 is
safe as the accelerator default. The same-seed curves are compared step by step as well.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import ROOT, load_note, write_report

DTYPES = ("float32", "bfloat16")
TINY = ROOT / "configs" / "tiny.yaml"


def train_all(runs_dir: Path, seeds: int, jobs: int) -> None:
    """Every (dtype, seed) run of the tiny config with Muon, `jobs` processes at a time."""
    pending = [(d, s) for s in range(seeds) for d in DTYPES]
    running: list[subprocess.Popen] = []
    while pending or running:
        while pending and len(running) < jobs:
            dtype, seed = pending.pop(0)
            command = [sys.executable, "-m", "lab.cli", "train", str(TINY), "optim.name=muon",
                       f"optim.muon_ns_dtype={dtype}", f"run.seed={seed}",
                       "checkpoint.every_steps=0", f"run.dir={runs_dir / f'{dtype}-{seed}'}"]
            running.append(subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL))
        time.sleep(1)
        for p in [p for p in running if p.poll() is not None]:
            if p.returncode:
                raise SystemExit(f"a run failed: {' '.join(p.args)}")
            running.remove(p)


def read_curve(dtype: str, seed: int, run_dir: Path) -> dict:
    """One finished run: its final eval loss, final train loss and logged curve."""
    from lab.run.metrics import read_metrics

    summary = json.loads((run_dir / "summary.json").read_text())
    curve = {m["step"]: m["loss"] for m in read_metrics(run_dir) if "loss" in m}
    return {"dtype": dtype, "seed": seed, "final_eval_loss": summary["final_eval_loss"],
            "final_loss": curve[max(curve)], "train_seconds": summary.get("train_seconds"),
            "curve": curve}


def compare(runs: list[dict]) -> dict:
    """The two dtypes' mean final eval losses, their difference, and the seed spread."""
    by_dtype = {d: [r["final_eval_loss"] for r in runs if r["dtype"] == d] for d in DTYPES}
    means = {d: statistics.fmean(v) for d, v in by_dtype.items()}
    # Pooled sample variance: each dtype's deviations from its own mean.
    pooled = sum(statistics.variance(v) * (len(v) - 1) for v in by_dtype.values()) / sum(
        len(v) - 1 for v in by_dtype.values())
    spread = pooled ** 0.5
    difference = means["bfloat16"] - means["float32"]
    pairs = [(a, b) for a in runs for b in runs
             if a["dtype"] == "float32" and b["dtype"] == "bfloat16" and a["seed"] == b["seed"]]
    worst_step = max(abs(a["curve"][s] - b["curve"][s]) for a, b in pairs for s in a["curve"])
    return {"means": means, "difference": difference, "seed_spread": spread,
            "seed_range": {d: max(v) - min(v) for d, v in by_dtype.items()},
            "worst_same_seed_step_difference": worst_step,
            "bfloat16_within_seed_spread": abs(difference) < spread}


def report(runs: list[dict], verdict: dict) -> str:
    lines = ["Muon on configs/tiny.yaml (200 steps), Newton-Schulz operands float32 vs bfloat16",
             f"({len(runs)} runs on the CPU; at the report: {load_note()})", "",
             "| dtype | seed | final eval loss | final train loss | train s |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['dtype']} | {r['seed']} | {r['final_eval_loss']:.6f} | "
              f"{r['final_loss']:.6f} | {r['train_seconds']:.0f} |" for r in runs]
    m = verdict["means"]
    lines += ["", f"mean final eval loss: float32 {m['float32']:.5f}, bfloat16 {m['bfloat16']:.5f}",
              f"difference (bfloat16 - float32): {verdict['difference']:+.5f}",
              f"seed spread (pooled sample std over seeds): {verdict['seed_spread']:.5f}; "
              f"range float32 {verdict['seed_range']['float32']:.5f}, "
              f"bfloat16 {verdict['seed_range']['bfloat16']:.5f}",
              f"worst same-seed difference of a logged train loss: "
              f"{verdict['worst_same_seed_step_difference']:.5f}",
              "verdict: " + ("bfloat16 is within the seed spread"
                             if verdict["bfloat16_within_seed_spread"]
                             else "bfloat16 differs by more than the seed spread"), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=1, help="runs at once")
    parser.add_argument("--runs-dir", type=Path, required=True,
                        help="where the runs go (finished ones there are reused)")
    parser.add_argument("--out", type=Path, help="also write the report here (and .json beside)")
    args = parser.parse_args(argv)
    train_all(args.runs_dir, args.seeds, args.jobs)
    runs = [read_curve(d, s, args.runs_dir / f"{d}-{s}")
            for s in range(args.seeds) for d in DTYPES]
    verdict = compare(runs)
    text = report(runs, verdict)
    if args.out:
        args.out.with_suffix(".json").write_text(json.dumps(
            {"runs": [{k: v for k, v in r.items() if k != "curve"} for r in runs],
             "verdict": verdict}, indent=1) + "\n")
    return write_report(text, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
