"""Muon benchmarks: one update beside optax.contrib.muon, Newton-Schulz beside its matmul floor.

The shapes are the benchmark model's hidden matrices (d_model 512, 8 layers, 8 heads, SwiGLU
1536): per layer wq wk wv wo (512, 512), w_gate w_up (512, 1536), w_down (1536, 512), either
stacked (8, in, out) as scanned layers keep them or as 56 separate matrices.

    .venv/bin/python benchmarks/bench_muon.py [--quick]
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

from lab.muon import muon, newton_schulz

D, F, LAYERS = 512, 1536, 8
SHAPES = {"wq": (D, D), "wk": (D, D), "wv": (D, D), "wo": (D, D),
          "w_gate": (D, F), "w_up": (D, F), "w_down": (F, D)}
LR, WD = 0.02, 0.1


def _row(figure, value, unit, reference, reference_value, notes=""):
    ratio = value / reference_value if reference_value else None
    return {"figure": figure, "value": float(value), "unit": unit, "reference": reference,
            "reference_value": reference_value, "ratio": ratio, "notes": notes}


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


def _matmul_floor(params: dict) -> tuple:
    """The matmuls of one Newton-Schulz iteration, to time alone: for each (wide) matrix X of
    m x n, X X^T (m x n x m), A A (m^3) and A X (m x m x n), on independent inputs."""

    def products(xs, grams):
        out = []
        for x, g in zip(xs, grams, strict=True):
            out += [x @ jnp.swapaxes(x, -1, -2), g @ g, g @ x]
        return out

    wide = [p if p.shape[-2] <= p.shape[-1] else jnp.swapaxes(p, -1, -2) for p in params.values()]
    wide = [jnp.asarray(np.asarray(w)) for w in wide]  # materialised, not a lazy transpose
    grams = [jnp.asarray(np.asarray(w @ jnp.swapaxes(w, -1, -2))) for w in wide]
    return jax.jit(products), (wide, grams)


def _ns_flops(params: dict, steps: int) -> float:
    total = 0.0
    for p in params.values():
        m, n = sorted(p.shape[-2:])
        batch = int(np.prod(p.shape[:-2]))
        total += batch * steps * (4 * m * m * n + 2 * m**3)
    return total


def _matmul_peak(repeats: int) -> float:
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2048, 2048)), jnp.float32)
    [seconds] = _median_seconds((jax.jit(lambda a: a @ a), (x,)), repeats=repeats)
    return 2 * 2048**3 / seconds


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
        rows.append(_row(f"muon update, {layout}", ours * 1e3, "ms",
                         "optax.contrib.muon, same shapes and settings", theirs * 1e3,
                         "jitted tx.update; Nesterov 0.95, 5 NS steps, Moonlight scaling"))
        rows.append(_row(f"muon update temp buffers, {layout}", ours_mib, "MiB",
                         "optax.contrib.muon", theirs_mib, "XLA memory_analysis temp size"))

    params = _params(stacked=True)
    matrices = (list(params.values()),)
    ns = jax.jit(lambda ps: [newton_schulz(p) for p in ps])
    ns16 = jax.jit(lambda ps: [newton_schulz(p, compute_dtype=jnp.bfloat16) for p in ps])
    ns_s, one_iteration_s, ns16_s = _median_seconds(
        (ns, matrices), _matmul_floor(params), (ns16, matrices), repeats=repeats
    )
    floor_s = 5 * one_iteration_s
    flops = _ns_flops(params, 5)
    rows.append(_row("newton_schulz, all hidden matrices (float32)", ns_s * 1e3, "ms",
                     "the same matmuls timed alone", floor_s * 1e3,
                     f"{flops / 1e9:.1f} GFLOP; target ratio <= 1.3"))
    peak = _matmul_peak(repeats)
    rows.append(_row("newton_schulz matmul throughput", flops / ns_s / 1e9, "GFLOP/s",
                     "2048^3 float32 matmul, same run", peak / 1e9, "ratio = fraction of peak"))
    rows.append(_row("newton_schulz, bfloat16 matmul operands", ns16_s * 1e3, "ms",
                     "newton_schulz float32", ns_s * 1e3, "compute_dtype=jnp.bfloat16"))
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    param_mib = sum(p.size for p in params.values()) * 4 / 2**20
    rows.append(_row("peak resident memory (whole benchmark)", rss_mib, "MiB", "", None,
                     f"getrusage maxrss; one copy of the parameters is {param_mib:.0f} MiB"))
    return rows


if __name__ == "__main__":
    for row in run(quick="--quick" in sys.argv):
        ratio = "" if row["ratio"] is None else f"  ratio {row['ratio']:.3f}"
        ref = "" if row["reference_value"] is None else f"  vs {row['reference_value']:.4g}"
        print(f"{row['figure']:<48} {row['value']:>10.4g} {row['unit']:<8}{ref}{ratio}"
              f"  [{row['reference']}] {row['notes']}")
