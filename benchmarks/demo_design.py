"""The demo's study design on paper: `python -m benchmarks.demo_design`.

Before anything of a new demo recipe is trained, this prices candidate designs against the
15-minute budget of `make demo` and checks the geometry of the held-out budget, using the last
demo's fitted law (benchmarks/results/demo-full-20261129.txt: E 1.073, alpha 0.817,
beta 0.934, A and B refitted from its twelve printed points) as a stand-in truth. Nothing here
reads a held-out run.

The geometric fact it checks: with C = 6 N D, a held-out point beyond both the largest fitted
N and the largest fitted D needs N_h D_h > N_max D_max. When every fitted size spends the top
budget, D_max = C_top / (6 N_min) and the condition is C_h / C_top > N_max / N_min, impossible
at C_h = 2 C_top with a ladder spanning more than 2x. A staircase (each budget's sizes centred on
its optimum, neighbouring budgets sharing sizes) keeps the small sizes out of the top budget.
"""

from __future__ import annotations

import numpy as np

from analysis.approach3 import fit_approach3, law
from lab.config import load_config, override
from lab.model.accounting import flops_per_token, param_counts, with_vocab
from lab.studies.demo import STUDY, load_study

# The last demo's points (benchmarks/results/demo-full-20261129.txt): N, tokens, loss.
LAST_DEMO = [
    (23_648, 3_616_768, 1.5293), (23_648, 7_233_536, 1.4826), (23_648, 14_467_072, 1.4541),
    (45_456, 1_943_552, 1.4567), (45_456, 3_887_104, 1.3753), (45_456, 7_774_208, 1.3271),
    (90_648, 1_003_520, 1.5118), (90_648, 2_007_040, 1.3781), (90_648, 4_014_080, 1.2826),
    (199_248, 468_992, 1.7980), (199_248, 937_984, 1.4824), (199_248, 1_875_968, 1.3119),
]
RATE = 6.0e10  # lab FLOPs per second of training on 2 quiet cores (the last demo: 1.58e13
# FLOPs, 17 runs, 365 s in all, with OVERHEAD per run and ANALYSIS below)
OVERHEAD = 6.0  # seconds per run outside its steps: compilation, restore, evaluation, saves
ANALYSIS = 30.0
SEED_NOISE = 0.004  # relative seed-to-seed scatter of a final loss, the low end seen here


def stand_in_truth() -> tuple[float, ...]:
    n, d, loss = (np.array(c, float) for c in zip(*LAST_DEMO, strict=True))
    fit = fit_approach3(n, d, loss)
    return fit.E, fit.A, fit.B, fit.alpha, fit.beta


def sizes_of(widths: list[int]) -> list[tuple[int, int, int]]:
    """(width, non-embedding N, lab FLOPs per step) of one-layer models, the study's base."""
    base = load_config(load_study(STUDY).base)
    rows = []
    for w in widths:
        cfg = override(base, {"model.d_model": w, "model.n_heads": 2 if w < 48 else 4})
        m = with_vocab(cfg.model, 257)
        per_step = flops_per_token(m, cfg.train.seq_len) * cfg.train.batch_size * cfg.train.seq_len
        rows.append((w, param_counts(m)["non_embedding_params"], per_step))
    return rows


def price(widths, budgets, per_budget, held_budget, held_sizes, seeds, truth, decay=0.25):
    """The design's FLOPs, runs, estimated wall clock and the held-out geometry. Budget k
    trains sizes k .. k + per_budget - 1 of `widths`; the held-out budget trains `held_sizes`
    (indices into widths), once per seed."""
    sizes = sizes_of(widths)
    fitted = {}  # size index -> budgets it spends
    for k, b in enumerate(budgets):
        # per_budget None: every size below the held-out ones at every budget (the last demo)
        window = range(min(held_sizes)) if per_budget is None else range(k, k + per_budget)
        for i in window:
            fitted.setdefault(i, []).append(b)
    # A stable run to the largest branch step, then one decay of 0.25 S per budget.
    flops = sum(max(bs) / (1 + decay) + sum(b * decay / (1 + decay) for b in bs)
                for bs in fitted.values())
    runs = len(fitted) + sum(len(bs) for bs in fitted.values())
    held = held_budget * len(held_sizes) * seeds
    flops += held
    runs += len(held_sizes) * seeds
    points = [(sizes[i][1], b / sizes[i][2] * 16 * 128, b) for i, bs in fitted.items()
              for b in bs]
    n_max = max(p[0] for p in points)
    d_max = max(p[1] for p in points)
    held_points = [(sizes[i][1], held_budget / sizes[i][2] * 16 * 128) for i in held_sizes]
    steps = {sizes[i][0]: round(b / sizes[i][2] / (1 + decay)) for i, bs in fitted.items()
             for b in bs[:1]}
    loss = [float(law(n, d, *truth)) for n, d in held_points]
    return {
        "flops": flops, "runs": runs,
        "minutes": (flops / RATE + runs * OVERHEAD + ANALYSIS) / 60,
        "n_span": sizes[max(fitted)][1] / sizes[0][1],
        "beyond": [(n / n_max, d / d_max) for n, d in held_points],
        "first_steps": steps, "held_loss": loss,
        "profile_depth": (max(loss[0], loss[-1]) - min(loss)) / min(loss),
    }


def describe(name, widths, budgets, per_budget, held_budget, held_sizes, seeds, truth):
    r = price(widths, budgets, per_budget, held_budget, held_sizes, seeds, truth)
    both = [i for i, (xn, xd) in enumerate(r["beyond"]) if xn > 1 and xd > 1]
    print(f"{name}: widths {widths}, budgets {[f'{b:.3g}' for b in budgets]}, "
          f"{per_budget or 'all'} sizes a budget; held out {held_budget:.3g} "
          f"({held_budget / budgets[-1]:g}x) at widths {[widths[i] for i in held_sizes]} "
          f"x {seeds} seed(s)")
    print(f"  {r['flops']:.3g} lab FLOPs, {r['runs']} runs, about {r['minutes']:.1f} min on 2 "
          f"quiet cores; fitted N spans {r['n_span']:.1f}x")
    print("  held-out N/N_max, D/D_max: " + ", ".join(f"({a:.2f}, {b:.2f})"
                                                      for a, b in r["beyond"])
          + f"; beyond both: {len(both)} point(s)")
    print(f"  stand-in law on the held-out sizes: {[round(x, 4) for x in r['held_loss']]}; "
          f"profile depth {r['profile_depth']:.2%} against a seed noise of ~{SEED_NOISE:.1%}")
    print(f"  steps at each size's first budget: {r['first_steps']}")


def main() -> None:
    truth = stand_in_truth()
    E, A, B, alpha, beta = truth
    print(f"stand-in truth (refit of the last demo's 12 points): E {E:.4g}, A {A:.4g}, "
          f"B {B:.4g}, alpha {alpha:.3f}, beta {beta:.3f}")
    widths = [24, 32, 40, 48, 56, 64, 72, 80, 96, 112, 128, 144, 160, 192, 224, 256]
    for w, n, per_step in sizes_of(widths):
        print(f"  width {w:3d}: N {n:9,d}, {per_step:.3g} lab FLOPs a step")
    print("N_opt of the stand-in law (C = 6ND):")
    for c in (1e11, 3e11, 1e12, 3e12, 1e13):
        g = (alpha * A / (beta * B)) ** (1 / (alpha + beta))
        print(f"  C {c:.0e}: N_opt {g * (c / 6) ** (beta / (alpha + beta)):,.0f}")
    old = [32, 48, 72, 112, 160]
    describe("last demo (every size at every budget)", old, [6e11, 1.2e12, 2.4e12], None,
             4.8e12, [4], 1, truth)
    for name, args in DESIGNS.items():
        describe(name, *args, truth)


STAIRCASE = [24, 32, 40, 48, 56, 64, 72, 96, 128]
DESIGNS = {
    "chosen (configs/demo.yaml): staircase, 4x": (STAIRCASE, [1.25e11, 2.5e11, 5e11, 1e12],
                                                  3, 4e12, [6, 7, 8], 2),
    "staircase, 4x, one seed": (STAIRCASE, [1.25e11, 2.5e11, 5e11, 1e12], 3, 4e12, [6, 7, 8], 1),
    "staircase, 4x, held-out 64-96": (STAIRCASE, [1.25e11, 2.5e11, 5e11, 1e12], 3, 4e12,
                                      [5, 6, 7], 2),
    "staircase, 2x": (STAIRCASE, [1.25e11, 2.5e11, 5e11, 1e12], 3, 2e12, [5, 6, 7], 2),
    "staircase, 3x": (STAIRCASE, [1.25e11, 2.5e11, 5e11, 1e12], 3, 3e12, [5, 6, 7], 2),
}

if __name__ == "__main__":
    main()
