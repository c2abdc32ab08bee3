"""`lab branch RUN_DIR`: branch a stable WSD run's checkpoints into decays (lab.studies.branch),
print the compute report, or predict each branch's loss with the schedule law."""

from __future__ import annotations

import argparse

from lab import paths
from lab.config import DECAY_SHAPES, Config
from lab.errors import ArgumentParser, UserError, shown
from lab.model.accounting import param_counts, with_vocab
from lab.run import rundir
from lab.run.branch_points import check_branch_points, child_configs, decay_of, planned_pairs
from lab.run.rundir import Status, Summary
from lab.studies import branch as studies_branch
from lab.studies.branch import (
    check_checkpoints,
    check_existing_children,
    compute_report,
    format_report,
    load_parent,
    train_runs,
    write_branch_files,
)


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{what} must be comma-separated integers, got {shown(text)}") from None
    if not values or any(v <= 0 for v in values):
        raise UserError(f"{what} must be positive integers, got {shown(text)}")
    return values


def _print_branch(event: str, cfg: Config, summary: Summary | None) -> None:
    name = paths.name(cfg.run.dir)
    if event == "skipped":
        print(f"{name}: finished already, skipped")
    elif event == "starting":
        print(f"--- branch {name}")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="lab branch",
                            description=studies_branch.__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a stable WSD run with checkpoints at the branch points")
    parser.add_argument("--at", help="branch steps, e.g. 1000,2000 (default: the config's plan)")
    parser.add_argument("--decay-steps", help="decay lengths, e.g. 200,400")
    parser.add_argument("--shape", choices=DECAY_SHAPES, help="decay shape")
    parser.add_argument("--final-ratio", type=float, help="final lr over the peak (default: "
                        "the run's schedule.final_ratio)")
    parser.add_argument("--dry-run", action="store_true",
                        help="create nothing; print the children and the compute report")
    parser.add_argument("--predict", action="store_true",
                        help="train nothing; print each branch's final eval loss predicted by "
                        "the schedule law fitted on this run and its finished branches")
    return parser


def _pairs(args: argparse.Namespace, parent_dir: str, parent: Config) -> list[tuple[int, int]]:
    """The (branch step, decay) pairs: --at x --decay-steps, or the config's plan."""
    if args.at:
        steps = _ints(args.at, "--at")
        if not args.decay_steps:
            raise UserError("--at needs --decay-steps, e.g. --decay-steps 200,400")
        return [(s, d) for s in steps for d in _ints(args.decay_steps, "--decay-steps")]
    if args.decay_steps:
        raise UserError("--decay-steps needs --at; without both, the config's plan is used")
    pairs = planned_pairs(parent, param_counts(with_vocab(parent.model, 257))["params"])
    if not pairs:
        raise UserError(f"{parent_dir} declares no branch plan (branch.at_steps and "
                        "branch.decay_steps, or the like); pass --at STEPS --decay-steps "
                        "LENGTHS")
    return pairs


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    parent_dir, parent = load_parent(args.run_dir)
    pairs = _pairs(args, parent_dir, parent)
    check_branch_points(parent, pairs)
    from lab.accel.sharding import initialize_distributed, is_main_process

    initialize_distributed()  # every host of a pod runs the branches together
    check_checkpoints(parent_dir, pairs)
    shape, final_ratio = decay_of(parent, args.shape, args.final_ratio)
    if args.predict:  # fitting needs a finished decay; analysis.schedule_law says so if none
        from lab.studies.branch_predict import format_predictions, predict_branches

        print(format_predictions(*predict_branches(parent_dir, pairs, shape, final_ratio)))
        return 0
    report = compute_report(parent, pairs)
    children = child_configs(parent, parent_dir, pairs, shape, final_ratio)
    print(format_report(report))
    if args.dry_run:
        for child in children:
            print(f"{child.run.dir}: lab train {rundir.config_path(child.run.dir)}")
        return 0
    if is_main_process():  # one writer of the files every host would write alike
        write_branch_files(parent_dir, report, children)
    check_existing_children(children)
    statuses = train_runs(children, _print_branch)
    failed = {k: v for k, v in statuses.items() if v != Status.FINISHED}
    print(f"{len(statuses) - len(failed)} of {len(statuses)} branches finished"
          + (f"; not finished: {failed}" if failed else ""))
    return 0 if not failed else 1
