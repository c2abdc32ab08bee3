"""launch.gpu: the environment and command of a GPU debug launch (shown by --dry-run and
rehearsed on the CPU), and the step-window profiler it asks for."""

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from lab.accel.profiling import StepProfiler, parse_window
from lab.errors import UserError
from launch.gpu import (
    CUDA_INSTALL,
    CUDA_PLUGINS,
    LATENCY_HIDING,
    XLA_GPU_FLAGS,
    check_backend,
    default_xla_flags,
    gpu_env,
)

ROOT = Path(__file__).resolve().parents[1]


def launch_gpu(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.gpu", *args], cwd=ROOT,
                          env=env or dict(os.environ), capture_output=True, text=True,
                          timeout=300)


def test_dry_run_prints_the_environment_and_the_command():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    result = launch_gpu(["--dry-run", "--mem-fraction", "0.5", "--profile-steps", "20:5",
                         "--xla-flag=--xla_gpu_enable_triton_gemm=false", "--",
                         "lab", "train", "configs/gpu/debug.yaml", "train.steps=300"], env)
    assert result.returncode == 0, result.stderr
    words = shlex.split(result.stdout)
    assert words[0] == "env"
    start = words.index(sys.executable)
    assignments = dict(w.split("=", 1) for w in words[1:start])
    assert words[start:] == [sys.executable, "-m", "lab.cli", "train", "configs/gpu/debug.yaml",
                             "train.steps=300"]
    assert assignments["JAX_PLATFORMS"] == "cuda"
    assert assignments["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.5"
    # The lab's flags (the --xla-flag repeats one of them, so it appears once), then the user's.
    assert assignments["XLA_FLAGS"].split() == [*default_xla_flags(),
                                                "--xla_force_host_platform_device_count=8"]
    assert assignments["LAB_PROFILE_STEPS"] == "20:5"
    assert assignments["LAB_PROFILE_DIR"] == "runs/profile"


def test_environment_options():
    env = gpu_env({"XLA_PYTHON_CLIENT_MEM_FRACTION": ".75", "XLA_FLAGS": LATENCY_HIDING},
                  preallocate=False, gpus="0,1", dump_hlo="/tmp/hlo", latency_hiding=True)
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION" not in env
    assert env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert env["XLA_FLAGS"].split() == [*default_xla_flags(), "--xla_dump_to=/tmp/hlo"]
    assert "XLA_FLAGS" not in gpu_env({}, xla_defaults=False)
    for bad in [dict(mem_fraction=1.5), dict(xla_flags=["xla_foo"]),
                dict(profile_steps="5:0")]:
        with pytest.raises(UserError):
            gpu_env({}, **bad)
    assert parse_window("7") == (10, 7) and parse_window("3:2") == (3, 2)


def test_the_users_xla_flags_win_over_the_labs():
    """Merged by flag name, each once: a flag the user sets (in XLA_FLAGS, then --xla-flag, the
    later winning) replaces the lab's value; --no-xla-defaults keeps only the user's."""
    user_env = "--xla_gpu_enable_triton_gemm=true --xla_dump_to=/d"
    flags = gpu_env({"XLA_FLAGS": user_env}, xla_flags=[
        "--xla_gpu_enable_command_buffer=FUSION", "--xla_dump_to=/e"])["XLA_FLAGS"].split()
    replaced = {"--xla_gpu_enable_triton_gemm=false", "--xla_gpu_enable_command_buffer="}
    assert replaced <= set(default_xla_flags())
    assert flags == [("--xla_gpu_enable_triton_gemm=true" if f.startswith("--xla_gpu_enable_tri")
                      else "--xla_gpu_enable_command_buffer=FUSION" if f in replaced else f)
                     for f in default_xla_flags()] + ["--xla_dump_to=/e"]
    assert gpu_env({"XLA_FLAGS": user_env}, xla_defaults=False)["XLA_FLAGS"] == user_env
    no_lhs = gpu_env({}, latency_hiding=False)["XLA_FLAGS"].split()
    assert no_lhs == [f for f in default_xla_flags() if f != LATENCY_HIDING]
    assert len(XLA_GPU_FLAGS) >= 5 and all(f.source and f.effect for f in XLA_GPU_FLAGS)
    shown = shlex.split(launch_gpu(["--dry-run", "--no-xla-defaults", "--", "lab", "train",
                                    "configs/tiny.yaml"], dict(os.environ, XLA_FLAGS="")).stdout)
    assert not any(w.startswith("XLA_FLAGS=") for w in shown)


def test_the_labs_xla_flags_exist_in_the_installed_jaxlib():
    """XLA stops at start-up on a flag it does not know (a renamed or retired one, such as
    MaxText's --xla_gpu_graph_level), and it parses the GPU flags on any backend: the CPU checks
    every name in XLA_GPU_FLAGS, and that an unknown one does fail."""
    def start(flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", "import jax; jax.numpy.zeros(1)"],
                              env=dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu"),
                              capture_output=True, text=True, timeout=300)

    known = start(" ".join(default_xla_flags()))
    assert known.returncode == 0, known.stderr[-2000:]
    unknown = start("--xla_gpu_graph_level=0")
    assert unknown.returncode != 0 and "Unknown flag" in unknown.stderr


def test_a_config_mistake_fails_before_the_gpu_starts():
    result = launch_gpu(["--dry-run", "--", "lab", "train", "configs/gpu/debug.yaml",
                         "train.stepz=5"])
    assert result.returncode == 2
    assert result.stderr.startswith("error: unknown config key 'train.stepz'")
    assert launch_gpu(["--dry-run"]).returncode == 2


def test_a_preset_is_checked_from_any_folder(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for name in ("gpu/debug", "configs/gpu/debug.yaml"):
        result = subprocess.run([sys.executable, "-m", "launch.gpu", "--dry-run", "--", "lab",
                                 "train", name, "train.steps=300"], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        assert shlex.split(result.stdout)[-3:] == ["train", name, "train.steps=300"]


def test_no_cuda_backend_is_one_line_naming_the_install(monkeypatch):
    result = launch_gpu(["--", "lab", "train", "configs/gpu/debug.yaml"])
    if not any(importlib.util.find_spec(p) for p in CUDA_PLUGINS):  # this machine: no plugin
        assert result.returncode == 2 and result.stdout == ""
        assert result.stderr.count("\n") == 1
        assert "pip install -e '.[cuda12]'" in result.stderr
    # The check itself, whatever this machine has installed: no plugin, or either one alone
    # (the H200 this was checked on had jax's CUDA 13 plugin and no CUDA 12 one).
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=re.escape(CUDA_INSTALL)):
        check_backend("cuda")
    check_backend("cpu")  # a CPU rehearsal needs no plugin
    for present in CUDA_PLUGINS:
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, present=present: object() if name == present else None)
        check_backend("cuda")


CHILD = """
import json, os, sys
import jax, jax.numpy as jnp
from lab.accel.profiling import StepProfiler
prof = StepProfiler()
x = jnp.ones((64, 64))
started = []
for step in range(6):
    prof.step(step, wait_for=x)
    started.append(prof.active)
    x = jnp.tanh(x @ x)
prof.stop(x)
print(json.dumps({"platform": jax.devices()[0].platform, "active": started,
                  "fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")}))
sys.exit(7)
"""


def test_cpu_rehearsal_runs_the_command_with_its_environment_and_status(tmp_path):
    result = launch_gpu(["--platform", "cpu", "--profile-steps", "2:3", "--profile-dir",
                         str(tmp_path / "prof"), "--", sys.executable, "-c", CHILD])
    assert result.returncode == 7, result.stderr  # the command's own exit status
    report = json.loads(result.stdout.splitlines()[-1])
    assert report == {"platform": "cpu", "active": [False, False, True, True, True, False],
                      "fraction": "0.9"}
    traces = list((tmp_path / "prof").glob("plugins/profile/*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0


def test_profiler_does_nothing_without_the_variables(tmp_path):
    prof = StepProfiler(env={}, default_dir=str(tmp_path))
    for step in range(20):
        prof.step(step)
    assert not prof.active and not any(tmp_path.iterdir())


@pytest.mark.slow
def test_the_same_config_trains_through_the_gpu_launcher_on_cpu(tmp_path, small_data):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    result = launch_gpu(["--platform", "cpu", "--", "lab", "train", "configs/tiny.yaml",
                         f"data.path={small_data}", f"run.dir={tmp_path / 'run'}",
                         "train.steps=4", "train.log_every=2", "schedule.warmup_steps=1",
                         "schedule.decay_steps=1", "train.eval_batches=1"], env)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 4
