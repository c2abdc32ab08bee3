"""How much memory one chip needs for a training step, estimated before anything is compiled.

The estimate adds, per chip: the parameters and optimizer state (exact, from their shapes and
shardings), the gradients (float32, sharded like the parameters), the activations a block keeps
for the backward pass under the chosen remat policy (all layers), the larger of two transient
working sets (one block's backward pass, or the loss: a chunk of logits with its gradient and
the gathered output head), and on a TPU the compiler's own scratch. `lab train` prints it at the
start and refuses a run that cannot fit; `lab sweep --dry-run` shows it per run. The TPU
compiler's own figure (lab.train.aot) is the check on this estimate: tests/test_aot.py keeps them
within 15% of each other on ladder rungs, one of them dominated by the parameters and optimizer.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from lab.accel import sharding
from lab.accel.chips import GIB, chip_for
from lab.config import Config
from lab.errors import UserError
from lab.model.moe import dispatch_kind

# Measured with the TPU compiler (v5e, libtpu 0.0.42), from its buffer assignment and memory
# analysis of the v5e ladder's rungs: the scratch it reports with the temporaries (112 MiB of
# VMEM) and the generated code (about 30 MiB).
TPU_COMPILER_BYTES = 144 << 20


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per chip."""

    params: int
    opt_state: int
    grads: int
    activations: int  # kept for the backward pass, all layers
    working: int  # one block's backward pass, transient
    logits: int  # the loss's transient: a chunk of logits, its gradient, the gathered head
    compiler: int = 0  # the compiler's own scratch and code (TPU)

    @property
    def transient(self) -> int:
        """The block's backward pass and the loss run at different times; the compiler gives
        both the same addresses, so the larger one counts."""
        return max(self.working, self.logits)

    @property
    def total(self) -> int:
        return (self.params + self.opt_state + self.grads + self.activations + self.transient
                + self.compiler)

    def describe(self) -> str:
        which = "backward" if self.working >= self.logits else "loss"
        parts = [("params", self.params), ("optimizer", self.opt_state), ("grads", self.grads),
                 ("activations", self.activations), (f"transient ({which})", self.transient)]
        if self.compiler:
            parts.append(("compiler", self.compiler))
        return f"{gib(self.total)} per chip (" + ", ".join(f"{n} {gib(b)}" for n, b in parts) + ")"


def gib(n: float) -> str:
    """Bytes for people: GiB, or MiB below one GiB."""
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB else f"{n / (1 << 20):.1f} MiB"


def _dtype_bytes(name: str) -> int:
    return np.dtype(name).itemsize


def sharded_bytes(abstract: Any, shardings: Any) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs laid out by `shardings`."""
    total = 0
    for leaf, sh in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings), strict=True):
        shape = sh.shard_shape(leaf.shape) if leaf.shape else ()
        total += math.prod(shape) * leaf.dtype.itemsize
    return total


# One block's backward pass holds about this many times the bytes of the tensors the block
# computes (`counted` below): the float32 results of its matmuls and their gradients, the
# all-gathered weights and the scan's own buffers. Fitted to the TPU compiler's figures for the
# five rungs of configs/sweeps/ladder-v5e.yaml on v5e:4x8 (all within 10%); it was 1.2 before,
# which left the estimate 25% under the compiler.
WORKING_FACTOR = 2.8


def activation_bytes(cfg: Config, local_batch: int, tensor: int, remat: str | None = None,
                     attention: str = "xla", platform: str = "tpu") -> tuple[int, int, int]:
    """(kept for backward, one block's transient working set, the loss's transient) in bytes
    per chip.

    Per token, with a = bytes of an activation and t = the tensor-parallel size, the tensors a
    block computes are its input and the normalised input of each half (4 D), q, k, v before
    and after rotary (2 (H + 2K) E / t), the attention output (H E / t) and the MLP's gate, up
    and their product (3 F / t). XLA keeps about twice that without remat (casts, float32 norm
    statistics, the kernels' own layouts): measured with the TPU compiler on v5e, 38 a D per
    token and layer for d512 against 20 a D counted. `full` keeps the block input only; `dots`
    and `minimal` keep every projection's output, `save_attention` the attention output and its
    float32 logsumexp besides (splash attention, the resolved `attention`, keeps it across 128
    lanes); the save_*_proj policies keep one of them. The backward pass of one block holds
    WORKING_FACTOR times a block's tensors. The loss holds one float32 copy of the logits
    (their gradient is written in place) for the tokens of a chunk, with a chunked loss (or the
    dense op's own backward on GPU and TPU) that gradient again in the compute dtype for the
    head's backward matmuls, and the head's weight
    gathered whole (in the compute dtype) from its shards. `remat` (default: the config's)
    names the policy.
    """
    m = cfg.model
    L = cfg.train.seq_len
    tokens = local_batch * L
    a = _dtype_bytes(m.activation_dtype)
    c = _dtype_bytes(m.compute_dtype)
    D, H, K, E, V = m.d_model, m.n_heads, m.kv_heads, m.head_dim, m.vocab_size
    qkv = (H + 2 * K) * E / tensor
    lse_lanes = 128 if attention == "splash" else 1
    mlp = mlp_width(cfg, platform) / tensor
    counted = a * (4 * D + 2 * qkv + H * E / tensor + 3 * mlp) + 4 * H / tensor
    everything = 2 * counted
    projections = a * (D + qkv + D + 2 * mlp + D)  # block input, q k v, out, gate, up, down
    kept_per_layer = {
        "none": everything,
        "full": a * D,
        "dots": projections,
        "save_attention": projections + (a * E + 4 * lse_lanes) * H / tensor,
        "minimal": projections,
        "save_qkv_proj": a * (D + qkv),
        "save_out_proj": a * (D + D),
    }[remat or m.remat]
    kept = int(tokens * kept_per_layer * m.n_layers)
    working = int(tokens * WORKING_FACTOR * counted)
    # A chunk is loss_chunk tokens of the global batch: every row, loss_chunk // B positions.
    positions = min(max(1, m.loss_chunk // cfg.train.batch_size), L) if m.loss_chunk else L
    # Chunked, the loss's scan writes each chunk's gradient again in the compute dtype. Whole,
    # XLA feeds it to the head's matmuls without that copy, unless the dense op's own backward
    # (lab.model.kernels.matmul: GPU and TPU, backward_dtype=compute) casts it to a narrower compute
    # dtype first (all three read from the TPU compiler: +512 MiB on a d512 test config).
    own_backward = (platform != "cpu" and m.backward_dtype == "compute"
                    and m.compute_dtype != "float32")
    second_copy = c if m.loss_chunk or own_backward else 0
    logits = int(local_batch * positions * V / tensor * (4 + second_copy) + D * V / tensor * c)
    return kept, working, logits


def mlp_width(cfg: Config, platform: str) -> int:
    """The MLP hidden units one token's activations hold: the dense width, or for a mixture
    of experts the shared experts' and, of the routed ones, every expert's on the one-hot path
    (each token goes through all of them) or its top_k's on the ragged path."""
    m = cfg.model
    if not m.moe.experts:
        return m.ff_dim
    routed = m.moe.experts if dispatch_kind(m.moe, platform) == "onehot" else m.moe.top_k
    return (routed + m.moe.shared_experts) * m.expert_ff_dim


def estimate(trainer: Any, remat: str | None = None) -> MemoryEstimate:
    """The per-chip estimate for a built lab.train.Trainer (its config and mesh); `remat`
    names another policy than the config's."""
    cfg, mesh = trainer.cfg, trainer.mesh
    abstract_state = jax.eval_shape(trainer.init_fn)
    params = sharded_bytes(abstract_state["params"], trainer.state_shardings["params"])
    opt = sharded_bytes(abstract_state["opt"], trainer.state_shardings["opt"])
    data_parallel = sharding.batch_size_divisor(mesh)
    local_batch = max(cfg.train.batch_size // (data_parallel * cfg.train.grad_accum), 1)
    from lab.model.kernels.attention import resolve

    platform = sharding.mesh_platform(mesh)
    attention = resolve(cfg.model.attention, platform)
    kept, working, logits = activation_bytes(cfg, local_batch, mesh.shape["tensor"], remat,
                                             attention, platform)
    grads = params * (2 if cfg.train.grad_accum > 1 else 1)  # an accumulator besides
    compiler = TPU_COMPILER_BYTES if platform == "tpu" else 0
    return MemoryEstimate(params, opt, grads, kept, working, logits, compiler)


def capacity(device: Any) -> tuple[int | None, str]:
    """(bytes one chip holds, what it is) for a device: what the runtime reports when it does,
    else the chip table by device kind; None for a CPU or an unknown kind."""
    if device.platform == "cpu":
        return None, "cpu"
    try:
        stats = device.memory_stats() or {}
    except Exception:  # abstract (topology) devices and some runtimes have none
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), device.device_kind
    chip = chip_for(device.device_kind)
    if chip is None:
        return None, device.device_kind
    return chip.memory_bytes, chip.name


# `model.remat=auto` takes a policy whose estimate leaves this much of a chip free, for the
# estimate's error (tests/test_aot.py holds it within 15% of the TPU compiler).
AUTO_REMAT_FRACTION = 0.85


def mesh_device(mesh: Any) -> Any:
    """A device of the mesh: a real one, or an abstract mesh's abstract device."""
    if isinstance(mesh, jax.sharding.AbstractMesh):
        return mesh.abstract_device
    return mesh.devices.flat[0]


def choose_remat(trainer: Any) -> tuple[str, str]:
    """`model.remat=auto` on the trainer's chips: (the first policy of lab.model.remat.AUTO_ORDER,
    least recomputation first, whose estimate fits AUTO_REMAT_FRACTION of a chip, else
    `full`; a line saying what was chosen and why)."""
    from lab.model.remat import AUTO_ORDER

    limit, chip = capacity(mesh_device(trainer.mesh))
    if limit is None:
        return "none", f"model.remat=auto: none (no memory limit known for {chip})"
    room = AUTO_REMAT_FRACTION * limit
    for policy in AUTO_ORDER:
        needed = estimate(trainer, policy).total
        if needed <= room:
            break
    return policy, (f"model.remat=auto: {policy}, {gib(needed)} per chip by lab.model.memory's "
                    f"estimate, the least recomputation within {AUTO_REMAT_FRACTION:.0%} of "
                    f"the {gib(limit)} of one {chip}")


# What to change when a step does not fit its chips: every refusal for memory ends with it.
FIT_ADVICE = ("lower train.batch_size or raise train.grad_accum, set model.remat=full, "
              "model.activation_dtype=bfloat16 or model.loss_chunk, or use more chips")


def out_of_memory(error: BaseException) -> bool:
    """Whether `error` is XLA's report that a program does not fit the device's memory (the
    compiler's, or the runtime's when an allocation fails)."""
    return "RESOURCE_EXHAUSTED" in str(error)


def check_fits(needed: int, limit: int | None, what: str, chip: str) -> None:
    """Refuse (UserError) a run whose `needed` bytes per chip exceed the chip's `limit`."""
    if limit is None or needed <= limit:
        return
    raise UserError(
        f"{what} needs {gib(needed)} per chip but a {chip} chip holds {gib(limit)}; "
        f"{FIT_ADVICE}")


# The largest TPU slice on which the estimate has been checked against the compiler on every
# rung of the v5e ladder: within 15% on 32 and 64 chips, but as low as 0.71 of it on 128 chips
# and 0.51 on 256, where libtpu all-reduces whole arrays (the output head's float32 gradient
# among them) and keeps them live in a way that differs from rung to rung
# (benchmarks/results/aot-ladder-v5e-*.txt, docs/performance.md).
CHECKED_TPU_CHIPS = 64


def caveat(mesh: Any) -> str:
    """A line saying the estimate may be low, for a TPU mesh larger than CHECKED_TPU_CHIPS;
    else ""."""
    if sharding.mesh_platform(mesh) != "tpu" or mesh.size <= CHECKED_TPU_CHIPS:
        return ""
    return (f"note: on TPU slices of more than {CHECKED_TPU_CHIPS} chips the compiler has "
            "needed up to twice this estimate; `lab train CONFIG --compile-only --topology T` "
            "gives its figure")


def preflight(trainer: Any) -> str:
    """`lab train` before it touches the run directory: the estimate as one line (and the
    caveat where it applies), or a UserError if the run cannot fit its chips."""
    est = estimate(trainer)
    limit, chip = capacity(mesh_device(trainer.mesh))
    check_fits(est.total, limit, "this run (by lab.model.memory's estimate)", chip)
    of = f" of {gib(limit)} ({chip})" if limit else ""
    note = f"{trainer.remat_note}\n" if getattr(trainer, "remat_note", "") else ""
    warning = caveat(trainer.mesh)
    return f"{note}memory: {est.describe()}{of}" + (f"\n{warning}" if warning else "")
