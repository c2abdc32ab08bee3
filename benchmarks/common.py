"""What the benchmark topics share: the row convention, a quiet progress sink, short runs."""

from __future__ import annotations

import os
from pathlib import Path

from lab.config import load_config
from lab.train import train

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def row(figure: str, value: float, unit: str, reference: str, reference_value: float | None,
        notes: str = "") -> dict:
    """One table row; the ratio is value over the reference measured in the same run."""
    ratio = value / reference_value if reference_value else None
    return {"figure": figure, "value": float(value), "unit": unit, "reference": reference,
            "reference_value": reference_value, "ratio": ratio, "notes": notes}


def load_note() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.1f} {five:.1f} {fifteen:.1f} (1/5/15 min, {os.cpu_count()} CPUs)"


class Quiet:
    """A progress sink for lab.train.train that prints nothing."""

    def show(self, step, metrics, seconds_per_step) -> None:
        pass


def final_eval_loss(config: str | Path | None, overrides: list[str], run_dir: Path) -> float:
    """Train `config` with `overrides` into `run_dir` (no checkpoints) and return the final
    eval loss; a diverged run returns inf."""
    cfg = load_config(config, [f"run.dir={run_dir}", "checkpoint.every_steps=0", *overrides])
    summary = train(cfg, progress=Quiet())
    loss = summary.get("final_eval_loss")
    return float("inf") if summary.get("status") != "finished" or loss is None else float(loss)
