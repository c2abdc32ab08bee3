"""A debug launch on one GPU host, with the same configs as everywhere else:

    python -m launch.gpu -- lab train configs/gpu/debug.yaml
    python -m launch.gpu --mem-fraction 0.5 --profile-steps 20:5 -- lab train configs/tiny.yaml
    python -m launch.gpu --dry-run -- lab train configs/gpu/debug.yaml   # shows env + command

It sets the environment JAX reads on GPUs and then becomes the command (exec), so signals and
the exit status are the command's own:
- JAX_PLATFORMS=cuda, so a missing GPU is an error instead of a silent fall back to the CPU
  (and without a CUDA plugin of jax, 12 or 13, the launcher stops first, naming
  `pip install -e '.[cuda12]'`);
- XLA_PYTHON_CLIENT_MEM_FRACTION (the share of GPU memory JAX preallocates), or
  XLA_PYTHON_CLIENT_PREALLOCATE=false with --no-preallocate (slower, but shows real usage);
- XLA_FLAGS: the lab's GPU flags (XLA_GPU_FLAGS below, from MaxText's and NVIDIA JAX-Toolbox's
  GPU scripts; --no-xla-defaults leaves them out), then the user's own (XLA_FLAGS already set,
  then each --xla-flag), which win where they name the same flag; --xla_dump_to with --dump-hlo;
- CUDA_VISIBLE_DEVICES with --gpus;
- LAB_PROFILE_STEPS / LAB_PROFILE_DIR with --profile-steps: a jax.profiler trace of those steps
  (see lab/accel/profiling.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import shlex
import sys

from lab.accel.profiling import DIR_VAR, STEPS_VAR, parse_window
from lab.errors import UserError, shown
from launch.common import after_dashes, resolve_command, run_main, train_config


@dataclasses.dataclass(frozen=True)
class XlaFlag:
    flag: str  # --name=value, as XLA_FLAGS takes it
    source: str  # where the anchors set it
    effect: str


MAXTEXT_A3 = "MaxText end_to_end/gpu/a3/*.sh, configs/a3/*/1vm.sh"
TOOLBOX = "JAX-Toolbox rosetta/docs/GPU_performance.md"
# Only flags that act on one GPU (the collective combine thresholds and pipelined collectives of
# the same scripts need several). None is yet shown to help on the lab's models: the device sweep
# (benchmarks/device_check.py) measures them together against the baseline without them.
XLA_GPU_FLAGS = (
    XlaFlag("--xla_gpu_enable_latency_hiding_scheduler=true",
            f"{MAXTEXT_A3}; {TOOLBOX}; set in JAX-Toolbox's images",
            "schedules asynchronous collectives and copies to overlap compute"),
    XlaFlag("--xla_gpu_enable_triton_gemm=false", f"{MAXTEXT_A3}; {TOOLBOX}",
            "matmuls go to cuBLAS instead of Triton-generated kernels"),
    XlaFlag("--xla_gpu_enable_command_buffer=",
            f"{MAXTEXT_A3} (as --xla_gpu_graph_level=0, the switch's older name); {TOOLBOX}",
            "no CUDA graphs: kernels launch one by one"),
    XlaFlag("--xla_gpu_enable_highest_priority_async_stream=true", f"{MAXTEXT_A3}; {TOOLBOX}",
            "asynchronous work runs on the highest-priority CUDA stream"),
    XlaFlag("--xla_gpu_enable_while_loop_double_buffering=true", f"{MAXTEXT_A3}; {TOOLBOX}",
            "double-buffers while loops (the scanned layers), so one layer's loads overlap "
            "the previous layer's compute"),
    XlaFlag("--xla_disable_hlo_passes=rematerialization", MAXTEXT_A3,
            "XLA's own rematerialization pass off: model.remat alone decides what is recomputed"),
)
LATENCY_HIDING = XLA_GPU_FLAGS[0].flag


def flag_name(flag: str) -> str:
    """--name of --name=value."""
    return flag.split("=", 1)[0]


def merge_xla_flags(defaults: list[str], user: list[str]) -> list[str]:
    """Each flag once: the defaults, then the user's flags; where both name the same flag the
    user's value wins (the last one given), in the default's place."""
    merged: dict[str, str] = {}
    for flag in [*defaults, *user]:
        if not flag.startswith("--"):
            raise UserError(f"XLA flag {shown(flag)} must start with --, e.g. "
                            "--xla_gpu_enable_triton_gemm=false")
        merged[flag_name(flag)] = flag
    return list(merged.values())


def default_xla_flags(latency_hiding: bool = True) -> list[str]:
    """The lab's GPU flags (XLA_GPU_FLAGS), without the latency-hiding scheduler if asked."""
    return [f.flag for f in XLA_GPU_FLAGS if latency_hiding or f.flag != LATENCY_HIDING]


def gpu_env(base: dict[str, str], *, mem_fraction: float | None = 0.9, preallocate: bool = True,
            gpus: str | None = None, xla_flags: list[str] = (), latency_hiding: bool = True,
            xla_defaults: bool = True, dump_hlo: str | None = None,
            profile_steps: str | None = None, profile_dir: str = "runs/profile",
            platform: str = "cuda") -> dict[str, str]:
    """The environment of the run: `base` with the GPU settings applied."""
    env = dict(base)
    env["JAX_PLATFORMS"] = platform
    if not preallocate:
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
        env.pop("XLA_PYTHON_CLIENT_MEM_FRACTION", None)
    elif mem_fraction is not None:
        if not 0 < mem_fraction <= 1:
            raise UserError(f"--mem-fraction must lie in (0, 1], got {mem_fraction}")
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{mem_fraction:g}"
    user = [*env.get("XLA_FLAGS", "").split(), *xla_flags]
    if dump_hlo:
        user.append(f"--xla_dump_to={dump_hlo}")
    flags = merge_xla_flags(default_xla_flags(latency_hiding) if xla_defaults else [], user)
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus
    if profile_steps:
        parse_window(profile_steps)
        env[STEPS_VAR] = profile_steps
        env[DIR_VAR] = profile_dir
    return env


CUDA_INSTALL = "pip install -e '.[cuda12]'"
# jax's CUDA plugins by CUDA major version: the cuda12 extra installs the first; a machine whose
# jax came with CUDA 13 (as NVIDIA's and cloud images now ship) has the second, and it serves.
CUDA_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin")


def check_backend(platform: str) -> None:
    """A CUDA run needs one of jax's CUDA plugins; without it JAX would fail deep in start-up."""
    if platform == "cuda" and not any(importlib.util.find_spec(p) for p in CUDA_PLUGINS):
        raise UserError(f"no CUDA backend for JAX here (no {' or '.join(CUDA_PLUGINS)}); "
                        f"install one with {CUDA_INSTALL}, or rehearse on the CPU with "
                        "--platform cpu")


def describe(env: dict[str, str], base: dict[str, str], argv: list[str]) -> str:
    """The changed environment and the command, as one line a shell can run."""
    changed = [f"{k}={v}" for k, v in env.items() if base.get(k) != v]
    removed = [k for k in base if k not in env]
    unset = [w for k in removed for w in ("-u", k)]
    return shlex.join(["env", *unset, *changed, *argv])


def build_parser() -> argparse.ArgumentParser:
    from lab.errors import ArgumentParser

    p = ArgumentParser(prog="python -m launch.gpu",
                       description="Run a command (e.g. lab train CONFIG) on this host's GPUs "
                                   "with debug-friendly JAX/XLA settings.")
    p.add_argument("--mem-fraction", type=float, default=0.9,
                   help="XLA_PYTHON_CLIENT_MEM_FRACTION: GPU memory JAX preallocates (0.9)")
    p.add_argument("--no-preallocate", action="store_true",
                   help="allocate GPU memory on demand (XLA_PYTHON_CLIENT_PREALLOCATE=false)")
    p.add_argument("--gpus", help="CUDA_VISIBLE_DEVICES, e.g. 0 or 0,1")
    p.add_argument("--xla-flag", action="append", default=[], metavar="FLAG",
                   help="an extra XLA flag, e.g. --xla-flag=--xla_gpu_enable_triton_gemm=false")
    p.add_argument("--no-xla-defaults", action="store_true",
                   help="leave out the lab's XLA GPU flags (docs/launch.md lists them); the "
                        "user's XLA_FLAGS and --xla-flag still apply")
    p.add_argument("--no-latency-hiding", action="store_true",
                   help="leave out --xla_gpu_enable_latency_hiding_scheduler=true")
    p.add_argument("--dump-hlo", metavar="DIR", help="dump the compiled HLO to DIR")
    p.add_argument("--profile-steps", metavar="START:COUNT",
                   help="capture a jax.profiler trace of COUNT steps from step START")
    p.add_argument("--profile-dir", default="runs/profile", help="where the trace goes")
    p.add_argument("--platform", default="cuda",
                   help="JAX_PLATFORMS (cuda; rocm on AMD; cpu to rehearse without a GPU)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the environment and command instead of running")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    return p


def launch(args: argparse.Namespace) -> int:
    """Check the command, set the GPU environment and become the command (or show it)."""
    command = after_dashes(args.command)
    run = resolve_command(command, "no command: put it after --, e.g. python -m launch.gpu -- "
                                   "lab train configs/gpu/debug.yaml")
    train_config(command)  # a config mistake fails before the GPU starts
    base = dict(os.environ)
    env = gpu_env(base, mem_fraction=args.mem_fraction, preallocate=not args.no_preallocate,
                  gpus=args.gpus, xla_flags=args.xla_flag,
                  latency_hiding=not args.no_latency_hiding,
                  xla_defaults=not args.no_xla_defaults, dump_hlo=args.dump_hlo,
                  profile_steps=args.profile_steps, profile_dir=args.profile_dir,
                  platform=args.platform)
    if not args.dry_run:
        check_backend(args.platform)
    print(describe(env, base, run), flush=True)
    if args.dry_run:
        return 0
    try:
        os.execvpe(run[0], run, env)  # the command takes this process's place
    except OSError as e:
        print(f"error: cannot run {shown(run[0])}: {e.strerror}", file=sys.stderr)
        return 127
    return 0  # not reached


def main(argv: list[str] | None = None) -> int:
    return run_main(build_parser(), launch, argv)


if __name__ == "__main__":
    sys.exit(main())
