"""launch.tpu: the gcloud and xpk commands of a pod launch, checked from --dry-run output and
by running them against a stand-in gcloud that executes the workers' shell line in bash."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lab.studies.sweep import expand_sweep
from launch import tpu

ROOT = Path(__file__).resolve().parents[1]
HOSTILE = "a b;rm -rf ~'\""
SLICE = ["--name", "lab-v5e", "--zone", "us-west4-a"]
SOURCE = ["--repo", "https://example.com/lab.git", "--ref", "0123abc"]
OVERLAP = " ".join(tpu.LIBTPU_OVERLAP_FLAGS)


def three_run_sweep(tmp_path: Path, name: str = HOSTILE) -> Path:
    spec = {"base": str(ROOT / "configs" / "tpu" / "v5e-ladder.yaml"), "kind": "ladder",
            "tokens": 1.0e9, "warmup_fraction": 0.02, "decay_fraction": 0.2,
            "sizes": [{"name": name, "d_model": 512, "n_layers": 4, "n_heads": 4},
                      {"d_model": 768, "n_layers": 6, "n_heads": 6}, 2.0e8]}
    path = tmp_path / "three.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def dry_run(capsys, argv: list[str]) -> list[tuple[str, list[str]]]:
    """(comment, argv) of each printed command, parsed back as a shell would."""
    assert tpu.main([argv[0], "--dry-run", *argv[1:]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) % 2 == 0
    return [(lines[i][2:], shlex.split(lines[i + 1])) for i in range(0, len(lines), 2)]


def option(argv: list[str], name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in argv if a.startswith(f"{name}=")]
    return value


def test_v5e_32_sweep_dry_run_is_the_whole_plan(tmp_path, capsys):
    sweep_file = three_run_sweep(tmp_path)
    steps = dry_run(capsys, ["up", *SLICE, "--type", "v5litepod-32", "--queued", *SOURCE,
                             "--sweep", str(sweep_file), "--out", "gs://bkt/sweeps/three",
                             "--", "data.path=gs://bkt/data"])
    commands = [argv for _, argv in steps]
    assert commands[0] == ["gcloud", "compute", "tpus", "queued-resources", "create", "lab-v5e",
                           "--node-id=lab-v5e", "--zone=us-west4-a",
                           "--accelerator-type=v5litepod-32",
                           "--runtime-version=v2-alpha-tpuv5-lite"]
    assert commands[1][:6] == ["gcloud", "compute", "tpus", "queued-resources", "describe",
                               "lab-v5e"]
    assert commands[-1] == ["gcloud", "compute", "tpus", "queued-resources", "delete",
                            "lab-v5e", "--zone=us-west4-a", "--force", "--quiet"]

    setup = commands[2]
    assert setup[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "lab-v5e"]
    assert "--worker=all" in setup
    script = option(setup, "--command")
    assert "git clone --quiet https://example.com/lab.git scaling-lab" in script
    assert "git checkout --quiet --detach 0123abc" in script  # one commit on every host
    assert "'jax[tpu]==" in script
    assert "-e '.[tpu,gcs]'" in script  # libtpu, and gcsfs: run directories are on gs://

    jobs = commands[3:-1]
    sweep = expand_sweep(sweep_file, ["data.path=gs://bkt/data"], out="gs://bkt/sweeps/three")
    assert len(jobs) == len(sweep.runs) == 3
    for argv, run in zip(jobs, sweep.runs, strict=True):
        assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "lab-v5e"]
        assert "--worker=all" in argv  # every host runs the same program
        line = option(argv, "--command")
        words = shlex.split(line)
        start = words.index("(env")
        end = words.index("2>&1")
        train = words[start + 1:end]
        train[-1] = train[-1].removesuffix(")")  # the group ( ... ) around the commands
        assert train[:2] == ["LAB_COORDINATOR=auto", f"LIBTPU_INIT_ARGS={OVERLAP}"]
        assert train[2:] == [".venv/bin/python", "-m", "lab.cli", "train",
                             "configs/tpu/v5e-ladder.yaml", *run.overrides]
        assert run.dir.startswith("gs://bkt/sweeps/three/")
        assert words[-1] == f"logs/{run.slug}.log"
    first = shlex.split(option(jobs[0], "--command"))
    assert f"run.name={HOSTILE}" in first  # one word, byte for byte, after both shells


def test_explicit_coordinator_port_looks_up_worker_0(tmp_path, capsys):
    steps = dry_run(capsys, ["sweep", *SLICE, str(three_run_sweep(tmp_path, "plain")),
                             "--out", "gs://bkt/s", "--coordinator-port", "8476"])
    lookup, *jobs = [argv for _, argv in steps]
    assert lookup == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "lab-v5e",
                      "--zone=us-west4-a", "--format=value(networkEndpoints[0].ipAddress)"]
    for argv in jobs:
        assert "LAB_COORDINATOR=WORKER0_IP:8476" in shlex.split(option(argv, "--command"))


def test_single_run_needs_gs_paths_and_logs_follow_worker_0(capsys):
    code = tpu.main(["run", *SLICE, "--dry-run", "--", "lab", "train", "configs/tiny.yaml"])
    assert code == 2
    assert "run.dir is 'runs/tiny'; a pod run needs it on Cloud Storage" in capsys.readouterr().err
    steps = dry_run(capsys, ["run", *SLICE, "--env", "XLA_FLAGS=--xla_dump_to=/tmp/d", "--",
                             "lab", "train", "configs/tiny.yaml", "run.dir=gs://b/r/first"])
    (comment, argv), = steps
    words = shlex.split(option(argv, "--command"))
    assert "LAB_COORDINATOR=auto" in words and "XLA_FLAGS=--xla_dump_to=/tmp/d" in words
    assert words[-1] == "logs/first.log"
    ((_, logs),) = dry_run(capsys, ["logs", *SLICE, "first"])
    assert "--worker=0" in logs and option(logs, "--command").endswith("logs/first.log")
    # A preset name is checked as the workers' `lab train` reads it.
    steps = dry_run(capsys, ["run", *SLICE, "--", "lab", "train", "tpu/v5e-ladder",
                             "run.dir=gs://b/r/preset"])
    assert shlex.split(option(steps[0][1], "--command"))[-1] == "logs/preset.log"
    assert tpu.main(["run", *SLICE, "--dry-run", "--", "lab", "train", "tpu/nope"]) == 2
    assert "is no preset" in capsys.readouterr().err


def test_tpu_vm_create_and_delete_without_queueing(capsys):
    (_, create), = dry_run(capsys, ["create", *SLICE, "--type", "v6e-16", "--spot",
                                    "--project", "p1"])
    assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "lab-v5e",
                      "--zone=us-west4-a", "--project=p1", "--accelerator-type=v6e-16",
                      "--version=v2-alpha-tpuv6e", "--spot"]
    (_, delete), = dry_run(capsys, ["delete", *SLICE])
    assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "lab-v5e",
                      "--zone=us-west4-a", "--quiet"]
    assert tpu.main(["create", *SLICE, "--type", "v9x-8", "--dry-run"]) == 2


def test_xpk_sweep_is_one_workload_per_run(tmp_path, capsys):
    sweep_file = three_run_sweep(tmp_path)
    steps = dry_run(capsys, ["xpk-sweep", "--cluster", "c1", "--docker-image", "gcr.io/p/lab:1",
                             str(sweep_file), "--out", "gs://bkt/s"])
    *submits, watch = [argv for _, argv in steps]
    assert watch == ["xpk", "workload", "list", "--cluster=c1"]
    names = [option(a, "--workload") for a in submits]
    assert len(set(names)) == 3
    for name in names:
        assert re.fullmatch(r"[a-z][a-z0-9-]{0,38}[a-z0-9]", name), name
    sweep = expand_sweep(sweep_file, out="gs://bkt/s")
    for argv, run in zip(submits, sweep.runs, strict=True):
        assert argv[:3] == ["xpk", "workload", "create"]
        assert "--tpu-type=v5litepod-32" in argv and "--docker-image=gcr.io/p/lab:1" in argv
        assert shlex.split(option(argv, "--command")) == [
            "env", "LAB_COORDINATOR=auto", f"LIBTPU_INIT_ARGS={OVERLAP}", "python", "-m",
            "lab.cli", "train", "configs/tpu/v5e-ladder.yaml", *run.overrides]


def test_branch_plans_run_lab_branch_after_the_stable_run(capsys):
    steps = dry_run(capsys, ["sweep", *SLICE, str(ROOT / "configs/sweeps/branch-tiny.yaml"),
                             "--out", "gs://b/br"])
    line = option(steps[0][1], "--command")
    # `lab branch` runs only once `lab train` has succeeded (&&), under the same environment
    env = shlex.join(["LAB_COORDINATOR=auto", f"LIBTPU_INIT_ARGS={OVERLAP}"])
    train, branch = line.split(f" && env {env} .venv/bin/python -m lab.cli branch ")
    assert " lab.cli train configs/tiny.yaml " in train
    assert shlex.split(branch)[:4] == ["gs://b/br/d64-l2", "--at", "200,400,800",
                                       "--decay-steps"]


FAKE_GCLOUD = """#!{python}
# A stand-in gcloud: `ssh` runs the workers' shell line in bash in a fake home directory;
# `describe` answers worker 0's IP; everything else succeeds silently.
import os, subprocess, sys
args = sys.argv[1:]
with open(os.environ["GCLOUD_LOG"], "a") as f:
    f.write(repr(args) + "\\n")
if "ssh" in args:
    command = [a for a in args if a.startswith("--command=")][0].split("=", 1)[1]
    sys.exit(subprocess.run(["bash", "-c", command], cwd=os.environ["FAKE_HOME"]).returncode)
if "describe" in args:
    print("10.1.2.3")
"""

FAKE_PYTHON = """#!{python}
import json, os, sys
with open(os.environ["ARGV_LOG"], "a") as f:
    f.write(json.dumps([os.environ.get("LAB_COORDINATOR"), sys.argv[1:]]) + "\\n")
print("trained")
"""


def test_commands_survive_real_shells_with_a_hostile_name(tmp_path):
    hostile = "x y;touch PWNED;'\"$(touch PWNED2)`touch PWNED3`"
    sweep_file = three_run_sweep(tmp_path, hostile)
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    venv = home / "scaling-lab" / ".venv" / "bin"
    venv.mkdir(parents=True)
    bin_dir.mkdir()
    for path, text in [(bin_dir / "gcloud", FAKE_GCLOUD), (venv / "python", FAKE_PYTHON)]:
        path.write_text(text.format(python=sys.executable))
        path.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_HOME=str(home),
               ARGV_LOG=str(tmp_path / "argv.jsonl"), GCLOUD_LOG=str(tmp_path / "gcloud.log"))
    args = ["sweep", *SLICE, str(sweep_file), "--out", "gs://bkt/s", "--coordinator-port", "8476"]

    # Run for real through the stand-in gcloud (argument lists, no local shell) ...
    result = subprocess.run([sys.executable, "-m", "launch.tpu", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    # ... and paste the dry run's lines into bash, as a user would.
    shown = subprocess.run([sys.executable, "-m", "launch.tpu", *args, "--dry-run"], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=120).stdout
    jobs = [line for line in shown.splitlines() if "--worker=all" in line]
    for line in jobs:
        assert subprocess.run(["bash", "-c", line], env=env, cwd=tmp_path).returncode == 0

    sweep = expand_sweep(sweep_file, out="gs://bkt/s")
    calls = [json.loads(line) for line in (tmp_path / "argv.jsonl").read_text().splitlines()]
    expected = [["-m", "lab.cli", "train", "configs/tpu/v5e-ladder.yaml", *r.overrides]
                for r in sweep.runs]
    assert [argv for _, argv in calls] == expected * 2
    assert [c for c, _ in calls] == ["10.1.2.3:8476"] * 3 + ["WORKER0_IP:8476"] * 3
    assert f"run.name={hostile}" in calls[0][1]
    for where in (tmp_path, home, home / "scaling-lab", ROOT):
        assert not list(where.glob("PWNED*")), where
    logs = sorted(p.name for p in (home / "scaling-lab" / "logs").iterdir())
    assert logs == sorted(f"{r.slug}.log" for r in sweep.runs)
    assert (home / "scaling-lab" / "logs" / logs[0]).read_text().count("trained") == 2


@pytest.mark.parametrize("argv, message", [
    (["sweep", *SLICE, "configs/sweeps/lr-tiny.yaml", "--out", "runs/x"], "--out is 'runs/x'"),
    (["run", *SLICE, "--"], "no command"),
    (["run", "--name", "n", "--", "lab", "train", "configs/tiny.yaml"], "--zone is needed"),
    (["run", *SLICE, "--env", "1X=2", "--", "echo"], "must be NAME=VALUE"),
    (["xpk-run", "--cluster", "c", "--docker-image", "i", "--workload", "My_Run", "--", "echo"],
     "must be lowercase letters"),
])
def test_mistakes_are_one_line_errors(capsys, argv, message):
    assert tpu.main([argv[0], "--dry-run", *argv[1:]]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_libtpu_flags_overlap_collectives_and_merge_with_the_users(capsys):
    assert tpu.libtpu_init_args() == OVERLAP
    merged = tpu.libtpu_init_args("--xla_enable_async_all_gather=false --xla_tpu_foo=1")
    assert merged.split() == [*tpu.LIBTPU_OVERLAP_FLAGS[:-1], "--xla_enable_async_all_gather=false",
                              "--xla_tpu_foo=1"]  # the user's value wins, each flag once
    steps = dry_run(capsys, ["run", *SLICE, "--env", "LIBTPU_INIT_ARGS=--xla_tpu_foo=1", "--",
                             "lab", "train", "configs/tiny.yaml", "run.dir=gs://b/r/x"])
    words = shlex.split(option(steps[0][1], "--command"))
    (libtpu,) = [w for w in words if w.startswith("LIBTPU_INIT_ARGS=")]
    assert libtpu == f"LIBTPU_INIT_ARGS={OVERLAP} --xla_tpu_foo=1"


def test_libtpu_accepts_the_flags():
    """libtpu stops at start-up on a flag it does not know: start it (on this CPU host, for an
    abstract v5e topology) with the launcher's flags."""
    pytest.importorskip("libtpu")
    code = ("from jax.experimental import topologies; "
            "t = topologies.get_topology_desc(topology_name='v5e:2x2', platform='tpu'); "
            "print('devices', len(t.devices))")
    for flags, ok in [(OVERLAP, True), ("--xla_tpu_no_such_flag=true", False)]:
        env = dict(os.environ, LIBTPU_INIT_ARGS=flags, ALLOW_MULTIPLE_LIBTPU_LOAD="1",
                   TPU_SKIP_MDS_QUERY="1")
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                           text=True, timeout=300)
        assert ("devices 4" in r.stdout) == ok, (flags, r.stdout, r.stderr[-2000:])
