"""The study's report page, report.html, and fit.json beside it (what `lab demo` ends with).

The page leads with the figures a reader looks at first: the law against the points with the
held-out predictions, the held-out budget over N, the training curves. The numbers follow as
HTML tables, each shown once (built by analysis.report's *_rows functions, which also give the
demo's printed text), every other figure beside its table, and the commands that reproduce
every step once at the end. It is self-contained: every figure is embedded as a base64 PNG.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from analysis.output import jsonable
from analysis.report import (
    Table,
    banner_lines,
    downstream_rows,
    heldout_parts,
    heldout_rows,
    isoflop_rows,
    law_rows,
    loss_rows,
    prediction_rows,
    task_cost_phrase,
    task_ladder,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

CSS = """body{font-family:system-ui,sans-serif;max-width:64em;margin:2em auto;padding:0 1em;
color:#222}.banner{border:3px solid #b00;background:#fee;padding:.6em 1em;margin:1em 0;
font-weight:600}.banner li{font-weight:400}.lead{font-size:1.1em}
pre{background:#f6f6f6;padding:.8em;overflow-x:auto;font-size:.85em}
img{max-width:100%;border:1px solid #ddd;margin:.5em 0}figure{margin:1em 0}
figcaption{color:#555;font-size:.9em}.lead-figures{display:flex;flex-wrap:wrap;gap:1em}
.lead-figures figure{flex:1 1 26em;margin:0}
table{border-collapse:collapse;margin:1em 0}caption{text-align:left;font-weight:600;
padding:.3em 0}td,th{padding:.2em .6em;text-align:right}td:first-child,th:first-child{
text-align:left;white-space:nowrap}thead th{border-bottom:1px solid #999}
tbody tr:nth-child(even){background:#f6f6f6}"""

CAPTIONS = {
    "law.png": "Final eval loss of every branch against its tokens, with the fitted law per "
               "size; the stars are the held-out points, the circles their predictions.",
    "heldout.png": "The held-out budget: loss against N, each seed and their mean, the law along "
                   "the budget, the baselines' predictions and where the minimum lies.",
    "curves.png": "Training loss of each size's stable run and its decays.",
    "contours.png": "The fitted law over N and D, with the compute-optimal allocation.",
    "frontier.png": "Loss against compute, and the compute-optimal frontier with its band.",
    "residuals.png": "Residuals of the fit (log loss minus log fit).",
    "isoflop.png": "IsoFLOP profiles: loss against N at each budget, parabolas and minima.",
    "allocation.png": "Optimal N and D per budget (IsoFLOP) and their power laws.",
    "downstream.png": "Accuracy against task loss: the runs, the fitted sigmoid (floor at "
                      "chance) with its bootstrap band, the predictions; the task loss law; "
                      "and the held-out runs' predicted accuracy beside their outcome.",
}
# The figures shown beside their section's table; every other one leads the page.
SECTION_FIGURES = {"law": ("contours.png", "frontier.png", "residuals.png"),
                   "isoflop": ("isoflop.png", "allocation.png")}
LEAD_ORDER = ("law.png", "heldout.png", "curves.png")

esc = html.escape


def embed_png(path: str | Path) -> str:
    data = Path(path).read_bytes()
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError(f"{path} is not a PNG file")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def figure_html(path: str) -> str:
    name = Path(path).name
    return (f"<figure><img alt='{esc(name)}' src='{embed_png(path)}'>"
            f"<figcaption>{esc(name)}: {esc(CAPTIONS.get(name, ''))}</figcaption></figure>")


def table_html(caption: str, table: Table) -> str:
    headers, rows = table
    head = "".join(f"<th>{esc(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in r) + "</tr>"
                   for r in rows)
    return (f"<table><caption>{esc(caption)}</caption><thead><tr>{head}</tr></thead>"
            f"<tbody>{body}</tbody></table>")


def _list_html(items: list[str]) -> str:
    return "<ul>" + "".join(f"<li>{esc(x)}</li>" for x in items) + "</ul>" if items else ""


def _banner_html(result: dict, smoke_test: bool) -> str:
    """banner_lines in a red box: each headline a paragraph, its "  - " lines a list under it."""
    groups: list[tuple[str, list[str]]] = []
    for line in banner_lines(result, smoke_test):
        if line.startswith("  - ") and groups:
            groups[-1][1].append(line[4:])
        else:
            groups.append((line, []))
    if not groups:
        return ""
    return "<div class='banner'>" + "".join(f"<p>{esc(head)}</p>" + _list_html(items)
                                            for head, items in groups) + "</div>"


def _sentence(phrase: str) -> str:
    return phrase[:1].upper() + phrase[1:] + "."


def lead_html(result: dict) -> str:
    """The held-out verdict, above the figures."""
    parts = heldout_parts(result["heldout"])
    return (f"<p class='lead'>The held-out check of the law fitted on {result['n_points']} "
            f"points: {esc(parts['law'])}. {esc(_sentence(parts['goal']))}</p>")


def heldout_facts(h: dict) -> list[str]:
    """What the held-out table does not show: where its points lie, the seeds' spread and
    the loss minimum over N."""
    parts = heldout_parts(h)
    return [_sentence(parts[k]) for k in ("where", "seeds", "minimum") if k in parts]


def law_section(result: dict, figures: list[str]) -> list[str]:
    level = f"{result.get('level', 0.95):.0%}"
    return ["<h2>The fitted law</h2><p>L(N, D) = E + A/N<sup>α</sup> + B/D<sup>β</sup> "
            "(Hoffmann et al. 2022, Approach 3: Huber loss on log loss, "
            f"{result.get('n_starts', 4500)} starts), N the non-embedding parameters, D the "
            f"tokens; {level} percentile intervals from {result.get('bootstrap_samples', 0)} "
            "bootstrap resamples of the points.</p>",
            table_html(f"Approach 3 on {result['n_points']} points", law_rows(result)),
            *map(figure_html, figures)]


def heldout_section(h: dict) -> list[str]:
    return ["<h2>Held-out check</h2><p>The held-out runs (their own budget beyond the fitted "
            "ones, each size trained with every seed; or, without them, the largest model's "
            "longest branch) are left out of the fit and predicted by it, beside three naive "
            "baselines fitted on the same points (analysis.baselines). The measured loss of a "
            "size is the mean over its seeds.</p>",
            table_html("The held-out runs: measured loss against the law's and the baselines' "
                       "predictions", heldout_rows(h)),
            _list_html(heldout_facts(h))]


def downstream_section(downstream: dict) -> list[str]:
    parts = ["<h2>Downstream tasks</h2><p>The two-step law of the OLMo ladder (Bhagia et al. "
             "2024; analysis.downstream): each task's loss fitted as L(N, D) by Approach 3 on "
             "the ladder's points, then accuracy as a sigmoid of that task loss with its floor "
             "at chance; the held-out runs' accuracy (the mean over seeds) predicted through "
             "both steps, beside naive baselines fitted on the same points (accuracy in place "
             "of loss). Intervals: bootstrap refits of both steps.</p>"]
    for task, c in downstream["tasks"].items():
        h = c["heldout"]
        parts += [f"<h3>Task {esc(task)}</h3>",
                  table_html(f"Task {task}: held-out accuracy, predicted against measured",
                             downstream_rows(h)),
                  _list_html([_sentence(f"the law fitted on {task_ladder(c)}"),
                              f"Goal (every error within {100 * h['goal']:.0f} points): "
                              + ("met." if h["goal_met"] else "missed.")]),
                  figure_html(c["figure"])]
    if downstream.get("cost"):
        cost = _sentence("the tasks cost " + task_cost_phrase(downstream["cost"]))
        parts.append(f"<p>{esc(cost)}</p>")
    return parts


def prediction_section(result: dict, figures: list[str]) -> list[str]:
    p, iso = result["prediction"], result["isoflop"]
    parts = [f"<h2>Prediction at {p['multiple_of_largest']:g}x the largest budget</h2>",
             table_html("The compute-optimal model", prediction_rows(result)),
             "<h2>IsoFLOP view (Approach 2)</h2>"]
    if "error" in iso:
        return parts + [f"<p>Not available: {esc(iso['error'])}.</p>"]
    n_iv = iso["N_opt"]["exponent_interval"]
    parts += [f"<p>A parabola in log N per budget; power laws through the minima: N_opt ∝ "
              f"C<sup>{iso['a']:.3g}</sup> [{n_iv[0]:.3g}, {n_iv[1]:.3g}], D_opt ∝ "
              f"C<sup>{iso['b']:.3g}</sup>.</p>",
              table_html(f"IsoFLOP minima of {iso['n_budgets']} budgets", isoflop_rows(iso)),
              *map(figure_html, figures)]
    return parts


def compute_section(compute: dict, timing: dict) -> str:
    return "<h2>Compute</h2>" + table_html("Compute and time", (["quantity", "value"], [
        ["FLOPs with branching", f"{compute['flops_branched']:.3g}"],
        ["FLOPs training each point from scratch", f"{compute['flops_from_scratch']:.3g}"],
        ["saved by branching", f"{compute['saving']:.0%}"],
        *[[k.replace("_", " "), f"{v:.1f}"] for k, v in timing.items()]]))


def reproduce_section(commands: dict, fits: list[str]) -> str:
    lines = [*commands.get("train", []), *commands.get("branch", []), *fits]
    return ("<h2>Reproduce</h2><p>Each size's stable run (its branch plan is in the overrides), "
            "its branches, then the fits:</p><pre class='commands'>" + esc("\n".join(lines))
            + "</pre><p>TensorBoard logs of every run: <code>tensorboard --logdir "
            f"{esc(commands.get('logdir', 'runs'))}</code></p>")


def placed_figures(result: dict) -> dict[str, list[str]]:
    """Each figure under the section that shows it: "lead" (law, held-out, curves first,
    then any other), "law", "isoflop"; the downstream figures sit with their tasks."""
    downstream = {c["figure"] for c in (result.get("downstream") or {}).get("tasks", {}).values()}
    placed = {"lead": [], **{k: [] for k in SECTION_FIGURES}}
    for fig in result["figures"]:
        name = Path(fig).name
        section = next((k for k, names in SECTION_FIGURES.items() if name in names), "lead")
        if fig not in downstream:
            placed[section].append(fig)
    rank = {name: i for i, name in enumerate(LEAD_ORDER)}
    placed["lead"].sort(key=lambda f: rank.get(Path(f).name, len(rank)))
    return placed


def render_html(result: dict, *, compute: dict, commands: dict, timing: dict,
                title: str, smoke_test: bool = False) -> str:
    """A self-contained page: what must be read first, the held-out verdict, the lead figures,
    then the tables (loss per size and budget, the law, the held-out check, downstream, the
    prediction, IsoFLOP, compute) with their figures, and the commands that reproduce it."""
    figures = placed_figures(result)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{esc(title)}</h1>",
             _banner_html(result, smoke_test), lead_html(result),
             "<div class='lead-figures'>" + "".join(map(figure_html, figures["lead"]))
             + "</div>",
             "<h2>The points</h2>",
             table_html("Final eval loss per size and budget (* held out of the fit)",
                        loss_rows(result)),
             *law_section(result, figures["law"]), *heldout_section(result["heldout"])]
    if result.get("downstream"):
        parts += downstream_section(result["downstream"])
    parts += [*prediction_section(result, figures["isoflop"]), compute_section(compute, timing),
              reproduce_section(commands, result["commands"]["fit"]), "</body></html>"]
    return "\n".join(p for p in parts if p)


def write_report(out_dir: str | Path, result: dict, *, compute: dict, commands: dict,
                 timing: dict, title: str, smoke_test: bool = False) -> dict:
    """Write fit.json and report.html; returns the fit.json content. A smoke test (the quick
    demo) says at the top of the page that its law means nothing."""
    out = Path(out_dir)
    data = {**result, "compute": compute, "timing": timing, "smoke_test": smoke_test,
            "commands": {**commands, **result["commands"]}}
    (out / "fit.json").write_text(json.dumps(jsonable(data), indent=2) + "\n")
    page = render_html(result, compute=compute, commands=commands, timing=timing, title=title,
                       smoke_test=smoke_test)
    (out / "report.html").write_text(page)
    return data
