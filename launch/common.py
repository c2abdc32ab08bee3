"""What the launchers share: the command after `--`, how a `lab ...` command runs, and a user's
mistake shown as one `error: ...` line with exit status 2 (as `lab` itself shows it)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from lab.errors import UserError


def after_dashes(words: list[str]) -> list[str]:
    """The command given after `--` (argparse's REMAINDER keeps the `--` itself)."""
    return words[1:] if words[:1] == ["--"] else list(words)


def resolve_command(command: list[str], missing: str) -> list[str]:
    """`lab ...` runs as this interpreter's `python -m lab.cli ...`, so an inactive virtualenv
    still finds the lab; any other command runs as given. `missing` is the error for none."""
    if not command:
        raise UserError(missing)
    if command[0] == "lab":
        return [sys.executable, "-m", "lab.cli", *command[1:]]
    return list(command)


def run_main(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], int],
             argv: list[str] | None) -> int:
    """A launcher's main: parse argv (sys.argv[1:] when None) and run; a UserError anywhere
    is printed as one line and gives exit status 2."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        return run(parser.parse_args(argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
