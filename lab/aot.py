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
from lab.errors import UserError

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


def topology_devices(topology: str) -> list:
    """The abstract devices of a TPU slice, e.g. "v5e:16x16" (256 chips)."""
    if not TOPOLOGY.match(topology):
        raise UserError(f"--topology {topology!r} is not a TPU topology; write it as "
                        "GENERATION:SHAPE, e.g. v5e:2x2, v5e:16x16 or v5p:4x4x4")
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
    from lab.model import padded_vocab, with_vocab

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

    from lab import sharding
    from lab.checkpoint import abstract_with_shardings

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
    estimate: Any  # lab.memory.MemoryEstimate
    seconds: float

    @property
    def fits(self) -> bool:
        return self.capacity is None or self.compiled.total <= self.capacity

    def lines(self) -> list[str]:
        from lab.memory import gib

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
            f"  estimate      {gib(self.estimate.total):>12}  (lab.memory)",
        ]


def compile_report(cfg: Config, topology: str | None = None) -> Report:
    """Build the real train step for `topology`'s chips (or the local devices), compile it,
    and read one chip's memory."""
    import jax

    from lab import memory, sharding
    from lab.train import build_trainer

    devices = topology_devices(topology) if topology else jax.devices()
    mesh = sharding.make_mesh(cfg.mesh, devices)
    trainer = build_trainer(cfg, mesh)
    estimate = memory.estimate(trainer)
    start = time.perf_counter()
    compiled = lower_train_step(trainer).compile()
    seconds = time.perf_counter() - start
    limit, chip = memory.capacity(devices[0])
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
        from lab.memory import gib

        where = topology or "the local devices"
        raise UserError(
            f"the train step needs {gib(report.compiled.total)} per chip on {where} but a "
            f"{report.chip} chip holds {gib(report.capacity)}; lower train.batch_size or raise "
            "train.grad_accum, set model.remat=full, model.activation_dtype=bfloat16 or "
            "model.loss_chunk, or use more chips")
    return 0
