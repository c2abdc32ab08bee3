"""Collecting run directories into tables.

A run directory (docs/training.md) holds `summary.json` (params, non_embedding_params, tokens,
flops, final_eval_loss, status; branches add parent, branch_step, decay_steps; an MoE run
active_params and total_params, lab.run.rundir.PARAM_KEYS), the resolved
`config.yaml`, and `metrics.jsonl` with one JSON object per logged step (step, loss, lr,
tokens, sometimes eval_loss). Inputs are searched recursively for summary.json, so a sweep's
parent directory, or a run with its branches beneath it, can be given whole.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import numpy as np
import pandas as pd
import yaml

from lab import paths
from lab.errors import UserError
from lab.run.rundir import CONFIG, METRICS, SUMMARY, Status, Summary, param_count

# Columns of the runs table, in order.
COLUMNS = [
    "run",
    "N",
    "non_embedding_params",
    "total_params",
    "active_params",
    "E",
    "D",
    "C",
    "loss",
    "lr",
    "batch_size",
    "seq_len",
    "batch_tokens",
    "schedule",
    "decay_shape",
    "parent",
    "branch_step",
    "decay_steps",
    "stable",
    "status",
    "predicted_loss",
    "predicted_lo",
    "predicted_hi",
]


# The config key of a run's expert count (0: the dense MLP, which the MoE law counts as E = 1).
EXPERTS_KEY = "model.moe.experts"


def find_runs(root: str) -> list[str]:
    """Run directories under `root` (itself included): those holding a summary.json."""
    if not paths.exists(root):
        raise UserError(f"no such file or directory: {root}; give a run directory or a CSV")
    if not paths.is_dir(root):
        raise UserError(f"{root} is not a directory; give a run directory or a CSV")
    return [paths.parent(p) for p in paths.find(root, SUMMARY)]


def _load_json(path: str) -> dict:
    try:
        data = json.loads(paths.read_input(path))
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err}); fix or remove that run") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} should hold a JSON object; fix or remove that run")
    return data


def _config(run_dir: str) -> dict:
    path = paths.join(run_dir, CONFIG)
    if not paths.exists(path):
        return {}
    try:
        data = yaml.safe_load(paths.read_input(path))
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML ({err}); fix or remove that run") from None
    return data if isinstance(data, dict) else {}


def _get(cfg: dict, dotted: str):
    for key in dotted.split("."):
        if not isinstance(cfg, dict) or key not in cfg:
            return None
        cfg = cfg[key]
    return cfg


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _experts(cfg: dict) -> float:
    """The run's expert count E: its config's, 1 for the dense MLP (0 or no MoE keys)."""
    experts = _number(_get(cfg, EXPERTS_KEY) or 0)
    return experts if experts >= 1 else 1.0


def read_run(run_dir: str) -> dict:
    """One row of the runs table, from a run's summary.json and config.yaml."""
    s = Summary.from_dict(_load_json(paths.join(run_dir, SUMMARY)))
    cfg = _config(run_dir)
    batch, seq = _number(_get(cfg, "train.batch_size")), _number(_get(cfg, "train.seq_len"))
    interval = s.predicted_interval or [None, None]  # a run `lab plan` wrote
    counts = s.to_dict()
    return {
        "run": run_dir,
        "N": _number(s.params),
        "non_embedding_params": _number(s.non_embedding_params),
        "total_params": _number(param_count(counts, "total")),
        "active_params": _number(param_count(counts, "active")),
        "E": _experts(cfg),
        "D": _number(s.tokens),
        "C": _number(s.flops),
        "loss": _number(s.final_eval_loss),
        "lr": _number(_get(cfg, "optim.lr")),
        "batch_size": batch,
        "seq_len": seq,
        "batch_tokens": batch * seq,
        "schedule": _get(cfg, "schedule.name"),
        "decay_shape": _get(cfg, "schedule.decay_shape"),
        "parent": s.parent,
        "branch_step": _number(s.branch_step),
        "decay_steps": _number(s.decay_steps),
        # A WSD run without a decay ends at its peak learning rate: a branch point, not a law point.
        "stable": _get(cfg, "schedule.name") == "wsd"
        and _number(_get(cfg, "schedule.decay_steps")) == 0,
        "status": str(s.status) if s.status is not None else "unknown",
        "predicted_loss": _number(s.predicted_loss),
        "predicted_lo": _number(interval[0]),
        "predicted_hi": _number(interval[-1]),
    }


def collect_runs(inputs: str | Iterable[str], include_unfinished: bool = False) -> pd.DataFrame:
    """Every run under the given directories, one row each (columns: COLUMNS).

    Runs whose status is not `finished`, or that lack a finite final loss, are left out unless
    `include_unfinished`; the frame's `attrs["skipped"]` lists them as (run, reason) pairs.
    """
    if isinstance(inputs, str):
        inputs = [inputs]
    rows, skipped = [], []
    for root in inputs:
        found = find_runs(root)
        if not found:
            raise UserError(f"no {SUMMARY} under {root}; give a run directory or a CSV")
        for run_dir in found:
            row = read_run(run_dir)
            reason = None
            if row["status"] != Status.FINISHED:
                reason = f"status {row['status']}"
            elif not np.isfinite(row["loss"]):
                reason = "no final_eval_loss"
            if reason and not include_unfinished:
                skipped.append((run_dir, reason))
                continue
            rows.append(row)
    df = pd.DataFrame(rows, columns=COLUMNS)
    df.attrs["skipped"] = skipped
    return df


def read_curve(run_dir: str) -> pd.DataFrame:
    """A run's metrics.jsonl as a frame (one row per logged step); blank lines are skipped."""
    path = paths.join(run_dir, METRICS)
    rows = []
    for i, line in enumerate(paths.read_input(path).splitlines()):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise UserError(f"{path} line {i + 1} is not JSON; fix or remove that line") from None
    return pd.DataFrame(rows)


def collect_curves(runs: pd.DataFrame, loss: str = "loss", params: str = "N") -> pd.DataFrame:
    """Training-curve points of the given runs: columns run, N, D (tokens so far), C, loss.

    C along a curve is the run's FLOPs per token (summary flops / tokens) times the tokens so
    far, or 6 N per token when the summary gives no FLOPs.
    """
    out = []
    for _, r in runs.iterrows():
        curve = read_curve(r["run"])
        missing = [c for c in ("tokens", loss) if c not in curve.columns]
        if missing:
            raise UserError(
                f"{paths.join(r['run'], METRICS)} lacks {', '.join(missing)}; Approach 1 "
                "needs tokens and loss at every logged step"
            )
        curve = curve.dropna(subset=["tokens", loss])
        curve = curve[curve["tokens"] > 0]
        n = r[params]
        per_token = r["C"] / r["D"] if r["C"] > 0 and r["D"] > 0 else 6.0 * n
        out.append(
            pd.DataFrame(
                {
                    "run": r["run"],
                    "N": n,
                    "D": curve["tokens"].to_numpy(np.float64),
                    "C": per_token * curve["tokens"].to_numpy(np.float64),
                    "loss": curve[loss].to_numpy(np.float64),
                }
            )
        )
    if not out:
        raise UserError("no runs to take training curves from; check the inputs")
    return pd.concat(out, ignore_index=True)
