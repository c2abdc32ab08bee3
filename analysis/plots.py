"""PNG figures of the fits, drawn with matplotlib's Agg canvas (no display, no pyplot state).

Each `plot_*` function writes its figures into a directory and returns their paths.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from analysis.approach3 import Approach3Fit, optimal_allocation
from analysis.envelope import EnvelopeFit
from analysis.hparams import DEEPSEEK_BATCH, DEEPSEEK_LR, HparamLaws
from analysis.isoflop import IsoflopFit

EXTRAPOLATE = 100.0  # lines continue to this multiple of the largest compute in the data


def _figure(ncols: int = 1) -> tuple[Figure, list]:
    fig = Figure(figsize=(6.4 * ncols, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _save(fig: Figure, out_dir: str, name: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=120)
    return path


def _compute_range(C) -> np.ndarray:
    C = np.asarray(C, dtype=np.float64)
    return np.logspace(np.log10(C.min()), np.log10(C.max() * EXTRAPOLATE), 200)


def plot_approach3(
    fit: Approach3Fit, points: pd.DataFrame, out_dir: str, label: str = "N (parameters)"
) -> list[str]:
    """contours.png (the law over N, D with the optimal allocation), frontier.png (loss against
    compute with the compute-optimal loss and its band) and residuals.png."""
    N, D, loss = (points[c].to_numpy(np.float64) for c in ("N", "D", "loss"))
    C = 6.0 * N * D
    written = []

    fig, (ax,) = _figure()
    gn = np.logspace(np.log10(N.min()) - 0.5, np.log10(N.max()) + 1, 200)
    gd = np.logspace(np.log10(D.min()) - 0.5, np.log10(D.max()) + 1, 200)
    NN, DD = np.meshgrid(gn, gd)
    cs = ax.contourf(NN, DD, np.log(fit.predict(NN, DD)), levels=30, cmap="viridis")
    fig.colorbar(cs, ax=ax, label="log predicted loss")
    cline = _compute_range(C)
    n_opt, d_opt, _ = optimal_allocation(cline, fit.E, fit.A, fit.B, fit.alpha, fit.beta)
    if not fit.degenerate:
        ax.plot(n_opt, d_opt, "r-", label=f"optimal allocation, N ∝ C^{fit.a:.3f}")
    for c in np.logspace(np.log10(C.min()), np.log10(C.max()), 4):
        ax.plot(gn, c / (6 * gn), "w:", lw=0.8)
    ax.scatter(N, D, c="k", s=8, label="runs")
    ax.set(
        xscale="log",
        yscale="log",
        xlim=(gn[0], gn[-1]),
        ylim=(gd[0], gd[-1]),
        xlabel=label,
        ylabel="tokens D",
        title="degenerate fit: no allocation shown" if fit.degenerate
        else "L(N, D) and the optimal allocation",
    )
    ax.legend(loc="upper left", fontsize=8)
    written.append(_save(fig, out_dir, "contours.png"))

    fig, (ax,) = _figure()
    sc = ax.scatter(C, loss, c=np.log10(N), s=10, cmap="plasma")
    fig.colorbar(sc, ax=ax, label=f"log10 {label}")
    opt = fit.compute_optimal(cline)
    inside = cline <= C.max()
    ax.plot(cline[inside], opt["loss"][inside], "k-", label="compute-optimal loss (fit)")
    ax.plot(cline[~inside], opt["loss"][~inside], "k--", label="extrapolation")
    if "loss_lo" in opt:
        ax.fill_between(
            cline,
            opt["loss_lo"],
            opt["loss_hi"],
            color="k",
            alpha=0.15,
            label=f"{fit.level:.0%} bootstrap band",
        )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="compute C (FLOPs)",
        ylabel="loss",
        title="loss-compute frontier" + (" (degenerate fit)" if fit.degenerate else ""),
    )
    ax.legend(fontsize=8)
    written.append(_save(fig, out_dir, "frontier.png"))

    fig, (ax,) = _figure()
    resid = np.log(loss) - np.log(fit.predict(N, D))
    sc = ax.scatter(C, resid, c=np.log10(N), s=10, cmap="plasma")
    fig.colorbar(sc, ax=ax, label=f"log10 {label}")
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set(
        xscale="log",
        xlabel="compute C (FLOPs)",
        ylabel="log loss − log fit",
        title=f"residuals (Huber objective {fit.objective:.4g})",
    )
    written.append(_save(fig, out_dir, "residuals.png"))
    return written


def _law_label(name: str, law) -> str:
    """'N_opt ∝ C^0.321 [0.30, 0.34]', the interval left out where it is undefined (two
    budgets leave no degree of freedom for one)."""
    text = f"{name}_opt ∝ C^{law.exponent:.3f}"
    lo, hi = law.exponent_interval
    if np.isfinite(lo) and np.isfinite(hi):
        text += f" [{lo:.3f}, {hi:.3f}]"
    return text


def _allocation(ax, C, N_opt, D_opt, n_law, d_law, label: str = "N (parameters)") -> None:
    cline = _compute_range(C)
    ax.scatter(C, N_opt, c="C0", s=14, label="N_opt")
    ax.scatter(C, D_opt, c="C1", s=14, label="D_opt")
    for law, color, name in ((n_law, "C0", "N"), (d_law, "C1", "D")):
        ax.plot(cline, law(cline), color=color, label=_law_label(name, law))
    ax.axvline(np.max(C), color="gray", lw=0.8, ls=":")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="compute C (FLOPs)",
        ylabel=f"{label} or D (tokens)",
        title="optimal allocation (dotted: extrapolation starts)",
    )
    ax.legend(fontsize=8)


def plot_isoflop(fit: IsoflopFit, out_dir: str, label: str = "N (parameters)") -> list[str]:
    """isoflop.png (loss against N per budget, parabolas and their minima) and
    allocation.png (N_opt(C), D_opt(C))."""
    fig, (ax,) = _figure()
    for i, (_, b) in enumerate(fit.budgets.iterrows()):
        g = fit.points[fit.points["budget"] == b["budget"]]
        color = f"C{i % 10}"
        ax.scatter(g["N"], g["loss"], s=10, color=color)
        x = np.linspace(np.log(b["N_min"]), np.log(b["N_max"]), 100)
        ax.plot(
            np.exp(x), b["c0"] + b["c1"] * x + b["c2"] * x * x, color=color, label=f"C={b['C']:.2g}"
        )
        ax.plot(b["N_opt"], b["loss_opt"], "k*", ms=8)
    ax.set(xscale="log", xlabel=label, ylabel="loss", title="IsoFLOP profiles")
    ax.legend(fontsize=7, ncol=2)
    written = [_save(fig, out_dir, "isoflop.png")]
    fig, (ax,) = _figure()
    bud = fit.budgets
    _allocation(ax, bud["C"], bud["N_opt"], bud["D_opt"], fit.N_opt, fit.D_opt, label)
    written.append(_save(fig, out_dir, "allocation.png"))
    return written


def plot_envelope(
    fit: EnvelopeFit, curves: pd.DataFrame, out_dir: str, label: str = "N (parameters)"
) -> list[str]:
    """frontier.png (all training curves against compute, the envelope marked) and
    allocation.png (N_opt(C), D_opt(C) through the envelope)."""
    fig, (ax,) = _figure()
    for _, g in curves.groupby("run"):
        ax.plot(g["C"], g["loss"], color="gray", lw=0.6, alpha=0.6)
    f = fit.frontier
    sc = ax.scatter(f["C"], f["loss"], c=np.log10(f["N"]), cmap="plasma", s=18, zorder=3)
    fig.colorbar(sc, ax=ax, label=f"log10 {label} of the best run")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="compute C (FLOPs)",
        ylabel="loss",
        title="training curves and their envelope",
    )
    written = [_save(fig, out_dir, "frontier.png")]
    fig, (ax,) = _figure()
    _allocation(ax, f["C"], f["N"], f["D"], fit.N_opt, fit.D_opt, label)
    written.append(_save(fig, out_dir, "allocation.png"))
    return written


def plot_hparams(laws: HparamLaws, runs: pd.DataFrame, out_dir: str) -> list[str]:
    """hparams.png: learning rate and batch size against compute, every run, each budget's
    optimum (the vertex of its quadratic), the fitted laws and DeepSeek LLM's for reference."""
    fig, axes = _figure(2)
    v = laws.vertices
    cline = _compute_range(v["C"])
    for ax, col, law, ref, name in (
        (axes[0], "lr", laws.lr, DEEPSEEK_LR, "learning rate"),
        (axes[1], "batch_tokens", laws.batch, DEEPSEEK_BATCH, "batch size (tokens)"),
    ):
        opt = "lr_opt" if col == "lr" else "batch_opt"
        ax.scatter(runs["C"], runs[col], s=8, color="lightgray", label="all runs")
        ax.scatter(v["C"], v[opt], s=18, color="C0", label="each budget's optimum (vertex)")
        if law is not None:
            ax.plot(cline, law(cline), "C0-", label=f"fit: {law.coef:.3g}·C^{law.exponent:.4f}")
        ax.plot(
            cline, ref[0] * cline ** ref[1], "k--", lw=0.8, label=f"DeepSeek: {ref[0]}·C^{ref[1]}"
        )
        ax.set(xscale="log", yscale="log", xlabel="compute C (FLOPs)", ylabel=name)
        ax.legend(fontsize=7)
    return [_save(fig, out_dir, "hparams.png")]


def _sigmoid_panel(ax, fit, pred: pd.DataFrame | None) -> None:
    """Accuracy against task loss: the points, the sigmoid with its bootstrap band, the
    floor (chance) and the ceiling, and the predictions at their predicted task loss."""
    from analysis.downstream import sigmoid

    pts = fit.points
    losses = [pts["task_loss"]] + ([pred["task_loss"]] if pred is not None else [])
    lo, hi = min(x.min() for x in losses), max(x.max() for x in losses)
    grid = np.linspace(lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo), 200)
    sc = ax.scatter(pts["task_loss"], pts["accuracy"], c=np.log10(pts["N"]), cmap="plasma",
                    s=18, zorder=3, label="fitted runs")
    ax.figure.colorbar(sc, ax=ax, label="log10 N")
    ax.plot(grid, fit.sigmoid.predict(grid), "k-", label=fit.sigmoid.describe())
    if fit.sigmoid_samples is not None:
        s = fit.sigmoid_samples
        band = sigmoid(grid[None, :], s[:, :1], s[:, 1:2], s[:, 2:3], fit.chance)
        q = [(1 - fit.level) / 2, (1 + fit.level) / 2]
        ax.fill_between(grid, *np.quantile(band, q, axis=0), color="k", alpha=0.15,
                        label=f"{fit.level:.0%} bootstrap band")
    ax.axhline(fit.chance, color="C3", ls="--", lw=0.8, label=f"chance {fit.chance:g}")
    ax.axhline(fit.chance + fit.sigmoid.a, color="gray", ls=":", lw=0.8, label="ceiling")
    if pred is not None:
        yerr = ([pred["accuracy"] - pred["lo"], pred["hi"] - pred["accuracy"]]
                if "lo" in pred else None)
        xerr = ([pred["task_loss"] - pred["task_loss_lo"], pred["task_loss_hi"]
                 - pred["task_loss"]] if "lo" in pred else None)
        ax.errorbar(pred["task_loss"], pred["accuracy"], xerr=xerr, yerr=yerr, fmt="o",
                    mfc="none", color="C0", capsize=3,
                    label="predicted (intervals: task loss, one run's accuracy)")
    ax.set(xlabel="task loss", ylabel="accuracy", title=f"step 2: accuracy of {fit.task}")
    ax.legend(fontsize=7)


def plot_downstream(fit, out_dir: str, pred: pd.DataFrame | None = None,
                    outcome=None) -> list[str]:
    """downstream.png: the sigmoid with the points (and any predictions); step 1's task loss
    against its law; with `outcome` (the measured accuracy of the predicted runs, in the
    order of `pred`), the predictions beside the outcomes."""
    fig, axes = _figure(3 if outcome is not None else 2)
    _sigmoid_panel(axes[0], fit, pred)
    pts = fit.points
    ax = axes[1]
    ax.scatter(fit.loss_law.predict(pts["N"], pts["D"]), pts["task_loss"], s=14, color="C0")
    lims = [pts["task_loss"].min(), pts["task_loss"].max()]
    ax.plot(lims, lims, "k-", lw=0.8)
    ax.set(xlabel="task loss of the law", ylabel="measured task loss",
           title=f"step 1: {fit.loss_law.describe()}")
    if outcome is not None:
        ax = axes[2]
        x = np.arange(len(pred))
        yerr = ([pred["accuracy"] - pred["lo"], pred["hi"] - pred["accuracy"]]
                if "lo" in pred else None)
        ax.errorbar(x, pred["accuracy"], yerr=yerr, fmt="o", mfc="none", capsize=4,
                    color="C0", label="predicted (one run's interval)")
        ax.scatter(x, outcome, marker="*", s=120, color="k", zorder=3, label="measured")
        ax.axhline(fit.chance, color="C3", ls="--", lw=0.8, label="chance")
        ax.set_xticks(x, [f"N {n:.3g}\nD {d:.3g}" for n, d in zip(pred["N"], pred["D"],
                                                                  strict=True)], fontsize=7)
        ax.set(ylabel="accuracy", title="prediction beside outcome")
        ax.legend(fontsize=7)
    return [_save(fig, out_dir, "downstream.png")]
