"""Model FLOPs utilisation: model FLOPs per token x tokens/s over the hardware's peak.

Accelerators use their dense bfloat16 peak from the table in `lab.accel.chips`, matched by the
exact device kind: MFU = global model FLOP/s / (devices x one chip's peak). A CPU has no
published number that means anything, so its peak is measured once by a matrix-multiply probe
(2048^3, the dtype the model's matmuls use) and cached; `run.peak_tflops` in the config
overrides either.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from lab import paths
from lab.accel.chips import chip_for


def _cache_file() -> Path:
    return paths.cache_dir() / "matmul_peak.json"


def probe_matmul_peak(dtype: str = "float32", size: int = 2048, repeats: int = 5) -> float:
    """Measured FLOP/s of a size^3 matmul with `dtype` operands and float32 accumulation,
    on the first device (best of `repeats`)."""
    key = jax.random.key(0)
    a = jax.random.normal(key, (size, size), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.fold_in(key, 1), (size, size), jnp.float32).astype(dtype)
    mm = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    mm(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mm(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def cpu_peak_flops(dtype: str) -> float:
    """The host's matmul peak for `dtype`, probed once and cached per machine and dtype."""
    path = _cache_file()
    key = f"{platform.node()}|{platform.processor() or platform.machine()}|{os.cpu_count()}|{dtype}"
    try:
        cached = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        cached = {}
    if key not in cached:
        cached[key] = probe_matmul_peak(dtype)
        path.parent.mkdir(parents=True, exist_ok=True)
        paths.write_text(path, json.dumps(cached, indent=1))
    return cached[key]


def accelerator_peak_flops(device_kind: str) -> float | None:
    """One chip's dense bf16 peak in FLOP/s, or None for a kind not in lab.accel.chips."""
    chip = chip_for(device_kind)
    return chip.peak_flops if chip else None


def mfu(model_flops_per_second: float, device_kind: str, n_devices: int) -> float | None:
    """Global model FLOP/s over (devices x one chip's dense bf16 peak); None if the kind is
    unknown."""
    peak = accelerator_peak_flops(device_kind)
    return model_flops_per_second / (n_devices * peak) if peak else None


def total_peak_flops(compute_dtype: str, override_tflops: float = 0.0) -> tuple[float, str]:
    """Peak FLOP/s of everything the run uses, and where the number came from.

    On CPU the fake devices share the host's cores, so the peak is per process (host);
    on accelerators it is per chip, times the number of chips.
    """
    device = jax.devices()[0]
    if override_tflops:
        per = override_tflops * 1e12
        source = "config run.peak_tflops"
    elif device.platform == "cpu":
        per = cpu_peak_flops(compute_dtype)
        source = f"measured {compute_dtype} matmul peak of this CPU"
    else:
        per = accelerator_peak_flops(device.device_kind)
        source = f"{device.device_kind} dense bf16 peak"
        if per is None:
            return 0.0, f"unknown peak for {device.device_kind}; set run.peak_tflops"
    units = jax.process_count() if device.platform == "cpu" else jax.device_count()
    return per * units, source
