"""JAX's persistent compilation cache, kept under the lab's cache directory.

A rerun, a resumed run, a branch or another run of a sweep with the same shapes loads its
compiled train step from disk instead of compiling it again. On by default, in
`lab.paths.cache_dir()/jax-compilation`; the environment variable LAB_COMPILATION_CACHE
turns it off (`0`) or moves it (a directory). JAX reads its settings when it is imported, so
`enable()` sets them as environment variables (inherited by every child process, e.g. the runs
of a sweep) and, when JAX is already imported, through `jax.config` too. It must run before the
first compilation.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lab.paths import cache_dir

ENV_VAR = "LAB_COMPILATION_CACHE"
OFF = ("0", "false", "no", "off")
ON = ("", "1", "true", "yes", "on")
# Programs that compile faster than this are not written: a cache read costs more than that
# for the many small jitted helpers (JAX's own default is 1 s).
MIN_COMPILE_SECS = 0.5
# Least recently used entries go beyond this size (JAX then locks the directory with filelock,
# which also keeps concurrent test workers from reading half-written entries).
MAX_BYTES = 4 << 30


def cache_path(environ: dict[str, str] | None = None) -> Path | None:
    """Where compiled programs go, or None when LAB_COMPILATION_CACHE turns the cache off."""
    environ = os.environ if environ is None else environ
    value = environ.get(ENV_VAR, "").strip()
    if value.lower() in OFF:
        return None
    if value.lower() in ON:
        return cache_dir() / "jax-compilation"
    return Path(value).expanduser()


def settings(path: Path) -> dict[str, str | float | int]:
    """JAX's configuration options for a cache at `path`, by option name."""
    return {"jax_compilation_cache_dir": str(path),
            "jax_persistent_cache_min_compile_time_secs": MIN_COMPILE_SECS,
            "jax_compilation_cache_max_size": MAX_BYTES}


def enable() -> Path | None:
    """Turn the persistent cache on for this process and its children (unless it is off);
    options the user set in JAX's own environment variables win. Returns the directory."""
    path = cache_path()
    wanted = {} if path is None else settings(path)
    if path is None:
        os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    for name, value in wanted.items():
        os.environ.setdefault(name.upper(), str(value))
    if "jax" in sys.modules:  # too late for the environment: JAX read it when imported
        import jax

        jax.config.update("jax_enable_compilation_cache", path is not None)
        for name, value in wanted.items():
            jax.config.update(name, type(value)(os.environ[name.upper()]))
    return None if path is None else Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
