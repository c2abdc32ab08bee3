"""Compile the train step ahead of time, for a TPU topology from any host or for the local
devices, and read each chip's memory from the compiler.

    lab train CONFIG --compile-only [--topology v5e:16x16]
    lab sweep SWEEP --dry-run --topology v5e:16x16

A topology ("v5e:2x2", "v5p:4x4x4") gives abstract devices through libtpu's compiler
(jax.experimental.topologies); the config's mesh is laid over them, the real step is built by
lab.train.build_trainer and lowered with the state's and the batch's shardings, and the compiled
program's memory analysis says what one chip holds: arguments (parameters, optimizer state, the
batch), outputs, temporaries and generated code, less what the donated state aliases.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any

from lab.config import Config
from lab.errors import UserError, shown

TOPOLOGY = re.compile(r"^(v4|v5e|v5p|v6e):\d+(x\d+){1,2}$")


@dataclasses.dataclass(frozen=True)
class CompiledMemory:
    """One chip's bytes, as the compiler assigned them."""

    arguments: int
    outputs: int
    temporaries: int
    code: int
    aliased: int  # outputs that reuse a donated argument's buffer

    @property
    def total(self) -> int:
        return self.arguments + self.outputs + self.temporaries + self.code - self.aliased

    @classmethod
    def of(cls, compiled: Any) -> CompiledMemory:
        m = compiled.memory_analysis()
        return cls(m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes,
                   m.generated_code_size_in_bytes, m.alias_size_in_bytes)


def check_topology(topology: str) -> None:
    """Refuse what is not a TPU slice's name such as "v5e:16x16" (an empty one included)."""
    if not TOPOLOGY.match(topology):
        raise UserError(f"--topology {shown(topology)} is not a TPU topology; write it as "
                        "GENERATION:SHAPE, e.g. v5e:2x2, v5e:16x16 or v5p:4x4x4")


def topology_devices(topology: str) -> list:
    """The abstract devices of a TPU slice, e.g. "v5e:16x16" (256 chips)."""
    check_topology(topology)
    from lab.backend import prepare_tpu_compiler

    prepare_tpu_compiler(topology)  # before libtpu loads
    from jax.experimental import topologies

    try:
        import libtpu  # noqa: F401  (the compiler; the `tpu` extra)
    except ImportError:
        raise UserError("compiling for a TPU topology needs libtpu; install the tpu extra "
                        "(pip install -e '.[tpu]')") from None
    try:
        return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
    except Exception as e:  # libtpu rejects shapes a slice cannot have
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--topology {topology}: libtpu refused it ({first}); use a slice "
                        "shape such as v5e:2x2, v5e:4x8 or v5e:16x16") from None


def with_known_vocab(cfg: Config) -> tuple[Config, str]:
    """The config with model.vocab_size filled in without reading any tokens: the prepared
    data's vocabulary if data.path holds prepared data, else the byte tokenizer's."""
    from lab.model.accounting import padded_vocab, with_vocab

    if cfg.model.vocab_size:
        return cfg, ""
    vocab, source = 257, "the byte tokenizer's (set model.vocab_size for another)"
    if cfg.data.path:
        try:
            from lab.data import open_dataset

            vocab, source = open_dataset(cfg.data.path).vocab_size, f"the data in {cfg.data.path}"
        except (UserError, OSError):
            pass
    note = f"vocabulary {padded_vocab(vocab)} from {source}"
    return dataclasses.replace(cfg, model=with_vocab(cfg.model, vocab)), note


def lower_train_step(trainer: Any) -> Any:
    """The trainer's jitted step lowered for abstract inputs carrying their shardings."""
    import jax
    import jax.numpy as jnp

    from lab.accel import sharding
    from lab.run.checkpoint import abstract_with_shardings

    cfg = trainer.cfg
    state = abstract_with_shardings(jax.eval_shape(trainer.init_fn), trainer.state_shardings)
    batch = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.train.seq_len + 1), jnp.int32,
                                 sharding=sharding.batch_sharding(trainer.mesh))
    with jax.set_mesh(trainer.mesh):
        return trainer.train_step.lower(state, batch)


@dataclasses.dataclass(frozen=True)
class Report:
    """What one compile found: the chip, its capacity, the compiler's and the estimate's
    figures, and the compile time."""

    devices: int
    chip: str
    capacity: int | None
    compiled: CompiledMemory
    estimate: Any  # lab.model.memory.MemoryEstimate
    seconds: float

    @property
    def fits(self) -> bool:
        return self.capacity is None or self.compiled.total <= self.capacity

    def lines(self) -> list[str]:
        from lab.model.memory import gib

        c = self.compiled
        cap = gib(self.capacity) if self.capacity else "unknown"
        spare = (f", {1 - c.total / self.capacity:.0%} spare" if self.capacity and self.fits
                 else "")
        return [
            f"compiled for {self.devices} x {self.chip} in {self.seconds:.0f} s; per chip:",
            f"  arguments     {gib(c.arguments):>12}",
            f"  outputs       {gib(c.outputs):>12}",
            f"  temporaries   {gib(c.temporaries):>12}",
            f"  code          {gib(c.code):>12}",
            f"  aliased       {gib(-c.aliased):>12}  (the donated state)",
            f"  total         {gib(c.total):>12}  of {cap} HBM{spare}",
            f"  estimate      {gib(self.estimate.total):>12}  (lab.model.memory)",
        ]


def compile_report(cfg: Config, topology: str | None = None) -> Report:
    """Build the real train step for `topology`'s chips (or the local devices), compile it,
    and read one chip's memory."""
    import jax

    from lab.accel import sharding
    from lab.model import memory
    from lab.model.memory import gib
    from lab.train import build_trainer

    devices = topology_devices(topology) if topology else jax.devices()
    mesh = sharding.make_mesh(cfg.mesh, devices)
    trainer = build_trainer(cfg, mesh)
    estimate = memory.estimate(trainer)
    start = time.perf_counter()
    limit, chip = memory.capacity(devices[0])
    try:
        compiled = lower_train_step(trainer).compile()
    except Exception as e:  # the TPU compiler refuses a program larger than HBM outright
        if not memory.out_of_memory(e) and "exceeds" not in str(e):
            raise
        where = topology or "the local devices"
        raise UserError(
            f"the train step needs more than the {gib(limit) if limit else 'available'} a "
            f"{chip} chip holds per chip on {where} (the compiler ran out of memory); "
            f"{memory.FIT_ADVICE}") from None
    seconds = time.perf_counter() - start
    return Report(len(devices), chip, limit, CompiledMemory.of(compiled), estimate, seconds)


def compile_only(cfg: Config, topology: str | None) -> int:
    """`lab train CONFIG --compile-only [--topology T]`: print one chip's memory; a step that
    cannot fit is a UserError (exit 2)."""
    cfg, note = with_known_vocab(cfg)
    if note:
        print(note)
    report = compile_report(cfg, topology)
    print("\n".join(report.lines()), flush=True)
    if not report.fits:
        from lab.model.memory import FIT_ADVICE, gib

        where = topology or "the local devices"
        raise UserError(
            f"the train step needs {gib(report.compiled.total)} per chip on {where} but a "
            f"{report.chip} chip holds {gib(report.capacity)}; {FIT_ADVICE}")
    return 0


def _short(n: int) -> str:
    """Bytes as one word for a table column."""
    from lab.model.memory import gib

    return gib(n).replace(" ", "")


def sweep_memory(sweep: Any, topology: str | None) -> tuple[dict[str, list[str]], str, str]:
    """`lab sweep --dry-run [--topology T]`: each run's estimated memory per chip and, for a
    topology, the compiler's figure; a one-line problem when a run cannot fit (or cannot be
    laid out on those chips), else ""; and without the compiler's figure, the estimate's
    caveat on a large TPU slice (lab.model.memory.caveat), else ""."""
    import jax

    from lab.accel import sharding
    from lab.model import memory
    from lab.train import build_trainer

    devices = topology_devices(topology) if topology else jax.devices()
    limit, chip = memory.capacity(devices[0])
    estimated, compiled, too_big, unplaced = [], [], [], []
    note = ""
    for run in sweep.runs:
        cfg, _ = with_known_vocab(run.config)
        try:
            trainer = build_trainer(cfg, sharding.make_mesh(cfg.mesh, devices))
        except UserError as e:
            estimated.append("-")
            compiled.append("-")
            unplaced.append(f"{run.name} ({e})")
            continue
        needed = memory.estimate(trainer).total
        estimated.append(_short(needed))
        note = note or ("" if topology else memory.caveat(trainer.mesh))
        if topology:
            needed = CompiledMemory.of(lower_train_step(trainer).compile()).total
            compiled.append(_short(needed))
        if limit is not None and needed > limit:
            too_big.append(run.name)
    columns = {"mem/chip": estimated}
    if topology:
        columns["XLA/chip"] = compiled
    where = f"{len(devices)} x {chip}" + (f" ({topology})" if topology else "")
    problem = ""
    if too_big:
        from lab.model.memory import gib

        problem = (f"{', '.join(too_big)} cannot fit a {chip} chip's {gib(limit)} on {where}; "
                   "lower their batch per chip, raise train.grad_accum, or use model.remat, "
                   "model.activation_dtype=bfloat16 or model.loss_chunk")
    elif unplaced and topology:
        problem = f"cannot lay out on {where}: {unplaced[0]}"
    return columns, problem, note


# jax.Device.platform names -> jax.export platform names
_EXPORT_PLATFORMS = {"tpu": "tpu", "gpu": "cuda", "cuda": "cuda", "rocm": "rocm", "cpu": "cpu"}


def abstract_mesh(cfg: Config, n_devices: int, platform: str, device_kind: str = "") -> Any:
    """An AbstractMesh of the config's mesh axes over `n_devices` devices of `platform` (tpu |
    gpu | cpu), for tracing and exporting without such devices."""
    import jax
    from jax._src.mesh import AbstractDevice  # no public constructor yet (jax 0.10)
    from jax.sharding import AxisType

    from lab.accel import sharding

    shape = sharding.mesh_shape(cfg.mesh, n_devices)
    device = AbstractDevice(device_kind=device_kind or platform, num_cores=None,
                            platform=platform)
    return jax.sharding.AbstractMesh(shape, sharding.MESH_AXES,
                                     axis_types=(AxisType.Auto,) * len(shape),
                                     abstract_device=device)


def export_train_step(cfg: Config, platform: str, n_devices: int = 4) -> Any:
    """The whole train step exported (jax.export) for `platform` (tpu | gpu) on an abstract
    mesh of `n_devices`: StableHLO as that platform's compiler would receive it."""
    import jax
    import jax.numpy as jnp

    from lab.accel import sharding
    from lab.run.checkpoint import abstract_with_shardings
    from lab.train import build_trainer

    mesh = abstract_mesh(cfg, n_devices, platform)
    trainer = build_trainer(cfg, mesh)
    state = abstract_with_shardings(jax.eval_shape(trainer.init_fn), trainer.state_shardings)
    batch = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.train.seq_len + 1), jnp.int32,
                                 sharding=sharding.batch_sharding(mesh))
    with sharding.mesh_context(mesh):
        return jax.export.export(trainer.train_step,
                                 platforms=(_EXPORT_PLATFORMS[platform],))(state, batch)
