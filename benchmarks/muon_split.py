"""Muon's Newton-Schulz dealt out over data x fsdp: compiled FLOPs and collectives per device.

One jitted Muon step on 8 CPU devices, for a (4, 64, 192) stack plus 64 x 192, 192 x 64 and
64 x 192 matrices sharded as the lab shards kernels (a matrix axis over fsdp, the other over
tensor), on several meshes, with the split (`split_axes=BATCH_AXES`, the default) and without
it (`split_axes=()`: the compiler partitions every Newton-Schulz product itself).

    .venv/bin/python -m benchmarks.muon_split [--out benchmarks/results/muon-split.txt]

The step is also checked against the one-device step (largest parameter difference).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from pathlib import Path

from benchmarks.common import write_report

MESHES = ((8, 1, 1), (1, 8, 1), (2, 4, 1), (2, 2, 2))
SHAPES = {"stacked": (4, 64, 192), "wide": (64, 192), "tall": (192, 64), "same": (64, 192)}
COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")


def specs() -> dict:
    from jax.sharding import PartitionSpec as P

    return {"stacked": P(None, "fsdp", "tensor"), "wide": P("fsdp", "tensor"),
            "tall": P("fsdp", None), "same": P(None, "tensor")}


def inputs() -> tuple[dict, dict]:
    """Parameters and gradients of `SHAPES`, standard normal."""
    import jax

    keys = jax.random.split(jax.random.key(5), 2 * len(SHAPES))
    params = {k: jax.random.normal(keys[i], s) for i, (k, s) in enumerate(SHAPES.items())}
    grads = {k: jax.random.normal(keys[len(SHAPES) + i], s)
             for i, (k, s) in enumerate(SHAPES.items())}
    return params, grads


def collectives(hlo: str) -> int:
    """The number of collective operations in compiled HLO text."""
    return sum(len(re.findall(rf"\s{op}(?:-start)?\(", hlo)) for op in COLLECTIVES)


def muon_step(mesh, split_axes: tuple[str, ...], params: dict, grads: dict):
    """One jitted Muon step with params sharded by `specs()` on `mesh` (one device when None):
    the new parameters, the update, and the compiled FLOPs and collectives per device."""
    import jax
    import optax
    from jax.sharding import NamedSharding

    from lab.optim.muon import muon

    tx = muon(0.02, weight_decay=0.1, split_axes=split_axes)

    def step(g, s, p):
        updates = tx.update(g, s, p)[0]
        return optax.apply_updates(p, updates), updates

    step = jax.jit(step)
    if mesh is not None:
        put = {k: NamedSharding(mesh, spec) for k, spec in specs().items()}
        params = {k: jax.device_put(v, put[k]) for k, v in params.items()}
        grads = {k: jax.device_put(v, put[k]) for k, v in grads.items()}
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        args = (grads, tx.init(params), params)
        compiled = step.lower(*args).compile()
        new_params, updates = step(*args)
    return new_params, updates, compiled.cost_analysis()["flops"], collectives(compiled.as_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args(argv)
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import numpy as np
    from jax.sharding import AxisType

    from lab.accel.sharding import BATCH_AXES, MESH_AXES

    params, grads = inputs()
    want, _, flops_one, _ = muon_step(None, (), params, grads)
    lines = [
        "One Muon step, compiled FLOPs and collective operations per device "
        f"(jax {jax.__version__}, 8 CPU devices)",
        "",
        "| mesh (data x fsdp x tensor) | FLOPs, no split | collectives | FLOPs, split "
        "over data x fsdp | collectives | max param diff vs 1 device (split) |",
        "|---|---|---|---|---|---|",
        f"| 1 device | {flops_one / 1e6:.1f} M | 0 | - | - | - |",
    ]
    for shape in MESHES:
        # MESH_AXES is (data, fsdp, expert, tensor): a dense model's expert axis is 1.
        mesh = jax.make_mesh((*shape[:2], 1, shape[2]), MESH_AXES,
                             axis_types=(AxisType.Auto,) * len(MESH_AXES))
        _, _, flops_whole, coll_whole = muon_step(mesh, (), params, grads)
        got, _, flops_split, coll_split = muon_step(mesh, BATCH_AXES, params, grads)
        diff = max(float(np.abs(np.asarray(got[k]) - np.asarray(want[k])).max()) for k in want)
        lines.append(
            f"| {' x '.join(map(str, shape))} | {flops_whole / 1e6:.1f} M "
            f"({flops_whole / flops_one:.2f}) | {coll_whole} | {flops_split / 1e6:.1f} M "
            f"({flops_split / flops_one:.2f}) | {coll_split} | {diff:.1e} |")
    return write_report("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    sys.exit(main())
