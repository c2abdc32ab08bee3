"""What the benchmark topics share: the row convention and its table, a quiet progress sink,
short runs. Light to import (the runner imports it; lab and jax load only for a run)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def write_report(text: str, out: Path | None) -> int:
    """Print a benchmark's report, and write it to `out` too when given; exit status 0."""
    if out:
        out.write_text(text)
    sys.stdout.write(text)
    return 0


def row(figure: str, value: float, unit: str, reference: str, reference_value: float | None,
        notes: str = "", best: float | None = None) -> dict:
    """One table row; the ratio is value over the reference measured in the same run.

    A timed figure's value is the median of its repeats; `best` is the fastest repeat, shown
    beside it (the median is what a user sees, the best what the code can do when undisturbed).
    """
    ratio = value / reference_value if reference_value else None
    return {"figure": figure, "value": float(value), "best": None if best is None else float(best),
            "unit": unit, "reference": reference, "reference_value": reference_value,
            "ratio": ratio, "notes": notes}


HEAD = ("topic", "figure", "value", "best", "unit", "reference", "ref value", "ratio", "notes")


def fmt(x) -> str:
    """A table cell for a number (None: '-')."""
    if x is None:
        return "-"
    if isinstance(x, float):
        if x != x:  # nan
            return "nan"
        if abs(x) >= 100:
            return f"{x:,.0f}"
        return f"{x:.4g}"
    return str(x)


def table_head() -> list[str]:
    return ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]


def table_line(topic: str, r: dict) -> str:
    """One Markdown table line for a row of `topic`."""
    cells = [topic, r["figure"], fmt(r["value"]), fmt(r.get("best")), r["unit"], r["reference"],
             fmt(r["reference_value"]), fmt(r["ratio"]), r["notes"]]
    return "| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |"


def print_rows(topic: str, rows: list[dict]) -> None:
    """Print one topic's rows as the runner's table does (a topic run on its own)."""
    print("\n".join([*table_head(), *(table_line(topic, r) for r in rows)]))


def load_note() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.1f} {five:.1f} {fifteen:.1f} (1/5/15 min, {os.cpu_count()} CPUs)"


class Quiet:
    """A progress sink for lab.train.train that prints nothing."""

    def show(self, step, metrics, seconds_per_step) -> None:
        pass


def final_eval_loss(config: str | Path | None, changes: dict, run_dir: Path) -> float:
    """Train `config` with `changes` (dotted keys, e.g. {"optim.lr": 1e-3}) into `run_dir` (no
    checkpoints) and return the final eval loss; a diverged run returns inf."""
    from lab.config import load_config, override
    from lab.train import train

    cfg = override(load_config(config), {"run.dir": str(run_dir), "checkpoint.every_steps": 0,
                                         **changes})
    summary = train(cfg, progress=Quiet())
    loss = summary.get("final_eval_loss")
    return float("inf") if summary.get("status") != "finished" or loss is None else float(loss)
