"""The run directory: the names of its files, its summary (`Summary`, with the run's `Status`),
and the lock that lets one `lab train` at a time use it.

The lock is a file, `RUN_DIR/lock.json`, holding the host, the process id and that process's
start time. A second process finds it and exits with status 2 naming the holder. A lock left by
a process that is gone (killed with SIGKILL, a crashed host) is stale: on the same host it is
detected (no process with that id, or one started at another time) and taken over; a lock from
another host is left to the user, since this host cannot see that host's processes.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lab import paths
from lab.errors import UserError

SUMMARY = "summary.json"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
LOCK = "lock.json"
TB = "tb"  # TensorBoard event files (lab.run.metrics)
CHECKPOINTS = "checkpoints"  # orbax checkpoints, one folder per step (lab.run.checkpoint)
PROFILE = "profile"  # traces of LAB_PROFILE_STEPS (lab.accel.profiling)
BRANCHES = "branches"  # RUN_DIR/branches/NAME: the runs branched from this one (lab branch)
BRANCH_REPORT = "branches.json"  # what the branches cost against training each from scratch


class Status(enum.StrEnum):
    """A run's status in its summary; the members are the strings summary.json holds."""

    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"  # an exception ended it; the summary says how far it got
    DIVERGED = "diverged"  # a non-finite loss or gradient, or a loss spike; see the message
    PREEMPTED = "preempted"  # SIGTERM / SIGINT: it saved a checkpoint, run it again to go on


# Summary fields written even when they are None (as null): a run has no final loss until it
# finishes. Every other field is left out while it is None.
ALWAYS_WRITTEN = ("final_eval_loss",)

# Which count N is (`lab fit --params`, a sweep's `params:`): the keys that hold it in
# param_counts() and in summary.json, the first present wins. A run or config without MoE
# accounting has only `params`: a dense model's every parameter is active for every token.
PARAM_KEYS = {
    "non_embedding": ("non_embedding_params",),
    "total": ("total_params", "params"),
    "active": ("active_params", "params"),
}


def param_count(counts: Mapping[str, Any], params: str) -> Any:
    """The count `params` (a key of PARAM_KEYS) names, from param_counts() or a summary's
    fields; None where none of its keys is there."""
    for key in PARAM_KEYS[params]:
        if counts.get(key) is not None:
            return counts[key]
    return None


@dataclasses.dataclass
class Summary:
    """summary.json: what a run is (its size, its data) and how far it got. `lab train` writes
    it at the start (status running) and at the end; `lab fit` reads params, tokens, flops and
    final_eval_loss of the finished runs. Keys this class does not know are kept in `extra`, so
    a summary read and written again is unchanged."""

    params: int | None = None
    non_embedding_params: int | None = None
    # A mixture of experts' parameters: all of them, and those one token goes through
    # (lab.model.accounting.param_counts); equal for a dense model.
    total_params: int | None = None
    active_params: int | None = None
    flops_per_token: int | None = None
    name: str | None = None
    data: str | None = None
    status: Status | str | None = None  # a Status; a string that is none is kept as it is
    tokens: int | None = None  # tokens trained, the parent's included for a branch
    flops: int | None = None  # flops_per_token * tokens
    final_eval_loss: float | None = None
    # At the end of a run:
    steps: int | None = None
    flops_spent: int | None = None  # this run's own FLOPs (a branch's, after its parent's)
    peak_flops: float | None = None
    peak_source: str | None = None
    train_seconds: float | None = None
    compile_seconds: float | None = None
    eval_seconds: float | None = None
    checkpoint_seconds: float | None = None
    noise_scale: float | None = None  # the last smoothed gradient noise scale (tokens), if measured
    # A branch (lab branch):
    parent: str | None = None
    branch_step: int | None = None
    decay_steps: int | None = None
    decay_shape: str | None = None
    # A planned run (lab plan):
    predicted_loss: float | None = None
    predicted_interval: list[float] | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Summary:
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        fields = {k: v for k, v in data.items() if k in known}
        status = fields.get("status")
        if isinstance(status, str) and status in Status._value2member_map_:
            fields["status"] = Status(status)
        return cls(**fields, extra={k: v for k, v in data.items() if k not in known})

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name != "extra" and (value is not None or f.name in ALWAYS_WRITTEN):
                out[f.name] = str(value) if f.name == "status" else value
        return {**self.extra, **out}

    @property
    def finished(self) -> bool:
        return self.status == Status.FINISHED


def write_json_atomic(path: str | Path, data: dict) -> None:
    """Write JSON so that readers never see half a file (local or remote)."""
    paths.write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> dict | None:
    """A JSON file's object, or None if it is missing or unreadable."""
    try:
        return json.loads(paths.read_text(path))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def summary_path(run_dir: str | Path) -> str:
    return paths.join(run_dir, SUMMARY)


def config_path(run_dir: str | Path) -> str:
    return paths.join(run_dir, CONFIG)


def metrics_path(run_dir: str | Path) -> str:
    return paths.join(run_dir, METRICS)


def branch_dirs(run_dir: str | Path) -> list[str]:
    """The run directories branched from `run_dir` (RUN_DIR/branches/NAME, each with a
    summary.json), sorted by name; local or remote (gs://), spelled as `run_dir` is."""
    root = paths.join(run_dir, BRANCHES)
    if not paths.is_dir(root):
        return []
    # A branch's own branches sit deeper (NAME/branches/...): only the direct children count.
    return sorted(paths.parent(p) for p in paths.find(root, SUMMARY)
                  if paths.parent(paths.parent(p)) == root)


def read_summary(run_dir: str | Path) -> Summary | None:
    """A run's summary, or None if it has none yet (or one being written)."""
    data = read_json(summary_path(run_dir))
    return Summary.from_dict(data) if isinstance(data, dict) else None


def write_summary(run_dir: str | Path, summary: Summary) -> None:
    write_json_atomic(summary_path(run_dir), summary.to_dict())


def is_finished(run_dir: str | Path) -> bool:
    summary = read_summary(run_dir)
    return summary is not None and summary.finished


def check_run_dir(run_dir: str) -> None:
    """A run directory must be a directory (or not exist yet)."""
    if paths.exists(run_dir) and not paths.is_dir(run_dir):
        raise UserError(f"run.dir {run_dir} is an existing file, not a directory; choose another "
                        "run.dir")


def _start_time(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot), to tell a reused id apart; None
    where /proc is not available or the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process with that id
    now = _start_time(pid)
    return started is None or now is None or now == started


class RunLock:
    """`with RunLock(run_dir):` holds the run directory's lock (see the module's docstring).

    Creating the lock creates the run directory if it is missing; releasing it removes that
    directory again if nothing else was written into it, so a refused start leaves no trace.
    """

    def __init__(self, run_dir: str, enabled: bool = True):
        self.run_dir = run_dir
        self.path = paths.join(run_dir, LOCK)
        self.enabled = enabled
        self.created_dir = False
        self.me = {"host": socket.gethostname(), "pid": os.getpid(),
                   "started": _start_time(os.getpid()), "since": time.time()}

    def holder(self) -> dict | None:
        try:
            held = json.loads(paths.read_text(self.path))
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}  # being written, or damaged: not ours to judge
        return held if isinstance(held, dict) else {}

    def _is_stale(self, held: dict) -> bool:
        return (held.get("host") == self.me["host"] and isinstance(held.get("pid"), int)
                and not _alive(held["pid"], held.get("started")))

    def _create(self) -> bool:
        """Write our lock file unless one exists; True if we now hold the lock."""
        text = json.dumps(self.me)
        if paths.is_remote(self.path):  # no exclusive create on object stores: write, read back
            if paths.exists(self.path):
                return False
            paths.write_text(self.path, text)
            return self.holder() == self.me
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return True

    def _remove_stale(self, held: dict) -> None:
        """Take a stale lock away, unless another process replaced it meanwhile."""
        if paths.is_remote(self.path):
            paths.remove(self.path)
            return
        aside = f"{self.path}.{os.getpid()}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            moved = json.loads(Path(aside).read_text())
        except (OSError, json.JSONDecodeError):
            moved = {}
        if moved != held:  # a live process's fresh lock: put it back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        os.remove(aside)

    def acquire(self) -> None:
        if not self.enabled:
            return
        if not paths.exists(self.run_dir):
            paths.makedirs(self.run_dir)
            self.created_dir = True
        for _ in range(3):
            if self._create():
                return
            held = self.holder()
            if held is None:
                continue  # released meanwhile
            if held and self._is_stale(held):
                self._remove_stale(held)
                continue
            break
        held = self.holder() or {}
        self._cleanup_dir()
        who = (f"process {held.get('pid')} on host {held.get('host')}" if held
               else "another process")
        raise UserError(f"{self.run_dir} is in use by {who} (lock {self.path}); wait for it to "
                        "finish, or delete the lock file if that process is gone")

    def release(self) -> None:
        if not self.enabled:
            return
        if self.holder() == self.me:
            paths.remove(self.path)
        self._cleanup_dir()

    def _cleanup_dir(self) -> None:
        if self.created_dir and not paths.is_remote(self.run_dir):
            try:
                os.rmdir(self.run_dir)  # only if empty
            except OSError:
                pass

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
