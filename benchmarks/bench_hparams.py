"""The hyperparameter laws (analysis/hparams.py) at realistic noise: synthetic sweeps from known
exponents with 1% multiplicative loss noise, many seeds, the vertex method against DeepSeek's
near-optimal band (runs within 0.25% of each group's best, least squares over all of them).

The sweeps, both forms: the loss is a bowl in ln lr and ln batch around the law's optimum,
ln L = ln L0 + 0.02 u^2 + 0.01 v^2 + 0.01 u v (u = ln lr/lr*, v = ln B/B*; a factor 4 off in lr
costs 3.9%), times exp(N(0, noise)). Every group sweeps lr over 9 values half an octave apart
and the batch over 5 values an octave apart (both x/÷ 4 around a centre shifted at random by up
to half a step from the optimum), 45 runs.
- DeepSeek: 6 budgets, C from 1e17 to 1e20, lr* = 0.3118 C^-0.125, B* = 0.292 C^0.3271;
- StepFun: 4 x 4 cells, N from 1e5 to 3e6, D from 1e7 to 3e8, lr* = 1.79 N^-0.713 D^0.307,
  B* = 0.58 D^0.571.

    .venv/bin/python -m benchmarks.bench_hparams [--quick] [--out FILE]

The committed record is benchmarks/results/hparams-recovery.txt (200 seeds).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.common import row, write_report

DEEPSEEK = {"lr": (0.3118, (-0.1250,)), "batch": (0.2920, (0.3271,))}  # variables: C
STEPFUN = {"lr": (1.79, (-0.713, 0.307)), "batch": (0.58, (0.571,))}  # (N, D) and (D,)
VARIABLES = {"deepseek": {"lr": ("C",), "batch": ("C",)},
             "stepfun": {"lr": ("N", "D"), "batch": ("D",)}}
BOWL = (0.02, 0.01, 0.01)  # ln L rises by a u^2 + b v^2 + c u v
BAND = 0.0025  # DeepSeek's near-optimal band


def _optimum(law: tuple, x: dict, names: tuple[str, ...]) -> float:
    coef, exps = law
    return coef * float(np.prod([x[n] ** p for n, p in zip(names, exps, strict=True)]))


def sweep(form: str, noise: float, seed: int, skew: float = 0.0) -> pd.DataFrame:
    """A synthetic sweep of the `form` ("deepseek" or "stepfun") with log-normal loss noise;
    `skew` adds skew * u^3 (a bowl steeper on the high-lr side when positive)."""
    rng = np.random.default_rng(seed)
    laws = DEEPSEEK if form == "deepseek" else STEPFUN
    if form == "deepseek":
        groups = [{"C": c} for c in np.logspace(17, 20, 6)]
    else:
        groups = [{"N": n, "D": d} for n in (1e5, 3e5, 1e6, 3e6) for d in (1e7, 3e7, 1e8, 3e8)]
    frames = []
    for x in groups:
        lr_opt = _optimum(laws["lr"], x, VARIABLES[form]["lr"])
        b_opt = _optimum(laws["batch"], x, VARIABLES[form]["batch"])
        shift_u, shift_v = rng.uniform(-0.5, 0.5, 2)
        u = (np.arange(-4, 5) + shift_u) * np.log(2) / 2  # half an octave apart
        v = (np.arange(-2, 3) + shift_v) * np.log(2)
        U, V = (a.ravel() for a in np.meshgrid(u, v))
        size = x.get("C", x.get("N", 1.0) * x.get("D", 1.0))
        log_loss = np.log(2.0 + 10 * size**-0.05) + BOWL[0] * U**2 + BOWL[1] * V**2 \
            + BOWL[2] * U * V + skew * U**3
        frames.append(pd.DataFrame({**x, "lr": lr_opt * np.exp(U),
                                    "batch_tokens": b_opt * np.exp(V),
                                    "loss": np.exp(log_loss + rng.normal(0, noise, len(U)))}))
    return pd.concat(frames, ignore_index=True)


def band_exponents(runs: pd.DataFrame, form: str) -> dict:
    """DeepSeek's near-optimal band: per group, the runs within 0.25% of its best loss; least
    squares of ln lr (ln batch) on the law's variables over all of them. The reference the
    vertex method replaced."""
    keys = list(VARIABLES[form]["lr"])
    best = runs.groupby(keys)["loss"].transform("min")
    band = runs[runs["loss"] <= best * (1 + BAND)]
    out = {}
    for name, col in (("lr", "lr"), ("batch", "batch_tokens")):
        names = VARIABLES[form][name]
        A = np.column_stack([np.ones(len(band)), np.log(band[list(names)].to_numpy(float))])
        out[name] = np.linalg.lstsq(A, np.log(band[col].to_numpy(float)), rcond=None)[0]
    return out


LEVELS = (0.8, 0.95)


def vertex_fit(runs: pd.DataFrame, form: str, bootstrap: int = 1000, seed: int = 0) -> dict:
    """{name: (exponents, {(level, small_sample): intervals})} from analysis.hparams's vertex
    method: each group's vertex, then the law through them with its group bootstrap, with and
    without the small-sample correction."""
    from analysis.hparams import fit_hparam_laws, fit_stepfun_laws, fit_through_vertices

    fit = (fit_hparam_laws if form == "deepseek" else fit_stepfun_laws)(runs, bootstrap=2)
    out = {}
    for name in ("lr", "batch"):
        v = fit.vertices[fit.vertices[f"{name}_opt"].notna()]
        X = v[list(VARIABLES[form][name])].to_numpy(float)
        ivs = {}
        for level in LEVELS:
            for small in (True, False):
                f = fit_through_vertices(X, v[f"{name}_opt"].to_numpy(float), level, bootstrap,
                                         seed, small_sample=small)
                ivs[level, small] = f.intervals[:, 1:].T
        out[name] = (f.theta, ivs)
    return out


def truth(form: str, name: str) -> np.ndarray:
    """(ln coef, exponents...) of the true law."""
    coef, exps = (DEEPSEEK if form == "deepseek" else STEPFUN)[name]
    return np.array([np.log(coef), *exps])


def centre(form: str, name: str) -> np.ndarray:
    """[1, ln x] at the sweep's geometric centre, where a law's optimum is scored."""
    x = {"C": 10**18.5, "N": np.sqrt(1e5 * 3e6), "D": np.sqrt(1e7 * 3e8)}
    return np.array([1.0, *(np.log(x[v]) for v in VARIABLES[form][name])])


def measure(form: str, seeds: range, noise: float = 0.01, skew: float = 0.0,
            bootstrap: int = 1000) -> pd.DataFrame:
    """One row per (seed, exponent): the true value, the vertex method's estimate, whether
    its intervals cover the truth (at 80% and 95%, with and without the small-sample
    correction), and the band method's estimate; and per law the ln of the optimum it gives
    at the sweep's centre (`ln lr_opt`, `ln batch_opt`), against the truth's."""
    rows = []
    for seed in seeds:
        runs = sweep(form, noise, seed, skew)
        new, old = vertex_fit(runs, form, bootstrap, seed), band_exponents(runs, form)
        for name in ("lr", "batch"):
            est, ivs = new[name]
            for i, var in enumerate(VARIABLES[form][name], start=1):
                t = truth(form, name)[i]
                rows.append({"seed": seed, "exponent": f"{name} in {var}", "true": t,
                             "vertex": est[i], "band": old[name][i],
                             **{f"cover{level:.0%}{'' if small else ' raw'}":
                                bool(iv[i - 1][0] <= t <= iv[i - 1][1])
                                for (level, small), iv in ivs.items()}})
            x = centre(form, name)  # the optimum itself, in ln units (a relative error)
            rows.append({"seed": seed, "exponent": f"ln {name}_opt", "true": truth(form, name)
                         @ x, "vertex": est @ x, "band": old[name] @ x})
    return pd.DataFrame(rows)


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per exponent: |error| median and 95th percentile of both methods, and coverages."""
    t = table.assign(err_vertex=(table["vertex"] - table["true"]).abs(),
                     err_band=(table["band"] - table["true"]).abs())
    covers = {c: (c, lambda v: v.dropna().astype(float).mean()) for c in table.columns
              if c.startswith("cover")}
    return t.groupby("exponent", sort=False).agg(
        true=("true", "first"),
        vertex_median=("err_vertex", "median"),
        vertex_p95=("err_vertex", lambda e: e.quantile(.95)),
        band_median=("err_band", "median"), band_p95=("err_band", lambda e: e.quantile(.95)),
        **covers).reset_index()


def report(seeds: int) -> tuple[str, list[dict]]:
    lines, rows = [], []
    cases = [("deepseek", 0.01, 0.0), ("stepfun", 0.01, 0.0), ("deepseek", 0.004, 0.0),
             ("deepseek", 0.01, 0.004), ("stepfun", 0.01, 0.004)]
    for form, noise, skew in cases:
        start = time.perf_counter()
        s = summary(measure(form, range(seeds), noise, skew))
        took = time.perf_counter() - start
        lines.append(f"\n{form}: {noise:.1%} loss noise{f', skew {skew}' if skew else ''}, "
                     f"{seeds} seeds ({took:.0f} s). |exponent error|: median and 95th "
                     "percentile over seeds, vertex method and 0.25% band; coverage of the "
                     "vertex method's 80% and 95% intervals, and without the small-sample "
                     "correction (raw)")
        lines.append(f"{'exponent':<12} {'true':>7} {'vertex med':>10} {'vertex p95':>10} "
                     f"{'band med':>9} {'band p95':>9} {'cov 80%':>7} {'cov 95%':>7} "
                     f"{'raw 80%':>7} {'raw 95%':>7}")
        for _, r in s.iterrows():
            covs = " ".join("      -" if pd.isna(r[c]) else f"{r[c]:>7.1%}"
                            for c in ("cover80%", "cover95%", "cover80% raw", "cover95% raw"))
            lines.append(f"{r['exponent']:<12} {r['true']:>7.3f} {r['vertex_median']:>10.4f} "
                         f"{r['vertex_p95']:>10.4f} {r['band_median']:>9.4f} "
                         f"{r['band_p95']:>9.4f} {covs}")
            if r["exponent"].startswith("ln "):
                continue
            tag = f"{form} {r['exponent']} noise {noise:.1%}{' skew' if skew else ''}"
            rows.append(row(f"{tag}: vertex p95 |error|", r["vertex_p95"], "", "band p95",
                            r["band_p95"], notes=f"95% coverage {r['cover95%']:.1%}"))
    return "\n".join(lines) + "\n", rows


def run(quick: bool = False) -> list[dict]:
    return report(20 if quick else 200)[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="20 seeds instead of 200")
    p.add_argument("--out", type=Path, help="also write the report here")
    args = p.parse_args()
    seeds = 20 if args.quick else 200
    text, _ = report(seeds)
    head = ("$ .venv/bin/python -m benchmarks.bench_hparams"
            f"{' --quick' if args.quick else ''}{f' --out {args.out}' if args.out else ''}\n")
    return write_report(head + text, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
