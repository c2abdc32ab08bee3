"""The analysis and report of a branched ladder (what `lab demo` ends with).

    result = analyse_study(points, out_dir, bootstrap=200, extrapolate=10)
    report_page.write_report(out_dir, result, compute=..., commands=..., timing=..., title=...)

`points` has one row per branch or run: size, N (non-embedding parameters), D (tokens),
C = 6 N D, loss (final eval loss), budget (its compute budget's index), and optionally held_out
(True on the rows of the demo's held-out budget, a whole IsoFLOP budget beyond the fitted ones,
one row per size and seed) and seed; without it the largest size's longest branch is held out.
Approach 3 is fitted to the rest by the very `lab fit` command the report prints (with bootstrap
intervals), then predicts the held-out losses beside three naive baselines
(analysis.heldout). The IsoFLOP view (Approach 2) uses the fitted points (and a held-out
branch, which sits on a fitted budget). Outputs under out_dir: points.csv, fit_points.csv,
plots/*.png, and (report_page.write_report) fit.json (the check under `heldout`) and
a self-contained report.html. This module also gives the study's tables as headers and rows
(the *_rows functions), which the demo prints and the report shows as HTML tables.
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.heldout import heldout_check
from analysis.inputs import load_inputs
from analysis.methods import FitResult, analyse
from analysis.output import format_table, jsonable
from analysis.study_downstream import downstream_study
from lab.errors import UserError, shown
from lab.paths import shown_path


def held_out_index(points: pd.DataFrame) -> int:
    """The row left out of the fit: the largest model's longest run."""
    largest = points[points["N"] == points["N"].max()]
    return int(largest["D"].idxmax())


def fit_words(csv: Path, plots: Path, bootstrap: int, budget: float, method: str) -> list[str]:
    """The `lab fit` arguments of one analysis step (printed in the report as they run)."""
    words = [shown_path(csv)]
    if method != "approach3":
        words += ["--method", method]
    if bootstrap:
        words += ["--bootstrap", str(bootstrap)]
    return words + ["--budgets", f"{budget:g}", "--plots", shown_path(plots)]


def fit_step(csv: Path, plots: Path, bootstrap: int, budget: float, method: str) -> FitResult:
    """One analysis step, as `lab fit` runs its `fit_words` (the other options at their
    defaults, which are the fits' own)."""
    return analyse(method, load_inputs([shown_path(csv)]), options={"bootstrap": bootstrap},
                   budgets=[budget], plots_dir=shown_path(plots), sources=[shown_path(csv)])


def _marked_points(points: pd.DataFrame | list[dict]) -> tuple[pd.DataFrame, bool]:
    """The study's points with the `held_out` column marking the rows left out of the fit, and
    whether the points marked them themselves (else held_out_index chose one)."""
    df = pd.DataFrame(points).reset_index(drop=True)
    for col in ("size", "N", "D", "C", "loss", "budget"):
        if col not in df.columns:
            raise UserError(f"the study's points lack column {shown(col)}")
    explicit = "held_out" in df.columns
    if explicit:
        df["held_out"] = df["held_out"].astype(bool)
        if not df["held_out"].any() or df["held_out"].all():
            raise UserError("the study's points must mark some rows held_out, not all")
    else:
        df["held_out"] = df.index == held_out_index(df)
    return df, explicit


def analyse_study(points: pd.DataFrame | list[dict], out_dir: str | Path, *,
                  bootstrap: int = 200, extrapolate: float = 10.0,
                  curves: list[str] = ()) -> dict:
    """Fit, hold out, predict and plot; returns the JSON-ready result (also the figures'
    paths under "figures" and the commands under "commands")."""
    out = Path(out_dir)
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    df, explicit = _marked_points(points)
    df.to_csv(out / "points.csv", index=False)
    df[~df["held_out"]].to_csv(out / "fit_points.csv", index=False)
    target = float(f"{extrapolate * float(df['C'].max()):.3g}")  # a round number to print

    iso_csv = "fit_points.csv" if explicit else "points.csv"
    commands = {"fit": [shlex.join(["lab", "fit", *fit_words(out / csv, plots, bootstrap,
                                                             target, method)])
                        for csv, method in (("fit_points.csv", "approach3"),
                                            (iso_csv, "isoflop"))]}
    # Approach 3 on all but the held-out point, exactly as the printed command does it.
    done = fit_step(out / "fit_points.csv", plots, bootstrap, target, "approach3")
    fit, fit_json, fit_text = done.fit, done.record, done.text

    heldout = heldout_check(df[~df["held_out"]], df[df["held_out"]], fit)
    heldout["budget"] = float(df.loc[df["held_out"], "budget_flops"].iloc[0]) \
        if "budget_flops" in df else None

    # Approach 2 on every point; a budget without an interior minimum is reported, not fatal.
    # An explicit held-out run is a budget of its own and stays out; a held-out branch is one
    # point of a fitted budget's profile (as before), so that profile keeps it.
    try:
        iso_done = fit_step(out / iso_csv, plots, bootstrap, target, "isoflop")
        iso = iso_done.fit
        isoflop = {**iso_done.record, "text": iso_done.text}
    except UserError as err:
        isoflop = {"error": str(err)}

    figures = [str(p) for p in fit_json.get("plots", [])] + [
        str(p) for p in isoflop.get("plots", [])]
    figures.insert(0, plot_law(df, fit, heldout, plots / "law.png"))
    if len(heldout["N"]) >= 3:
        figures.insert(1, plot_heldout(heldout, fit, plots / "heldout.png"))
    if curves:
        figures.insert(1, plot_curves(curves, plots / "curves.png"))

    downstream = downstream_study(df, out, bootstrap, curves)
    if downstream:
        figures += [c["figure"] for c in downstream["tasks"].values()]
        commands["fit"] += [c["command"] for c in downstream["tasks"].values()]

    optimal = fit_json["compute_optimal"][0]
    result = {
        **{k: v for k, v in fit_json.items() if k != "compute_optimal"},
        "N_definition": "non-embedding parameters",
        "C_definition": "6 N D",
        "heldout": heldout,
        "prediction": {"C": target, "multiple_of_largest": extrapolate, **optimal},
        "isoflop": {k: v for k, v in isoflop.items() if k not in ("text", "plots")},
        "study_points": df.drop(columns=[c for c in ("run",) if c in df]).to_dict(orient="records"),
        "fit_text": fit_text,
        "isoflop_text": isoflop.get("text", ""),
        "figures": figures,
        "commands": commands,
    }
    if downstream:
        result["downstream"] = downstream
    if "N_opt" in isoflop:
        result["isoflop"]["prediction"] = {
            "C": target, "N_opt": float(iso.N_opt(target)), "D_opt": float(iso.D_opt(target))}
    return jsonable(result)


# ----------------------------------------------------------------------------- figures


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def plot_law(df: pd.DataFrame, fit, heldout: dict, path: Path) -> str:
    """law.png: the loss of every fitted branch against its tokens, one colour per size, the
    fitted law through them, and the held-out budget's losses (stars, the mean over seeds)
    beside the law's predictions with their intervals."""
    fig, ax = _figure()
    d_line = np.logspace(np.log10(df["D"].min() / 1.3), np.log10(df["D"].max() * 1.3), 100)
    for i, (size, g) in enumerate(sorted(df.groupby("size"), key=lambda kv: kv[1]["N"].min())):
        color = f"C{i % 10}"
        n = float(g["N"].iloc[0])
        fitted = g[~g["held_out"]]
        ax.scatter(fitted["D"], fitted["loss"], color=color, s=22,
                   label=f"{size} (N={n:,.0f} non-embedding)")
        ax.plot(d_line, fit.predict(n, d_line), color=color, lw=1)
    d, measured, predicted = (np.array(heldout[k]) for k in ("D", "measured", "predicted"))
    ax.scatter(d, measured, marker="*", s=160, color="k", zorder=4,
               label="held out (measured, mean of seeds)")
    yerr = None
    if heldout.get("interval"):
        lo, hi = np.array(heldout["interval"]).T
        yerr = [predicted - lo, hi - predicted]
    ax.errorbar(d, predicted, yerr=yerr, fmt="o", mfc="none", color="k", capsize=4,
                label=f"predicted (mean |error| {heldout['error']:.2%})")
    ax.set(xscale="log", xlabel="tokens D", ylabel="final eval loss (nats/byte)",
           title=fit.describe())
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=100)
    return str(path)


def plot_heldout(h: dict, fit, path: Path) -> str:
    """heldout.png: the held-out budget's loss against N: each seed, their mean, the law along
    the budget with its minimum, the measured parabola's vertex, and the baselines."""
    from analysis.heldout import budget_line

    fig, ax = _figure()
    n, measured = np.array(h["N"]), np.array(h["measured"])
    for seeds, x in zip(h["measured_seeds"], n, strict=True):
        ax.scatter([x] * len(seeds), seeds, color="0.6", s=14, zorder=3)
    ax.scatter(n, measured, marker="*", s=160, color="k", zorder=4,
               label="measured (mean of seeds; grey: each seed)")
    grid = np.geomspace(n.min() / 1.5, n.max() * 1.5, 200)
    ax.plot(grid, fit.predict(grid, budget_line(n, np.array(h["D"]))(grid)), color="C0",
            label="law along the budget")
    for i, (name, pred) in enumerate(h["baseline_predicted"].items()):
        ax.scatter(n, pred, marker="x", color=f"C{i + 1}", label=f"baseline: {name}")
    for key, color, label in (("optimum_predicted_N", "C0", "law's minimum"),
                              ("optimum_measured_N", "k", "measured minimum (parabola)")):
        if h.get(key):
            ax.axvline(h[key], color=color, ls="--", lw=1, label=f"{label}: N {h[key]:,.0f}")
    ax.set(xscale="log", xlabel="N (non-embedding parameters)",
           ylabel="final eval loss (nats/byte)", title="the held-out budget, over N")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=100)
    return str(path)


def plot_curves(run_dirs: list[str], path: Path, smooth: int = 8) -> str:
    """curves.png: training loss (a running mean over `smooth` logged steps) against tokens of
    each stable run and its decays, and the final eval loss of each decay."""
    from lab import paths
    from lab.run.metrics import read_metrics
    from lab.run.rundir import branch_dirs, read_summary

    fig, ax = _figure()
    for i, run_dir in enumerate(run_dirs):
        color = f"C{i % 10}"
        runs = [str(run_dir), *branch_dirs(run_dir)]
        for j, r in enumerate(runs):
            m = pd.DataFrame([x for x in read_metrics(r) if "loss" in x and "tokens" in x])
            if m.empty:
                continue
            loss = m["loss"].rolling(smooth, min_periods=1).mean()
            ax.plot(m["tokens"], loss, color=color, lw=1.2 if j == 0 else 0.8,
                    ls="-" if j == 0 else "--", label=paths.name(run_dir) if j == 0 else None)
            summary = read_summary(r)
            if j and summary is not None and summary.final_eval_loss:
                ax.plot(summary.tokens, summary.final_eval_loss, "o", color=color, ms=4)
    ax.set(xscale="log", xlabel="tokens", ylabel=f"training loss (mean of {smooth} logs)",
           title="stable runs (solid), decays (dashed), eval loss after each decay (dots)")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)
    return str(path)


# ----------------------------------------------------------------------------- text


def _finite(v) -> bool:
    """A number the report can print (None and NaN, a law without an optimum, are not)."""
    return isinstance(v, float) and math.isfinite(v)


def _num(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.{digits}g}"


def _fixed(v, places: int) -> str:
    """A number with `places` decimals, "-" where there is none (a baseline that could not
    predict: NaN, null)."""
    return "-" if v is None or not math.isfinite(v) else f"{v:.{places}f}"


def _iv(result: dict, key: str) -> str:
    iv = result.get("intervals", {}).get(key)
    return f" [{_num(iv[0], 3)}, {_num(iv[1], 3)}]" if iv and None not in iv else ""


Table = tuple[list[str], list[list[str]]]  # headers and rows: printed, or an HTML <table>


def loss_rows(result: dict) -> Table:
    """Final eval loss per size and budget (the mean over seeds where a point has several);
    the held-out points marked with *."""
    df = pd.DataFrame(result["study_points"])
    budgets = sorted(df["budget"].unique())
    rows = []
    for size, g in sorted(df.groupby("size"), key=lambda kv: kv[1]["N"].min()):
        row = [size, f"{int(g['N'].iloc[0]):,}"]
        for b in budgets:
            p = g[g["budget"] == b]
            row.append("-" if p.empty else f"{p['loss'].mean():.4f}"
                       + ("*" if bool(p["held_out"].iloc[0]) else ""))
        rows.append(row)
    heads = ["size", "N (non-embedding)"]
    heads += [f"C≈{df[df['budget'] == b]['C'].median():.2g}" for b in budgets]
    return heads, rows


def loss_table(result: dict) -> str:
    """loss_rows as the demo prints it."""
    return format_table(*loss_rows(result))


def heldout_rows(h: dict) -> Table:
    """The held-out budget point by point: measured (each seed), the law with its interval
    and error, and each baseline's prediction and error; the last row the mean |error|s."""
    names = list(h["baselines"])
    heads = ["size", "N", "D", "measured", "seeds", "law", "interval", "error", *names]
    rows = []
    for i, size in enumerate(h["sizes"]):
        iv = h.get("interval")
        rows.append([size, f"{h['N'][i]:,.0f}", f"{h['D'][i]:,.0f}", f"{h['measured'][i]:.4f}",
                     " ".join(f"{x:.4f}" for x in h["measured_seeds"][i]),
                     f"{h['predicted'][i]:.4f}",
                     f"[{iv[i][0]:.4f}, {iv[i][1]:.4f}]" if iv else "-",
                     f"{h['errors'][i]:+.2%}",
                     *[f"{_num(h['baseline_predicted'][k][i], 5)} "
                       f"({_pct(h['baseline_errors'][k][i], '+')})" for k in names]])
    rows.append(["mean |error|", "", "", "", "", "", "", f"{h['error']:.2%}",
                 *[_pct(h["baselines"][k]) for k in names]])
    return heads, rows


def law_rows(result: dict) -> Table:
    """The fitted law's parameters and allocation exponents with their intervals."""
    names = {"a": "a (N_opt ∝ C^a)", "b": "b (D_opt ∝ C^b)"}
    return ["parameter", "value", "interval"], [
        [names.get(k, k), _num(result.get(k)), _iv(result, k).strip() or "-"]
        for k in ("E", "A", "B", "alpha", "beta", "a", "b")]


def prediction_rows(result: dict) -> Table:
    """The compute-optimal model at the prediction's budget: Approach 3's (with its
    intervals) and, where it could be fitted, the IsoFLOP view's."""
    p = result["prediction"]

    def iv(key: str) -> str:
        lo, hi = p.get(f"{key}_lo"), p.get(f"{key}_hi")
        return "-" if lo is None or hi is None else f"[{_num(lo)}, {_num(hi)}]"

    def count(v) -> str:  # "-" where the law has no optimum (alpha < 0: NaN)
        return f"{v:,.0f}" if _finite(v) else "-"

    def per_param(q: dict) -> str:
        return "-" if "-" in (count(q["N_opt"]), count(q["D_opt"])) \
            else f"{q['D_opt'] / q['N_opt']:.1f}"

    rows = [["Approach 3", f"{p['C']:.3g}", count(p["N_opt"]), iv("N_opt"), count(p["D_opt"]),
             iv("D_opt"), per_param(p), _fixed(p.get("loss"), 4), iv("loss")]]
    iso = result["isoflop"].get("prediction")
    if iso:
        rows.append(["IsoFLOP", f"{iso['C']:.3g}", count(iso["N_opt"]), "-",
                     count(iso["D_opt"]), "-", per_param(iso), "-", "-"])
    return ["law", "C (FLOPs)", "N_opt", "interval", "D_opt", "interval", "tokens/param",
            "loss", "interval"], rows


def isoflop_rows(iso: dict) -> Table:
    """Approach 2's minimum of each budget's parabola in log N."""
    return ["C (FLOPs)", "runs", "N_opt", "D_opt", "loss at the minimum"], [
        [f"{b['C']:.3g}", str(b["n_runs"]), f"{b['N_opt']:,.0f}", f"{b['D_opt']:,.0f}",
         f"{b['loss_opt']:.4f}"] for b in iso.get("budgets", [])]


def downstream_rows(h: dict) -> Table:
    """A task's held-out runs: accuracy predicted (with its interval) against measured, in
    points, beside each baseline's; the last row the mean |error|s."""
    names = list(h["baselines"])
    rows = []
    for i, (n, d) in enumerate(zip(h["N"], h["D"], strict=True)):
        iv = f"[{h['interval'][i][0]:.3f}, {h['interval'][i][1]:.3f}]" if "interval" in h \
            else "-"
        rows.append([f"{n:,.0f}", f"{d:,.0f}", f"{h['measured'][i]:.3f}",
                     f"{h['above_chance'][i]:+.3f}", f"{h['predicted'][i]:.3f}", iv,
                     f"{100 * h['errors'][i]:+.1f}",
                     *[_fixed(h["baseline_predicted"][k][i], 3) for k in names]])
    rows.append(["mean |error|", "", "", "", "", "", f"{100 * h['mean_abs_error']:.1f}",
                 *[f"{100 * h['baselines'][k]:.1f}" for k in names]])
    return ["N", "D", "measured", "above chance", "law", "interval", "error (points)",
            *names], rows


SMOKE_TEST = ("SMOKE TEST: this quick study checks that every step runs; its models are too "
              "small and its runs too short for the fitted law, the held-out error or the "
              "compute-optimal numbers below to mean anything. Run `lab demo` (without "
              "--quick) for a study whose law can be read.")


def banner_lines(result: dict, smoke_test: bool = False) -> list[str]:
    """What must be read before any number: a smoke test's notice, the fit's warnings, and a
    backtest's verdict when the law did not beat every naive baseline."""
    lines = [SMOKE_TEST] if smoke_test else []
    warnings = result.get("warnings") or []
    iso_warnings = (result.get("isoflop") or {}).get("warnings") or []
    if warnings or iso_warnings:
        lines.append(f"WARNING: {len(warnings) + len(iso_warnings)} problem(s) with the fits; "
                     "read their numbers with care:")
        lines += [f"  - Approach 3: {w}" for w in warnings]
        lines += [f"  - IsoFLOP: {w}" for w in iso_warnings]
    if result.get("degenerate"):
        lines.append("The Approach 3 fit is degenerate: its parameters are not shown as a law.")
    verdict = (result.get("backtest") or {}).get("verdict")
    if verdict:  # a naive baseline predicted the larger runs as well as the law
        lines.append(f"WARNING: {verdict}.")
    downstream = (result.get("downstream") or {}).get("warnings") or []
    if downstream:
        lines.append(f"WARNING: {len(downstream)} problem(s) with the downstream law:")
        lines += [f"  - downstream: {w}" for w in downstream]
    return lines


def downstream_lines(h: dict, task: str) -> list[str]:
    """A downstream law's held-out check (analysis.downstream.heldout_accuracy) in a few
    lines: each run's predicted and measured accuracy, and the goal."""
    lines = [f"downstream, task {task}: accuracy of the held-out runs, predicted against "
             f"measured (errors in points)"]
    for i, (n, d) in enumerate(zip(h["N"], h["D"], strict=True)):
        iv = f" [{h['interval'][i][0]:.3f}, {h['interval'][i][1]:.3f}]" if "interval" in h \
            else ""
        lines.append(f"  N {n:,.0f}, D {d:,.0f}: predicted {h['predicted'][i]:.3f}{iv}, "
                     f"measured {h['measured'][i]:.3f} ({h['above_chance'][i]:+.3f} above "
                     f"chance), error {100 * h['errors'][i]:+.1f} points")
    lines.append(f"  mean |error| {100 * h['mean_abs_error']:.1f} points, worst "
                 f"{100 * h['worst_abs_error']:.1f}; goal (every error within "
                 f"{100 * h['goal']:.0f} points): {'met' if h['goal_met'] else 'missed'}")
    return lines


def study_downstream_lines(downstream: dict) -> list[str]:
    """The downstream check in a few lines per task: the ladder's range above chance, each
    held-out size's prediction beside its outcome, the error against the goal and the
    baselines."""
    lines = []
    for task, c in downstream["tasks"].items():
        lines.append(f"downstream law on {task_ladder(c)}")
        h = c["heldout"]
        lines += downstream_lines(h, task)
        lines.append("  baselines' mean |error|: " + ", ".join(
            f"{k} {100 * v:.1f} points" for k, v in h["baselines"].items())
            + f"; the law's {100 * h['mean_abs_error']:.1f}")
    if downstream.get("cost"):
        lines.append(f"downstream tasks' cost: {task_cost_phrase(downstream['cost'])}")
    return lines


def task_ladder(c: dict) -> str:
    """A task's law on the ladder (analysis.study_downstream.task_check's entry): its points,
    their accuracy above chance, the sigmoid, and how much of its rise the ladder covers."""
    lo, hi = c["ladder_accuracy"]
    s = c["fit"]["sigmoid"]
    return (f"{c['fit']['n_points']} ladder points, task {c['task']}: accuracy {lo:.3f} to "
            f"{hi:.3f} on the ladder (chance {c['chance']:g}: {lo - c['chance']:+.3f} to "
            f"{hi - c['chance']:+.3f}); sigmoid floor {c['chance']:g}, ceiling "
            f"{c['chance'] + s['a']:.3f}, midpoint at task loss {s['L0']:.4g}; the ladder spans "
            f"{s['rise_covered']:.0%} of its rise")


def task_cost_phrase(cost: dict) -> str:
    return (f"{cost['task_seconds']:.0f} s of the runs' {cost['train_seconds']:.0f} s in their "
            f"training loops ({cost['share']:.1%})")


def _pct(v, sign: str = "") -> str:
    """A fraction as a percentage, "n/a" where a baseline could not predict (NaN, null)."""
    return "n/a" if v is None or not math.isfinite(v) else f"{v:{sign}.2%}"


def heldout_parts(h: dict) -> dict[str, str]:
    """The held-out check in a few phrases: where it lies, the law's error against the
    baselines', the seeds' spread, the loss minimum over N and the goal (the demo prints them
    as lines, the report shows them beside its table)."""
    x = h["extrapolation"]
    seeds = max(len(s) for s in h["measured_seeds"])
    baselines = ", ".join(f"{k} {_pct(v)}" for k, v in h["baselines"].items())
    parts = {
        "where": f"held out: {len(h['sizes'])} size(s) x {seeds} seed(s)"
                 + (f" at {h['budget']:.3g} FLOPs" if h.get("budget") else "")
                 + f", C x{max(e['C'] for e in x):.2f} the largest fitted; N x"
                 + ", x".join(f"{e['N']:.2f}" for e in x) + ", D x"
                 + ", x".join(f"{e['D']:.2f}" for e in x)
                 + f" ({sum(h['beyond_both'])} beyond every fitted point in both N and D)",
        "law": f"mean |error| {h['error']:.2%} (bias {h['bias']:+.2%}, worst "
               f"{h['worst']:.2%}); baselines' mean |error|: {baselines}"}
    if h.get("seed_spread") is not None:
        parts["seeds"] = ("seed spread (max - min over mean, averaged over sizes): "
                          f"{h['seed_spread']:.2%}")
    if "optimum_measured_N" in h and len(h["sizes"]) >= 3:
        predicted, measured = h["optimum_predicted_N"], h["optimum_measured_N"]
        ratio = f" ({h['optimum_ratio']:.2f}x)" if h["optimum_ratio"] else ""
        parts["minimum"] = (
            "loss minimum over N: predicted "
            + (f"at N {predicted:,.0f}" if predicted else "beyond 10x the sizes")
            + (f", measured at N {measured:,.0f}{ratio}"
               + ("" if h.get("optimum_measured_inside") else ", outside the sizes")
               if measured else ", measured: none (the losses curve downwards)"))
    missed = [k for k, v in h["goal"].items() if not v]
    parts["goal"] = ("goal (mean |error| < 1%, below every baseline, minimum within 1.5x): "
                     + ("met" if not missed else "missed: " + ", ".join(missed)))
    return parts


def heldout_lines(h: dict) -> list[str]:
    """heldout_parts as the demo prints them."""
    parts = heldout_parts(h)
    return [parts["where"], f"  law: {parts['law']}",
            *[f"  {parts[k]}" for k in ("seeds", "minimum", "goal") if k in parts]]


def summary_lines(result: dict, compute: dict, timing: dict) -> list[str]:
    """The study's numbers (banner_lines come before them)."""
    r, h, p = result, result["heldout"], result["prediction"]
    level = f"{r.get('level', 0.95):.0%}"
    lines = [
        f"Approach 3 on {r['n_points']} points (N = non-embedding parameters, C = 6ND), "
        f"{level} bootstrap intervals ({r.get('bootstrap_samples', 0)} resamples):",
        f"  L(N, D) = E + A/N^alpha + B/D^beta: E {_num(r['E'])}{_iv(r, 'E')}, "
        f"alpha {_num(r['alpha'], 3)}{_iv(r, 'alpha')}, beta {_num(r['beta'], 3)}{_iv(r, 'beta')}",
        f"  N_opt ∝ C^{_num(r['a'], 3)}{_iv(r, 'a')}, D_opt ∝ C^{_num(r['b'], 3)}{_iv(r, 'b')}",
    ]
    lines += heldout_lines(h)
    if result.get("downstream"):
        lines += study_downstream_lines(result["downstream"])
    if not (_finite(p.get("N_opt")) and _finite(p.get("D_opt"))):
        opt = (f"none: the fitted law has no optimum (alpha {_num(r['alpha'], 3)}, beta "
               f"{_num(r['beta'], 3)}; both must be positive)")
    else:
        opt = (f"N {p['N_opt']:,.0f}, D {p['D_opt']:,.0f} ({p['D_opt'] / p['N_opt']:.0f} "
               f"tokens/param), loss {p['loss']:.4f}")
        if p.get("loss_lo") is not None:
            opt += f" [{p['loss_lo']:.4f}, {p['loss_hi']:.4f}]"
    lines.append(f"compute-optimal at C = {p['C']:.3g} ({p['multiple_of_largest']:g}x the "
                 f"largest run): {opt}")
    iso = result["isoflop"]
    if "error" in iso:
        lines.append(f"IsoFLOP: not available ({iso['error']})")
    else:
        n_iv = iso["N_opt"]["exponent_interval"]
        lines.append(f"IsoFLOP ({iso['n_budgets']} budgets): N_opt ∝ C^{_num(iso['a'], 3)} "
                     f"[{_num(n_iv[0], 3)}, {_num(n_iv[1], 3)}], D_opt ∝ C^{_num(iso['b'], 3)}")
    lines.append(f"compute: {compute['flops_branched']:.3g} FLOPs with branching against "
                 f"{compute['flops_from_scratch']:.3g} from scratch "
                 f"({compute['saving']:.0%} saved)")
    if timing:
        parts = [f"{timing['total_seconds'] / 60:.1f} min in all"]
        if "runs_seconds" in timing:
            parts.append(f"runs {timing['runs_seconds'] / 60:.1f} min")
        if "cpu_seconds" in timing:
            parts.append(f"CPU time {timing['cpu_seconds'] / 60:.1f} min")
        if "peak_memory_gb" in timing:
            parts.append(f"peak memory {timing['peak_memory_gb']:.1f} GB")
        lines.append("time: " + ", ".join(parts))
    return lines
