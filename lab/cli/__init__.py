"""`lab`: the one command-line entry point, with subcommands data, train, branch, sweep, fit,
plan and demo. A user's mistake exits with status 2 and one line; bugs keep their traceback."""

from __future__ import annotations

import argparse
import sys

from lab.config import config_keys
from lab.errors import FIXES, ArgumentParser, UserError, file_system_error
from lab.schema import keys_help

EXIT_DIVERGED = 3  # the loss or gradient became NaN or Inf; the last checkpoint is intact


def _train(args: argparse.Namespace) -> int:
    from lab.run.preemption import caught

    # From here to the end, SIGTERM stops the run cleanly (exit 0); the handler is released
    # on every way out, so an in-process caller (a test, a notebook) is left as it was.
    with caught():
        return _train_command(args)


def _train_command(args: argparse.Namespace) -> int:
    from lab import presets
    from lab.config import dump_config, load_config

    # Fails fast, before JAX is imported.
    cfg = load_config(presets.resolve(args.config), args.overrides)
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    if args.compile_only and args.lower:
        raise UserError("--compile-only and --lower are two different checks: use one")
    if args.json and not args.lower:
        raise UserError("--json needs --lower: it writes what --lower prints")
    if args.topology is not None:  # before anything is resolved or printed
        from lab.train.aot import check_topology

        check_topology(args.topology)
    if args.lower:
        from lab.train.lowering import lower_command

        return lower_command(cfg, args.lower, args.topology, args.json)
    if args.topology is not None and not args.compile_only:
        raise UserError("--topology needs --compile-only or --lower tpu: a run trains on the "
                        "local devices")
    from lab.accel.sharding import initialize_distributed

    initialize_distributed()  # before anything starts the JAX backend
    if args.compile_only:
        from lab.train.aot import compile_only

        return compile_only(cfg, args.topology)
    from lab.run.rundir import Status
    from lab.train import train

    summary = train(cfg)
    return EXIT_DIVERGED if summary.get("status") == Status.DIVERGED else 0


def _quiet_absl() -> None:
    """orbax logs routine events as absl warnings; keep stderr for what the user must read."""
    try:
        from absl import logging as absl_logging
    except ImportError:
        return
    absl_logging.set_verbosity(absl_logging.ERROR)


def _keys_help() -> str:
    return keys_help("config keys", config_keys())


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="lab", description="The JAX/Flax scaling lab.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    sub.required = True

    p = sub.add_parser("train", help="train a model from a YAML config",
                       description="Train (or resume) a run. Overrides are dotted key=value "
                                   "words, e.g. train.steps=200 optim.name=muon mesh.fsdp=4.",
                       epilog=_keys_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="a YAML file, or the name of a preset (a file of the "
                                  "package's configs/), e.g. tiny or gpu/debug")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (file, then overrides) as YAML and exit")
    p.add_argument("--compile-only", action="store_true",
                   help="compile the train step and print each chip's memory, without training")
    p.add_argument("--topology", metavar="GEN:SHAPE",
                   help="with --compile-only: compile for a TPU slice from any host, e.g. "
                        "v5e:16x16 (exit 2 if the step cannot fit a chip's HBM); with --lower "
                        "tpu: lower (and compile) for that slice")
    p.add_argument("--lower", metavar="cuda|tpu",
                   help="without a device: lower the train step for cuda or tpu and print its "
                        "matmuls by operand dtype with their FLOPs, custom calls, collectives "
                        "and the bytes of parameters, optimizer state and saved activations")
    p.add_argument("--json", metavar="OUT", help="with --lower: also write its facts to OUT")
    p.set_defaults(run=_train)

    # Listed for `lab --help`; main() hands their arguments to their own parsers.
    for name, text in [
        ("data", "prepare a corpus into token shards (lab data prep --help)"),
        ("fit", "fit scaling laws to run directories or a CSV"),
        ("plan", "plan the compute-optimal run and the next sweep at a budget from a fit"),
        ("sweep", "expand a sweep file into runs, and run them (--dry-run)"),
        ("branch", "branch a stable WSD run's checkpoints into decays"),
        ("demo", "a whole scaling study on this machine, with a report"),
    ]:
        sub.add_parser(name, help=text, add_help=False)
    return parser


# Subcommands that parse their own arguments: the rest of the command line goes to them as is.
DELEGATED = {"data": "lab.cli.data", "fit": "lab.cli.fit", "plan": "lab.studies.plan",
             "sweep": "lab.studies.sweep",
             "branch": "lab.studies.branch", "demo": "lab.studies.demo"}


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
        if argv and argv[0] in DELEGATED:
            import importlib

            return int(importlib.import_module(DELEGATED[argv[0]]).main(argv[1:]) or 0)
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if extra and getattr(args, "overrides", None) is not None and not any(
                word.startswith("-") for word in extra):
            args.overrides += extra  # key=value words after an option (argparse stops there)
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return int(args.run(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a name too long, a full or read-only disk where no check caught it
        if e.errno not in FIXES:
            raise
        print(f"error: {file_system_error(e, 'use')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
