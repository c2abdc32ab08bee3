"""What a run records: `metrics.jsonl`, TensorBoard scalars under `tb/`, and `summary.json`.

Only process 0 writes; the other processes of a multi-host run get a logger that drops
everything, so every host can run the same program.

The run directory may be local or on an object store (`gs://`, see `lab/paths.py`). Object
stores cannot append, so for a remote run directory the logger keeps the lines in memory and
rewrites `metrics.jsonl` whole, and uploads the TensorBoard event file it writes to a local
temporary directory, on each flush: at every evaluation, before every checkpoint save (so a
checkpoint never gets ahead of the metrics it covers), every `FLUSH_RECORDS` records or
`FLUSH_SECONDS` seconds, whichever comes first, and at the end. A local run directory is
appended to and flushed at every record, as before.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from tensorboard.summary import Writer

from lab import paths
from lab.run import rundir

# A remote run directory is rewritten at least this often (records, seconds).
FLUSH_RECORDS = 100
FLUSH_SECONDS = 60.0


# TensorBoard groups scalars by the part of the tag before the slash.
TB_GROUPS = {"loss": "train/loss", "ce": "train/ce", "eval_loss": "eval/loss",
             "lr": "optim/lr", "grad_norm": "optim/grad_norm", "update_norm": "optim/update_norm",
             "param_norm": "optim/param_norm", "tokens": "perf/tokens",
             "tokens_per_second": "perf/tokens_per_second", "mfu": "perf/mfu"}


def tb_tag(key: str) -> str:
    """The TensorBoard tag of a metrics.jsonl key (`train/loss`, `perf/mfu`, ...); a key with
    its own group (`task/choice/accuracy`) keeps it."""
    if "/" in key:
        return key
    return TB_GROUPS.get(key, f"train/{key}")


def _config_events(config_yaml: str, hparams: dict[str, Any]) -> list:
    """Two summary events: the resolved config as text (the Text tab) and its scalar values as
    hyperparameters (the HParams tab), built from TensorBoard's own protos (no TensorFlow)."""
    from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2
    from tensorboard.plugins.hparams import summary_v2 as hp
    from tensorboard.plugins.text import metadata as text_metadata

    text = tensor_pb2.TensorProto(
        dtype=7, string_val=[f"```\n{config_yaml}```".encode()],  # 7 = DT_STRING
        tensor_shape=tensor_shape_pb2.TensorShapeProto())
    meta = text_metadata.create_summary_metadata(display_name="config", description="")
    text_summary = summary_pb2.Summary(value=[
        summary_pb2.Summary.Value(tag="config/text_summary", metadata=meta, tensor=text)])
    plain = {k: v if isinstance(v, (bool, int, float, str)) else str(v)
             for k, v in hparams.items()}
    now = time.time()
    return [event_pb2.Event(wall_time=now, step=0, summary=text_summary),
            event_pb2.Event(wall_time=now, step=0, summary=hp.hparams_pb(plain))]


def _plain(value: Any) -> Any:
    """JSON-friendly numbers: NaN and Inf become strings, numpy scalars Python floats."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLogger:
    """Writes one JSON object per logged step and mirrors the scalars to TensorBoard."""

    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        self.run_dir = run_dir
        self.path = rundir.metrics_path(run_dir)
        self.remote = paths.is_remote(run_dir)
        if self.remote:
            # The records so far (a resumed run's, already truncated) are rewritten with ours.
            self.lines = paths.read_text(self.path).splitlines(keepends=True) \
                if paths.exists(self.path) else []
            self.unflushed, self.last_flush = 0, time.monotonic()
            self.tb_local = tempfile.TemporaryDirectory(prefix="lab-tb-")
            self.tb_remote = paths.join(run_dir, rundir.TB)
            self.tb = Writer(self.tb_local.name)
        else:
            self.file = open(self.path, "a")  # noqa: SIM115 (kept open for the run)
            self.tb = Writer(str(Path(run_dir) / rundir.TB))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        line = json.dumps(record) + "\n"
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tb.add_scalar(tb_tag(key), float(value), int(step))
        if not self.remote:
            self.file.write(line)
            self.file.flush()
            self.tb.flush()
            return
        self.lines.append(line)
        self.unflushed += 1
        if ("eval_loss" in record or self.unflushed >= FLUSH_RECORDS
                or time.monotonic() - self.last_flush >= FLUSH_SECONDS):
            self.flush()

    def write_config(self, config_yaml: str, hparams: dict[str, Any]) -> None:
        """Record the resolved config in TensorBoard, as text and as hyperparameters."""
        if not self.enabled:
            return
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        tb_dir = self.tb_local.name if self.remote else str(Path(self.run_dir) / rundir.TB)
        writer = EventFileWriter(tb_dir, filename_suffix=".config")
        for event in _config_events(config_yaml, hparams):
            writer.add_event(event)
        writer.close()

    def flush(self) -> None:
        """Make everything logged so far durable (for a remote run: rewrite and upload)."""
        if not self.enabled:
            return
        self.tb.flush()
        if not self.remote:
            self.file.flush()
            return
        paths.write_text(self.path, "".join(self.lines))
        for event_file in sorted(Path(self.tb_local.name).iterdir()):
            paths.put(event_file, paths.join(self.tb_remote, event_file.name))
        self.unflushed, self.last_flush = 0, time.monotonic()

    def close(self) -> None:
        if not self.enabled:
            return
        self.flush()
        self.tb.close()
        if self.remote:
            self.tb_local.cleanup()
        else:
            self.file.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Every record of a run's metrics.jsonl, in order (a torn last line is ignored)."""
    records = []
    path = rundir.metrics_path(run_dir)
    if not paths.exists(path):
        return records
    for line in paths.read_text(path).splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
