"""Test-wide set-up: eight fake CPU devices, so sharded and unsharded runs can be compared.

XLA reads the flag when the backend starts, so it must be set before anything imports jax.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from lab.accel import compile_cache  # noqa: E402

# Compiled programs persist between test sessions (in the user's cache, unlike the prepared
# data below) and reach the `lab` subprocesses through the environment. LAB_COMPILATION_CACHE=0
# runs the tests without it.
if (_compiled := compile_cache.cache_path()) is not None:
    os.environ.setdefault(compile_cache.ENV_VAR, str(_compiled))
compile_cache.enable()

import shutil  # noqa: E402
import sysconfig  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep the default-corpus cache of a test session out of the user's home."""
    os.environ.setdefault("LAB_CACHE_DIR", str(tmp_path_factory.mktemp("lab-cache")))


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> str:
    """A small prepared byte-level corpus (about 1.5 MB of stdlib source), made once a session."""
    from lab.data import prepare

    src = tmp_path_factory.mktemp("small-corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in sorted(p.name for p in stdlib.glob("*.py"))[:60]:
        shutil.copy(stdlib / name, src / name)
    out = tmp_path_factory.mktemp("small-data") / "prepared"
    prepare(str(src), str(out), tokenizer="byte")
    return str(out)
