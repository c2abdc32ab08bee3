"""`lab train CONFIG [key=value ...]`: train (or resume) a run, or only compile or lower its
step."""

from __future__ import annotations

import argparse

from lab.config import config_keys
from lab.errors import EXIT_DIVERGED, ArgumentParser, UserError
from lab.schema import keys_help


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
    from lab.model.memory import FIT_ADVICE, out_of_memory
    from lab.run.rundir import Status
    from lab.train import train

    try:
        summary = train(cfg)
    except Exception as e:  # the estimate let it start; the device's memory did not
        if not out_of_memory(e):
            raise
        raise UserError("the train step ran out of device memory (XLA: RESOURCE_EXHAUSTED) "
                        f"although lab.model.memory's estimate fit; {FIT_ADVICE}") from None
    return EXIT_DIVERGED if summary.get("status") == Status.DIVERGED else 0


def _keys_help() -> str:
    return keys_help("config keys", config_keys())


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="lab train",
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
    return p


def main(argv: list[str]) -> int:
    args, extra = build_parser().parse_known_args(argv)
    if extra and not any(word.startswith("-") for word in extra):
        args.overrides += extra  # key=value words after an option (argparse stops there)
    elif extra:  # worded as when `lab` parsed the train command itself
        raise UserError(f"lab: unrecognized arguments: {' '.join(extra)}; see `lab --help`")
    return _train(args)
