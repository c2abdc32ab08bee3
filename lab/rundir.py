"""The run directory: the names of its files, and the lock that lets one `lab train` at a time
use it.

The lock is a file, `RUN_DIR/lock.json`, holding the host, the process id and that process's
start time. A second process finds it and exits with status 2 naming the holder. A lock left by
a process that is gone (killed with SIGKILL, a crashed host) is stale: on the same host it is
detected (no process with that id, or one started at another time) and taken over; a lock from
another host is left to the user, since this host cannot see that host's processes.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from lab import paths
from lab.errors import UserError

SUMMARY = "summary.json"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
LOCK = "lock.json"


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
