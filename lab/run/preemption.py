"""SIGTERM and SIGINT ask a run to checkpoint and stop at the next step boundary.

The handler is installed as early as possible (`lab train` does it before it reads the config)
and held until the run's last save and summary are written, so a SIGTERM at any moment of a
run ends it with status 'preempted' (or 'finished', if the loop was done) and exit status 0,
never with the default death (exit 143) that leaves the run directory half-written. A second
SIGINT still interrupts at once (Ctrl-C twice), as a user at a terminal expects.

With several processes every host must stop at the same step, so the training loop asks JAX's
preemption sync point instead of this flag (see lab.train.hooks).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class Preemption:
    """The process-wide flag set by SIGTERM / SIGINT."""

    def __init__(self):
        self.requested = False
        self.signal: int | None = None
        self.depth = 0
        self.previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: object) -> None:
        if signum == signal.SIGINT and self.requested and self.signal == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: stop now
        self.requested, self.signal = True, signum

    def install(self) -> None:
        """Catch the signals (nested calls count; only the outermost restores the old
        handlers). A no-op outside the main thread, where Python cannot set handlers."""
        if threading.current_thread() is not threading.main_thread():
            return
        if self.depth == 0:
            self.requested, self.signal = False, None  # a new outermost run starts unasked
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)
        self.depth += 1

    def uninstall(self) -> None:
        if threading.current_thread() is not threading.main_thread() or self.depth == 0:
            return
        self.depth -= 1
        if self.depth == 0:
            for sig, handler in self.previous.items():
                signal.signal(sig, handler)
            self.previous.clear()


PREEMPTION = Preemption()


@contextlib.contextmanager
def caught() -> Iterator[Preemption]:
    """`with caught() as p:` SIGTERM / SIGINT set `p.requested` instead of ending the
    process."""
    PREEMPTION.install()
    try:
        yield PREEMPTION
    finally:
        PREEMPTION.uninstall()
