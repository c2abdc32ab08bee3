"""`lab fit`: fit scaling laws to run directories or CSV files and print what they imply.

    lab fit INPUT... [--method approach3|isoflop|envelope|hparams|critical-batch|moe]
                     [--bootstrap K] [--json OUT] [--plots DIR] [--backtest [--folds K]]
                     [--params non_embedding|total|active]
    lab fit STABLE_RUN --method schedule|multipower --backtest [--folds K] [--json OUT]
    lab fit INPUT... --method downstream --chance P [--task NAME] [--predict N:D,...]

An INPUT is a run directory (searched recursively for summary.json) or a CSV with columns N,
loss and either D or C (then D = C / 6N; `--method moe` reads N, E and loss); Epoch AI's
`Model Size`, `Training FLOP`, `loss` layout is read as well. `lab.cli` dispatches here and
turns a UserError into exit status 2. Runs that `lab plan` planned carry a predicted loss;
every fit prints it against the outcome.
The schedule laws (`--method schedule`, Tissue et al.; `multipower`, Luo et al.) are backtested
along a stable run's curve and its branches' (analysis.schedule_backtest); `lab branch
--predict` is where they predict new branches. The downstream law (Bhagia et al.: task loss
from N and D, accuracy from task loss) reads its own columns (lab.cli.fit_downstream).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from analysis.inputs import load_inputs
from analysis.methods import METHODS, FitResult, analyse
from analysis.moe_law import TRANSFORMS
from analysis.output import jsonable, warning_banner
from analysis.schedule_backtest import SCHEDULE_LAWS, backtest_schedule
from lab.cli import fit_downstream as downstream_cli
from lab.errors import ArgumentParser, UserError
from lab.run.rundir import PARAM_KEYS

# The options of the methods that `lab fit` spells differently; the rest share their names.
FLAGS = {"rel_tol": "budget_tolerance", "n_bins": "bins", "transform": "moe_transform"}


def _budgets(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text}") from None
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"budgets must be positive FLOP counts: {text}")
    return values


def _pairs(text: str) -> list[tuple[float, float]]:
    try:
        pairs = [tuple(float(v) for v in item.split(":")) for item in text.split(",") if item]
    except ValueError:
        pairs = []
    if not pairs or any(len(p) != 2 or not (p[0] > 0 and p[1] >= 1) for p in pairs):
        raise argparse.ArgumentTypeError(f"not a list of N:E pairs with N > 0 and E >= 1: {text}")
    return pairs


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="lab fit",
        description="Fit scaling laws (Chinchilla approaches 1-3, hyperparameter laws) to runs.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="run directory (searched recursively for summary.json) or CSV with "
                        "columns N, loss and D or C")
    p.add_argument("--method", choices=[*METHODS, *SCHEDULE_LAWS, downstream_cli.DOWNSTREAM],
                   default="approach3",
                   help="approach3: parametric L(N, D) (default); isoflop: approach 2; "
                        "envelope: approach 1 on training curves; hparams: LR and batch laws "
                        "in C (DeepSeek) and in N, D (StepFun); critical-batch: B_crit(L) from "
                        "a batch sweep's curves; moe: Clark et al.'s unified law in active N and "
                        "experts E, and what an MoE is worth in dense compute; schedule (Tissue "
                        "et al.), multipower (Luo et al.): the schedule laws, with --backtest "
                        "only, on one stable run and its branches; downstream: task loss L(N, "
                        "D), then accuracy as a sigmoid of it (Bhagia et al. 2024), from columns "
                        "N, D, task_loss, accuracy or runs' task results")
    p.add_argument("--bootstrap", type=int, default=0, metavar="K",
                   help="resample the points K times for confidence intervals (default: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    p.add_argument("--level", type=float, default=0.95, help="interval level (default 0.95)")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON to OUT")
    p.add_argument("--plots", metavar="DIR", help="write PNG figures into DIR")
    p.add_argument("--budgets", type=_budgets, metavar="C1,C2,...",
                   help="compute budgets (FLOPs) to report the optimal N, D for; default: the "
                        "largest in the data times 1, 10 and 100")
    p.add_argument("--backtest", action="store_true",
                   help="also backtest the law by compute: fit on the smaller budgets, predict "
                        "the larger ones, against three naive baselines; calibrates the "
                        "prediction intervals by its out-of-sample errors")
    p.add_argument("--folds", type=int, metavar="K",
                   help="with --backtest: K quantile cuts of C for points without a few "
                        "distinct budgets (default 4), or the last K budgets as cuts")
    _add_point_options(p)
    _add_method_settings(p)
    downstream_cli.add_options(p)
    return p


def _add_point_options(p: argparse.ArgumentParser) -> None:
    """Which runs, and which of their numbers, become the points."""
    p.add_argument("--drop-highest-loss", type=int, default=0, metavar="K",
                   help="leave out the K highest-loss points first (Besiroglu et al. drop 5)")
    p.add_argument("--include-unfinished", action="store_true",
                   help="keep runs whose status is not finished")
    p.add_argument("--params", choices=tuple(PARAM_KEYS),
                   help="which parameter count of a run is N (default: non_embedding, as sweeps "
                        "and the demo count it; active for --method moe, what one token uses; "
                        "total, every expert counted, as Chinchilla counts). A CSV's N is taken "
                        "as it is")
    p.add_argument("--include-stable-parents", action="store_true",
                   help="keep an undecayed stable run whose branches are among the inputs (left "
                        "out by default: its loss is not that of a finished schedule)")


def _add_method_settings(p: argparse.ArgumentParser) -> None:
    """The settings of one method or another (grouping, bins, band)."""
    p.add_argument("--budget-tolerance", type=float, default=0.1, metavar="R",
                   help="runs within a factor 1+R in compute share a budget (default 0.1)")
    p.add_argument("--bins", type=int, default=30,
                   help="log-uniform compute bins of the envelope (default 30)")
    p.add_argument("--curve-loss", default="loss",
                   help="metrics.jsonl field the envelope reads (default loss)")
    p.add_argument("--moe-transform", choices=TRANSFORMS, default="auto",
                   help="--method moe: Clark et al.'s saturating transform of E, with E_start "
                        "and E_max fitted (saturating), E_start alone (start), or plain E; auto "
                        "(default) fits what the distinct expert counts can test: both with 5 "
                        "or more, E_start with 4, plain E with 2 or 3")
    p.add_argument("--at", type=_pairs, metavar="N:E,...",
                   help="--method moe: predict the loss and the dense equivalent at these "
                        "(active N, experts E), e.g. 1e9:8,1e9:64 (default: the smallest and "
                        "largest N of the data at each expert count)")


def method_options(args: argparse.Namespace) -> dict:
    """The keyword options of the chosen method, from the flags of the same meaning."""
    names = METHODS[args.method].options
    return {name: getattr(args, FLAGS.get(name, name)) for name in names
            if hasattr(args, FLAGS.get(name, name))}


def run_fit(args: argparse.Namespace) -> FitResult:
    """Check the arguments and outputs, load the inputs, fit and describe."""
    if args.bootstrap < 0:
        raise UserError(f"--bootstrap must be 0 or more, got {args.bootstrap}")
    if not 0 < args.level < 1:
        raise UserError(f"--level must be between 0 and 1, got {args.level}")
    check_backtest_args(args)
    downstream_cli.check_args(args)
    if args.method != "moe" and (args.at is not None or args.moe_transform != "auto"):
        raise UserError("--at and --moe-transform belong to --method moe; add it or drop them")
    check_outputs(args.json, args.plots)  # before the work, not after it
    if args.method in SCHEDULE_LAWS:
        return schedule_backtest(args)
    # A method's own default N (active for moe); hparams and downstream read it too.
    default = METHODS[args.method].params if args.method in METHODS else "non_embedding"
    params = args.params = args.params or default
    if args.method == downstream_cli.DOWNSTREAM:
        return downstream_cli.fit_downstream_command(args)
    method = METHODS[args.method]
    inputs = load_inputs(
        args.inputs,
        include_unfinished=args.include_unfinished,
        params=params,
        include_stable_parents=args.include_stable_parents,
        tokens=method.tokens,
    )
    backtest = ({"folds": args.folds, "level": args.level, "rel_tol": args.budget_tolerance}
                if args.backtest else None)
    return analyse(args.method, inputs, options=method_options(args), budgets=args.budgets,
                   drop_highest=args.drop_highest_loss, curve_loss=args.curve_loss,
                   params=params, plots_dir=args.plots, sources=list(args.inputs),
                   backtest=backtest)


def check_backtest_args(args: argparse.Namespace) -> None:
    """--backtest and --folds make sense together, for a method that predicts a loss."""
    from analysis.backtest import PREDICTORS

    if args.folds is not None and not args.backtest:
        raise UserError("--folds needs --backtest; add --backtest or drop --folds")
    if args.folds is not None and args.folds < 1:
        raise UserError(f"--folds must be at least 1, got {args.folds}")
    if args.method in SCHEDULE_LAWS and not args.backtest:
        raise UserError(f"--method {args.method} only backtests here; add --backtest, or fit "
                        "and predict branches with `lab branch RUN --predict`")
    own = [name for name, m in METHODS.items() if m.backtest is not None]
    predicting = (*PREDICTORS, *own, *SCHEDULE_LAWS, downstream_cli.DOWNSTREAM)
    if args.backtest and args.method not in predicting:
        raise UserError(f"--backtest needs a method that predicts a loss or an accuracy "
                        f"({', '.join(predicting)}); --method {args.method} does not")


def schedule_backtest(args: argparse.Namespace) -> FitResult:
    """The backtest of a schedule law on one stable run's curve and its finished branches'
    (read as `lab branch --predict` reads them), cut in FLOPs by the stable run's summary."""
    from lab import paths
    from lab.config import load_config
    from lab.run import rundir
    from lab.studies.branch_predict import default_start, run_curves

    if len(args.inputs) != 1:
        raise UserError(f"--method {args.method} fits one model's curves: give its stable run "
                        f"directory alone (its branches are read from it), not "
                        f"{len(args.inputs)} inputs")
    run_dir = args.inputs[0]
    summary = rundir.read_summary(run_dir) if paths.is_dir(run_dir) else None
    if summary is None or not paths.is_file(rundir.config_path(run_dir)):
        raise UserError(f"{run_dir} is not a run directory (no summary.json and config.yaml); "
                        "give the stable run whose branches `lab branch` trained")
    if not (summary.flops and summary.steps):
        raise UserError(f"{run_dir}'s summary has no flops or steps: the run has not finished; "
                        "finish it (lab train resumes it)")
    start = default_start(load_config(rundir.config_path(run_dir)))
    bt = backtest_schedule(run_curves(run_dir), args.method, folds=args.folds, start=start,
                           flops_per_step=summary.flops / summary.steps, level=args.level)
    record = {"method": args.method, "backtest": bt.to_dict(), "inputs": [run_dir],
              "skipped_runs": []}
    verdict = bt.verdict()
    text = "\n".join((warning_banner([verdict]) if verdict else []) + [bt.describe()])
    return FitResult(bt, jsonable(record), text)


def check_outputs(json_path: str | None, plots_dir: str | None) -> None:
    """Refuse outputs that cannot be written before any fitting: --json must name a file in an
    existing directory, --plots a directory (made if missing) under an existing one."""
    if json_path:
        parent = os.path.dirname(os.path.abspath(json_path))
        if os.path.isdir(json_path):
            raise UserError(f"--json {json_path} is a directory; give a file name such as "
                            "fit.json")
        if not os.path.isdir(parent):
            raise UserError(f"--json {json_path}: the folder {parent} does not exist; create "
                            "it or write elsewhere")
    if plots_dir:
        if os.path.exists(plots_dir) and not os.path.isdir(plots_dir):
            raise UserError(f"--plots {plots_dir} is a file, not a directory; give a directory "
                            "for the figures")
        ancestor = os.path.abspath(plots_dir)
        while not os.path.exists(ancestor):
            ancestor = os.path.dirname(ancestor)
        if not os.path.isdir(ancestor) or not os.access(ancestor, os.W_OK):
            raise UserError(f"--plots {plots_dir}: cannot create it under {ancestor}; give a "
                            "writable directory")


def main(argv: list[str]) -> int:
    """Entry point of `lab fit`; returns the exit status. Raises UserError on bad input."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    done = run_fit(args)
    result, report = done.record, done.text
    for run, why in (tuple(s.values()) for s in result["skipped_runs"]):
        flag = "--include-stable-parents" if "stable" in why else "--include-unfinished"
        print(f"left out {run} ({why}); pass {flag} to keep it", file=sys.stderr)
    print(report)
    if args.json:
        try:
            with open(args.json, "w") as fh:
                json.dump(result, fh, indent=2)
                fh.write("\n")
        except OSError as err:
            raise UserError(f"cannot write {args.json}: {err.strerror}; check the path") from None
        print(f"wrote {args.json}")
    for path in result.get("plots", []):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
