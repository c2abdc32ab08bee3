"""Where the lab's CPU train step spends its time: a jax.profiler trace of one step of the
benchmark model (benchmarks.against_commit's worker: d_model 512, 8 layers, seq 512, 8
sequences, AdamW, float32), its ops' time summed by kind, and the matmul FLOPs of the compiled
program, so the time outside the matmuls can be read against the matmul work.

The trace's op times are summed over the runtime's threads (two matmuls may run at once), and
tracing slows the step, so the shares, not the seconds, are the figure. Writes
benchmarks/results/cpu-step-profile.txt.

    .venv/bin/python -m benchmarks.cpu_step_profile
"""

from __future__ import annotations

import collections
import gzip
import json
import re
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import RESULTS, load_note, write_report

INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = \w+\[([\d,]*)\]")
COMPUTATION = re.compile(r"^%(\S+) \(.*\{$")
CALLS = re.compile(r"^\s*(?:ROOT )?%(\S+) = .*\bcalls=%([\w.\-]+)")
# Op kinds by the instruction name XLA gives a fusion (its first ops), checked in order.
KINDS = (("layout copies and transposes", ("copy", "transpose", "bitcast_bitcast")),
         ("concatenations and pads", ("concatenate", "pad")),
         ("scan buffers (broadcast, dynamic slices)", ("broadcast", "dynamic", "slice")))


def _shapes(hlo: str) -> dict[str, list[int]]:
    """Each instruction's result shape, by name."""
    return {m.group(1): [int(d) for d in m.group(2).split(",") if d]
            for m in map(INSTRUCTION.match, hlo.splitlines()) if m}


def _one_dot_flops(line: str, shapes: dict[str, list[int]]) -> float:
    """FLOPs of the dot instruction on `line`: 2 x its result's size x the contracted depth."""
    dims = shapes[INSTRUCTION.match(line).group(1)]
    lhs = re.search(r"dot\(%([^,\s)]+)", line).group(1)
    contracted = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line).group(1)
    return 2 * float(np.prod(dims)) * int(np.prod([shapes[lhs][int(i)]
                                                     for i in contracted.split(",")]))


def _dot_flops(hlo: str, layers: int) -> dict[str, float]:
    """FLOPs of the program's dots: dense (2-D results) and attention (batched), a dot inside
    the scanned loop body counted once per layer."""
    shapes, flops = _shapes(hlo), collections.Counter()
    for line in hlo.splitlines():
        match = INSTRUCTION.match(line)
        if not match or " dot(" not in line:
            continue
        repeat = layers if "while/body" in line else 1
        kind = "dense" if len(shapes[match.group(1)]) == 2 else "attention"
        flops[kind] += _one_dot_flops(line, shapes) * repeat
    return dict(flops)


def _call_flops(hlo: str) -> dict[str, float]:
    """FLOPs of one execution of each instruction that calls a computation holding dots (the
    fusions that the trace times), by the instruction's name."""
    shapes, in_computation, computation = _shapes(hlo), collections.Counter(), None
    for line in hlo.splitlines():
        head = COMPUTATION.match(line)
        if head:
            computation = head.group(1)
        elif computation and INSTRUCTION.match(line) and " dot(" in line:
            in_computation[computation] += _one_dot_flops(line, shapes)
    calls = (CALLS.match(line) for line in hlo.splitlines())
    return {m.group(1): in_computation[m.group(2)] for m in calls
            if m and m.group(2) in in_computation}


def _kind(name: str, shapes: dict[str, list[int]]) -> str:
    if name.startswith("ynn_fusion") or name.startswith("dot"):
        return "dense matmuls" if len(shapes.get(name, [])) == 2 else "attention matmuls"
    for kind, prefixes in KINDS:
        if name.startswith(prefixes) or name.startswith(tuple("wrapped_" + p for p in prefixes)):
            return kind
    return "elementwise and reductions"


def _events(trace_dir: Path, shapes: dict[str, list[int]]) -> list[dict]:
    """The trace's timed ops of the compiled program (the instructions named in `shapes`), in
    order of their start."""
    trace = json.load(gzip.open(next(trace_dir.rglob("*.trace.json.gz"))))
    return sorted((e for e in trace["traceEvents"]
                   if e.get("ph") == "X" and e.get("name", "") in shapes), key=lambda e: e["ts"])


def _op_times(events: list[dict], shapes: dict[str, list[int]]) -> dict[str, float]:
    """Seconds of the traced ops by kind, summed over threads."""
    times = collections.Counter()
    for event in events:
        times[_kind(event["name"], shapes)] += event["dur"] / 1e6
    return dict(times)


def _shared(events: list[dict]) -> list[float]:
    """For each event (sorted by start), the fraction of its time during which another one ran."""
    fractions = []
    for event in events:
        start, end = event["ts"], event["ts"] + event["dur"]
        beside = []  # the parts of [start, end) that other events cover, merged below
        for other in events:
            if other["ts"] >= end:
                break
            if other is not event:
                lo, hi = max(start, other["ts"]), min(end, other["ts"] + other["dur"])
                if hi > lo:
                    beside.append((lo, hi))
        covered, reach = 0.0, start
        for lo, hi in sorted(beside):
            covered += max(0.0, hi - max(lo, reach))
            reach = max(reach, hi)
        fractions.append(covered / event["dur"] if event["dur"] else 0.0)
    return fractions


def _dense_rates(events: list[dict], shapes: dict[str, list[int]],
                 call_flops: dict[str, float]) -> dict[str, tuple[float, float]]:
    """(GFLOP/s, seconds) of the dense matmuls that ran alone for at least half their time,
    and of those that shared the cores with another op for more than half."""
    totals = {"alone": [0.0, 0.0], "beside another op": [0.0, 0.0]}
    for event, shared in zip(events, _shared(events), strict=True):
        if _kind(event["name"], shapes) == "dense matmuls":
            total = totals["beside another op" if shared > 0.5 else "alone"]
            total[0] += call_flops.get(event["name"], 0.0)
            total[1] += event["dur"] / 1e6
    return {k: (flops / seconds / 1e9 if seconds else 0.0, seconds)
            for k, (flops, seconds) in totals.items()}


def _matmul_alone(m: int, k: int, n: int, repeats: int = 10) -> float:
    """GFLOP/s of one float32 (m, k) @ (k, n) matmul jitted on its own, at its best call."""
    x, w = jnp.ones((m, k)), jnp.ones((k, n))
    matmul = jax.jit(jnp.matmul)
    matmul(x, w).block_until_ready()
    best = min(_seconds(matmul, x, w) for _ in range(repeats))
    return 2 * m * k * n / best / 1e9


def _seconds(fn, *args) -> float:
    started = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - started


def main() -> int:
    from benchmarks.bench_train import _tokens, bench_config
    from lab.accel import sharding
    from lab.train import build_trainer

    cfg = bench_config({"mesh.fsdp": 1, "model.compute_dtype": "float32"})
    trainer = build_trainer(cfg, sharding.make_mesh(cfg.mesh))
    batch = _tokens(0, trainer.mesh)
    with jax.set_mesh(trainer.mesh), tempfile.TemporaryDirectory() as tmp:
        state = trainer.init_state()
        hlo = trainer.train_step.lower(state, batch).compile().as_text()
        for _ in range(2):  # compile, then one step untraced
            started = time.perf_counter()
            state, metrics = trainer.train_step(state, batch)
            jax.block_until_ready(metrics)
        untraced = time.perf_counter() - started
        jax.profiler.start_trace(tmp)
        state, metrics = trainer.train_step(state, batch)
        jax.block_until_ready(metrics)
        jax.profiler.stop_trace()
        shapes = _shapes(hlo)
        events = _events(Path(tmp), shapes)
    times = _op_times(events, shapes)
    rates = _dense_rates(events, shapes, _call_flops(hlo))
    flops = _dot_flops(hlo, cfg.model.n_layers)
    total = sum(times.values())
    lines = ["$ .venv/bin/python -m benchmarks.cpu_step_profile",
             f"one traced train step, benchmark model, float32; untraced step {untraced:.2f} s, "
             f"{load_note()}",
             f"matmul work: dense {flops['dense'] / 1e9:.0f} GFLOP, attention "
             f"{flops['attention'] / 1e9:.0f} GFLOP",
             "| ops | seconds (summed over threads) | share |", "|---|---|---|",
             *(f"| {kind} | {seconds:.2f} | {seconds / total:.1%} |"
               for kind, seconds in sorted(times.items(), key=lambda kv: -kv[1])),
             "dense matmuls in the step, each op's own rate: " + "; ".join(
                 f"{kind} {rate:.0f} GFLOP/s ({seconds:.2f} s)"
                 for kind, (rate, seconds) in rates.items()),
             "the step's dense shapes jitted alone, best of 10: " + "; ".join(
                 f"({m}x{k}) @ ({k}x{n}) {_matmul_alone(m, k, n):.0f} GFLOP/s"
                 for m, k, n in ((4096, 512, 512), (4096, 512, 1536), (4096, 1536, 512)))]
    RESULTS.mkdir(parents=True, exist_ok=True)
    return write_report("\n".join(lines) + "\n", RESULTS / "cpu-step-profile.txt")


if __name__ == "__main__":
    raise SystemExit(main())
