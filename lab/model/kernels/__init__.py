"""The model's compute kernels behind one switch: the target platform.

`Kernels.build(cfg, platform)` fixes, once per model, how its matmuls and attention run. On
`cpu` the matmuls go through lab.model.kernels.cpu's hand-written backward passes (row-major copies,
bfloat16 residuals kept as bits), tuned for XLA's CPU backend; on `gpu` and `tpu` they are
einsums with a backward pass of compute-dtype operands (lab.model.kernels.matmul), or, with
`model.backward_dtype=float32`, einsums that XLA differentiates itself. The platform is the
target's, which may differ from the host's when compiling ahead of time for a TPU topology.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lab.config import ModelConfig
from lab.model.kernels import attention as _attention
from lab.model.kernels import cpu, matmul
from lab.model.kernels.loss import cross_entropy

__all__ = ["Kernels", "cross_entropy"]


@dataclasses.dataclass(frozen=True)
class Kernels:
    """Static (hashable) kernel choices of one model."""

    platform: str  # cpu | gpu | tpu
    attention: str  # the implementation, resolved from `auto`
    compute_dtype: str  # matmul operands
    activation_dtype: str  # the matmuls' results
    backward_dtype: str = "compute"  # ModelConfig.backward_dtype (GPU and TPU)

    @classmethod
    def build(cls, cfg: ModelConfig, platform: str | None = None) -> Kernels:
        platform = platform or jax.default_backend()
        return cls(platform, _attention.resolve(cfg.attention, platform), cfg.compute_dtype,
                   cfg.activation_dtype, cfg.backward_dtype)

    def dense(self, x: jax.Array, w: jax.Array, out_dtype: str | None = None) -> jax.Array:
        """x @ w: operands in the compute dtype, accumulated in float32, the result in
        `out_dtype` (default: the activation dtype)."""
        dtype = jnp.dtype(self.compute_dtype)
        out_dtype = jnp.dtype(out_dtype or self.activation_dtype)
        if self.platform == "cpu":
            y = cpu.dense(x, w, dtype)
        elif self.backward_dtype == "compute":
            return matmul.dense(x, w, dtype.name, out_dtype.name)
        else:
            y = jnp.einsum("...d,df->...f", x.astype(dtype), w.astype(dtype),
                           preferred_element_type=jnp.float32)
        return y.astype(out_dtype)

    def attend(self, q_BxLxHxE: jax.Array, k_BxLxKxE: jax.Array, v_BxLxKxE: jax.Array,
               scale: float) -> tuple[jax.Array, jax.Array]:
        """Causal (grouped-query) attention, (B, L, H, E) in and out, and each sequence's
        largest logit per query head, (B, H) float32 (lab.model.kernels.attention.attention)."""
        return _attention.attention(self.attention, q_BxLxHxE, k_BxLxKxE, v_BxLxKxE, scale,
                                    jnp.dtype(self.compute_dtype), self.platform)
