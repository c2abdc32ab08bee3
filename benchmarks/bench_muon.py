"""Muon benchmarks: one update beside optax.contrib.muon; Newton-Schulz beside its matmul floor,
its FLOPs at the float32 matmul peak probed in the same run.

The shapes are the benchmark model's hidden matrices (d_model 512, 8 layers, 8 heads, SwiGLU
1536): per layer wq wk wv wo (512, 512), w_gate w_up (512, 1536), w_down (1536, 512), either
stacked (8, in, out) as scanned layers keep them or as 56 separate matrices.

    .venv/bin/python -m benchmarks.bench_muon [--quick]
"""

from __future__ import annotations

import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax.contrib import _muon as optax_muon

from benchmarks.common import load_note, print_rows, row
from lab.accel.mfu import probe_matmul_peak
from lab.optim.muon import muon, newton_schulz

D, F, LAYERS = 512, 1536, 8
SHAPES = {"wq": (D, D), "wk": (D, D), "wv": (D, D), "wo": (D, D),
          "w_gate": (D, F), "w_up": (D, F), "w_down": (F, D)}
LR, WD = 0.02, 0.1


def _median_seconds(*calls, repeats: int) -> list[float]:
    """Median wall time of each (jitted fn, args) call, after two warm-up calls each.

    The calls alternate within every round, so load from other processes on this shared
    machine falls on all of them alike and their ratio stays fair.
    """
    for fn, args in calls:
        jax.block_until_ready(fn(*args))
        jax.block_until_ready(fn(*args))
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for (fn, args), spent in zip(calls, times, strict=True):
            started = time.perf_counter()
            jax.block_until_ready(fn(*args))
            spent.append(time.perf_counter() - started)
    return [statistics.median(spent) for spent in times]


def _params(stacked: bool) -> dict:
    rng = np.random.default_rng(0)
    if stacked:
        shapes = {k: (LAYERS, *s) for k, s in SHAPES.items()}
    else:
        shapes = {f"{k}_{i}": s for i in range(LAYERS) for k, s in SHAPES.items()}
    return {k: jnp.asarray(rng.normal(size=s) / np.sqrt(s[-2]), jnp.float32)
            for k, s in shapes.items()}


def _optax_muon(stacked: bool) -> optax.GradientTransformation:
    """optax's Muon with the same settings; 3-D leaves get dimension numbers so all use Muon."""
    dims = None
    if stacked:
        dims = {k: optax_muon.MuonDimensionNumbers(1, 2) for k in SHAPES}
    return optax.contrib.muon(LR, beta=0.95, weight_decay=WD, nesterov=True,
                              consistent_rms=0.2, muon_weight_dimension_numbers=dims)


def _update_call(tx, params, grads) -> tuple[tuple, float]:
    """A jitted update ready to time, and its compiled temporary buffer size in MiB."""
    state = tx.init(params)
    step = jax.jit(tx.update)
    temp = step.lower(grads, state, params).compile().memory_analysis()
    temp_mib = temp.temp_size_in_bytes / 2**20 if temp is not None else float("nan")
    return (step, (grads, state, params)), temp_mib


# How many matmuls of each kind 5 Newton-Schulz steps make, on a wide S x L matrix:
# X X^T (S x L x S), A A (S^3) and A X (S x S x L). See lab.optim.muon._gram_iterations.
MATMUL_COUNTS = {"standard": {"xxt": 5, "aa": 5, "ax": 5}, "gram": {"xxt": 2, "aa": 14, "ax": 2}}
MATMUL_FLOPS = {"xxt": lambda s, l: 2 * s * s * l, "aa": lambda s, l: 2 * s**3,
                "ax": lambda s, l: 2 * s * s * l}


def _auto_method(shape: tuple[int, ...]) -> str:
    short, long = sorted(shape[-2:])
    return "gram" if long >= 2 * short else "standard"  # newton_schulz's float32 rule


def _ns_flops(leaves: list, method: str) -> float:
    total = 0.0
    for p in leaves:
        short, long = sorted(p.shape[-2:])
        kind = _auto_method(p.shape) if method == "auto" else method
        batch = int(np.prod(p.shape[:-2]))
        total += batch * sum(n * MATMUL_FLOPS[k](short, long)
                             for k, n in MATMUL_COUNTS[kind].items())
    return total


def run(quick: bool = False) -> list[dict]:
    repeats = 3 if quick else 9
    rows = []
    for stacked in (True, False) if not quick else (True,):
        layout = "stacked (8, in, out)" if stacked else "unrolled, 56 matrices"
        params = _params(stacked)
        grads = jax.tree.map(lambda p: 0.01 * jnp.flip(p, -2), params)
        ours_call, ours_mib = _update_call(muon(LR, weight_decay=WD), params, grads)
        theirs_call, theirs_mib = _update_call(_optax_muon(stacked), params, grads)
        ours, theirs = _median_seconds(ours_call, theirs_call, repeats=repeats)
        rows.append(row(f"muon update, {layout}", ours * 1e3, "ms",
                        "optax.contrib.muon, same shapes and settings", theirs * 1e3,
                        "jitted tx.update; Nesterov 0.95, 5 NS steps, Moonlight scaling"))
        rows.append(row(f"muon update temp buffers, {layout}", ours_mib, "MiB",
                        "optax.contrib.muon", theirs_mib, "XLA memory_analysis temp size"))

    params = _params(stacked=True)
    leaves = list(params.values())
    ns_auto = jax.jit(lambda ps: [newton_schulz(p) for p in ps])
    ns_std = jax.jit(lambda ps: [newton_schulz(p, method="standard") for p in ps])
    ns16 = jax.jit(lambda ps: [newton_schulz(p, compute_dtype=jnp.bfloat16) for p in ps])
    # The floor: Newton-Schulz's matmul FLOPs at this machine's float32 matmul peak, probed
    # (best of 5, 2048^3) before and after the timings; the higher probe is used. Timing each
    # product alone is no floor (each pays its own dispatch and memory traffic).
    peaks = [probe_matmul_peak("float32")]
    auto_s, std_s, ns16_s = _median_seconds(
        (ns_auto, (leaves,)), (ns_std, (leaves,)), (ns16, (leaves,)), repeats=repeats)
    peaks.append(probe_matmul_peak("float32"))
    peak = max(peaks)
    probes = f"2048^3 float32 peak probes {', '.join(f'{p / 1e9:.0f}' for p in peaks)} GFLOP/s"
    flops_std, flops_auto = _ns_flops(leaves, "standard"), _ns_flops(leaves, "auto")
    rows.append(row("newton_schulz, all hidden matrices", auto_s * 1e3, "ms",
                    "its matmul FLOPs at the float32 matmul peak of this run",
                    flops_auto / peak * 1e3,
                    f"float32, Gram form on the 512x1536 ones; {flops_auto / 1e9:.0f} GFLOP, "
                    f"{flops_auto / auto_s / 1e9:.0f} GFLOP/s; {probes}; ratio >= 1 unless "
                    f"the probes ran under more load; target ratio <= 1.3; {load_note()}"))
    rows.append(row("newton_schulz, standard iteration", std_s * 1e3, "ms",
                    "its matmul FLOPs at the float32 matmul peak of this run",
                    flops_std / peak * 1e3,
                    f"method='standard'; {flops_std / 1e9:.0f} GFLOP, "
                    f"{flops_std / std_s / 1e9:.0f} GFLOP/s; target ratio <= 1.3"))
    rows.append(row("newton_schulz, default vs standard iteration", auto_s * 1e3, "ms",
                    "method='standard'", std_s * 1e3,
                    f"FLOP ratio {flops_auto / flops_std:.3f}"))
    rows.append(row("newton_schulz, bfloat16 matmul operands", ns16_s * 1e3, "ms",
                    "method='standard', float32", std_s * 1e3,
                    "compute_dtype=jnp.bfloat16 (standard iteration)"))
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    param_mib = sum(p.size for p in params.values()) * 4 / 2**20
    rows.append(row("peak resident memory (whole benchmark)", rss_mib, "MiB", "", None,
                    f"getrusage maxrss; one copy of the parameters is {param_mib:.0f} MiB"))
    return rows


if __name__ == "__main__":
    print_rows("muon", run(quick="--quick" in sys.argv))
