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
import numpy as np

from benchmarks.common import RESULTS, load_note, write_report

INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = \w+\[([\d,]*)\]")
# Op kinds by the instruction name XLA gives a fusion (its first ops), checked in order.
KINDS = (("layout copies and transposes", ("copy", "transpose", "bitcast_bitcast")),
         ("concatenations and pads", ("concatenate", "pad")),
         ("scan buffers (broadcast, dynamic slices)", ("broadcast", "dynamic", "slice")))


def _shapes(hlo: str) -> dict[str, list[int]]:
    """Each instruction's result shape, by name."""
    return {m.group(1): [int(d) for d in m.group(2).split(",") if d]
            for m in map(INSTRUCTION.match, hlo.splitlines()) if m}


def _dot_flops(hlo: str, layers: int) -> dict[str, float]:
    """FLOPs of the program's dots: dense (2-D results) and attention (batched), a dot inside
    the scanned loop body counted once per layer."""
    shapes, flops = _shapes(hlo), collections.Counter()
    for line in hlo.splitlines():
        match = INSTRUCTION.match(line)
        if not match or " dot(" not in line:
            continue
        dims = shapes[match.group(1)]
        lhs = re.search(r"dot\(%([^,\s)]+)", line).group(1)
        contracted = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line).group(1)
        depth = int(np.prod([shapes[lhs][int(i)] for i in contracted.split(",")]))
        repeat = layers if "while/body" in line else 1
        flops["dense" if len(dims) == 2 else "attention"] += 2 * np.prod(dims) * depth * repeat
    return dict(flops)


def _kind(name: str, shapes: dict[str, list[int]]) -> str:
    if name.startswith("ynn_fusion") or name.startswith("dot"):
        return "dense matmuls" if len(shapes.get(name, [])) == 2 else "attention matmuls"
    for kind, prefixes in KINDS:
        if name.startswith(prefixes) or name.startswith(tuple("wrapped_" + p for p in prefixes)):
            return kind
    return "elementwise and reductions"


def _op_times(trace_dir: Path, shapes: dict[str, list[int]]) -> dict[str, float]:
    """Seconds of the traced ops by kind, summed over threads."""
    trace = json.load(gzip.open(next(trace_dir.rglob("*.trace.json.gz"))))
    times = collections.Counter()
    for event in trace["traceEvents"]:
        name = event.get("name", "")
        if event.get("ph") == "X" and name in shapes:
            times[_kind(name, shapes)] += event["dur"] / 1e6
    return dict(times)


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
        times = _op_times(Path(tmp), _shapes(hlo))
    flops = _dot_flops(hlo, cfg.model.n_layers)
    total = sum(times.values())
    lines = ["$ .venv/bin/python -m benchmarks.cpu_step_profile",
             f"one traced train step, benchmark model, float32; untraced step {untraced:.2f} s, "
             f"{load_note()}",
             f"matmul work: dense {flops['dense'] / 1e9:.0f} GFLOP, attention "
             f"{flops['attention'] / 1e9:.0f} GFLOP",
             "| ops | seconds (summed over threads) | share |", "|---|---|---|",
             *(f"| {kind} | {seconds:.2f} | {seconds / total:.1%} |"
               for kind, seconds in sorted(times.items(), key=lambda kv: -kv[1]))]
    RESULTS.mkdir(parents=True, exist_ok=True)
    return write_report("\n".join(lines) + "\n", RESULTS / "cpu-step-profile.txt")


if __name__ == "__main__":
    raise SystemExit(main())
