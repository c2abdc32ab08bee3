"""How much dense compute is a mixture-of-experts model worth at this scale? The moe-tiny sweep
(configs/sweeps/moe-tiny.yaml: 3 sizes x E = 1 (dense), 2, 4, 8 experts at top-1 routing, every
run on the same 300K tokens, so dense and MoE runs of one size spend the same active compute),
then `lab fit --method moe` (Clark et al. 2022's unified law in active N and E, with the dense
equivalent and compute multiplier of each MoE, and its backtest by size) and, beside it, the
same runs fitted in total parameters (`--params total`).

    nice -n 10 .venv/bin/python -m benchmarks.bench_moe [--out DIR] [--quick]

The full run trains into DIR (default: a temporary folder; a finished run there is skipped, so
a stopped benchmark resumes) and writes benchmarks/results/moe-tiny.txt (the commands, what
they printed, the sweep's wall time) and moe-tiny.json (the fits). --quick (and `python -m
benchmarks`) fits a synthetic law shaped like the sweep instead, with 0.5% noise, and reports
how well the compute multiplier comes back; it trains nothing and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.common import RESULTS, ROOT, print_rows, row

PRESET = ROOT / "configs" / "sweeps" / "moe-tiny.yaml"
# A synthetic law for --quick: S-BASE-like magnitudes, at the sweep's sizes and expert counts.
TRUTH = (-0.08, -0.1, 0.004, 2.2, 1.8)  # a, b, c, d, E_start (E_max = inf)
SIZES, EXPERTS = (1.3e5, 2.9e5, 5.1e5), (1, 2, 4, 8)


def synthetic(seed: int = 0, noise: float = 0.005) -> list[dict]:
    """The law's compute multiplier at the largest size and 8 experts, from noisy points."""
    from analysis.moe_law import dense_equivalent, fit_moe, moe_law

    rng = np.random.default_rng(seed)
    N, E = np.repeat(SIZES, len(EXPERTS)), np.tile(np.asarray(EXPERTS, float), len(SIZES))
    loss = moe_law(N, E, *TRUTH) * np.exp(rng.normal(0, noise, len(N)))
    fit = fit_moe(pd.DataFrame({"N": N, "E": E, "loss": loss}), bootstrap=200,
                  at=[(SIZES[-1], 8.0)])
    got = fit.answers().iloc[0]
    truth = float(dense_equivalent(SIZES[-1], 8.0, *TRUTH)) / SIZES[-1]
    inside = got.multiplier_lo <= truth <= got.multiplier_hi
    return [row("synthetic MoE law: compute multiplier at 8 experts", got.multiplier, "x",
                "the true law's", truth,
                f"95% interval [{got.multiplier_lo:.3g}, {got.multiplier_hi:.3g}] "
                f"{'holds' if inside else 'misses'} it; {len(N)} points, {noise:.1%} noise")]


def _children_cpu_seconds() -> float:
    """User and system time of this process's finished children (and theirs), in seconds."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _lab(words: list[str]) -> str:
    """`lab WORDS` under nice, its output (stdout and stderr) shown as it runs and returned."""
    cmd = ["nice", "-n", "10", sys.executable, "-m", "lab.cli", *words]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    sys.stdout.write(proc.stdout)
    if proc.returncode != 0:
        raise RuntimeError(f"lab {' '.join(words)} exited {proc.returncode}: "
                           f"{proc.stderr.strip()[-500:]}")
    return proc.stdout + proc.stderr


def sweep_and_fit(out: Path) -> list[dict]:
    """Run the sweep, fit it both ways, write the record; the rows of the answer."""
    started, cpu_before = time.perf_counter(), _children_cpu_seconds()
    log = _lab(["sweep", str(PRESET), "--out", str(out)])
    sweep_seconds = time.perf_counter() - started
    # The CPU time of the sweep's processes does not grow with other work on the machine, as
    # the wall time does; its runs are one process at a time, so on an idle machine the wall
    # time is about the CPU time (less where a step uses both cores).
    cpu_seconds, load = _children_cpu_seconds() - cpu_before, os.getloadavg()[2]
    fits, printed = {}, [f"$ lab sweep configs/sweeps/moe-tiny.yaml --out OUT  "
                         f"({sweep_seconds:.0f} s wall, {cpu_seconds:.0f} s CPU, load average "
                         f"{load:.1f} over the last 15 minutes)",
                         log.replace(str(out), "OUT").rstrip()]
    for params in ("active", "total"):
        words = ["fit", str(out), "--method", "moe", "--params", params, "--bootstrap", "200"]
        words += ["--backtest"] if params == "active" else []
        with tempfile.NamedTemporaryFile(suffix=".json") as fh:
            text = _lab([*words, "--json", fh.name])
            fits[params] = json.loads(Path(fh.name).read_text())
        shown = " ".join(["lab", *words]).replace(str(out), "OUT")
        printed += ["", f"$ {shown} --json OUT.json", text.replace(str(out), "OUT").rstrip()]
    (RESULTS / "moe-tiny.txt").write_text("\n".join(printed) + "\n")
    (RESULTS / "moe-tiny.json").write_text(json.dumps(
        {"sweep_seconds": sweep_seconds, "sweep_cpu_seconds": cpu_seconds, "load_average": load,
         "fits": fits}, indent=2) + "\n")
    rows = [row("moe-tiny sweep: CPU time", cpu_seconds, "s", "the 15-minute goal", 900.0,
                f"12 runs, one at a time; {sweep_seconds:.0f} s wall at load {load:.1f}")]
    for r in fits["active"]["answers"]:
        rows.append(row(f"compute multiplier at N={r['N']:.3g}, E={r['E']:g}",
                        r["multiplier"], "x", "dense (E = 1)", 1.0,
                        f"95% interval [{r.get('multiplier_lo') or float('nan'):.3g}, "
                        f"{r.get('multiplier_hi') or float('nan'):.3g}]"))
    return rows


def run(quick: bool = False, out: str | None = None) -> list[dict]:
    if quick:
        return synthetic()
    if out:
        return sweep_and_fit(Path(out))
    with tempfile.TemporaryDirectory() as tmp:
        return sweep_and_fit(Path(tmp) / "moe-tiny")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the synthetic law only; trains nothing")
    p.add_argument("--out", help="train the sweep here (kept; a rerun resumes it)")
    args = p.parse_args()
    print_rows("moe", run(quick=args.quick, out=args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
