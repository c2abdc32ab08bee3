"""The critical batch from runs that measured the gradient noise scale (`train.noise_scale_every`,
metric `noise_scale`: McCandlish et al. 2018's B_simple = tr(Σ)/|G|², in tokens, smoothed).

McCandlish et al. find the critical batch B_crit close to the noise scale (B_simple within a
small factor of it), so one run that measures it gives what a batch sweep gives: B_crit as it
grows while the loss falls. This fits Kaplan et al. 2020's form (section 5.1),

    B_crit(L) = B* / L^(1/α_B)        (their B* ≈ 2e8 tokens, α_B ≈ 0.21)

as a power law B = coef · L^exponent (B* = coef, α_B = −1/exponent), and the same quantity
against the tokens seen, B = coef · D^exponent, by least squares in log-log space.

The points are a run's logged records: the noise scale beside the training loss, the loss
averaged over a centred window of records (the per-batch loss is noisy; the noise scale is
already smoothed). Records in the first `skip` of each run are left out: warmup and the
first measurements (whose moving average has seen few steps) are a transient the law does not
describe. The logged points are smoothed and so correlated: the least-squares intervals treat
them as independent and are too narrow; read the per-run exponents' spread as the honest one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.output import format_table, interval
from analysis.powerlaw import PowerLaw, fit_power_law
from lab.errors import UserError

MIN_POINTS = 3  # per run: fewer measured records give no law


@dataclass
class NoiseScaleFit:
    """B_noise against the loss (pooled over the runs) and against tokens (per run)."""

    points: pd.DataFrame  # run, step, tokens, loss (windowed), noise_scale, batch_tokens
    vs_loss: PowerLaw  # B = coef * L^exponent, every run's points together
    per_run: pd.DataFrame  # run, batch_tokens, points, loss and tokens exponents and coefs
    vs_tokens: PowerLaw | None  # with one run: its law in tokens; with several, None
    warnings: list[str] = field(default_factory=list)

    @property
    def alpha_B(self) -> float:
        """Kaplan et al.'s α_B: B_crit ∝ L^(−1/α_B)."""
        return -1.0 / self.vs_loss.exponent

    def __call__(self, loss) -> np.ndarray:
        """B_noise (tokens) at a loss, by the pooled law."""
        return self.vs_loss(loss)

    def to_dict(self) -> dict:
        return {
            "form": "B_noise(L) = coef * L^exponent = B* / L^(1/alpha_B), tokens "
                    "(McCandlish et al. 2018's B_simple; Kaplan et al. 2020 section 5.1)",
            "law": self.vs_loss.to_dict(),
            "B_star": self.vs_loss.coef,
            "alpha_B": self.alpha_B,
            "law_tokens": self.vs_tokens.to_dict() if self.vs_tokens is not None else None,
            "runs": self.per_run.to_dict(orient="records"),
            "n_points": len(self.points),
        }


def noise_points(curves: pd.DataFrame, *, skip: float = 0.1, window: int = 5) -> pd.DataFrame:
    """The (loss, tokens, noise_scale) points of every run that measured the noise scale."""
    if "noise_scale" not in curves.columns:
        return pd.DataFrame(columns=["run", "step", "tokens", "loss", "noise_scale"])
    parts = []
    for _, g in curves.sort_values("step").groupby("run", sort=False):
        g = g.dropna(subset=["step", "loss"]).copy()
        g["loss"] = g["loss"].rolling(window, center=True, min_periods=1).mean()
        last = g["step"].max()
        g = g[(g["step"] > skip * last) & (g["noise_scale"] > 0)].dropna(subset=["noise_scale"])
        if len(g):
            parts.append(g)
    if not parts:
        return pd.DataFrame(columns=["run", "step", "tokens", "loss", "noise_scale"])
    return pd.concat(parts, ignore_index=True)


def has_noise_scale(curves: pd.DataFrame) -> bool:
    return "noise_scale" in curves.columns and bool(curves["noise_scale"].notna().any())


def fit_noise_scale(curves: pd.DataFrame, *, skip: float = 0.1, window: int = 5,
                    level: float = 0.95) -> NoiseScaleFit:
    """Fit B_noise(L) (and B_noise(tokens) per run) on curves with columns run, step, loss,
    noise_scale and tokens (batch_tokens if known)."""
    points = noise_points(curves, skip=skip, window=window)
    rows, warns = [], []
    for run, g in points.groupby("run", sort=False):
        if len(g) < MIN_POINTS:
            warns.append(f"{run}: only {len(g)} measured record(s) after the first "
                         f"{skip:.0%}; left out")
            continue
        by_loss = fit_power_law(g["loss"], g["noise_scale"], level)
        by_tokens = fit_power_law(g["tokens"], g["noise_scale"], level)
        rows.append({"run": run, "batch_tokens": float(g["batch_tokens"].iloc[0])
                     if "batch_tokens" in g else float("nan"), "points": len(g),
                     "loss_exponent": by_loss.exponent, "loss_coef": by_loss.coef,
                     "tokens_exponent": by_tokens.exponent, "tokens_coef": by_tokens.coef})
    if not rows:
        raise UserError(f"no run has {MIN_POINTS} or more records with a noise_scale after its "
                        f"first {skip:.0%}; train with train.noise_scale_every=N (N below "
                        "train.log_every x a few) or longer")
    kept = points[points["run"].isin([r["run"] for r in rows])]
    per_run = pd.DataFrame(rows)
    single = per_run["run"].iloc[0] if len(per_run) == 1 else None
    vs_tokens = (fit_power_law(kept["tokens"], kept["noise_scale"], level)
                 if single is not None else None)
    return NoiseScaleFit(points=kept.reset_index(drop=True),
                         vs_loss=fit_power_law(kept["loss"], kept["noise_scale"], level),
                         per_run=per_run, vs_tokens=vs_tokens, warnings=warns)


def describe_noise_scale(fit: NoiseScaleFit) -> str:
    """The noise-scale laws as `lab fit` prints them."""
    law = fit.vs_loss
    out = [f"Gradient noise scale (McCandlish et al. 2018, B_simple, tokens): {len(fit.points)} "
           f"records of {len(fit.per_run)} run(s)"]
    rows = [["B_noise(L) exponent", law.exponent, interval(law.exponent_interval)],
            ["B_noise(L) coefficient B*", law.coef, interval(law.coef_interval)],
            ["alpha_B (B ∝ L^(-1/alpha_B))", fit.alpha_B, ""]]
    if fit.vs_tokens is not None:
        t = fit.vs_tokens
        rows += [["B_noise(D) exponent (tokens seen)", t.exponent,
                  interval(t.exponent_interval)],
                 ["B_noise(D) coefficient", t.coef, interval(t.coef_interval)]]
    out.append(format_table(["quantity", "value", f"{law.level:.0%} interval"], rows))
    out.append("(the intervals treat smoothed, correlated records as independent: too narrow)")
    if len(fit.per_run) > 1:
        out.append("each run's own laws (B_noise = coef · L^exponent, and in tokens seen):")
        out.append(format_table(
            ["run", "batch (tokens)", "records", "exponent in L", "exponent in D"],
            [[r["run"], r["batch_tokens"], int(r["points"]), r["loss_exponent"],
              r["tokens_exponent"]] for _, r in fit.per_run.iterrows()]))
    return "\n".join(out)


def noise_at_losses(fit: NoiseScaleFit, losses) -> np.ndarray:
    """The measured noise scale where the runs' (windowed) loss first reaches each loss, the
    median over runs (interpolated in log between records); NaN where no run gets there."""
    out = []
    for L in np.asarray(losses, dtype=np.float64):
        found = []
        for _, g in fit.points.groupby("run", sort=False):
            low = np.minimum.accumulate(g["loss"].to_numpy())
            i = np.flatnonzero(low <= L)
            if len(i) and i[0] > 0:
                j = i[0]
                l0, l1 = low[j - 1], low[j]
                w = (l0 - L) / (l0 - l1) if l0 > l1 else 1.0
                b = np.log(g["noise_scale"].to_numpy()[[j - 1, j]])
                found.append(float(np.exp(b[0] + w * (b[1] - b[0]))))
        out.append(float(np.median(found)) if found else float("nan"))
    return np.asarray(out)
