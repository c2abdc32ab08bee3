"""What a train step will run on a GPU or TPU, read from the program without such a device.

    lab train CONFIG --lower cuda|tpu [--json OUT] [--topology T]

The real step (lab.train.build_trainer) is traced and lowered for the target platform: on an
abstract mesh for `cuda` and for `tpu` without a topology, on a TPU slice's abstract devices
with `--topology` (libtpu), where it is also compiled so that the collectives XLA's SPMD
partitioner adds can be counted. The summary gives:

- the matmuls (dot_general) by operand dtypes, each with its FLOPs per step (a scanned block's
  counted once in the count and `n_layers` times in the FLOPs), read from the traced step;
  float32 x float32 matmuls are named by the code they come from, and those that a config asks
  for (Muon's float32 Newton-Schulz) are marked deliberate;
- the custom calls of the lowered StableHLO (cuDNN attention, Pallas kernels);
- the collectives: those the program writes out (shard_map) and, when compiled, XLA's;
- the bytes of parameters and optimizer state per chip and of the activations the backward
  pass keeps (jax.ad_checkpoint.saved_residuals of one micro-batch, all chips, by dtype).

cuDNN's attention asks the local GPU for its cuDNN version and compute capability while it is
traced; without a GPU they are answered as for an H100 with cuDNN 9.10 (`cudnn_without_gpu`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lab.config import Config
from lab.errors import UserError

PLATFORMS = {"cuda": "gpu", "tpu": "tpu"}  # --lower name -> the mesh's platform
# Without --topology the memory figures (and model.remat=auto) assume this chip.
ASSUMED_KIND = {"cuda": "NVIDIA H100 80GB HBM3", "tpu": "TPU v5 lite"}
_SHORT = {"bfloat16": "bf16", "float32": "f32", "float16": "f16", "float64": "f64"}
# float32 x float32 matmuls made on purpose, by (part of) the file they come from.
DELIBERATE_F32 = {
    "lab/optim/muon.py": "Muon's Newton-Schulz in float32 (optim.muon_ns_dtype=float32)",
    "lab/model/moe.py:MoE.__call__": "the MoE router's logits in float32 (D x experts: small, and "
                               "the top-k choice is sensitive to rounding)",
    "splash_attention_kernel.py": "splash attention's backward: the row sums of dO * O, a "
                                  "float32 reduction outside the kernel",
}
# Custom calls that only carry sharding, not kernels.
_SHARDING_CALLS = {"Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape"}
_COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "collective_permute",
                "collective_broadcast")


@dataclasses.dataclass
class Dots:
    """The dot_generals of one operand-dtype pair."""

    count: int = 0
    flops: float = 0.0


@dataclasses.dataclass
class F32Dots:
    """float32 x float32 matmuls from one place in the code."""

    where: str
    reason: str  # why it is float32 on purpose, or "" when it is not
    count: int = 0
    flops: float = 0.0


@dataclasses.dataclass
class LoweredStep:
    platform: str  # cuda | tpu
    devices: int
    chip: str
    attention: str
    remat: str
    remat_note: str
    dots: dict[str, Dots]
    f32_dots: list[F32Dots]
    custom_calls: dict[str, int]
    collectives: dict[str, int]
    collectives_source: str
    params_bytes: int  # per chip
    opt_bytes: int  # per chip
    saved_bytes: dict[str, int]  # by dtype, the whole micro-batch

    def to_json(self) -> dict:
        return {
            "platform": self.platform, "devices": self.devices, "chip": self.chip,
            "attention": self.attention, "remat": self.remat,
            "dots": {k: d.count for k, d in self.dots.items()},
            "dot_flops": {k: d.flops for k, d in self.dots.items()},
            "f32_dots": [dataclasses.asdict(e) for e in self.f32_dots],
            "custom_calls": self.custom_calls,
            "collectives": self.collectives, "collectives_source": self.collectives_source,
            "bytes": {"params_per_chip": self.params_bytes, "optimizer_per_chip": self.opt_bytes,
                      "saved_activations": sum(self.saved_bytes.values()),
                      "saved_activations_by_dtype": self.saved_bytes},
        }


# ----------------------------------------------------------------------------- reading programs


def dtype_pair(lhs: Any, rhs: Any) -> str:
    """"bf16xbf16", "f32xf32", ... for two operand dtypes."""
    return "x".join(_SHORT.get(str(d), str(d)) for d in (lhs, rhs))


def lowered_pair(eqn: Any, platform: str) -> str:
    """The operand dtypes a dot_general equation lowers to: JAX's lowering converts operands
    of two dtypes to the result's dtype on GPUs (so a float32 cotangent times a bfloat16
    weight is float32 x float32) and keeps them on TPUs."""
    lhs, rhs = (v.aval.dtype for v in eqn.invars[:2])
    if lhs != rhs and platform != "tpu":
        lhs = rhs = eqn.outvars[0].aval.dtype
    return dtype_pair(lhs, rhs)


def dot_flops(eqn: Any) -> float:
    """2 x output elements x contracted size of a dot_general equation."""
    (contract_lhs, _), _ = eqn.params["dimension_numbers"]
    lhs_shape = eqn.invars[0].aval.shape
    out = math.prod(eqn.outvars[0].aval.shape)
    return 2.0 * out * math.prod(lhs_shape[d] for d in contract_lhs)


def ragged_dot_flops(eqn: Any) -> float:
    """2 x every lhs element x the rhs's free size (neither contracted, batch nor group) of a
    ragged_dot_general equation: each row meets one group's matrix, forward and in both
    gradients (2 M K N for M rows of width K against groups of K x N)."""
    numbers = eqn.params["ragged_dot_dimension_numbers"]
    (_, contract_rhs), (_, batch_rhs) = numbers.dot_dimension_numbers
    rhs_shape = eqn.invars[1].aval.shape
    used = set(contract_rhs) | set(batch_rhs) | set(numbers.rhs_group_dimensions)
    free = math.prod(n for d, n in enumerate(rhs_shape) if d not in used)
    return 2.0 * math.prod(eqn.invars[0].aval.shape) * free


DOT_FLOPS = {"dot_general": dot_flops, "ragged_dot_general": ragged_dot_flops}


def _sub_jaxprs(eqn: Any) -> Iterator[tuple[Any, int]]:
    """(jaxpr, times it runs per run of eqn) for each jaxpr inside an equation; a Pallas
    kernel's body is the kernel's business, not XLA's, and is left out."""
    if eqn.primitive.name == "pallas_call":
        return
    times = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
    for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            inner = getattr(item, "jaxpr", item)  # ClosedJaxpr -> Jaxpr
            if hasattr(inner, "eqns"):
                yield inner, times


def _where(eqn: Any) -> str:
    """The file (project-relative, or from its package down) and function an equation was
    traced from."""
    from jax._src import source_info_util

    root = str(Path(__file__).resolve().parents[2]) + os.sep
    frame = source_info_util.user_frame(eqn.source_info.traceback)
    if frame is None:
        return "unknown"
    name = frame.file_name.rpartition("site-packages" + os.sep)[2]
    return f"{name.removeprefix(root)}:{frame.function_name}"


def count_dots(jaxpr: Any, platform: str) -> tuple[dict[str, Dots], list[F32Dots]]:
    """The dot_generals (and the grouped ragged_dot_generals of a mixture of experts) of a
    jaxpr and everything inside it, by the operand dtypes they lower to on `platform`, and the
    float32 x float32 ones by where they come from."""
    dots: dict[str, Dots] = collections.defaultdict(Dots)
    f32: dict[str, F32Dots] = {}

    def walk(jaxpr: Any, times: int) -> None:
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in DOT_FLOPS:
                key = lowered_pair(eqn, platform)
                flops = DOT_FLOPS[eqn.primitive.name](eqn) * times
                dots[key].count += 1
                dots[key].flops += flops
                if key == "f32xf32":
                    where = _where(eqn)
                    reason = next((r for f, r in DELIBERATE_F32.items() if f in where),
                                  "")
                    entry = f32.setdefault(where, F32Dots(where, reason))
                    entry.count += 1
                    entry.flops += flops
            for inner, k in _sub_jaxprs(eqn):
                walk(inner, times * k)

    walk(jaxpr, 1)
    return dict(sorted(dots.items())), sorted(f32.values(), key=lambda e: e.where)


def custom_calls(stablehlo: str) -> dict[str, int]:
    """Custom-call targets of a StableHLO module (kernels, not sharding markers), by count."""
    names = re.findall(r"stablehlo\.custom_call @([\w$.\-]+)", stablehlo)
    names += re.findall(r'call_target_name = "([^"]+)"', stablehlo)
    return dict(sorted(collections.Counter(n for n in names if n not in _SHARDING_CALLS).items()))


def stablehlo_collectives(stablehlo: str) -> dict[str, int]:
    found = collections.Counter(re.findall(r"stablehlo\.(" + "|".join(_COLLECTIVES) + r")\b",
                                           stablehlo))
    return dict(sorted(found.items()))


def hlo_collectives(hlo: str) -> dict[str, int]:
    """Collectives of compiled (partitioned) HLO text; an async pair counts once."""
    names = "|".join(c.replace("_", "-") for c in _COLLECTIVES)
    found = collections.Counter(m.replace("-", "_") for m in
                                re.findall(r"\b(" + names + r")(?:-start)?\(", hlo))
    return dict(sorted(found.items()))


# ----------------------------------------------------------------------------- lowering


@contextlib.contextmanager
def cudnn_without_gpu() -> Iterator[None]:
    """jax.nn.dot_product_attention(implementation="cudnn") traced on a host without a GPU:
    its checks of the local cuDNN version and compute capability answer as for an H100
    (compute capability 9.0) with cuDNN 9.10. Restored on exit."""
    from jax._src.cudnn import fused_attention_stablehlo as fused

    stubs = {"check_cudnn_version": lambda: 91000,
             "check_compute_capability": lambda capability: float(capability) <= 9.0,
             "is_cuda_compute_capability_equal": lambda capability: capability == "9.0"}
    saved = {name: getattr(fused, name) for name in stubs}
    try:
        for name, stub in stubs.items():
            setattr(fused, name, stub)
        yield
    finally:
        for name, original in saved.items():
            setattr(fused, name, original)


def _inputs(trainer: Any, mesh: Any) -> tuple[Any, Any]:
    """Abstract state and batch of the step, carrying their shardings."""
    import jax
    import jax.numpy as jnp

    from lab.accel import sharding
    from lab.run.checkpoint import abstract_with_shardings

    cfg = trainer.cfg
    state = abstract_with_shardings(jax.eval_shape(trainer.init_fn), trainer.state_shardings)
    batch = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.train.seq_len + 1), jnp.int32,
                                 sharding=sharding.batch_sharding(mesh))
    return state, batch


def saved_activation_bytes(trainer: Any) -> dict[str, int]:
    """Bytes by dtype of what the backward pass of one micro-batch keeps (its residuals,
    all chips), the parameters themselves left out."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax._src.ad_checkpoint import saved_residuals  # public only as print_saved_residuals

    from lab.model.transformer import loss_fn

    cfg = trainer.cfg
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                          trainer.abstract_params)
    rows = cfg.train.batch_size // cfg.train.grad_accum
    tokens = jax.ShapeDtypeStruct((rows, cfg.train.seq_len + 1), jnp.int32)
    by_dtype: dict[str, int] = collections.Counter()
    for aval, what in saved_residuals(
            lambda p, t: loss_fn(nnx.merge(trainer.graphdef, p), t)[0], params, tokens):
        if "from the argument" not in what:
            name = _SHORT.get(str(aval.dtype), str(aval.dtype))
            by_dtype[name] += aval.size * aval.dtype.itemsize
    return dict(sorted(by_dtype.items()))


def _cpu_devices(n: int) -> list:
    import jax

    devices = jax.devices("cpu")
    if len(devices) < n:
        raise UserError(f"lowering this mesh needs {n} devices but this host has {len(devices)} "
                        f"CPU devices; set XLA_FLAGS=--xla_force_host_platform_device_count={n} "
                        "or lower a smaller mesh")
    return devices[:n]


def lower_step(cfg: Config, platform: str, topology: str | None = None) -> LoweredStep:
    """Trace and lower `cfg`'s train step for `platform` (cuda | tpu), on a TPU topology's
    chips when one is given, and read what it runs."""
    from lab.accel import sharding
    from lab.model import memory
    from lab.model.kernels import attention
    from lab.train import build_trainer
    from lab.train.aot import abstract_mesh, topology_devices

    if topology:
        mesh = sharding.make_mesh(cfg.mesh, topology_devices(topology))
        facts = trainer = build_trainer(cfg, mesh)
    else:
        # The facts (model.remat=auto, the memory figures) for the assumed chip; the program
        # lowered on as many local CPU devices with the target's kernels (cuDNN's kernel is
        # custom-partitioned, which an abstract mesh cannot lower).
        n = math.prod(max(1, getattr(cfg.mesh, axis)) for axis in sharding.MESH_AXES)
        facts = build_trainer(cfg, abstract_mesh(cfg, n, PLATFORMS[platform],
                                                 ASSUMED_KIND[platform]))
        mesh = sharding.make_mesh(cfg.mesh, _cpu_devices(n))
        trainer = build_trainer(facts.cfg, mesh, PLATFORMS[platform])
    stub = cudnn_without_gpu() if platform == "cuda" else contextlib.nullcontext()
    with stub, sharding.mesh_context(mesh):
        traced = trainer.train_step.trace(*_inputs(trainer, mesh))
        lowered = traced.lower(lowering_platforms=(platform,))
        saved = saved_activation_bytes(trainer)
    text = lowered.as_text()
    dots, f32 = count_dots(traced.jaxpr.jaxpr, platform)
    collectives, source = stablehlo_collectives(text), "written in the program (shard_map)"
    if topology:
        collectives = hlo_collectives(lowered.compile().as_text())
        source = f"after XLA's partitioning, compiled for {topology}"
    est = memory.estimate(facts)
    _, chip = memory.capacity(memory.mesh_device(facts.mesh))
    model = facts.cfg.model
    return LoweredStep(platform, mesh.devices.size, chip,
                       attention.resolve(model.attention, PLATFORMS[platform]), model.remat,
                       facts.remat_note, dots, f32, custom_calls(text), collectives, source,
                       est.params, est.opt_state, saved)


# ----------------------------------------------------------------------------- the command


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} x{n}" for name, n in counts.items()) or "none"


def summary_lines(step: LoweredStep) -> list[str]:
    """The one-screen summary `lab train --lower` prints."""
    from lab.model.memory import gib

    lines = [f"lowered for {step.platform}: {step.devices} x {step.chip}, attention "
             f"{step.attention}, remat {step.remat}"]
    lines += [step.remat_note] if step.remat_note else []
    lines.append("dots by operand dtypes    count   TFLOP per step")
    lines += [f"  {key:<22} {d.count:>6}   {d.flops / 1e12:>10.3f}" for key, d in step.dots.items()]
    if not step.f32_dots:
        lines.append("float32 x float32 dots: none")
    for e in step.f32_dots:
        why = f"deliberate: {e.reason}" if e.reason else "not deliberate"
        lines.append(f"  f32xf32 from {e.where}: {e.count} dots, {e.flops / 1e12:.3f} TFLOP "
                     f"({why})")
    lines.append(f"custom calls: {_counts(step.custom_calls)}")
    lines.append(f"collectives ({step.collectives_source}): {_counts(step.collectives)}")
    saved = ", ".join(f"{k} {gib(v)}" for k, v in step.saved_bytes.items()) or "none"
    lines.append(f"bytes: parameters {gib(step.params_bytes)} and optimizer state "
                 f"{gib(step.opt_bytes)} per chip; saved activations "
                 f"{gib(sum(step.saved_bytes.values()))} per micro-batch, all chips ({saved})")
    return lines


def check_json_path(path: str) -> Path:
    """--json OUT must be a file in a writable folder; checked before anything is traced."""
    out = Path(path)
    folder = out.parent if str(out.parent) else Path(".")
    if out.is_dir() or not folder.is_dir() or not os.access(folder, os.W_OK):
        raise UserError(f"--json {path}: cannot write a file there; name a file in an "
                        "existing, writable folder")
    return out


def lower_command(cfg: Config, platform: str, topology: str | None,
                  json_out: str | None) -> int:
    """`lab train CONFIG --lower cuda|tpu [--topology T] [--json OUT]`."""
    from lab.train.aot import with_known_vocab

    if platform not in PLATFORMS:
        raise UserError(f"--lower {platform}: unknown platform; use --lower cuda or --lower tpu")
    if topology and platform != "tpu":
        raise UserError("--topology is a TPU slice: use it with --lower tpu (or --compile-only)")
    out = check_json_path(json_out) if json_out else None
    cfg, note = with_known_vocab(cfg)
    if note:
        print(note)
    step = lower_step(cfg, platform, topology)
    print("\n".join(summary_lines(step)), flush=True)
    if out:
        out.write_text(json.dumps(step.to_json(), indent=2) + "\n")
    return 0
