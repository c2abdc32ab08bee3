"""What the launchers share: the command after `--`, how a `lab ...` command runs, and a user's
mistake shown as one `error: ...` line with exit status 2 (as `lab` itself shows it)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from lab.errors import EXIT_USER_ERROR, UserError

if TYPE_CHECKING:
    from lab.config import Config


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


def train_config(command: list[str], folder: Path | None = None) -> Config | None:
    """The config a `lab train CONFIG [key=value ...]` command would train with, read here so a
    mistake fails before anything starts; None for any other command. CONFIG is read as that
    `lab train` reads it: a file (relative to `folder`, where the command will run, if given),
    else a preset."""
    if command[:2] != ["lab", "train"] or len(command) < 3:
        return None
    from lab import presets
    from lab.config import load_config

    local = Path(folder or "", command[2])
    return load_config(str(local) if local.is_file() else presets.resolve(command[2]),
                       command[3:])


def run_main(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], int],
             argv: list[str] | None) -> int:
    """A launcher's main: parse argv (sys.argv[1:] when None) and run; a UserError anywhere
    is printed as one line and gives exit status 2."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        return run(parser.parse_args(argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
