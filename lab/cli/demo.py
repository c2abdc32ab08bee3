"""`lab demo`: a whole scaling study on this machine, with a report (lab.studies.demo)."""

from __future__ import annotations

import argparse

from lab import presets
from lab.errors import ArgumentParser
from lab.studies.demo import run_demo, study_keys_help


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="lab demo", description=(
        "Run a whole scaling study on this machine: a ladder of model sizes, one stable WSD "
        "run each branched into decays, the scaling-law fits with a held-out check; writes "
        "DIR/report.html and DIR/fit.json. Rerun the same command to continue an interrupted "
        "demo."), epilog=study_keys_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="output directory (default runs/demo, or runs/demo-quick "
                        "with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="a smaller ladder with short runs (a few minutes on 2 cores)")
    parser.add_argument("--optim", choices=("muon", "adamw"), default="muon",
                        help="optimizer of every run (default muon)")
    parser.add_argument("--study", help="a study file or preset instead of demo (the "
                        "presets: configs/demo.yaml, demo-quick)")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    study_file = presets.resolve(args.study, what="study file") if args.study else None
    return run_demo(study_file, args.quick, args.out, args.optim, argv)
