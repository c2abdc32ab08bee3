"""What a run records: `metrics.jsonl`, TensorBoard scalars under `tb/`, and `summary.json`.

Only process 0 writes; the other processes of a multi-host run get a logger that drops
everything, so every host can run the same program.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from tensorboard.summary import Writer


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON through a temporary file and a rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _plain(value: Any) -> Any:
    """JSON-friendly numbers: NaN and Inf become strings, numpy scalars Python floats."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLogger:
    """Appends one JSON object per logged step and mirrors the scalars to TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        self.path = Path(run_dir) / "metrics.jsonl"
        self.file = open(self.path, "a")  # noqa: SIM115 (kept open for the run)
        self.tb = Writer(str(Path(run_dir) / "tb"))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tb.add_scalar(key, float(value), int(step))
        self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()


def read_metrics(run_dir: Path) -> list[dict]:
    """Every record of a run's metrics.jsonl, in order (a torn last line is ignored)."""
    records = []
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return records
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
