"""Schedule laws against runs they were not fitted to: Tissue et al. 2024
(analysis/schedule_law.py) and the multi-power law of Luo et al. 2025
(analysis/multipower_law.py), fitted to the same curves in the same run.

The protocol, for each of two seeds (a d48 Muon + μP model of configs/demo-base.yaml, batch
16 x 128 tokens, warmup 30):

1. a stable WSD run (no decay) to step 800, eval every 20 steps, checkpoints at 300 and 600;
2. fitted: the stable curve (from step 60, twice the warmup) and two 1-sqrt decays to zero
   branched at 300 (60 and 150 steps), eval every 5 steps;
3. predicted, never fitted: 1-sqrt decays of 40, 120 and 200 steps branched at 600 (other
   lengths, one longer than any fitted), linear and cosine-shaped decays of 120 steps at 600,
   and a cosine schedule of 720 steps from scratch (other shapes).

Every eval is on the same 64 x 16 x 128 = 131k validation tokens. Scores, per law and seed:
the relative error of each final loss; the relative error of each annealing gain (the stable
run's loss at the same step minus the final loss; measured, the stable loss is a straight line
fitted to the stable evals within 100 steps, since one eval at the peak learning rate scatters;
predicted, the law's own stable curve); and whether the predicted order of the four 720-step
schedules (1-sqrt, linear and cosine decays at 600, cosine from scratch) matches the measured
one (concordant pairs of 6). Beside them: the eval noise of each fitted curve (its
point-to-point scatter, from second differences) and the seed floor (how far the two seeds'
measured losses and gains differ). Last, a simulation: each law's seed-0 fit taken as the
truth, the fitted curves redrawn from it at the same points with each curve's measured noise,
both laws refitted and scored the same way, so that the error the protocol's noise alone
causes stands beside the real errors.

    .venv/bin/python -m benchmarks.bench_schedule_law [--quick] [--keep DIR]

The full run writes benchmarks/results/schedule-law.json and schedule-law.txt (what it printed).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, ROOT, Quiet, load_note, print_rows, row

BASE = ROOT / "configs" / "demo-base.yaml"
SEEDS = (0, 1)
WARMUP, STABLE, FIT_AT, PREDICT_AT = 30, 800, 300, 600
FIT_DECAYS = (60, 150)
HELD = ((40, "1-sqrt"), (120, "1-sqrt"), (200, "1-sqrt"), (120, "linear"), (120, "cosine"))
COSINE_STEPS = 720  # as long as the 120-step decays at 600: the ranked group
SIM_DRAWS = 4


# ----------------------------------------------------------------------------- the scores


def relative_errors(predicted, measured) -> np.ndarray:
    """predicted / measured - 1, elementwise."""
    return np.asarray(predicted, float) / np.asarray(measured, float) - 1


def gain_errors(pred_stable, pred_final, meas_stable, meas_final) -> np.ndarray:
    """The relative error of each annealing gain (stable loss minus final loss, same step)."""
    return relative_errors(np.subtract(pred_stable, pred_final),
                           np.subtract(meas_stable, meas_final))


def ranking_agreement(predicted, measured) -> tuple[int, int]:
    """(pairs the prediction orders as measured, all pairs) among the schedules."""
    pairs = list(itertools.combinations(range(len(measured)), 2))
    right = sum((predicted[i] - predicted[j]) * (measured[i] - measured[j]) > 0 for i, j in pairs)
    return int(right), len(pairs)


def eval_noise(losses: np.ndarray) -> float:
    """The white-noise level of an evenly spaced, smooth-but-noisy curve: for white noise of
    standard deviation s, the second differences have standard deviation s * sqrt(6)."""
    return float(np.std(np.diff(np.asarray(losses, float), 2)) / np.sqrt(6))


def stable_at(n: np.ndarray, loss: np.ndarray, T: int, window: int = 100) -> float:
    """The stable run's loss at step T: a straight line fitted to its evals within `window`
    steps of T, read at T (one eval at a high learning rate scatters by a few hundredths)."""
    near = np.abs(n - T) <= window
    slope, intercept = np.polyfit(n[near].astype(float), loss[near], 1)
    return float(slope * T + intercept)


def score(law, held: list[dict]) -> dict:
    """A law's three scores on the held-out runs of one seed (dicts with lr, stable_lr, T,
    measured, measured_stable, ranked)."""
    pred = [law.final(h["lr"]) for h in held]
    pred_stable = [float(law.curve(h["stable_lr"])[h["T"]] + law.gap) for h in held]
    meas = [h["measured"] for h in held]
    err = relative_errors(pred, meas)
    gerr = gain_errors(pred_stable, pred, [h["measured_stable"] for h in held], meas)
    ranked = [i for i, h in enumerate(held) if h["ranked"]]
    right, pairs = ranking_agreement([pred[i] for i in ranked], [meas[i] for i in ranked])
    return {"predicted": pred, "error": err.tolist(), "gain_error": gerr.tolist(),
            "mean_abs_error": float(np.mean(np.abs(err))),
            "worst_abs_error": float(np.max(np.abs(err))),
            "mean_abs_gain_error": float(np.mean(np.abs(gerr))),
            "ranking": [right, pairs]}


# ----------------------------------------------------------------------------- the runs


def _train(cfg, log: io.StringIO) -> None:
    from lab.train import train

    with contextlib.redirect_stdout(log):
        train(cfg, progress=Quiet())


def _seed_runs(tmp: Path, seed: int, scale: float, log: io.StringIO) -> tuple[list, list[dict]]:
    """Train one seed's runs; its fitted curves and its held-out runs."""
    from lab.config import load_config, replace
    from lab.run.branch_points import child_config
    from lab.studies.branch_predict import load_curve

    s = lambda k: max(int(round(k * scale / 5)) * 5, 5)  # noqa: E731 (steps, multiples of 5)
    stable_dir = tmp / f"seed{seed}" / "stable"
    common = ["model.d_model=48", "model.n_heads=4", f"run.seed={seed}", "train.log_every=5",
              f"schedule.warmup_steps={s(WARMUP)}", "checkpoint.every_steps=0"]
    cfg = load_config(BASE, [f"run.dir={stable_dir}", *common, f"train.steps={s(STABLE)}",
                             "train.eval_every=" + str(s(20)),
                             f"branch.at_steps=[{s(FIT_AT)},{s(PREDICT_AT)}]"])
    _train(cfg, log)

    def branch(at: int, decay: int, shape: str) -> Path:
        child = child_config(cfg, str(stable_dir), at, decay, shape, 0.0)
        _train(replace(child, train={"eval_every": 5}), log)
        return Path(child.run.dir)

    stable = load_curve(str(stable_dir), use_eval=True)
    fitted = [stable] + [load_curve(str(branch(s(FIT_AT), s(d), "1-sqrt")), use_eval=True)
                         for d in FIT_DECAYS]
    held_dirs = [(f"{s(PREDICT_AT)}+{s(d)} {shape}", branch(s(PREDICT_AT), s(d), shape),
                  s(d) == s(120)) for d, shape in HELD]
    cos_dir = tmp / f"seed{seed}" / "cosine"
    cos_cfg = load_config(BASE, [f"run.dir={cos_dir}", *common, f"train.steps={s(COSINE_STEPS)}",
                                 "schedule.name=cosine", "train.eval_every=0"])
    _train(cos_cfg, log)
    held_dirs.append((f"cosine {s(COSINE_STEPS)} from scratch", cos_dir, True))
    held = []
    for name, run_dir, ranked in held_dirs:
        curve = load_curve(str(run_dir), use_eval=True)
        assert curve.final_eval is not None, f"{run_dir} did not finish: {log.getvalue()[-2000:]}"
        T = len(curve.lr)
        held.append({"name": name, "lr": curve.lr, "stable_lr": stable.lr, "T": T,
                     "measured": curve.final_eval, "ranked": ranked,
                     "measured_stable": stable_at(stable.n, stable.loss, T)})
    return fitted, held


# ----------------------------------------------------------------------------- fits and report


def _fit_both(fitted: list, start: int) -> dict:
    from analysis.multipower_law import fit_multipower_law
    from analysis.schedule_law import fit_schedule_law

    return {"tissue": fit_schedule_law(fitted, start=start),
            "multipower": fit_multipower_law(fitted, start=start)}


def _simulate(truth, fitted: list, held: list[dict], noise: list[float], start: int,
              seed: int) -> dict:
    """Both laws refitted on curves drawn from `truth` at the fitted points, each with its
    measured white noise, and scored against the truth's own losses: the error the protocol's
    noise alone causes."""
    from analysis.schedule_law import Curve

    rng = np.random.default_rng(seed)
    exact = [{**h, "measured": truth.final(h["lr"]),
              "measured_stable": float(truth.curve(h["stable_lr"])[h["T"]])} for h in held]
    errors: dict[str, list] = {"tissue": [], "multipower": [], "tissue_gain": [],
                               "multipower_gain": []}
    for _ in range(SIM_DRAWS):
        drawn = [Curve(c.name, c.lr, c.n, truth.curve(c.lr)[c.n]
                       + sigma * rng.standard_normal(len(c.n)))
                 for c, sigma in zip(fitted, noise, strict=True)]
        for name, law in _fit_both(drawn, start).items():
            s = score(law, exact)
            errors[name].append(s["mean_abs_error"])
            errors[f"{name}_gain"].append(s["mean_abs_gain_error"])
    return {k: float(np.mean(v)) for k, v in errors.items()}


def _seed_table(seed: int, held: list[dict], scores: dict) -> list[str]:
    lines = [f"seed {seed}: {'held-out run':<26} {'measured':>8} {'gain':>7} "
             + " ".join(f"{n + ' pred':>16} {'err':>7} {'gain err':>8}" for n in scores)]
    for i, h in enumerate(held):
        cells = " ".join(f"{s['predicted'][i]:>16.4f} {s['error'][i]:>+7.2%} "
                         f"{s['gain_error'][i]:>+8.1%}" for s in scores.values())
        lines.append(f"        {h['name']:<26} {h['measured']:>8.4f} "
                     f"{h['measured_stable'] - h['measured']:>7.4f} {cells}")
    for name, s in scores.items():
        lines.append(f"        {name}: mean |error| {s['mean_abs_error']:.2%}, worst "
                     f"{s['worst_abs_error']:.2%}, mean |gain error| "
                     f"{s['mean_abs_gain_error']:.1%}, ranking {s['ranking'][0]}/"
                     f"{s['ranking'][1]} pairs")
    return lines


def _floor(helds: list[list[dict]]) -> dict:
    """How far the seeds' measured final losses and gains differ, run by run."""
    meas = np.array([[h["measured"] for h in held] for held in helds])
    gain = np.array([[h["measured_stable"] - h["measured"] for h in held] for held in helds])
    orders = [tuple(np.argsort([h["measured"] for h in held if h["ranked"]])) for held in helds]
    return {"final": float(np.mean(np.abs(meas[0] - meas[1]) / meas.mean(0))),
            "gain": float(np.mean(np.abs(gain[0] - gain[1]) / gain.mean(0))),
            "measured_orders_agree": len(set(orders)) == 1}


def _seed_result(fitted: list, held: list[dict], start: int) -> tuple[dict, dict, list]:
    laws = _fit_both(fitted, start)
    noise = [eval_noise(c.loss) for c in fitted]  # the stable curve's, then each decay's
    return laws, {name: score(law, held) for name, law in laws.items()}, noise


def _summary(results: dict) -> dict:
    """Each law's scores over the seeds: mean |error|, worst, mean |gain error|, ranking."""
    out = {}
    for name in ("tissue", "multipower"):
        per = [results["seeds"][k]["scores"][name] for k in results["seeds"]]
        out[name] = {"mean_abs_error": float(np.mean([p["mean_abs_error"] for p in per])),
                     "worst_abs_error": float(np.max([p["worst_abs_error"] for p in per])),
                     "mean_abs_gain_error": float(np.mean([p["mean_abs_gain_error"]
                                                           for p in per])),
                     "ranking": [sum(p["ranking"][i] for p in per) for i in (0, 1)]}
    return out


def run(quick: bool = False, keep: str | None = None) -> list[dict]:
    """`keep`: train into this directory and keep it (a rerun skips the finished runs)."""
    scale = 0.25 if quick else 1.0
    start = 2 * max(int(round(WARMUP * scale / 5)) * 5, 5)
    started = time.perf_counter()
    log = io.StringIO()
    lines: list[str] = []
    results: dict = {"seeds": {}}
    helds = []
    with tempfile.TemporaryDirectory() if keep is None else contextlib.nullcontext(keep) as tmp:
        for seed in SEEDS:
            fitted, held = _seed_runs(Path(tmp), seed, scale, log)
            laws, scores, noise = _seed_result(fitted, held, start)
            helds.append(held)
            level = float(np.mean([c.loss[-1] for c in fitted]))
            decay_noise = float(np.mean(noise[1:]))
            lines += [f"seed {seed}: fitted on {', '.join(c.name for c in fitted)} "
                      f"({' + '.join(str(len(c.n)) for c in fitted)} eval points); "
                      f"point-to-point eval noise {noise[0]:.4f} nats ({noise[0] / level:.2%}) "
                      f"on the stable curve (every 20 steps), {decay_noise:.4f} "
                      f"({decay_noise / level:.2%}) on the decays (every 5 steps)"]
            lines += [f"  {law.name}: {law.describe()}" for law in laws.values()]
            lines += _seed_table(seed, held, scores)
            results["seeds"][seed] = {
                "noise_stable": noise[0], "noise_decays": decay_noise, "loss_level": level,
                "laws": {k: {f: v for f, v in vars(law).items()} for k, law in laws.items()},
                "runs": [h["name"] for h in held],
                "measured": [h["measured"] for h in held],
                "measured_stable": [h["measured_stable"] for h in held], "scores": scores}
            if seed == SEEDS[0]:
                sim = {f"truth {k}": _simulate(law, fitted, held, noise, start, seed)
                       for k, law in laws.items()}
        results["run_seconds"] = _run_seconds(Path(tmp))
    results["floor"] = _floor(helds)
    results["summary"] = _summary(results)
    results["simulation"] = sim
    seconds = time.perf_counter() - started
    lines += _closing(results, seconds)
    text = "\n".join(lines)
    print(text)
    if not quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        command = "$ .venv/bin/python -m benchmarks.bench_schedule_law" + (
            " --keep DIR  (runs already finished in DIR are read, not retrained)" if keep else "")
        (RESULTS / "schedule-law.txt").write_text(command + "\n\n" + text + "\n")
        (RESULTS / "schedule-law.json").write_text(
            json.dumps({**results, "seconds": seconds}, indent=2, default=_plain) + "\n")
    notes = "2 seeds, d48 Muon+μP; fitted on stable + 2 decays, 6 unseen schedules"
    rows = []
    for name, s in results["summary"].items():
        rows += [row(f"schedule law {name}: mean |error| of final losses",
                     100 * s["mean_abs_error"], "%", "goal", 1.0, notes),
                 row(f"schedule law {name}: mean |error| of annealing gains",
                     100 * s["mean_abs_gain_error"], "%", "goal", 25.0, notes),
                 row(f"schedule law {name}: ranking pairs right", s["ranking"][0], "pairs",
                     "all pairs", s["ranking"][1], notes)]
    rows.append(row("seed floor: mean |seed 0 - seed 1| of final losses",
                    100 * results["floor"]["final"], "%", "-", None, notes))
    return rows


def _run_seconds(root: Path) -> dict:
    """What the runs under `root` report they spent (compile, train, eval), summed: with
    `--keep` the runs may have been trained by an earlier call."""
    total = {"runs": 0, "compile_seconds": 0.0, "train_seconds": 0.0, "eval_seconds": 0.0}
    for summary in root.rglob("summary.json"):
        data = json.loads(summary.read_text())
        total["runs"] += 1
        for key in ("compile_seconds", "train_seconds", "eval_seconds"):
            total[key] += float(data.get(key) or 0.0)
    return total


def _plain(x):
    """JSON for numpy values."""
    return x.tolist() if isinstance(x, np.ndarray) else float(x)


def _closing(results: dict, seconds: float) -> list[str]:
    floor, sim = results["floor"], results["simulation"]
    lines = ["", "over both seeds:"]
    for name, s in results["summary"].items():
        lines.append(f"  {name:<10} mean |error| {s['mean_abs_error']:.2%} (goal < 1%, moonshot"
                     f" 0.3%), worst {s['worst_abs_error']:.2%}; mean |gain error| "
                     f"{s['mean_abs_gain_error']:.1%} (goal < 25%); ranking "
                     f"{s['ranking'][0]}/{s['ranking'][1]} pairs right")
    lines.append(f"  seed floor: the two seeds' final losses differ by {floor['final']:.2%} on "
                 f"average, their gains by {floor['gain']:.1%}; measured orders of the ranked "
                 f"group {'agree' if floor['measured_orders_agree'] else 'DISAGREE'} across seeds")
    lines.append(f"simulation (seed 0's fit taken as exact, {SIM_DRAWS} draws of the measured "
                 "eval noise at the same points):")
    for truth, errs in sim.items():
        lines.append(f"  {truth}: refitted tissue mean |error| {errs['tissue']:.2%} (gains "
                     f"{errs['tissue_gain']:.1%}), multipower {errs['multipower']:.2%} "
                     f"(gains {errs['multipower_gain']:.1%})")
    spent = results["run_seconds"]
    lines.append(f"{seconds:.0f} s for this call; the {spent['runs']} runs report "
                 f"{spent['compile_seconds']:.0f} s compiling, {spent['train_seconds']:.0f} s "
                 f"training and {spent['eval_seconds']:.0f} s evaluating; {load_note()}")
    return lines


if __name__ == "__main__":
    print_rows("schedule_law", run(quick="--quick" in sys.argv,
                                   keep=sys.argv[sys.argv.index("--keep") + 1]
                                   if "--keep" in sys.argv else None))
