"""Hyperparameter laws: the optimal learning rate and batch size as power laws.

Two forms, fitted the same way:

- DeepSeek LLM (2024): eta_opt = k C^p and B_opt = k C^q (B in tokens, C in FLOPs), from sweeps
  of learning rate and batch size at several compute budgets. Their published laws are
  eta_opt = 0.3118 C^-0.1250 and B_opt = 0.2920 C^0.3271.
- StepFun (Li et al. 2025, "Predictable Scale"): eta_opt = a N^alpha D^beta and
  B_opt = c D^gamma, from one sweep per (N, D) cell.

In each group of runs (a budget, or an (N, D) cell) log loss is fitted by least squares as a
quadratic in ln lr, and in ln batch where the batch varies (the full quadratic, with the
lr x batch term); the vertex is the group's optimum. A group whose quadratic does not open
upward, or whose vertex lies outside the swept range, is reported and left out of that law
(it only bounds the optimum). The power laws are fitted by least squares in log space through
the vertices, one point per group, and their intervals come from resampling whole groups.

DeepSeek picked instead the runs within 0.25% of each budget's best loss. Where run-to-run
scatter is wider than that band, noise picks it: the quadratic uses every run of the group and
averages the noise out (docs/planning.md has the measured difference at 1% noise).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

from analysis.points import check_points, group_budgets
from analysis.powerlaw import PowerLaw
from lab.errors import UserError

DEEPSEEK_LR = (0.3118, -0.1250)  # (coef, exponent) of eta_opt(C)
DEEPSEEK_BATCH = (0.2920, 0.3271)  # (coef, exponent) of B_opt(C), B in tokens
AXES = (("lr", "lr"), ("batch", "batch_tokens"))  # (name in the vertex table, run column)
INTERVAL_METHOD = "bootstrap over groups, small-sample corrected"


# ---------------------------------------------------------------------------------------------
# One group's optimum: the vertex of a quadratic in log space.


def _design(z_RxA: np.ndarray, quadratic: list[bool]) -> np.ndarray:
    """Columns 1, z_a, z_a^2 (axes with `quadratic`), z_0 z_1 (when both are quadratic)."""
    cols = [np.ones(len(z_RxA))] + [z_RxA[:, a] for a in range(z_RxA.shape[1])]
    cols += [z_RxA[:, a] ** 2 for a, q in enumerate(quadratic) if q]
    if sum(quadratic) == 2:
        cols.append(z_RxA[:, 0] * z_RxA[:, 1])
    return np.column_stack(cols)


def fit_vertex(group: pd.DataFrame) -> dict:
    """The optimum of one group of runs (columns lr, batch_tokens, loss).

    Axes with 3 or more distinct values get a quadratic term, with 2 only a linear one (which
    keeps the other axis's vertex unbiased, but gives no optimum of its own). Returns lr_opt
    and batch_opt (NaN where the group gives none), the curvature of ln loss in (ln lr,
    ln batch) (h_lr, h_batch, h_cross), loss_opt, n_runs and `problem` ("" when none).
    """
    out = {"n_runs": len(group), "lr_opt": np.nan, "batch_opt": np.nan, "loss_opt": np.nan,
           "h_lr": np.nan, "h_batch": np.nan, "h_cross": np.nan, "problem": ""}
    used = [(name, col) for name, col in AXES if group[col].nunique() >= 2]
    quad = [group[col].nunique() >= 3 for _, col in used]
    if not any(quad):
        out["problem"] = "neither lr nor batch takes 3 or more values, so no optimum is fitted"
        return out
    logs = np.log(group[[col for _, col in used]].to_numpy(np.float64))
    centre = logs.mean(axis=0)
    A = _design(logs - centre, quad)
    if len(group) <= A.shape[1] or np.linalg.matrix_rank(A) < A.shape[1]:
        out["problem"] = (f"{len(group)} runs do not pin down a quadratic in "
                          f"{' and '.join(n for (n, _), q in zip(used, quad, strict=True) if q)}")
        return out
    theta = np.linalg.lstsq(A, np.log(group["loss"].to_numpy(np.float64)), rcond=None)[0]
    k = len(used)
    qa = [a for a in range(k) if quad[a]]  # the axes with a vertex
    H = np.diag(2 * theta[1 + k:1 + k + len(qa)])
    if len(qa) == 2:
        H[0, 1] = H[1, 0] = theta[-1]
    for a, h in zip(qa, np.diag(H), strict=True):
        out[f"h_{used[a][0]}"] = float(h)
    if len(qa) == 2:
        out["h_cross"] = float(H[0, 1])
    grad = theta[1:1 + k][qa]
    if np.linalg.eigvalsh(H).min() <= 0:
        out["problem"] = ("the fitted quadratic does not open upward (no minimum): the sweep "
                          "is too narrow or too noisy to locate the optimum")
        return out
    z = -np.linalg.solve(H, grad)
    out["loss_opt"] = float(np.exp(theta[0] + 0.5 * grad @ z))
    outside = []
    for a, za in zip(qa, z, strict=True):
        name, col = used[a]
        value = float(np.exp(centre[a] + za))
        lo, hi = group[col].min(), group[col].max()
        if lo * (1 - 1e-9) <= value <= hi * (1 + 1e-9):
            out[f"{name}_opt"] = value
        else:
            outside.append(f"the {name} optimum ({value:.3g}) lies outside the sweep "
                           f"({lo:.3g} to {hi:.3g})")
    out["problem"] = "; ".join(outside)
    return out


def group_vertices(df: pd.DataFrame, by: str, where: Callable[[pd.DataFrame], str],
                   keys: tuple[str, ...]) -> tuple[pd.DataFrame, list[str]]:
    """The vertex of every group sharing `by`, with the group's `keys` (its first row's), and
    one warning per group with a problem (`where` names the group)."""
    rows, warns = [], []
    for _, g in df.groupby(by):
        v = {k: g[k].iloc[0] for k in (by, *keys)} | fit_vertex(g)
        rows.append(v)
        if v["problem"]:
            left = [n for n, _ in AXES if np.isnan(v[f"{n}_opt"]) and g[dict(AXES)[n]].nunique()
                    >= 3]
            note = f"; left out of the {' and '.join(left)} law" if left else ""
            warns.append(f"{where(g)}: {v['problem']}{note}; widen the sweep around the "
                         "optimum or add runs")
    return pd.DataFrame(rows), warns


def median_curvature(vertices: pd.DataFrame) -> dict:
    """The median over groups of the curvature of ln loss in (ln lr, ln batch), from the
    groups whose quadratic opened upward (the plan turns a hyperparameter error into loss)."""
    ok = vertices[vertices["loss_opt"].notna()]
    return {name: (float(ok[col].median()) if ok[col].notna().any() else None)
            for name, col in (("lr", "h_lr"), ("batch", "h_batch"), ("lr_batch", "h_cross"))}


# ---------------------------------------------------------------------------------------------
# The laws through the vertices, with a bootstrap over groups.


def _loglinear(X_GxK: np.ndarray, y_G: np.ndarray) -> np.ndarray:
    """Least squares of ln y on [1, ln X]: (ln coef, exponents...)."""
    A = np.column_stack([np.ones(len(y_G)), np.log(X_GxK)])
    return np.linalg.lstsq(A, np.log(y_G), rcond=None)[0]


@dataclass(frozen=True)
class VertexFit:
    """ln y = theta[0] + theta[1:] . ln x through one point per group, and `samples` (K x P) of
    theta from resampled groups."""

    theta: np.ndarray
    intervals: np.ndarray  # 2 x P: the level interval of each of theta's entries
    samples: np.ndarray
    n_groups: int


def fit_through_vertices(X_GxK: np.ndarray, y_G: np.ndarray, level: float, n_boot: int,
                         seed: int, small_sample: bool = True) -> VertexFit:
    """Fit through the groups' vertices; intervals from resampling whole groups with
    replacement. A group's vertex carries all of that group's noise, so groups, not runs, are
    the independent units. With few groups a percentile interval is too narrow, so each
    resample's deviation from the fit is scaled by t_{G-P}/z sqrt(G/(G-P)), the small-sample
    correction of a least-squares interval (P fitted parameters); docs/planning.md gives the
    coverage measured with it and without it (`small_sample=False`)."""
    G, P = len(y_G), X_GxK.shape[1] + 1
    theta = _loglinear(X_GxK, y_G)
    take_KxG = np.random.default_rng(seed).integers(0, G, (n_boot, G))
    A_KxGxP = np.concatenate([np.ones((n_boot, G, 1)), np.log(X_GxK)[take_KxG]], axis=2)
    AtA_KxPxP = np.einsum("kgp,kgq->kpq", A_KxGxP, A_KxGxP)
    Aty_KxP = np.einsum("kgp,kg->kp", A_KxGxP, np.log(y_G)[take_KxG])
    # A resample without spread in some variable pins nothing down: leave it out.
    ok = np.linalg.cond(AtA_KxPxP) < 1e10
    boot = np.linalg.solve(AtA_KxPxP[ok], Aty_KxP[ok][..., None])[..., 0]
    if G > P and len(boot) >= 2:
        q = (1 + level) / 2
        scale = stats.t.ppf(q, G - P) / stats.norm.ppf(q) * np.sqrt(G / (G - P)) \
            if small_sample else 1.0
        boot = theta + (boot - theta) * scale
        iv = np.quantile(boot, [1 - q, q], axis=0)
    else:  # a law through as many groups as parameters is exact: no interval, no draws
        iv, boot = np.full((2, P), np.nan), np.empty((0, P))
    return VertexFit(theta=theta, intervals=iv, samples=boot, n_groups=G)


def _law_fit(vertices: pd.DataFrame, target: str, variables: tuple[str, ...], level: float,
             n_boot: int, seed: int) -> tuple[VertexFit | None, str]:
    """The law of `target` (lr_opt or batch_opt) through the groups that gave one, or None and
    why not."""
    ok = vertices[vertices[target].notna()]
    X = ok[list(variables)].to_numpy(np.float64)
    need = len(variables) + 1
    if len(ok) < need or np.linalg.matrix_rank(np.column_stack([np.ones(len(ok)), np.log(X)])) \
            < need:
        return None, (f"{len(ok)} group(s) gave a {target.removesuffix('_opt')} optimum, too "
                      f"few (or too alike in {', '.join(variables)}) for a law in "
                      f"{', '.join(variables)}")
    return fit_through_vertices(X, ok[target].to_numpy(np.float64), level, n_boot, seed), ""


def _power_law(fit: VertexFit, level: float) -> PowerLaw:
    """A law in one variable as a PowerLaw (its intervals from the group bootstrap)."""
    iv = fit.intervals
    return PowerLaw(coef=float(np.exp(fit.theta[0])), exponent=float(fit.theta[1]),
                    coef_interval=(float(np.exp(iv[0, 0])), float(np.exp(iv[1, 0]))),
                    exponent_interval=(float(iv[0, 1]), float(iv[1, 1])), n=fit.n_groups,
                    level=level, interval_method=INTERVAL_METHOD)


def _vertex_records(vertices: pd.DataFrame, keys: tuple[str, ...]) -> list[dict]:
    cols = (*keys, "n_runs", "lr_opt", "batch_opt", "loss_opt", "h_lr", "h_batch", "h_cross")
    return [{**{c: (None if pd.isna(r[c]) else float(r[c])) for c in cols},
             "problem": r["problem"]} for _, r in vertices.iterrows()]


def _grid_runs(runs: pd.DataFrame, columns: tuple[str, ...], *, min_points: int,
               what: str) -> pd.DataFrame:
    """A checked copy of a grid of runs, with `batch_tokens` from batch_size x seq_len when the
    runs give those instead."""
    df = runs.copy()
    if "batch_tokens" not in df.columns and {"batch_size", "seq_len"} <= set(df.columns):
        df["batch_tokens"] = df["batch_size"] * df["seq_len"]
    check_points(df, columns, min_points=min_points, what=what)
    return df


def _no_law(fits: dict, why: dict, form: str) -> None:
    if all(f is None for f in fits.values()):
        raise UserError(f"no {form} law fits these runs: {'; '.join(why.values())}; sweep the "
                        "learning rate (and batch) over 3 or more values around the optimum")


# ---------------------------------------------------------------------------------------------
# DeepSeek's form: laws in C.


@dataclass
class HparamLaws:
    """eta_opt(C) and B_opt(C) through the vertices of each budget's sweep (either may be None
    when no budget, or too few, gave that optimum)."""

    lr: PowerLaw | None
    batch: PowerLaw | None
    vertices: pd.DataFrame  # one row per budget: C, n_runs, lr_opt, batch_opt, curvature, ...
    samples: dict  # "lr" / "batch": K x 2 bootstrap draws of (ln coef, exponent)
    curvature: dict
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = {"method": "hparams", "fit": "vertex of a quadratic in log lr (and log batch) per "
               f"budget; power laws through the vertices; intervals: {INTERVAL_METHOD}"}
        for key, law, name in (("lr", self.lr, "lr"), ("batch_tokens", self.batch, "batch")):
            if law is not None:
                out[key] = law.to_dict() | {"bootstrap": self.samples[name].tolist()}
        return out | {"n_budgets": len(self.vertices), "curvature": self.curvature,
                      "vertices": _vertex_records(self.vertices, ("C",)),
                      "warnings": list(self.warnings)}


def fit_hparam_laws(runs: pd.DataFrame, *, rel_tol: float = 0.1, level: float = 0.95,
                    bootstrap: int = 1000, seed: int = 0) -> HparamLaws:
    """Fit eta_opt(C) and B_opt(C) on runs with columns C, lr, loss and `batch_tokens` (or
    `batch_size` and `seq_len`); a `budget` column overrides grouping by compute."""
    df = _grid_runs(runs, ("C", "lr", "batch_tokens", "loss"), min_points=4, what="hparam laws")
    if "budget" not in df.columns:
        df["budget"] = group_budgets(df["C"], rel_tol)
    if df["budget"].nunique() < 2:
        raise UserError("hyperparameter laws need sweeps at two or more compute budgets, found "
                        "one; add runs at other budgets")
    # Each budget's runs are placed at its geometric-mean compute.
    df["C"] = df.groupby("budget")["C"].transform(lambda c: float(np.exp(np.log(c).mean())))
    vertices, warns = group_vertices(df, "budget", lambda g: f"at C={g['C'].iloc[0]:.3g}",
                                     ("C",))
    fits, why = {}, {}
    for i, name in enumerate(("lr", "batch")):
        fits[name], why[name] = _law_fit(vertices, f"{name}_opt", ("C",), level, bootstrap,
                                         seed + i)
    _no_law(fits, why, "hyperparameter")
    warns += [f"no {name} law in C: {w}" for name, w in why.items() if w]
    return HparamLaws(
        lr=fits["lr"] and _power_law(fits["lr"], level),
        batch=fits["batch"] and _power_law(fits["batch"], level),
        vertices=vertices,
        samples={k: f.samples for k, f in fits.items() if f is not None},
        curvature=median_curvature(vertices),
        warnings=warns,
    )


# ---------------------------------------------------------------------------------------------
# StepFun's form (Li et al. 2025, "Predictable Scale"): the optimum in N and D separately.


@dataclass(frozen=True)
class LogLinearLaw:
    """y = coef * prod(x_i ^ exponent_i), fitted in log space, with bootstrap intervals and
    the bootstrap draws of (ln coef, exponents...) themselves (`samples`, K x P)."""

    variables: tuple[str, ...]  # the names of x_i, e.g. ("N", "D")
    coef: float
    exponents: tuple[float, ...]
    coef_interval: tuple[float, float]
    exponent_intervals: tuple[tuple[float, float], ...]
    level: float
    samples: np.ndarray | None = None

    def __call__(self, **x) -> float:
        out = self.coef
        for name, p in zip(self.variables, self.exponents, strict=True):
            out *= float(x[name]) ** p
        return out

    def log_draws(self, **x) -> np.ndarray | None:
        """ln y at x under every bootstrap draw (None without draws)."""
        if self.samples is None or len(self.samples) < 2:
            return None
        lx = np.log([float(x[v]) for v in self.variables])
        return self.samples[:, 0] + self.samples[:, 1:] @ lx

    def to_dict(self) -> dict:
        return {
            "variables": list(self.variables),
            "coef": self.coef,
            "exponents": dict(zip(self.variables, self.exponents, strict=True)),
            "coef_interval": list(self.coef_interval),
            "exponent_intervals": {
                v: list(iv) for v, iv in zip(self.variables, self.exponent_intervals, strict=True)
            },
            "level": self.level,
            "interval_method": INTERVAL_METHOD,
            "bootstrap": [] if self.samples is None else self.samples.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> LogLinearLaw:
        names = tuple(d["variables"])
        samples = d.get("bootstrap")
        return cls(
            variables=names,
            coef=float(d["coef"]),
            exponents=tuple(float(d["exponents"][v]) for v in names),
            coef_interval=tuple(d["coef_interval"]),
            exponent_intervals=tuple(tuple(d["exponent_intervals"][v]) for v in names),
            level=float(d.get("level", 0.95)),
            samples=np.asarray(samples, np.float64).reshape(-1, len(names) + 1)
            if samples else None,
        )

    @classmethod
    def from_power_law(cls, d: dict, variable: str = "C") -> LogLinearLaw:
        """A DeepSeek-form law in one variable (a PowerLaw's JSON with its draws)."""
        return cls.from_dict({"variables": [variable], "coef": d["coef"],
                              "exponents": {variable: d["exponent"]},
                              "coef_interval": d["coef_interval"],
                              "exponent_intervals": {variable: d["exponent_interval"]},
                              "level": d.get("level", 0.95), "bootstrap": d.get("bootstrap")})


def _loglinear_law(fit: VertexFit, variables: tuple[str, ...], level: float) -> LogLinearLaw:
    iv = fit.intervals
    return LogLinearLaw(
        variables=variables,
        coef=float(np.exp(fit.theta[0])),
        exponents=tuple(float(v) for v in fit.theta[1:]),
        coef_interval=(float(np.exp(iv[0, 0])), float(np.exp(iv[1, 0]))),
        exponent_intervals=tuple((float(iv[0, i]), float(iv[1, i]))
                                 for i in range(1, len(fit.theta))),
        level=level,
        samples=fit.samples,
    )


@dataclass
class StepFunLaws:
    """eta_opt = a N^alpha D^beta and B_opt = c D^gamma (Li et al. 2025) through the vertices
    of each (N, D) cell's sweep (either may be None)."""

    lr: LogLinearLaw | None
    batch: LogLinearLaw | None  # batch in tokens
    vertices: pd.DataFrame  # one row per cell: N, D, n_runs, lr_opt, batch_opt, ...
    curvature: dict
    params: str = "total"
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = {"form": "Li et al. 2025: lr = a N^alpha D^beta, batch_tokens = c D^gamma",
               "fit": "vertex of a quadratic in log lr (and log batch) per (N, D) cell; laws "
               f"through the vertices; intervals: {INTERVAL_METHOD}", "params": self.params}
        for key, law in (("lr", self.lr), ("batch_tokens", self.batch)):
            if law is not None:
                out[key] = law.to_dict()
        return out | {"n_cells": len(self.vertices), "curvature": self.curvature,
                      "vertices": _vertex_records(self.vertices, ("N", "D")),
                      "warnings": list(self.warnings)}


def fit_stepfun_laws(runs: pd.DataFrame, *, rel_tol: float = 0.1, level: float = 0.95,
                     bootstrap: int = 1000, seed: int = 0, params: str = "total") -> StepFunLaws:
    """Fit Li et al.'s eta_opt(N, D) and B_opt(D) on a grid of runs with columns N, D, lr,
    loss and batch_tokens (or batch_size and seq_len).

    Runs sharing N and D (within a factor 1 + rel_tol) form a cell; each cell's vertex is its
    optimum, and the laws are fitted through the vertices by least squares in log space.
    """
    df = _grid_runs(runs, ("N", "D", "lr", "batch_tokens", "loss"), min_points=4,
                    what="StepFun's hyperparameter laws")
    n_cell, d_cell = group_budgets(df["N"], rel_tol), group_budgets(df["D"], rel_tol)
    df["cell"] = n_cell * (d_cell.max() + 1) + d_cell
    if len(np.unique(n_cell)) < 2 or len(np.unique(d_cell)) < 2:
        raise UserError(
            "StepFun's laws need runs at two or more model sizes and two or more token counts; "
            f"found {len(np.unique(n_cell))} and {len(np.unique(d_cell))}"
        )
    for col in ("N", "D"):  # a cell sits at its geometric means
        df[col] = df.groupby("cell")[col].transform(lambda v: float(np.exp(np.log(v).mean())))
    vertices, warns = group_vertices(
        df, "cell", lambda g: f"at N={g['N'].iloc[0]:.3g}, D={g['D'].iloc[0]:.3g}", ("N", "D"))
    fits, why = {}, {}
    for i, (name, variables) in enumerate((("lr", ("N", "D")), ("batch", ("D",)))):
        fit, why[name] = _law_fit(vertices, f"{name}_opt", variables, level, bootstrap, seed + i)
        fits[name] = fit and _loglinear_law(fit, variables, level)
    _no_law(fits, why, "StepFun")
    warns += [f"no {name} law in N and D: {w}" for name, w in why.items() if w]
    return StepFunLaws(lr=fits["lr"], batch=fits["batch"], vertices=vertices,
                       curvature=median_curvature(vertices), params=params, warnings=warns)


# ---------------------------------------------------------------------------------------------
# What an uncertain optimum costs a planned run.


def excess_log_loss(delta_KxA: np.ndarray, curvature: dict, axes: tuple[str, ...]) -> np.ndarray:
    """The rise of ln loss, 1/2 d' H d, when a run's (ln lr, ln batch) misses the optimum by
    each row d of `delta_KxA` (columns: `axes`, a subset of ("lr", "batch")), H the measured
    curvature. An axis without a measured curvature adds nothing."""
    h = {("lr", "lr"): curvature.get("lr"), ("batch", "batch"): curvature.get("batch"),
         ("lr", "batch"): curvature.get("lr_batch"), ("batch", "lr"): curvature.get("lr_batch")}
    H = np.array([[h[(a, b)] or 0.0 for b in axes] for a in axes], dtype=np.float64)
    return 0.5 * np.einsum("ka,ab,kb->k", delta_KxA, H, delta_KxA)
