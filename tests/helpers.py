"""Shared by the tests: run the real `lab` command with a chosen number of fake CPU devices."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def lab_env(devices: int) -> dict:
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def lab_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "lab.cli", *args]


def run_lab(args: list[str], devices: int = 1, expect: int | None = 0,
            timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `lab ARGS` to completion; check its exit status unless `expect` is None."""
    result = subprocess.run(lab_command(args), cwd=ROOT, env=lab_env(devices),
                            capture_output=True, text=True, timeout=timeout)
    if expect is not None:
        assert result.returncode == expect, result.stdout[-2000:] + result.stderr[-3000:]
    return result
