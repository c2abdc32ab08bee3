"""The downstream law (analysis.downstream) on synthetic ladders with a known truth: how well
both steps recover their parameters, how far the chained prediction is from the true accuracy
beyond the ladder, and how often its 95% intervals cover.

    .venv/bin/python -m benchmarks.downstream_synthetic [--seeds S]

Each seed draws a ladder of 16 runs: N log-uniform in [1e4, 3e5], D in [3e5, 2e7], the task
loss off TRUTH_LOSS with 1% log-normal noise, the accuracy the true sigmoid of that loss
measured on 1,000 four-way questions (binomial noise; chance 0.25). The law is fitted as
`lab fit --method downstream` fits it (the published 4,500 Approach 3 starts, 200 bootstrap
refits of both steps) and predicts 5 larger runs (up to 3x the largest N and D), each then drawn
20 times fresh: the law's interval is scored against the true mean accuracy, one run's against
the fresh outcomes. A second design shows the warning when the ladder sees only the sigmoid's
floor. Prints a table; the record is benchmarks/results/downstream-synthetic.txt.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

TRUTH_LOSS = (1.2, 60.0, 900.0, 0.45, 0.55)  # E, A, B, alpha, beta of the task loss
TRUTH_SIGMOID = (0.6, 6.0, 2.0)  # a, k, L0; chance 0.25
CHANCE, EXAMPLES, DRAWS = 0.25, 1000, 20
QUERY_N = np.array([1e5, 3e5, 5e5, 9e5, 9e5])
QUERY_D = np.array([3e7, 2e7, 4e7, 2e7, 6e7])


def _measure(rng, N, D) -> tuple[np.ndarray, np.ndarray]:
    from analysis.approach3 import law
    from analysis.downstream import sigmoid

    L = law(N, D, *TRUTH_LOSS) * np.exp(rng.normal(0, 0.01, len(N)))
    return L, rng.binomial(EXAMPLES, sigmoid(L, *TRUTH_SIGMOID, CHANCE)) / EXAMPLES


def ladder(rng, n: int = 16, n_range=(1e4, 3e5), d_range=(3e5, 2e7)) -> pd.DataFrame:
    N = np.exp(rng.uniform(*np.log(n_range), n))
    D = np.exp(rng.uniform(*np.log(d_range), n))
    L, acc = _measure(rng, N, D)
    return pd.DataFrame({"N": N, "D": D, "task_loss": L, "accuracy": acc})


def one_seed(seed: int) -> dict:
    from analysis.approach3 import law
    from analysis.downstream import fit_downstream, sigmoid

    rng = np.random.default_rng(seed)
    fit = fit_downstream(ladder(rng), CHANCE, seed=seed)
    pred = fit.predict(QUERY_N, QUERY_D, seed=seed)
    mean = sigmoid(law(QUERY_N, QUERY_D, *TRUTH_LOSS), *TRUTH_SIGMOID, CHANCE)
    fresh = np.stack([_measure(rng, QUERY_N, QUERY_D)[1] for _ in range(DRAWS)])
    return {"E": fit.loss_law.E, **dict(zip(("a", "k", "L0"), fit.sigmoid.theta, strict=True)),
            "abs_error": np.abs(pred["accuracy"] - mean).to_numpy(),
            "law_covers": ((pred["mean_lo"] <= mean) & (mean <= pred["mean_hi"])).to_numpy(),
            "run_covers": ((pred["lo"].to_numpy() <= fresh) & (fresh <= pred["hi"].to_numpy())),
            "run_width": (pred["hi"] - pred["lo"]).to_numpy(), "warnings": fit.warnings}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=10)
    seeds = parser.parse_args().seeds
    start = time.time()
    rows = [one_seed(s) for s in range(seeds)]
    print(f"{seeds} synthetic ladders of 16 runs, 5 larger runs predicted each "
          f"({time.time() - start:.0f} s)")
    print(f"{'quantity':44s} {'truth':>8s} {'median':>8s} {'min':>8s} {'max':>8s}")
    for name, truth in (("E", TRUTH_LOSS[0]), *zip(("a", "k", "L0"), TRUTH_SIGMOID, strict=True)):
        v = np.array([r[name] for r in rows])
        print(f"{name + ' (fitted)':44s} {truth:8.4g} {np.median(v):8.4g} {v.min():8.4g} "
              f"{v.max():8.4g}")
    err = np.concatenate([r["abs_error"] for r in rows])
    width = np.concatenate([r["run_width"] for r in rows])
    print(f"{'|predicted - true mean accuracy| (points)':44s} {'':8s} {100 * np.median(err):8.2f} "
          f"{100 * err.min():8.2f} {100 * err.max():8.2f}")
    print(f"{'width of one run 95% interval (points)':44s} {'':8s} {100 * np.median(width):8.2f} "
          f"{100 * width.min():8.2f} {100 * width.max():8.2f}")
    law_cov = np.mean(np.concatenate([r["law_covers"] for r in rows]))
    run_cov = np.mean(np.concatenate([r["run_covers"].ravel() for r in rows]))
    print(f"law's 95% interval covers the true mean: {law_cov:.1%} of {seeds * 5}")
    print(f"one run's 95% interval covers a fresh run: {run_cov:.1%} of {seeds * 5 * DRAWS}")
    print(f"fits with warnings: {sum(bool(r['warnings']) for r in rows)} of {seeds}")
    for w in sorted({w for r in rows for w in r["warnings"]}):
        print(f"  - {w}")
    floor_only()


def floor_only() -> None:
    """A ladder of small short runs whose task losses sit at the sigmoid's floor."""
    from analysis.downstream import fit_downstream

    fit = fit_downstream(ladder(np.random.default_rng(99), n_range=(1e3, 5e3),
                                d_range=(1e5, 4e5)), CHANCE, bootstrap=50)
    pts = fit.points
    print(f"floor-only ladder (N 1e3-5e3, D 1e5-4e5): task loss {pts['task_loss'].min():.3g} to "
          f"{pts['task_loss'].max():.3g}, accuracy {pts['accuracy'].min():.3g} to "
          f"{pts['accuracy'].max():.3g}; warnings:")
    for w in fit.warnings:
        print(f"  - {w}")


if __name__ == "__main__":
    main()
