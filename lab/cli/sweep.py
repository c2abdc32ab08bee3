"""`lab sweep FILE [key=value ...]`: expand a sweep file into runs (lab.studies.sweep), print
them, and run them or, with --dry-run, compile each for a TPU slice."""

from __future__ import annotations

import argparse

from lab import presets
from lab.errors import ArgumentParser, UserError
from lab.run.rundir import PARAM_KEYS
from lab.studies.sweep import describe, expand_sweep, run_sweep, sweep_keys_help


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="lab sweep",
        description="Expand a sweep file (configs/sweeps/*.yaml) into runs and run them one "
                    "after another; finished runs are skipped, so running it again resumes.",
        epilog=sweep_keys_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", help="a sweep file or preset, e.g. "
                        "configs/sweeps/isoflop-tiny.yaml or isoflop-tiny")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides for every run, e.g. data.path=data/prepared")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the runs (name, N, D, FLOPs, overrides) without running")
    parser.add_argument("--out", help="the sweep's output directory (default: the file's "
                                      "'out:', else runs/sweeps/NAME)")
    parser.add_argument("--params", choices=tuple(PARAM_KEYS),
                        help="which parameter count is N, for target sizes, tokens_per_param "
                             "and the table (default: the file's params:, else non_embedding; "
                             "active: what one token of an MoE uses; total: every expert)")
    parser.add_argument("--topology", metavar="GEN:SHAPE",
                        help="with --dry-run: compile every run's step for this TPU slice "
                             "(e.g. v5e:16x16) and show each chip's memory; exit 2 if a run "
                             "cannot fit")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.topology is not None:
        from lab.train.aot import check_topology

        check_topology(args.topology)
    if args.topology is not None and not args.dry_run:
        raise UserError("--topology needs --dry-run: a sweep runs on the local devices")
    path = presets.resolve(args.file, folder="sweeps", what="sweep file")
    sweep = expand_sweep(path, args.overrides, out=args.out, params=args.params)
    if not args.dry_run:
        print(describe(sweep), flush=True)
        return run_sweep(sweep)
    from lab.train.aot import sweep_memory

    columns, problem, note = sweep_memory(sweep, args.topology)
    print(describe(sweep, columns), flush=True)
    if note:
        print(note, flush=True)
    if problem:
        raise UserError(problem)
    return 0
