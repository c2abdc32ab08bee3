"""The schedule law (analysis/schedule_law.py) against runs it was not fitted to, on the demo
corpus with the demo's base config (Muon + μP, one layer):

1. a stable WSD run to step S2 = 2 S1, keeping checkpoints at S1 and S2;
2. two 1-sqrt decays branched at S1 (20% and 40% of S1): the law is fitted on these and the
   stable curve, and `lab branch RUN --at S2 --decay-steps ... --predict` prints its predictions
   (nothing is trained);
3. then the held-back runs: 1-sqrt decays of 10%, 20% and 40% of S2 at S2, a linear decay of
   20%, and a cosine run from scratch as long as the 20% branch. Error = predicted / measured
   final eval loss - 1.
4. B: the same runs, the law fitted on the stable curve and one decay at each branch point
   (40% at S1, 20% at S2), predicting the other four branches and the cosine run.

    .venv/bin/python -m benchmarks.bench_schedule_law [--quick]

The full run writes benchmarks/results/schedule-law.json and schedule-law.txt (what it printed).
"""

from __future__ import annotations

import contextlib
import dataclasses
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


def _child(stable: Path, step: int, decay: int, shape: str) -> Path:
    """A branch's directory (its name may carry more than step, decay and shape)."""
    found = sorted((stable / "branches").glob(f"step{step}-decay{decay}-{shape}*"))
    assert len(found) == 1, found
    return found[0]


def _table(title: str, checks: list[tuple[str, float, float]]) -> tuple[str, dict]:
    errors = [p / m - 1 for _, p, m in checks]
    lines = [title, f"{'held-back run':<34} {'predicted':>9} {'measured':>9} {'error':>8}"]
    lines += [f"{n:<34} {p:>9.4f} {m:>9.4f} {e:>+8.2%}"
              for (n, p, m), e in zip(checks, errors, strict=True)]
    worst = max(abs(e) for e in errors)
    mean_abs = sum(abs(e) for e in errors) / len(errors)
    lines.append(f"mean |error| {mean_abs:.2%}, worst {worst:.2%}")
    data = {"checks": [{"run": n, "predicted": p, "measured": m, "error": e}
                       for (n, p, m), e in zip(checks, errors, strict=True)],
            "mean_abs_error": mean_abs, "worst_abs_error": worst}
    return "\n".join(lines), data


def _measured(run_dir: Path) -> float:
    from lab.rundir import read_summary

    return float(read_summary(run_dir).final_eval_loss)


def _check_b(stable: Path, cfg, runs: dict, fit_on: list, cos_cfg, cos_dir: Path
             ) -> tuple[str, dict]:
    """B: the law fitted on the stable curve and the branches `fit_on` (one at each branch
    point), predicting the other branches of `runs` and the cosine run."""
    from analysis.schedule_law import fit_schedule_law
    from lab import rundir
    from lab.branch_predict import default_start, lr_sequence, run_curves
    from lab.config import load_config

    (s1, d1, _), (s2, d2, _) = fit_on
    curves = {c.name: c for c in run_curves(str(stable))}
    chosen = [curves[stable.name]] + [curves[runs[k].name] for k in fit_on]
    law_b = fit_schedule_law(chosen, start=default_start(cfg))
    checks_b = []
    for key, run_dir in runs.items():
        if key not in fit_on:
            lr = lr_sequence(load_config(rundir.config_path(run_dir)))
            checks_b.append((f"branch {key[0]}+{key[1]} {key[2]}", law_b.final(lr),
                             _measured(run_dir)))
    cos_lr = lr_sequence(cos_cfg)
    checks_b.append((f"cosine, {s2 + d2} steps from scratch", law_b.final(cos_lr),
                     _measured(cos_dir)))
    text_b, result = _table(
        f"B. fitted on the stable run, {s1}+{d1} and {s2}+{d2}: {law_b.describe()}", checks_b)
    result["law"] = dataclasses.asdict(law_b)
    return text_b, result


def _write_results(text: str, results: dict, seconds: float) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "schedule-law.txt").write_text(
        "$ .venv/bin/python -m benchmarks.bench_schedule_law\n\n" + text + "\n")
    (RESULTS / "schedule-law.json").write_text(
        json.dumps({**results, "seconds": seconds}, indent=2, default=str) + "\n")


def run(quick: bool = False) -> list[dict]:
    from lab.branch_predict import predict_branches
    from lab.config import load_config
    from lab.train import train

    s1 = 60 if quick else 240
    s2 = 2 * s1
    common = ["model.d_model=48", "model.n_heads=4", "train.log_every=5",
              f"train.eval_every={s1 // 6}", "train.eval_batches=32",
              "schedule.warmup_steps=30"]
    started = time.perf_counter()
    log = io.StringIO()
    printed: list[str] = []
    results: dict = {}
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
        printed.append("$ lab branch RUN " + " ".join(words[1:]))
        printed.append(_branch(words, log).rstrip())
        law, rows = predict_branches(str(stable), [(s2, d) for d in held], "1-sqrt", 0.0)
        _, linear = predict_branches(str(stable), [(s2, held[1])], "linear", 0.0)
        assert len(law.curves) == 3  # the stable run and the 2 decays at s1

        # Only now the held-back runs.
        _branch(words[:-1], log)
        _branch([*words[:-2], str(held[1]), "--shape", "linear"], log)
        cos_dir = Path(tmp) / "cosine"
        cos_cfg = load_config(BASE, [f"run.dir={cos_dir}", *common,
                                     f"train.steps={s2 + held[1]}", "schedule.name=cosine",
                                     "checkpoint.every_steps=0"])
        with contextlib.redirect_stdout(log):
            train(cos_cfg, progress=Quiet())

        runs = {(s, d, sh): _child(stable, s, d, sh) for s, d, sh in
                [(s1, fit_decays[0], "1-sqrt"), (s1, fit_decays[1], "1-sqrt"),
                 *[(s2, d, "1-sqrt") for d in held], (s2, held[1], "linear")]}
        checks = [(f"branch {s2}+{r['decay_steps']} 1-sqrt", r["predicted"],
                   _measured(runs[(s2, r["decay_steps"], "1-sqrt")])) for r in rows]
        checks.append((f"branch {s2}+{held[1]} linear", linear[0]["predicted"],
                       _measured(runs[(s2, held[1], "linear")])))
        checks.append((f"cosine, {s2 + held[1]} steps from scratch",
                       rows[1]["cosine_predicted"], _measured(cos_dir)))
        text_a, results["A"] = _table(
            f"A. fitted on the stable run and the decays {fit_decays} at step {s1} "
            f"(as printed above); predicting at step {s2}:", checks)
        results["A"]["law"] = dataclasses.asdict(law)

        # B: the same runs, fitted on one decay at each branch point, predicting the others.
        fit_on = [(s1, fit_decays[1], "1-sqrt"), (s2, held[1], "1-sqrt")]
        text_b, results["B"] = _check_b(stable, cfg, runs, fit_on, cos_cfg, cos_dir)
    seconds = time.perf_counter() - started
    printed += [text_a, text_b, f"{seconds:.0f} s; {load_note()}"]
    text = "\n\n".join(printed)
    print(text)
    notes = (f"configs/demo-base.yaml d48 Muon+μP, stable to {s2}, decays at {s1} and {s2}; "
             "A: fitted at the first point only, B: one decay at each point")
    if not quick:
        _write_results(text, results, seconds)
    return [row(f"schedule law {k}: {what} |error| on held-back runs",
                100 * results[k][f"{what}_abs_error"], "%", "goal", 1.0, notes)
            for k in ("A", "B") for what in ("mean", "worst")]


if __name__ == "__main__":
    print_rows("schedule_law", run(quick="--quick" in sys.argv))
