"""`lab plan INPUT... --budget C --out DIR`: the compute-optimal run at a budget and the next
IsoFLOP sweep, from a fitted law (lab.studies.plan)."""

from __future__ import annotations

import argparse
import math

from lab.errors import ArgumentParser
from lab.studies.plan import make_plan, report


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text}") from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="lab plan",
        description="Plan the compute-optimal run at a budget from a fitted law: writes "
        "DIR/config.yaml (for lab train), DIR/sweep.yaml (the next IsoFLOP sweep, for lab "
        "sweep) and DIR/plan.json (N, D, C, predicted_loss, interval, sources).",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="fit JSON from `lab fit --json` (approach3: the loss law; hparams or "
                   "critical-batch: learning-rate and batch laws), or run directories to fit "
                   "Approach 3 on")
    p.add_argument("--budget", type=_positive, required=True, metavar="C",
                   help="compute budget in FLOPs, counted as 6 N D like the fit, e.g. 1e15")
    p.add_argument("--out", required=True, metavar="DIR", help="where the plan files go")
    p.add_argument("--base", metavar="CONFIG",
                   help="the config the plan starts from (data, seq_len, optimizer, schedule "
                   "fractions; its lr under μP); default: the best run's config.yaml among the "
                   "inputs (or among the runs the fit JSON was fitted on)")
    p.add_argument("--runs", metavar="DIR",
                   help="where the planned runs will write (default runs/plan-C<budget>)")
    p.add_argument("--bootstrap", type=int, default=0, metavar="K",
                   help="with run directories: bootstrap the fit K times for the interval "
                   "(default 0: a residual interval)")
    p.add_argument("--level", type=float, default=0.95, help="interval level (default 0.95)")
    p.add_argument("--sweep-sizes", type=int, default=5, metavar="K",
                   help="model sizes in the next IsoFLOP sweep (default 5)")
    p.add_argument("--sweep-span", type=_positive, default=0.5, metavar="DECADES",
                   help="the sweep's sizes span N_plan x 10^(±DECADES) (default 0.5)")
    p.add_argument("--noise-scale", action="store_true",
                   help="take the batch from the measured gradient noise scale at the predicted "
                   "loss (a critical-batch fit JSON of runs trained with "
                   "train.noise_scale_every), before any batch law")
    p.add_argument("--aspect-ratio", type=_positive, default=64.0,
                   help="d_model / n_layers the shape search aims at (default 64; 32 suits "
                   "the tiny CPU models)")
    return p


def main(argv: list[str]) -> int:
    """Entry point of `lab plan`; returns the exit status. Raises UserError on bad input."""
    args = build_parser().parse_args(argv)
    plan = make_plan(args)
    print(report(plan, args.out))
    return 0

