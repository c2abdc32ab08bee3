"""The critical batch size as a function of the target loss (McCandlish et al. 2018; Kaplan et
al. 2020, section 5).

For a target loss L, a run of batch B reaches it after S steps and E = S B examples (here
tokens). Across batch sizes the two trade off as S/S_min - 1 = (E/E_min - 1)^-1, which is
S = S_min + E_min / B: linear in 1/B, so S_min and E_min come from a least-squares line of S on
1/B (weighted by 1/S^2, i.e. relative errors). The critical batch is B_crit(L) = E_min / S_min,
and across targets it follows a power law in L (Kaplan et al.: B_crit = B* / L^(1/alpha_B)).

Each run's loss curve is smoothed (a centred rolling mean, then a running minimum, so noise
cannot make a curve reach a target early and then leave it); S is the first step where it is
at or below the target, interpolated between logged steps. With several learning rates at one
batch size, the fastest run counts (each batch at its best learning rate, as McCandlish et al.
assume).

Runs that measured the gradient noise scale (`train.noise_scale_every`) give the same law from
one run (analysis.noise_scale); a sweep that measured it gives both, side by side.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.noise_scale import (
    NoiseScaleFit,
    fit_noise_scale,
    has_noise_scale,
    noise_at_losses,
)
from analysis.powerlaw import PowerLaw, fit_power_law
from lab.errors import UserError


def smoothed(loss: np.ndarray, window: int = 5) -> np.ndarray:
    """A centred rolling mean, then a running minimum."""
    s = pd.Series(np.asarray(loss, dtype=np.float64))
    return np.minimum.accumulate(s.rolling(window, center=True, min_periods=1).mean().to_numpy())


def steps_to_reach(step: np.ndarray, loss: np.ndarray, target: float) -> float:
    """The first (interpolated) step at which a non-increasing curve is at or below `target`;
    NaN if it never gets there."""
    below = np.flatnonzero(loss <= target)
    if not len(below):
        return float("nan")
    i = below[0]
    if i == 0:
        return float(step[0])
    s0, s1, l0, l1 = step[i - 1], step[i], loss[i - 1], loss[i]
    return float(s0 + (s1 - s0) * (l0 - target) / (l0 - l1)) if l0 > l1 else float(s1)


@dataclass
class CriticalBatch:
    """S_min, E_min and B_crit at each target loss, and B_crit(L) as a power law (from a batch
    sweep); the noise-scale law (from runs that measured it); either may be missing."""

    table: pd.DataFrame  # one row per target: loss, S_min, E_min, B_crit, n_batches
    law: PowerLaw | None  # B_crit = coef * L^exponent (B in tokens); None without a sweep
    warnings: list[str] = field(default_factory=list)
    noise: NoiseScaleFit | None = None

    def comparison(self) -> pd.DataFrame:
        """At the sweep's targets: its B_crit, the noise-scale law's and the measured noise
        scale (median over runs where they reach the loss), and their ratios."""
        if self.law is None or self.noise is None:
            return pd.DataFrame()
        t = self.table
        law, measured = self.noise(t["loss"]), noise_at_losses(self.noise, t["loss"])
        return pd.DataFrame({"loss": t["loss"], "B_crit_sweep": t["B_crit"],
                             "B_noise_law": law, "B_noise_measured": measured,
                             "law_over_sweep": law / t["B_crit"],
                             "measured_over_sweep": measured / t["B_crit"]})

    def to_dict(self) -> dict:
        return {
            "method": "critical-batch",  # what lab plan reads it as
            "form": "B_crit(L) = coef * L^exponent, tokens (McCandlish et al. 2018)",
            "law": self.law.to_dict() if self.law is not None else None,
            "targets": self.table.to_dict(orient="records"),
            "noise_scale": self.noise.to_dict() if self.noise is not None else None,
            "comparison": self.comparison().to_dict(orient="records"),
            "warnings": list(self.warnings),
        }


def fit_steps_examples(batch, steps) -> tuple[float, float]:
    """(S_min, E_min) from steps S at batch sizes B, by S = S_min + E_min / B (weights 1/S^2)."""
    B, S = np.asarray(batch, dtype=np.float64), np.asarray(steps, dtype=np.float64)
    X = np.column_stack([np.ones_like(B), 1.0 / B]) / S[:, None]
    s_min, e_min = np.linalg.lstsq(X, np.ones_like(S), rcond=None)[0]
    return float(s_min), float(e_min)


def default_targets(curves: dict[float, list[np.ndarray]], n: int = 8) -> np.ndarray:
    """Targets every batch size reaches: from just above the highest of the batch sizes' best
    losses up to 40% of the way to the lowest of their starting losses (leaving out the early
    transient, where the relation does not hold)."""
    lows = [min(c.min() for c in cs) for cs in curves.values()]
    highs = [min(c[0] for c in cs) for cs in curves.values()]
    lo, hi = max(lows), min(highs)
    if not hi > lo:
        raise UserError("the batch sizes' loss curves share no range of losses; train longer")
    top = lo + 0.4 * (hi - lo)
    return np.geomspace(lo + 0.02 * (top - lo), top, n)


def fit_critical_batch(
    curves: pd.DataFrame, *, targets=None, window: int = 5, level: float = 0.95
) -> CriticalBatch:
    """Fit B_crit(L) on training curves with columns run, step, loss and batch_tokens (one
    model size; one or more learning rates per batch size): from the batch sweep where there
    are three or more batch sizes, from the measured noise scale where runs logged one, or
    both."""
    need = [c for c in ("run", "step", "loss", "batch_tokens") if c not in curves.columns]
    if need:
        raise UserError(f"the critical batch fit needs curve column(s) {', '.join(need)}")
    noise = (fit_noise_scale(curves, window=window, level=level)
             if has_noise_scale(curves) else None)
    by_batch: dict[float, list[tuple[np.ndarray, np.ndarray]]] = {}
    for _, g in curves.sort_values("step").groupby("run"):
        g = g.dropna(subset=["step", "loss"])
        if len(g) < 2:
            continue
        by_batch.setdefault(float(g["batch_tokens"].iloc[0]), []).append(
            (g["step"].to_numpy(np.float64), smoothed(g["loss"].to_numpy(), window))
        )
    if len(by_batch) < 3:
        if noise is not None:  # one run (or two batch sizes) with the noise scale measured
            return CriticalBatch(table=pd.DataFrame(columns=TABLE_COLUMNS), law=None,
                                 warnings=list(noise.warnings), noise=noise)
        raise UserError(
            f"the critical batch fit needs curves at three or more batch sizes, got "
            f"{len(by_batch)}; sweep train.batch_size, or train with train.noise_scale_every=N "
            "to measure the gradient noise scale"
        )
    table, warns = sweep_table(by_batch, targets)
    law = fit_power_law(table["loss"], table["B_crit"], level)
    return CriticalBatch(table=table, law=law,
                         warnings=warns + (noise.warnings if noise is not None else []),
                         noise=noise)


TABLE_COLUMNS = ["loss", "S_min", "E_min", "B_crit", "n_batches"]


def sweep_table(by_batch: dict[float, list[tuple[np.ndarray, np.ndarray]]],
                targets=None) -> tuple[pd.DataFrame, list[str]]:
    """S_min, E_min and B_crit at each target loss from the (step, smoothed loss) curves of
    each batch size, and the warnings about targets left out."""
    if targets is None:
        targets = default_targets({b: [c for _, c in runs] for b, runs in by_batch.items()})
    rows, warns = [], []
    for L in np.asarray(targets, dtype=np.float64):
        B, S = [], []
        for b, runs in by_batch.items():
            s = np.nanmin([steps_to_reach(st, lo, L) for st, lo in runs] + [np.inf])
            if np.isfinite(s):
                B.append(b)
                S.append(s)
        if len(B) < 3:
            warns.append(f"only {len(B)} batch sizes reach loss {L:.4g}; target left out")
            continue
        s_min, e_min = fit_steps_examples(B, S)
        if not (s_min > 0 and e_min > 0):
            warns.append(f"at loss {L:.4g} the fit gives S_min={s_min:.3g}, E_min={e_min:.3g}; "
                         "no trade-off between steps and batch there, target left out")
            continue
        rows.append({"loss": float(L), "S_min": s_min, "E_min": e_min,
                     "B_crit": e_min / s_min, "n_batches": len(B)})
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    if len(table) < 2:
        raise UserError("fewer than two target losses gave a critical batch; train the batch "
                        "sweep longer or give targets the runs reach")
    return table, warns
