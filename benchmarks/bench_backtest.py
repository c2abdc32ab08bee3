"""How well Approach 3 predicts Chinchilla's larger runs from its smaller ones:
`lab fit $LAB_CHINCHILLA_CSV --backtest` (a rolling-origin backtest by compute, 4 quantile cuts
of C, against the naive baselines of analysis/baselines.py), as the issue states it (all 245
rows of the CSV) and on the replication's 240 points (`--drop-highest-loss 5`), each timed as
a `lab fit` process beside the plain fit (no backtest) in the same run.

    LAB_CHINCHILLA_CSV=... .venv/bin/python -m benchmarks.bench_backtest [--quick]

Then the calibrated intervals on synthetic laws with what the law does not model (SCENARIOS,
the very cases tests/test_analysis_backtest.py checks): the coverage of fresh outcomes beyond
the fitted budgets by nominal 90% intervals, calibrated and uncalibrated (residual).

The CSV has no licence and never enters the repository; only these results do. The full run
writes benchmarks/results/backtest-chinchilla.json and backtest-chinchilla.txt (the commands,
what they printed, the times, the coverages). --quick runs the 245-point command alone and
writes nothing.
"""

from __future__ import annotations

import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.common import RESULTS, ROOT, load_note, print_rows, row

# The synthetic law of the coverage checks, and its IsoFLOP design: six budgets.
TRUTH = (1.7, 400.0, 1200.0, 0.34, 0.30)  # E, A, B, alpha, beta
BUDGETS = np.logspace(16, 18.5, 6)
SCENARIOS = {  # name: (loss at (N, D) before noise, the noise's log-sd at N)
    "noise growing with N": (lambda N, D: _law(N, D), lambda N: 0.004 * (N / 1e7) ** 0.3),
    "misspecified law": (lambda N, D: _law(N, D) + 8.0 / (N * D) ** 0.12,
                         lambda N: np.full(np.shape(N), 0.006)),
}


def _law(N, D):
    from analysis.approach3 import law

    return law(N, D, *TRUTH)


def _starts() -> np.ndarray:
    """40 starts of the published grid around where TRUTH's fits end; each runs to
    convergence (a few starts keep the checks short)."""
    from analysis.approach3 import chinchilla_grid

    g = chinchilla_grid()
    return g[np.isin(g[:, 0], (5.0, 10.0)) & np.isin(g[:, 1], (5.0, 10.0))
             & np.isin(g[:, 2], (0.0, 0.5)) & (g[:, 3] == 0.5)]


STARTS = _starts()


def isoflop(budgets) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Five sizes across ±0.5 decade around TRUTH's optimum at each budget: N, D, C."""
    from analysis.approach3 import optimal_allocation

    N, D, C = [], [], []
    for c in budgets:
        n_opt, _, _ = optimal_allocation(c, *TRUTH)
        for n in n_opt * np.logspace(-0.5, 0.5, 5):
            N.append(n)
            D.append(c / (6 * n))
            C.append(c)
    return np.array(N), np.array(D), np.array(C)


def frame(N, D, C, loss) -> pd.DataFrame:
    return pd.DataFrame({"N": N, "D": D, "C": C, "loss": loss})


def interval_coverage(scenario: str, seeds: int = 8, level: float = 0.9) -> tuple[float, float]:
    """Coverage of fresh outcomes 3x and 10x beyond the largest budget by `level` intervals of
    Approach 3 fitted on the six budgets: (calibrated by the backtest, residual)."""
    from analysis.approach3 import fit_approach3
    from analysis.backtest import backtest
    from analysis.predict import LossLaw, fit_record

    truth, noise_sd = SCENARIOS[scenario]
    hits = {"calibrated": [], "residual": []}
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        N, D, C = isoflop(BUDGETS)
        loss = truth(N, D) * np.exp(rng.normal(0, noise_sd(N)))
        fit = fit_approach3(N, D, loss, grid=STARTS)
        bt = backtest(frame(N, D, C, loss), starts=STARTS, level=level)
        rec = fit.to_dict() | fit_record(fit, N, D, loss)
        laws = {"calibrated": LossLaw.from_dict(rec | {"calibration": bt.calibration()}),
                "residual": LossLaw.from_dict(rec)}
        Nq, Dq, _ = isoflop(BUDGETS[-1] * np.array([3.0, 10.0]))
        yq = truth(Nq, Dq) * np.exp(rng.normal(0, noise_sd(Nq)))
        for kind, lw in laws.items():
            assert lw.interval_method == kind
            for n, d, y in zip(Nq, Dq, yq, strict=True):
                _, lo, hi = lw.predict(n, d, level=level)
                hits[kind].append(lo <= y <= hi)
    return float(np.mean(hits["calibrated"])), float(np.mean(hits["residual"]))


def _lab_fit(words: list[str]) -> tuple[str, float, float]:
    """Run `lab fit WORDS` as its own process: (stdout, wall seconds, CPU seconds)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lab.cli", "fit", *words], cwd=ROOT,
                          capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"lab fit {shlex.join(words)} failed: {proc.stderr.strip()[-300:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return proc.stdout, wall, cpu


def run(quick: bool = False) -> list[dict]:
    csv = os.environ.get("LAB_CHINCHILLA_CSV")
    cases = {"all 245 rows": [], "240 points (--drop-highest-loss 5)": ["--drop-highest-loss",
                                                                       "5"]}
    if quick:
        cases = {"all 245 rows": []}
    rows, printed, records = [], [], {}
    if not csv or not Path(csv).is_file():
        cases = {}
        rows.append(row("backtest on Chinchilla's points", None, "", "-", None,
                        "skipped: point LAB_CHINCHILLA_CSV at Epoch AI's chinchilla_epoch.csv"))
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in cases.items():
            out = Path(tmp) / "fit.json"
            _, plain_wall, plain_cpu = _lab_fit([csv, *extra])
            words = [csv, *extra, "--backtest", "--json", str(out)]
            text, wall, cpu = _lab_fit(words)
            shown = ["lab", "fit", "$LAB_CHINCHILLA_CSV", *extra, "--backtest", "--json",
                     "OUT"]
            printed += [f"$ {' '.join(shown)}", text.rstrip().replace(str(out), "OUT"),
                        f"time: {wall:.1f} s wall, {cpu:.1f} s CPU; the plain fit (no "
                        f"--backtest) {plain_wall:.1f} s wall, {plain_cpu:.1f} s CPU", ""]
            bt = json.loads(out.read_text())["backtest"]
            records[name] = {"command": " ".join(shown), "wall_seconds": wall,
                             "cpu_seconds": cpu, "plain_fit_wall_seconds": plain_wall,
                             "plain_fit_cpu_seconds": plain_cpu, "backtest": bt}
            rows.append(row(f"lab fit --backtest, {name}: wall time", wall, "s",
                            "the plain fit, same run", plain_wall, f"CPU {cpu:.1f} s"))
            wins = sum(f["law"]["mean_abs_error"] < f["baselines"]["log_linear"][
                "mean_abs_error"] for f in bt["folds"])
            mean = bt["summary"]["mean_abs_error"]
            rows.append(row(f"{name}: law mean |error| over folds", 100 * mean["law"], "%",
                            "log-linear baseline", 100 * mean["log_linear"],
                            f"law beats log-linear in {wins} of {len(bt['folds'])} folds"))
    coverage = {}
    printed.append("Nominal 90% intervals, fresh outcomes 3x and 10x beyond six fitted IsoFLOP "
                   "budgets, 8 seeds x 10 outcomes (benchmarks.bench_backtest.SCENARIOS):")
    for name in SCENARIOS:
        calibrated, residual = interval_coverage(name)
        coverage[name] = {"calibrated": calibrated, "residual": residual}
        printed.append(f"  {name}: calibrated {calibrated:.1%}, residual {residual:.1%}")
        rows.append(row(f"90% interval coverage, {name}", 100 * calibrated, "%",
                        "residual interval", 100 * residual, "goal 80-95%"))
    note = load_note()
    printed.append(note)
    print("\n".join(printed))
    if not quick and records:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "backtest-chinchilla.txt").write_text("\n".join(printed) + "\n")
        (RESULTS / "backtest-chinchilla.json").write_text(
            json.dumps({"load": note, "cases": records, "coverage": coverage}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    print_rows("backtest", run(quick="--quick" in sys.argv))
