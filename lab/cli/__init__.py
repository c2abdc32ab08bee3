"""`lab`: the one command-line entry point, with subcommands data, train, branch, sweep, fit,
plan and demo. A user's mistake exits with status 2 and one line; bugs keep their traceback."""

from __future__ import annotations

import importlib
import sys

from lab.errors import (
    EXIT_INTERRUPTED,
    EXIT_USER_ERROR,
    FIXES,
    ArgumentParser,
    UserError,
    file_system_error,
)

# The subcommands, in `lab --help`'s order: each is the module whose main(argv) runs it (and
# whose build_parser() reads its arguments), with the line `lab --help` shows for it.
SUBCOMMANDS = {
    "train": ("lab.cli.train", "train a model from a YAML config"),
    "data": ("lab.cli.data", "prepare a corpus into token shards (lab data prep --help)"),
    "fit": ("lab.cli.fit", "fit scaling laws to run directories or a CSV"),
    "plan": ("lab.cli.plan",
             "plan the compute-optimal run and the next sweep at a budget from a fit"),
    "sweep": ("lab.cli.sweep", "expand a sweep file into runs, and run them (--dry-run)"),
    "branch": ("lab.cli.branch", "branch a stable WSD run's checkpoints into decays"),
    "demo": ("lab.cli.demo", "a whole scaling study on this machine, with a report"),
}


def _quiet_absl() -> None:
    """orbax logs routine events as absl warnings; keep stderr for what the user must read."""
    try:
        from absl import logging as absl_logging
    except ImportError:
        return
    absl_logging.set_verbosity(absl_logging.ERROR)


def build_parser() -> ArgumentParser:
    """`lab` itself: its help lists the subcommands; each parses its own arguments."""
    parser = ArgumentParser(prog="lab", description="The JAX/Flax scaling lab.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    sub.required = True
    for name, (_, text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from lab.backend import choose_platforms

    choose_platforms()  # no TPU backend (nor its warnings) on a host without TPU chips
    _quiet_absl()
    from lab.accel import compile_cache
    from lab.paths import cache_dir, makedirs

    try:
        makedirs(cache_dir(), fix="set LAB_CACHE_DIR to a directory you can write to")
        compile_cache.enable()  # before any compilation: a rerun loads its programs from disk
        if argv and argv[0] in SUBCOMMANDS:
            module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
            return int(module.main(argv[1:]) or 0)
        build_parser().parse_args(argv)  # `lab --help`, or a missing or unknown subcommand
        raise AssertionError("unreachable: the parser exits or raises without a subcommand")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as e:  # a name too long, a full or read-only disk where no check caught it
        if e.errno not in FIXES:
            raise
        print(f"error: {file_system_error(e, 'use')}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED

