"""The schedule law (analysis/schedule_law.py) against runs it was not fitted to, on the demo
corpus with the demo's base config (Muon + μP, one layer):

1. a stable WSD run to step S2 = 2 S1, keeping checkpoints at S1 and S2;
2. two 1-sqrt decays branched at S1 (20% and 40% of S1): the law is fitted on these and the
   stable curve, and `lab branch RUN --at S2 --decay-steps ... --predict` prints its predictions
   (nothing is trained);
3. then the held-back runs: 1-sqrt decays of 10%, 20% and 40% of S2 at S2, a linear decay of
   20%, and a cosine run from scratch as long as the 20% branch. Error = predicted / measured
   final eval loss - 1.

    .venv/bin/python -m benchmarks.bench_schedule_law [--quick]

The full run writes benchmarks/results/schedule-law.json and schedule-law.txt (what it printed).
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS, ROOT, Quiet, load_note, print_rows, row

BASE = ROOT / "configs" / "demo-base.yaml"


def _branch(argv: list[str], log: io.StringIO) -> str:
    from lab import branch

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert branch.main(argv) == 0, out.getvalue()
    log.write(out.getvalue())
    return out.getvalue()


def run(quick: bool = False) -> list[dict]:
    from analysis.schedule_law import load_curve, predict_branches, run_curves
    from lab.config import load_config
    from lab.metrics import read_json
    from lab.train import train

    s1 = 60 if quick else 240
    s2 = 2 * s1
    common = ["model.d_model=48", "model.n_heads=4", "train.log_every=5",
              f"train.eval_every={s1 // 6}", "train.eval_batches=32",
              "schedule.warmup_steps=30"]
    started = time.perf_counter()
    log = io.StringIO()
    printed: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        stable = Path(tmp) / "stable"
        cfg = load_config(BASE, [f"run.dir={stable}", *common, f"train.steps={s2}",
                                 "checkpoint.every_steps=0", f"branch.at_steps=[{s1},{s2}]"])
        with contextlib.redirect_stdout(log):
            train(cfg, progress=Quiet())
        fit_decays = [round(0.2 * s1), round(0.4 * s1)]
        _branch([str(stable), "--at", str(s1), "--decay-steps", ",".join(map(str, fit_decays))],
                log)
        held = [round(0.1 * s2), round(0.2 * s2), round(0.4 * s2)]
        words = [str(stable), "--at", str(s2), "--decay-steps", ",".join(map(str, held)),
                 "--predict"]
        printed.append("$ lab branch " + " ".join(["RUN", *words[1:]]))
        printed.append(_branch(words, log).rstrip())
        law, rows = predict_branches(str(stable), [(s2, d) for d in held], "1-sqrt", 0.0)
        _, linear = predict_branches(str(stable), [(s2, held[1])], "linear", 0.0)
        assert len(run_curves(str(stable))) == 3  # the fit saw the stable run and 2 decays

        # Only now the held-back runs.
        _branch(words[:-1], log)
        _branch([*words[:-2], str(held[1]), "--shape", "linear"], log)
        cos_dir = Path(tmp) / "cosine"
        cos_cfg = load_config(BASE, [f"run.dir={cos_dir}", *common,
                                     f"train.steps={s2 + held[1]}", "schedule.name=cosine",
                                     "checkpoint.every_steps=0"])
        with contextlib.redirect_stdout(log):
            train(cos_cfg, progress=Quiet())

        from lab.branch import branch_name

        def measured(run_dir: Path) -> float:
            return float(read_json(run_dir / "summary.json")["final_eval_loss"])

        checks = []
        for r in rows:
            name = branch_name(s2, r["decay_steps"], "1-sqrt")
            checks.append((f"branch {s2}+{r['decay_steps']} 1-sqrt", r["predicted"],
                           measured(stable / "branches" / name)))
        name = branch_name(s2, held[1], "linear")
        checks.append((f"branch {s2}+{held[1]} linear", linear[0]["predicted"],
                       measured(stable / "branches" / name)))
        checks.append((f"cosine, {s2 + held[1]} steps from scratch",
                       rows[1]["cosine_predicted"], measured(cos_dir)))
        assert load_curve(str(cos_dir)).final_eval == checks[-1][2]
    seconds = time.perf_counter() - started

    errors = [p / m - 1 for _, p, m in checks]
    lines = [f"{'held-back run':<34} {'predicted':>9} {'measured':>9} {'error':>8}"]
    lines += [f"{n:<34} {p:>9.4f} {m:>9.4f} {e:>+8.2%}"
              for (n, p, m), e in zip(checks, errors, strict=True)]
    worst = max(abs(e) for e in errors)
    mean_abs = sum(abs(e) for e in errors) / len(errors)
    lines.append(f"mean |error| {mean_abs:.2%}, worst {worst:.2%} "
                 f"({seconds:.0f} s; {load_note()})")
    printed.append("\n".join(lines))
    text = "\n\n".join(printed)
    print(text)
    notes = (f"configs/demo-base.yaml d48 Muon+μP; fitted on the stable run to {s2} and decays "
             f"{fit_decays} at {s1}; held back: {len(checks)} runs")
    if not quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "schedule-law.txt").write_text(
            "$ .venv/bin/python -m benchmarks.bench_schedule_law\n\n" + text + "\n")
        (RESULTS / "schedule-law.json").write_text(json.dumps({
            "law": {k: getattr(law, k) for k in ("L0", "A", "alpha", "C", "lam", "gap", "rms",
                                                 "n_points")},
            "fitted_on": list(law.curves), "checks": [
                {"run": n, "predicted": p, "measured": m, "error": e}
                for (n, p, m), e in zip(checks, errors, strict=True)],
            "mean_abs_error": mean_abs, "worst_abs_error": worst, "seconds": seconds},
            indent=2) + "\n")
    return [row("schedule law: worst |error| on held-back runs", 100 * worst, "%",
                "goal", 1.0, notes),
            row("schedule law: mean |error| on held-back runs", 100 * mean_abs, "%", "goal",
                1.0, notes)]


if __name__ == "__main__":
    print_rows("schedule_law", run(quick="--quick" in sys.argv))
