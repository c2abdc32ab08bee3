"""What `lab fit` reads: run directories (searched for summary.json) and CSV files of points,
gathered into one table, and the training curves the curve-based methods fit."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pandas as pd

from analysis.points import read_points_csv
from analysis.runs import collect_curves, collect_runs, read_curve
from lab import paths
from lab.errors import UserError


@dataclass
class Inputs:
    """What the INPUT arguments hold: every run and CSV row as a point (N, D, C, loss, ...);
    the run-directory part (for training curves) and the CSV part; runs left out."""

    points: pd.DataFrame
    runs: pd.DataFrame
    csv: pd.DataFrame
    skipped: list = field(default_factory=list)
    n_label: str = "N"  # what N counts, for table headers and axes

    def curves(self, loss: str = "loss") -> pd.DataFrame:
        """Training-curve points: metrics.jsonl of run directories; CSV rows as they are (a
        `run` column groups rows into curves, otherwise each row is its own)."""
        parts = []
        if not self.runs.empty:
            parts.append(collect_curves(self.runs, loss=loss))
        if not self.csv.empty:
            rows = self.csv.copy()
            if "run" not in rows.columns:
                rows["run"] = [f"{src}:{i}" for i, src in enumerate(rows["source"])]
            parts.append(rows[["run", "N", "D", "C", "loss"]])
        return pd.concat(parts, ignore_index=True)

    def batch_curves(self, loss: str = "loss") -> pd.DataFrame:
        """Loss curves (run, step, loss, batch_tokens; tokens and noise_scale where logged) of
        one model size's batch-size sweep, or of runs that measured the noise scale."""
        runs = self.runs
        if runs.empty:
            raise UserError("the critical batch fit reads loss curves; give run directories")
        if runs["N"].nunique() > 1:
            sizes = ", ".join(f"{n:.3g}" for n in sorted(runs["N"].unique()))
            raise UserError(f"the critical batch fit takes one model size, got N = {sizes}; "
                            "give the runs of one size")
        parts = []
        for _, r in runs.iterrows():
            curve = read_curve(r["run"])
            if not {"step", loss} <= set(curve.columns):
                raise UserError(f"{r['run']}/metrics.jsonl lacks step or {loss}")
            extra = [c for c in ("tokens", "noise_scale") if c in curve.columns and c != loss]
            parts.append(curve[["step", loss, *extra]].rename(columns={loss: "loss"})
                         .assign(run=r["run"], batch_tokens=r["batch_tokens"]))
        return pd.concat(parts, ignore_index=True)


def n_label(params: str, runs: bool, csv: bool) -> str:
    """What N counts, as table headers and axes name it."""
    kinds = ([f"{params.replace('_', '-')} parameters"] if runs else []) + (
        ["as in the CSV"] if csv else [])
    return f"N ({', '.join(kinds)})"


def _key(path: str) -> str:
    """A run directory's path in one spelling, to match a branch's `parent` with its run."""
    return path.rstrip("/") if paths.is_remote(path) else os.path.realpath(path)


def drop_stable_parents(runs: pd.DataFrame) -> tuple[pd.DataFrame, list]:
    """Leave out undecayed stable runs whose branches are in the table: their final loss is
    taken at a constant learning rate, so it sits above the law the decayed branches follow."""
    parents = {_key(str(p)) for p in runs["parent"].dropna()}
    stable = runs["stable"].fillna(False).astype(bool)
    drop = stable & runs["run"].map(lambda r: _key(str(r)) in parents)
    skipped = [(r, "an undecayed stable run whose branches are fitted instead")
               for r in runs.loc[drop, "run"]]
    return runs[~drop].reset_index(drop=True), skipped


def load_inputs(
    inputs: list[str],
    *,
    include_unfinished: bool = False,
    params: str = "non_embedding",
    include_stable_parents: bool = False,
    tokens: bool = True,
) -> Inputs:
    """Read run directories and CSV files into one points table. `params` names the count that
    is a run's N (lab.run.rundir.PARAM_KEYS); without `tokens`, a CSV needs no D or C."""
    run_frames, csv_frames, skipped = [], [], []
    for item in inputs:
        if not paths.exists(item):
            raise UserError(f"no such file or directory: {item}; give a run directory or a CSV")
        if paths.is_dir(item):
            runs = collect_runs(item, include_unfinished=include_unfinished)
            skipped += runs.attrs.get("skipped", [])
            runs["N"] = runs[f"{params}_params"]
            # A run without flops in its summary: C = 6 N D.
            runs["C"] = runs["C"].fillna(6.0 * runs["N"] * runs["D"])
            run_frames.append(runs.assign(source=item))
        else:
            csv_frames.append(read_points_csv(item, tokens=tokens))
    runs = pd.concat(run_frames, ignore_index=True) if run_frames else pd.DataFrame()
    if not runs.empty and not include_stable_parents:
        runs, left = drop_stable_parents(runs)
        skipped += left
    csv = pd.concat(csv_frames, ignore_index=True) if csv_frames else pd.DataFrame()
    parts = [f for f in (runs, csv) if not f.empty]
    if not parts:
        raise UserError(
            "no finished runs in the inputs; pass --include-unfinished or check the paths"
        )
    points = pd.concat(parts, ignore_index=True)
    label = n_label(params, not runs.empty, not csv.empty)
    return Inputs(points=points, runs=runs, csv=csv, skipped=skipped, n_label=label)
