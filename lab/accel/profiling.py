"""A profile of a few training steps, asked for through the environment.

`python -m launch.gpu --profile-steps 20:5` (or anyone) sets LAB_PROFILE_STEPS=START:COUNT and
LAB_PROFILE_DIR; a train loop that calls `StepProfiler.step(step)` before each step captures a
jax.profiler trace of steps START .. START+COUNT-1 into that directory (one per host), to open
in TensorBoard's profile plugin or Perfetto (the .trace.json.gz). Without the variables it does
nothing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from lab.errors import UserError, shown

STEPS_VAR = "LAB_PROFILE_STEPS"
DIR_VAR = "LAB_PROFILE_DIR"


def parse_window(text: str) -> tuple[int, int]:
    """"START:COUNT" (or "COUNT", starting at step 10, after compilation) -> (start, count)."""
    try:
        start, count = (int(p) for p in text.split(":")) if ":" in text else (10, int(text))
    except ValueError:
        start = count = -1
    if start < 0 or count < 1:
        raise UserError(f"profile steps {shown(text)} must be START:COUNT, e.g. 20:5 (steps 20-24)")
    return start, count


class StepProfiler:
    """Start a trace before step `start`, stop it (after the work is done) before start+count."""

    def __init__(self, env: Mapping[str, str] | None = None, default_dir: str = "profile"):
        env = os.environ if env is None else env
        spec = env.get(STEPS_VAR, "")
        self.window = parse_window(spec) if spec else None
        self.dir = env.get(DIR_VAR) or default_dir
        self.active = False

    def step(self, step: int, wait_for: Any = None) -> None:
        """Call before dispatching step `step`; `wait_for` (e.g. the train state) is blocked
        on before the trace stops, so the profiled steps' device work is in it."""
        if self.window is None:
            return
        import jax

        start, count = self.window
        if step == start and not self.active:
            jax.profiler.start_trace(self.dir)
            self.active = True
        elif step == start + count and self.active:
            self.stop(wait_for)

    def stop(self, wait_for: Any = None) -> None:
        """End the trace if one is running (call at the end of the loop too)."""
        if not self.active:
            return
        import jax

        if wait_for is not None:
            jax.block_until_ready(wait_for)
        jax.profiler.stop_trace()
        self.active = False
