"""The persistent compilation cache: a second process loads what the first compiled (JAX's own
hit counter, and the access times the cache rewrites on every hit), small programs are not
written, LAB_COMPILATION_CACHE=0 turns it off, and `lab train` uses it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import TINY
from lab.accel import compile_cache

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, time
from lab.accel import compile_cache
path = compile_cache.enable()
import jax, jax.numpy as jnp
hits = []
jax.monitoring.register_event_listener(
    lambda event, **kw: hits.append(event) if event == "/jax/compilation_cache/cache_hits"
    else None)
def f(x):  # big enough to take a while to compile
    for i in range(int(sys.argv[1])):
        x = jnp.tanh(x @ x.T + i) if i % 2 else jnp.sin(x) * x.sum(0)
    return x
start = time.perf_counter()
jax.jit(f).lower(jnp.ones((16, 16))).compile()
print(json.dumps({"path": str(path) if path else None, "hits": len(hits),
                  "seconds": time.perf_counter() - start}))
"""


def child(env_update: dict[str, str], layers: int = 40) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("JAX_") and k != compile_cache.ENV_VAR}
    env.update(JAX_PLATFORMS="cpu", **env_update)
    r = subprocess.run([sys.executable, "-c", CHILD, str(layers)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.splitlines()[-1])


def entries(path: Path) -> dict[str, bytes]:
    """Cache entries by name, with their last-access stamps (rewritten on every hit)."""
    return {p.name: p.read_bytes() for p in path.glob("*-atime")} if path.exists() else {}


def test_second_process_loads_what_the_first_compiled_unless_off(tmp_path):
    where = tmp_path / "cc"
    # No threshold, so the test does not depend on how fast this machine compiles.
    env = {compile_cache.ENV_VAR: str(where), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    first = child(env)
    assert first["path"] == str(where) and first["hits"] == 0
    written = entries(where)
    assert written, "the first process wrote nothing"
    second = child(env)
    assert second["hits"] >= 1
    after = entries(where)
    assert after.keys() == written.keys()  # nothing new compiled ...
    assert all(after[k] != written[k] for k in written)  # ... and every entry was read
    print(f"compile {first['seconds']:.2f} s, from the cache {second['seconds']:.2f} s")
    off = child({**env, compile_cache.ENV_VAR: "0"})
    assert off["path"] is None and off["hits"] == 0 and entries(where) == after


def test_small_programs_are_not_written(tmp_path):
    # A program that compiles in well under MIN_COMPILE_SECS, in the default directory.
    small = child({"LAB_CACHE_DIR": str(tmp_path)}, layers=1)
    assert small["path"] == str(tmp_path / "jax-compilation")
    assert small["hits"] == 0 and not entries(tmp_path / "jax-compilation")


def test_cache_path_and_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("LAB_CACHE_DIR", str(tmp_path))
    for value, expected in [("", tmp_path / "jax-compilation"), ("1", tmp_path / "jax-compilation"),
                            ("0", None), ("False", None), ("~/x", Path.home() / "x")]:
        assert compile_cache.cache_path({compile_cache.ENV_VAR: value}) == expected, value
    assert compile_cache.settings(tmp_path)["jax_persistent_cache_min_compile_time_secs"] > 0


STEPS = {"jit_init_fn", "jit_train_step", "jit_eval_step"}  # what lab.train compiles


@pytest.mark.slow
def test_lab_train_reuses_its_compiled_step(tmp_path, small_data):
    where = tmp_path / "cc"
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION")}
    env.update({compile_cache.ENV_VAR: str(where),
                "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"})
    args = [sys.executable, "-m", "lab.cli", "train", str(TINY), f"data.path={small_data}",
            "train.steps=2", "train.log_every=1", "train.eval_every=0", "train.eval_batches=1",
            "model.n_layers=1",
            "checkpoint.every_steps=0", "schedule.warmup_steps=1", "schedule.decay_steps=1"]
    for name in ("a", "b"):
        r = subprocess.run([*args, f"run.dir={tmp_path / name}"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        if name == "a":
            written = entries(where)
            assert written
    after = entries(where)
    assert after.keys() == written.keys()  # the second run compiled nothing new ...
    steps = {k.split("-")[0]: k for k in written if k.split("-")[0] in STEPS}
    assert steps.keys() == STEPS
    assert all(after[k] != written[k] for k in steps.values())  # ... and read its steps
