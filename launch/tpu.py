"""Cloud TPU pod launches through gcloud (TPU VMs or queued resources) and, on GKE, xpk.

    python -m launch.tpu create --name lab-v5e --zone us-west4-a --type v5litepod-32 --queued
    python -m launch.tpu setup  --name lab-v5e --zone us-west4-a
    python -m launch.tpu run    --name lab-v5e --zone us-west4-a -- lab train \\
        configs/tpu/v5e-ladder.yaml run.dir=gs://BUCKET/runs/first
    python -m launch.tpu sweep  --name lab-v5e --zone us-west4-a \\
        configs/sweeps/ladder-v5e.yaml --out gs://BUCKET/sweeps/ladder
    python -m launch.tpu delete --name lab-v5e --zone us-west4-a --queued
    python -m launch.tpu up ...   # create, setup, sweep (or run), delete

Every host of a slice must run the same program, or the run deadlocks (jax #22436): `setup`
checks out one commit on every worker, and `run`/`sweep` start the same command on
--worker=all. Each process joins with LAB_COORDINATOR=auto (JAX finds the slice); since JAX
0.8.1 the default coordinator port is closed by the usual GCP firewall (jax #35905), so
--coordinator-port PORT passes worker 0's internal IP and that port explicitly. Commands are
argument lists, shown with shlex quoting by --dry-run, so any run name survives both shells
(yours and the workers').
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from lab.errors import UserError, shown
from lab.paths import safe_name
from launch.common import after_dashes, run_main, train_config

ROOT = Path(__file__).resolve().parents[1]
WORKDIR = "scaling-lab"  # on each worker, relative to the home directory
DEFAULT_PORT = 8476  # open in the firewall rule GCP makes for TPU slices (jax #35905)

# Overlap collectives with compute: XLA's TPU flags that MaxText's TPU configs set (async
# collective fusion, all-gathers included, over several steps; compute and collectives together
# on the TensorCore). libtpu rejects an unknown flag at start-up, so the tests check these
# against the installed libtpu.
LIBTPU_OVERLAP_FLAGS = (
    "--xla_tpu_enable_async_collective_fusion=true",
    "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true",
    "--xla_tpu_enable_async_collective_fusion_multiple_steps=true",
    "--xla_tpu_overlap_compute_collective_tc=true",
    "--xla_enable_async_all_gather=true",
)

# Software versions by accelerator generation (Cloud TPU's documented runtime images).
RUNTIMES = {"v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite",
            "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}


@dataclass
class Step:
    """One command of a launch plan, with a comment saying what it does."""

    comment: str
    argv: list[str]
    poll_until: str | None = None  # repeat until the output is this (queued resources)


@dataclass
class Target:
    """Where commands go: a TPU slice by name, zone and project."""

    name: str
    zone: str | None
    project: str | None = None
    queued: bool = False
    extra: list[str] = field(default_factory=list)  # more flags for gcloud ... ssh

    def flags(self) -> list[str]:
        return ([f"--zone={self.zone}"] if self.zone else []) + \
            ([f"--project={self.project}"] if self.project else [])


# ----------------------------------------------------------------------------- gcloud


def runtime_for(accelerator: str) -> str:
    generation = accelerator.split("-")[0]
    if generation not in RUNTIMES:
        raise UserError(f"no default runtime for accelerator type {shown(accelerator)}; pass "
                        "--runtime (e.g. v2-alpha-tpuv5-lite for v5litepod-*)")
    return RUNTIMES[generation]


def create_steps(t: Target, accelerator: str, runtime: str | None, spot: bool) -> list[Step]:
    runtime = runtime or runtime_for(accelerator)
    spot_flag = ["--spot"] if spot else []
    if t.queued:
        return [
            Step(f"ask for a {accelerator} slice (a queued resource; it waits for capacity)",
                 ["gcloud", "compute", "tpus", "queued-resources", "create", t.name,
                  f"--node-id={t.name}", *t.flags(), f"--accelerator-type={accelerator}",
                  f"--runtime-version={runtime}", *spot_flag]),
            Step("wait until the queued resource is ACTIVE (polled every 30 s)",
                 ["gcloud", "compute", "tpus", "queued-resources", "describe", t.name,
                  *t.flags(), "--format=value(state.state)"], poll_until="ACTIVE"),
        ]
    return [Step(f"create a {accelerator} TPU VM slice",
                 ["gcloud", "compute", "tpus", "tpu-vm", "create", t.name, *t.flags(),
                  f"--accelerator-type={accelerator}", f"--version={runtime}", *spot_flag])]


def delete_steps(t: Target) -> list[Step]:
    if t.queued:
        return [Step("delete the queued resource and its slice",
                     ["gcloud", "compute", "tpus", "queued-resources", "delete", t.name,
                      *t.flags(), "--force", "--quiet"])]
    return [Step("delete the slice", ["gcloud", "compute", "tpus", "tpu-vm", "delete", t.name,
                                      *t.flags(), "--quiet"])]


def ssh(t: Target, remote: str, worker: str = "all") -> list[str]:
    """gcloud ssh running the shell line `remote` on `worker` ("all": every host at once)."""
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", t.name, *t.flags(),
            f"--worker={worker}", *t.extra, f"--command={remote}"]


def setup_steps(t: Target, repo: str, ref: str, jax_version: str | None,
                python: str = "3.11") -> list[Step]:
    """Clone the repository at one commit on every worker and install it in a virtualenv.
    TPU VM images ship an older Python than the lab needs, so uv provides `python`."""
    jax_req = f"jax[tpu]=={jax_version}" if jax_version else "jax[tpu]"
    q = shlex.quote
    remote = " && ".join([
        "set -e",
        "(command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh)",
        'export PATH="$HOME/.local/bin:$PATH"',
        f"(test -d {q(WORKDIR)}/.git || git clone --quiet {q(repo)} {q(WORKDIR)})",
        f"cd {q(WORKDIR)}",
        "git fetch --quiet origin",
        f"git checkout --quiet --detach {q(ref)}",
        f"(test -x .venv/bin/python || uv venv --quiet --python {q(python)} .venv)",
        # the tpu extra (jax[tpu]: libtpu), pinned to the jax installed here, and the gcs extra
        # (gcsfs, through which run directories on gs:// are read and written)
        f"uv pip install --quiet --python .venv/bin/python -e {q('.[tpu,gcs]')} {q(jax_req)}",
        'echo "$(hostname): $(git rev-parse HEAD)"',  # every host must show the same commit
    ])
    return [Step(f"install the lab at {ref} on every worker", ssh(t, remote))]


def worker_ip_step(t: Target) -> Step:
    return Step("look up worker 0's internal IP (the coordinator)",
                ["gcloud", "compute", "tpus", "tpu-vm", "describe", t.name, *t.flags(),
                 "--format=value(networkEndpoints[0].ipAddress)"])


# ----------------------------------------------------------------------------- the job


def remote_command(command: list[str]) -> list[str]:
    """The command as the workers' virtualenv runs it (`lab` and `python` map to .venv)."""
    if command[:1] == ["lab"]:
        return [".venv/bin/python", "-m", "lab.cli", *command[1:]]
    if command[:1] in (["python"], ["python3"]):
        return [".venv/bin/python", *command[1:]]
    return list(command)


def with_env(commands: list[list[str]], env: dict[str, str]) -> str:
    """Commands joined by && (each runs only if the one before succeeded), each under `env`."""
    assignments = [f"{k}={v}" for k, v in env.items()]
    return " && ".join(shlex.join(["env", *assignments, *c]) for c in commands)


def job_line(commands: list[list[str]], env: dict[str, str], log_name: str) -> str:
    """The shell line every worker runs: the commands with their environment, the output kept
    in logs/LOG_NAME.log on the worker and streamed back through ssh."""
    run = with_env([remote_command(c) for c in commands], env)
    log = shlex.quote(f"logs/{log_name}.log")
    return (f"set -o pipefail; cd {shlex.quote(WORKDIR)} && mkdir -p logs && "
            f"({run}) 2>&1 | tee -a {log}")


def libtpu_init_args(user: str = "") -> str:
    """LIBTPU_INIT_ARGS: the overlap flags, then the user's; a flag the user sets keeps the
    user's value (e.g. --xla_enable_async_all_gather=false turns that one off)."""
    flags: dict[str, str] = {}
    for flag in [*LIBTPU_OVERLAP_FLAGS, *user.split()]:
        flags[flag.split("=", 1)[0]] = flag
    return " ".join(flags.values())


def job_env(coordinator: str, extra: list[str]) -> dict[str, str]:
    """The training processes' environment: the coordinator, --env NAME=VALUE, and
    LIBTPU_INIT_ARGS merged with any given by --env."""
    env = {"LAB_COORDINATOR": coordinator}
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise UserError(f"--env {shown(item)} must be NAME=VALUE")
        env[key] = value
    env["LIBTPU_INIT_ARGS"] = libtpu_init_args(env.get("LIBTPU_INIT_ARGS", ""))
    return env


def log_name(text: str) -> str:
    """The name of a job's log file under logs/."""
    return safe_name(text, limit=60)


def check_train_command(command: list[str]) -> None:
    """A `lab train` command must be valid here and write to gs://: the hosts of a pod share
    no disk, so checkpoints on a worker's own disk could not be restored by the others."""
    cfg = train_config(command, folder=ROOT)  # the workers run it from the repository's root
    if cfg is not None and not cfg.run.dir.startswith("gs://"):
        raise UserError(f"run.dir is {shown(cfg.run.dir)}; a pod run needs it on Cloud Storage, "
                        "e.g. run.dir=gs://BUCKET/runs/NAME")


def sweep_jobs(file: str, overrides: list[str], out: str) -> list[tuple[str, list[list[str]]]]:
    """(log name, commands) for each run of a sweep: `lab train`, then `lab branch` when the
    sweep has a branch plan."""
    from lab.studies.sweep import branch_command, expand_sweep

    if not out.startswith("gs://"):
        raise UserError(f"--out is {shown(out)}; a pod sweep writes to Cloud Storage, e.g. "
                        "--out gs://BUCKET/sweeps/NAME")
    sweep = expand_sweep(file, overrides, out=out)
    base = sweep.base.relative_to(ROOT) if sweep.base.is_relative_to(ROOT) else None
    if base is None:
        raise UserError(f"the sweep's base config {sweep.base} is outside the repository; "
                        "the workers only have the repository's files")
    jobs = []
    for run in sweep.runs:
        commands = [["lab", "train", str(base), *run.overrides]]
        if run.branch:
            commands.append(branch_command(run))
        jobs.append((log_name(run.slug), commands))
    return jobs


# ----------------------------------------------------------------------------- xpk


def workload_name(prefix: str, slug: str) -> str:
    """A GKE workload name: lowercase letters, digits and '-', at most 40 characters."""
    clean = re.sub(r"[^a-z0-9-]+", "-", f"{prefix}-{slug}".lower()).strip("-")
    digest = hashlib.sha1(f"{prefix}/{slug}".encode()).hexdigest()[:6]
    head = clean[:33].rstrip("-")
    return f"{head}-{digest}" if head[:1].isalpha() else f"w-{head[:31]}-{digest}"


def xpk_step(cluster: str, workload: str, accelerator: str, slices: int, image: str,
             base_image: bool, t: Target, commands: list[list[str]],
             env: dict[str, str]) -> Step:
    # In the image the repository is the working directory and its Python is on PATH.
    line = with_env([_image_command(c) for c in commands], env)
    image_flag = [f"--base-docker-image={image}", f"--script-dir={ROOT}"] if base_image \
        else [f"--docker-image={image}"]
    return Step(f"submit workload {workload}",
                ["xpk", "workload", "create", f"--cluster={cluster}", f"--workload={workload}",
                 f"--tpu-type={accelerator}", f"--num-slices={slices}", *image_flag,
                 *t.flags(), f"--command={line}"])


def _image_command(command: list[str]) -> list[str]:
    if command[:1] == ["lab"]:
        return ["python", "-m", "lab.cli", *command[1:]]
    return list(command)


# ----------------------------------------------------------------------------- running


def show(steps: list[Step], out=None) -> None:
    out = out or sys.stdout
    for step in steps:
        out.write(f"# {step.comment}\n{shlex.join(step.argv)}\n")
    out.flush()


def execute(steps: list[Step], wait_minutes: float = 240) -> int:
    """Run the steps in order; stop at the first that fails."""
    for step in steps:
        print(f"# {step.comment}\n$ {shlex.join(step.argv)}", flush=True)
        if step.poll_until:
            deadline = time.monotonic() + wait_minutes * 60
            while True:
                state = subprocess.run(step.argv, capture_output=True, text=True).stdout.strip()
                print(f"state: {state or '?'}", flush=True)
                if state == step.poll_until:
                    break
                if time.monotonic() > deadline:
                    print(f"still {state} after {wait_minutes} minutes; giving up",
                          file=sys.stderr)
                    return 1
                time.sleep(30)
            continue
        code = subprocess.run(step.argv).returncode
        if code:
            print(f"failed with exit status {code}: {step.comment}", file=sys.stderr)
            return code
    return 0


def local_repo() -> tuple[str | None, str | None]:
    """This checkout's origin URL and HEAD commit (the defaults of --repo and --ref)."""
    def git(*args: str) -> str | None:
        r = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else None
    return git("remote", "get-url", "origin"), git("rev-parse", "HEAD")


@dataclass(frozen=True)
class _Parents:
    """The option groups the actions share (argparse parents)."""

    common: argparse.ArgumentParser  # --dry-run, --zone, --project
    slice: argparse.ArgumentParser  # which TPU slice
    create: argparse.ArgumentParser
    setup: argparse.ArgumentParser
    job: argparse.ArgumentParser  # the training processes' coordinator and environment
    sweep: argparse.ArgumentParser


def _parents() -> _Parents:
    from lab.errors import ArgumentParser

    common = ArgumentParser(add_help=False)
    common.add_argument("--dry-run", action="store_true",
                        help="print the commands instead of running them")
    common.add_argument("--zone", help="e.g. us-west4-a")
    common.add_argument("--project", help="the Google Cloud project (default: gcloud's)")

    slice_ = ArgumentParser(add_help=False)
    slice_.add_argument("--name", required=True, help="the TPU (and queued resource) name")
    slice_.add_argument("--queued", action="store_true",
                        help="the slice is a queued resource (create/delete go through it)")
    slice_.add_argument("--gcloud-flag", action="append", default=[], metavar="FLAG",
                        help="extra flag for gcloud ... ssh, e.g. --gcloud-flag=--internal-ip")

    create = ArgumentParser(add_help=False)
    create.add_argument("--type", dest="accelerator", default="v5litepod-32",
                        help="accelerator type (default v5litepod-32, a v5e-32 slice)")
    create.add_argument("--runtime", help="TPU software version (default: by generation)")
    create.add_argument("--spot", action="store_true", help="spot capacity (preemptible)")
    create.add_argument("--wait-minutes", type=float, default=240,
                        help="how long to wait for a queued resource")

    setup = ArgumentParser(add_help=False)
    setup.add_argument("--repo", help="git URL the workers clone (default: this checkout's "
                                      "origin)")
    setup.add_argument("--ref", help="commit to check out on every worker (default: HEAD)")
    setup.add_argument("--jax-version", default=_installed("jax"),
                       help="jax[tpu] version to install (default: the one installed here)")
    setup.add_argument("--python", default="3.11", help="Python version on the workers")

    job = ArgumentParser(add_help=False)
    job.add_argument("--coordinator-port", type=int, metavar="PORT",
                     help=f"pass worker 0's internal IP and PORT as the coordinator address "
                          f"(e.g. {DEFAULT_PORT}; default: LAB_COORDINATOR=auto)")
    job.add_argument("--coordinator-address", metavar="IP:PORT",
                     help="the coordinator address, given outright")
    job.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                     help="more environment for the training processes")

    sweep = ArgumentParser(add_help=False)
    sweep.add_argument("sweep", metavar="SWEEP", help="a sweep file, e.g. "
                                                      "configs/sweeps/ladder-v5e.yaml")
    sweep.add_argument("overrides", nargs="*", metavar="key=value")
    sweep.add_argument("--out", required=True, help="gs:// directory of the sweep's runs")
    return _Parents(common, slice_, create, setup, job, sweep)


def build_parser() -> argparse.ArgumentParser:
    from lab.errors import ArgumentParser

    g = _parents()
    parser = ArgumentParser(prog="python -m launch.tpu",
                            description="Launch the lab on Cloud TPU pods (gcloud) or GKE (xpk).")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", parser_class=ArgumentParser)
    sub.required = True
    sub.add_parser("create", parents=[g.common, g.slice, g.create], help="create the slice")
    sub.add_parser("setup", parents=[g.common, g.slice, g.setup],
                   help="install the lab at one commit on every worker")
    p = sub.add_parser("run", parents=[g.common, g.slice, g.job],
                       help="run one command on every worker: -- lab train CONFIG k=v ...")
    p.add_argument("command", nargs=argparse.REMAINDER)
    p.add_argument("--log", default="", help="log name on the workers (default: run.name)")
    sub.add_parser("sweep", parents=[g.common, g.slice, g.job, g.sweep],
                   help="run a sweep: one job on every worker per run, in order")
    p = sub.add_parser("logs", parents=[g.common, g.slice], help="follow a log on worker 0")
    p.add_argument("log", help="the log name (a run's directory name)")
    p = sub.add_parser("delete", parents=[g.common, g.slice], help="delete the slice")
    p = sub.add_parser("up", parents=[g.common, g.slice, g.create, g.setup, g.job],
                       help="create, set up, run a sweep (or a command), delete")
    p.add_argument("--sweep", dest="up_sweep", metavar="SWEEP", help="a sweep file to run")
    p.add_argument("--out", help="gs:// directory of the sweep's runs")
    p.add_argument("--keep", action="store_true", help="keep the slice afterwards")
    p.add_argument("command", nargs=argparse.REMAINDER,
                   help="-- overrides for the sweep, or a command when there is no --sweep")
    _add_xpk(sub, g)
    return parser


def _add_xpk(sub, g: _Parents) -> None:
    """The GKE actions: xpk-run (one command) and xpk-sweep (one workload per run)."""
    for name, text in [("xpk-run", "submit one command as a GKE workload"),
                       ("xpk-sweep", "submit one GKE workload per run of a sweep")]:
        p = sub.add_parser(name, parents=[g.common, g.job] + ([g.sweep] if name == "xpk-sweep"
                                                                else []), help=text)
        p.add_argument("--cluster", required=True, help="the xpk (GKE) cluster")
        p.add_argument("--type", dest="accelerator", default="v5litepod-32")
        p.add_argument("--num-slices", type=int, default=1)
        image = p.add_mutually_exclusive_group(required=True)
        image.add_argument("--docker-image", help="an image with the lab installed")
        image.add_argument("--base-docker-image",
                           help="a base image; xpk adds this directory to it")
        if name == "xpk-run":
            p.add_argument("--workload", required=True, help="the workload name")
            p.add_argument("command", nargs=argparse.REMAINDER)


def _installed(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def coordinator(args: argparse.Namespace, t: Target, steps: list[Step],
                dry_run: bool) -> str:
    """LAB_COORDINATOR for the workers; looks up worker 0's IP for --coordinator-port."""
    if args.coordinator_address:
        return args.coordinator_address
    if not args.coordinator_port:
        return "auto"
    lookup = worker_ip_step(t)
    if dry_run:
        steps.append(lookup)
        return f"WORKER0_IP:{args.coordinator_port}"  # filled in by the lookup when run
    r = subprocess.run(lookup.argv, capture_output=True, text=True)
    ip = r.stdout.strip()
    if r.returncode or not ip:
        raise UserError(f"could not look up worker 0's IP of {t.name} ({r.stderr.strip()}); "
                        "pass --coordinator-address IP:PORT")
    return f"{ip}:{args.coordinator_port}"


def steps_for(args: argparse.Namespace) -> list[Step]:
    """The commands an action runs, in order."""
    if args.action.startswith("xpk"):
        return xpk_steps(args)
    if not args.zone:
        raise UserError("--zone is needed, e.g. --zone us-west4-a")
    t = Target(args.name, args.zone, args.project, args.queued, list(args.gcloud_flag))
    steps: list[Step] = []
    if args.action in ("create", "up"):
        steps += create_steps(t, args.accelerator, args.runtime, args.spot)
    if args.action in ("setup", "up"):
        repo, ref = local_repo()
        repo, ref = args.repo or repo, args.ref or ref
        if not repo or not ref:
            raise UserError("no git origin or commit found here; pass --repo URL and --ref SHA")
        steps += setup_steps(t, repo, ref, args.jax_version, args.python)
    if args.action in ("run", "sweep", "up"):
        jobs = _jobs(args)
        env = job_env(coordinator(args, t, steps, args.dry_run), args.env)
        for name, commands in jobs:
            steps.append(Step(f"job {name}: on every worker",
                              ssh(t, job_line(commands, env, name))))
    if args.action == "logs":
        log = shlex.quote(f"logs/{log_name(args.log)}.log")
        steps.append(Step("follow the log on worker 0", ssh(
            t, f"tail -n 200 -F {shlex.quote(WORKDIR)}/{log}", worker="0")))
    if args.action == "delete" or (args.action == "up" and not args.keep):
        steps += delete_steps(t)
    return steps


def _jobs(args: argparse.Namespace) -> list[tuple[str, list[list[str]]]]:
    if args.action == "sweep":
        return sweep_jobs(args.sweep, args.overrides, args.out)
    words = after_dashes(args.command)
    if args.action == "up" and args.up_sweep:
        if not args.out:
            raise UserError("up --sweep needs --out gs://BUCKET/sweeps/NAME")
        return sweep_jobs(args.up_sweep, words, args.out)
    if not words:
        raise UserError("no command: put it after --, e.g. -- lab train "
                        "configs/tpu/v5e-ladder.yaml run.dir=gs://BUCKET/runs/NAME")
    check_train_command(words)
    name = getattr(args, "log", "") or _run_name(words) or "job"
    return [(log_name(name), [words])]


def _run_name(command: list[str]) -> str:
    for word in command:
        for key in ("run.name=", "run.dir="):
            if word.startswith(key):
                return word[len(key):].rstrip("/").rsplit("/", 1)[-1]
    return ""


def xpk_steps(args: argparse.Namespace) -> list[Step]:
    t = Target("", args.zone, args.project)
    env = job_env(args.coordinator_address or "auto", args.env)
    image = args.docker_image or args.base_docker_image
    base_image = bool(args.base_docker_image)
    if args.action == "xpk-sweep":
        prefix = Path(args.sweep).stem
        jobs = [(workload_name(prefix, name), cmd)
                for name, cmd in sweep_jobs(args.sweep, args.overrides, args.out)]
    else:
        words = after_dashes(args.command)
        if not words:
            raise UserError("no command: put it after --, e.g. -- lab train CONFIG "
                            "run.dir=gs://BUCKET/runs/NAME")
        check_train_command(words)
        if not re.fullmatch(r"[a-z]([a-z0-9-]{0,38}[a-z0-9])?", args.workload):
            raise UserError(f"--workload {shown(args.workload)} must be lowercase letters, "
                            "digits and "
                            "'-', start with a letter and be at most 40 characters")
        jobs = [(args.workload, [words])]
    steps = [xpk_step(args.cluster, w, args.accelerator, args.num_slices, image, base_image,
                      t, commands, env) for w, commands in jobs]
    steps.append(Step("watch the workloads", ["xpk", "workload", "list",
                                              f"--cluster={args.cluster}", *t.flags()]))
    return steps


def launch(args: argparse.Namespace) -> int:
    """Plan the steps, then show them (--dry-run) or run them."""
    steps = steps_for(args)
    if args.dry_run:
        show(steps)
        return 0
    return execute(steps, getattr(args, "wait_minutes", 240))


def main(argv: list[str] | None = None) -> int:
    return run_main(build_parser(), launch, argv)


if __name__ == "__main__":
    sys.exit(main())
