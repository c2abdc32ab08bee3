"""How well Approach 3 predicts Chinchilla's larger runs from its smaller ones:
`lab fit $LAB_CHINCHILLA_CSV --backtest` (a rolling-origin backtest by compute, 4 quantile cuts
of C, against the naive baselines of analysis/baselines.py), as the issue states it (all 245
rows of the CSV) and on the replication's 240 points (`--drop-highest-loss 5`), each timed as
a `lab fit` process beside the plain fit (no backtest) in the same run.

    LAB_CHINCHILLA_CSV=... .venv/bin/python -m benchmarks.bench_backtest [--quick]

The CSV has no licence and never enters the repository; only these results do. The full run
writes benchmarks/results/backtest-chinchilla.json and backtest-chinchilla.txt (the commands,
what they printed, and the times). --quick runs the 245-point command alone and writes nothing.
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

from benchmarks.common import RESULTS, ROOT, load_note, print_rows, row


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
    if not csv or not Path(csv).is_file():
        return [row("backtest on Chinchilla's points", None, "", "LAB_CHINCHILLA_CSV unset", None,
                    "skipped: point LAB_CHINCHILLA_CSV at Epoch AI's chinchilla_epoch.csv")]
    cases = {"all 245 rows": [], "240 points (--drop-highest-loss 5)": ["--drop-highest-loss",
                                                                       "5"]}
    if quick:
        cases = {"all 245 rows": []}
    rows, printed, records = [], [], {}
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
    note = load_note()
    print("\n".join(printed) + note)
    if not quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "backtest-chinchilla.txt").write_text("\n".join(printed) + note + "\n")
        (RESULTS / "backtest-chinchilla.json").write_text(
            json.dumps({"load": note, "cases": records}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    print_rows("backtest", run(quick="--quick" in sys.argv))
