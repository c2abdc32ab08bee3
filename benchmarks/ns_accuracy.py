"""Newton-Schulz accuracy against float64 on the presets' hidden matrices, per matmul precision.

For every distinct hidden-matrix shape of the GPU and TPU presets (read from their configs and
the model itself), two inputs: a Gaussian matrix, and one with singular values spread evenly
in log scale from 3e-4 to 1 (the tail a momentum matrix has). Each goes through
`lab.optim.muon.newton_schulz` with the standard loop and the Gram form, with the matmuls in
  float32   float32 operands at Precision.HIGHEST (the lab's default)
  tf32      float32 operands rounded to TF32's 10 mantissa bits (a GPU's default precision)
  bfloat16  bfloat16 operands, float32 accumulation (a TPU's default precision, and
            compute_dtype=bfloat16 anywhere)
and is compared with the same iteration (same coefficients, 5 steps) in float64 numpy: the
relative Frobenius error |O - O64| / |O64|. The last column is what method="auto" picks.

    .venv/bin/python -m benchmarks.ns_accuracy [--out benchmarks/results/ns-accuracy.txt]

On a CPU, float32 matmuls are float32 at any precision setting, so `tf32` is emulated by
rounding the operands of every product (round to nearest even) before a float32 product.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import write_report
from lab.config import ModelConfig, load_config
from lab.optim import muon

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ("configs/gpu/debug.yaml", "configs/tpu/v5e-ladder.yaml")
MODES = ("float32", "tf32", "bfloat16")
KINDS = ("gaussian", "log-spectrum")
STEPS = 5


def hidden_shapes(cfg: ModelConfig) -> list[tuple[int, int]]:
    """The distinct (short, long) shapes of the model's Muon matrices, from the model itself."""
    from flax import nnx

    from lab.model.roles import Role, specs_of
    from lab.model.transformer import Transformer

    cfg = dataclasses.replace(cfg, vocab_size=256, n_layers=1)
    state = nnx.state(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))), nnx.Param)
    leaves = jax.tree.leaves(nnx.to_pure_dict(state))
    specs = jax.tree.leaves(specs_of(state))
    return sorted({tuple(sorted(leaf.shape[-2:])) for leaf, spec in zip(leaves, specs, strict=True)
                   if spec.role is Role.HIDDEN})


def preset_shapes(presets: tuple[str, ...] = PRESETS) -> dict[tuple[int, int], list[str]]:
    """Each distinct hidden-matrix shape of the presets, with the presets that have it."""
    found: dict[tuple[int, int], list[str]] = {}
    for preset in presets:
        for shape in hidden_shapes(load_config(ROOT / preset).model):
            found.setdefault(shape, []).append(Path(preset).stem)
    return found


def test_matrix(shape: tuple[int, int], kind: str, seed: int = 0) -> np.ndarray:
    """A float32-representable input: Gaussian, or singular values 3e-4 ... 1 in log scale."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal(shape)
    if kind == "log-spectrum":
        u, _, vt = np.linalg.svd(g, full_matrices=False)
        g = (u * np.logspace(-3.5, 0, min(shape))) @ vt
    elif kind != "gaussian":
        raise ValueError(f"unknown input kind {kind!r}")
    return g.astype(np.float32).astype(np.float64)


def ns64(x: np.ndarray, steps: int = STEPS) -> np.ndarray:
    """The standard iteration in float64 numpy, from the formula (wide or tall alike)."""
    a, b, c = muon.NS_COEFFS
    tall = x.shape[-2] > x.shape[-1]
    x = x.T if tall else x
    x = x / np.linalg.norm(x)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def _round_tf32(x: jax.Array) -> jax.Array:
    """Round float32 to 10 explicit mantissa bits (nearest, ties to even), as TF32 holds them."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    bits = bits + jnp.uint32(0x0FFF) + ((bits >> 13) & jnp.uint32(1))
    return jax.lax.bitcast_convert_type(bits & jnp.uint32(0xFFFFE000), jnp.float32)


def _tf32_matmul(p: jax.Array, q: jax.Array) -> jax.Array:
    return jnp.matmul(_round_tf32(p), _round_tf32(q), precision=jax.lax.Precision.HIGHEST)


@functools.partial(jax.jit, static_argnames=("mode", "method"))
def orthogonalise(x: jax.Array, mode: str, method: str) -> jax.Array:
    """`newton_schulz` of a wide float32 matrix with its matmuls in `mode`."""
    if mode == "float32":
        return muon.newton_schulz(x, STEPS, method=method)
    if mode == "bfloat16":
        return muon.newton_schulz(x, STEPS, method=method, compute_dtype=jnp.bfloat16)
    if mode != "tf32":
        raise ValueError(f"unknown mode {mode!r}")
    # newton_schulz's own steps, with each product's operands rounded to TF32 first.
    if method == "auto":
        method = "gram" if muon.uses_gram(x.shape, precision="default") else "standard"
    x = x / (jnp.linalg.norm(x) + 1e-7)
    loop = muon._gram_iterations if method == "gram" else muon._standard_iterations
    return loop(x, STEPS, _tf32_matmul)


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want))


def measure(shape: tuple[int, int], kind: str) -> dict[tuple[str, str], float]:
    """Relative error of every (mode, method) for one input, against float64."""
    x64 = test_matrix(shape, kind)
    want = ns64(x64)
    x = jnp.asarray(x64, jnp.float32)
    return {
        (mode, method): relative_error(orthogonalise(x, mode, method), want)
        for mode in MODES
        for method in ("standard", "gram", "auto")
    }


def auto_method(shape: tuple[int, int], mode: str) -> str:
    if mode == "float32":
        return "gram" if muon.uses_gram(shape) else "standard"
    if mode == "bfloat16":
        return "gram" if muon.uses_gram(shape, compute_dtype=jnp.bfloat16) else "standard"
    return "gram" if muon.uses_gram(shape, precision="default") else "standard"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    lines = [
        "Newton-Schulz (5 steps) vs the same iteration in float64 numpy: |O - O64|_F / |O64|_F",
        f"jax {jax.__version__} on {jax.devices()[0].platform}; inputs: "
        "gaussian, log-spectrum (singular values 3e-4..1)",
        "",
        "| shape | presets | input | matmuls | standard | gram | auto (picks) |",
        "|---|---|---|---|---|---|---|",
    ]
    for shape, presets in preset_shapes().items():
        for kind in KINDS:
            errors = measure(shape, kind)
            for mode in MODES:
                lines.append(
                    f"| {shape[0]} x {shape[1]} | {', '.join(presets)} | {kind} | {mode} "
                    f"| {errors[mode, 'standard']:.2e} | {errors[mode, 'gram']:.2e} "
                    f"| {errors[mode, 'auto']:.2e} ({auto_method(shape, mode)}) |"
                )
            print(lines[-3], lines[-2], lines[-1], sep="\n", flush=True)
    lines.append("")
    lines.append(f"{time.perf_counter() - started:.0f} s")
    return write_report("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    sys.exit(main())
