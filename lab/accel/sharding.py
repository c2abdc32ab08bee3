"""Every sharding decision of the lab, in one place.

The mesh has four axes: `data` (replicated parameters), `fsdp` (data parallel with parameters
sharded), `expert` (a mixture of experts' experts split across devices, data parallel
everywhere else; lab.model.moe exchanges the tokens) and `tensor` (heads and MLP width split across
devices). Parameters declare their logical axes where they are created (lab.model.roles); `RULES`
maps logical axes to mesh axes. The batch is split over data x fsdp x expert.
When the devices span several TPU slices, `data` is the axis over the slices' network (DCN) and
the others stay inside a slice (MaxText's hybrid mesh). A parameter dimension its mesh axis
does not divide is an error, never silent replication; so is a tensor axis that leaves a host's
fast interconnect.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lab.config import MeshConfig
from lab.errors import UserError
from lab.tree import path_names

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")

# logical axis -> mesh axis (None = replicated)
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": BATCH_AXES,
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
    "expert": "expert",
    "router": None,
    "layers": None,
    "norm": None,
}


def initialize_distributed() -> None:
    """Join a multi-process run when launched as one (launch.local or a TPU pod).

    launch.local sets LAB_COORDINATOR, LAB_NUM_PROCESSES, LAB_PROCESS_ID and LAB_LOCAL_DEVICES;
    on Cloud TPU, LAB_COORDINATOR=auto lets JAX discover the slice, and LAB_COORDINATOR=IP:PORT
    alone (launch.tpu --coordinator-port) fixes the address while JAX still finds the process
    count and id. Must run before any computation starts the backend. Safe to call twice.
    """
    coordinator = os.environ.get("LAB_COORDINATOR")
    if not coordinator or jax.distributed.is_initialized():
        return
    if os.environ.get("LAB_LOCAL_DEVICES"):
        jax.config.update("jax_num_cpu_devices", int(os.environ["LAB_LOCAL_DEVICES"]))
    if coordinator == "auto":
        jax.distributed.initialize()
    else:
        count, index = os.environ.get("LAB_NUM_PROCESSES"), os.environ.get("LAB_PROCESS_ID")
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=int(count) if count else None,  # None: the cluster tells JAX
            process_id=int(index) if index else None,
            coordinator_bind_address=bind_address(coordinator),
        )


def bind_address(coordinator: str) -> str | None:
    """Where process 0's coordinator listens: the advertised address itself when it is an IP
    (launch.local's 127.0.0.1:PORT stays on loopback instead of every interface); JAX's
    default (all interfaces) for a host name."""
    host, _, port = coordinator.rpartition(":")
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    return coordinator if port else None


def is_main_process() -> bool:
    """Process 0 writes the files every process would write alike (configs, reports)."""
    return jax.process_index() == 0


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, ...]:
    """Resolve -1 to the remaining devices and check the product equals the device count:
    the sizes in MESH_AXES order."""
    sizes = [getattr(cfg, axis) for axis in MESH_AXES]
    named = ", ".join(f"{axis}={getattr(cfg, axis)}" for axis in MESH_AXES)
    fixed = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if n_devices % fixed:
            raise UserError(
                f"mesh: {n_devices} devices do not divide by the fixed axes' product {fixed} "
                f"({named}); choose sizes that divide the device count")
        sizes = [n_devices // fixed if s == -1 else s for s in sizes]
    if int(np.prod(sizes)) != n_devices:
        shown = " x ".join(f"{axis}={size}" for axis, size in zip(MESH_AXES, sizes, strict=True))
        raise UserError(
            f"mesh {shown} needs {int(np.prod(sizes))} devices but {n_devices} are available; "
            "set one axis to -1 or make the product match")
    return tuple(sizes)


def slice_count(devices: Sequence) -> int:
    """How many TPU slices (joined by the data-centre network) the devices span."""
    return len({getattr(d, "slice_index", 0) for d in devices})


def hybrid_shapes(shape: Sequence[int], slices: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(within a slice, across slices) shapes of a mesh whose first axis is data: the data
    axis is split over the slices, the other axes stay inside one."""
    data, *rest = shape
    if data % slices:
        raise UserError(
            f"mesh: the devices span {slices} slices and the data axis runs across them, but "
            f"mesh.data={data} does not divide by {slices}; set mesh.data to a multiple of "
            f"{slices}, e.g. mesh.data={slices} mesh.fsdp=-1")
    return (data // slices, *rest), (slices, *(1,) * len(rest))


def interconnect(device) -> tuple[str, int]:
    """The group of devices joined by a fast interconnect: a TPU slice (ICI spans its hosts),
    else one process (its host's devices)."""
    if getattr(device, "platform", "") == "tpu":
        return "slice", getattr(device, "slice_index", 0)
    return "process", device.process_index


PLURAL = {"slice": "slices", "process": "processes"}


def check_tensor_groups(grid: np.ndarray) -> None:
    """Tensor parallelism communicates in every layer: each tensor group (a row along the last
    mesh axis) must stay inside one interconnect group, never cross the network."""
    for group in grid.reshape(-1, grid.shape[-1]):
        where = {interconnect(d) for d in group}
        if len(where) > 1:
            kind = next(iter(where))[0]
            raise UserError(
                f"mesh: the tensor axis ({grid.shape[-1]} devices) spans {len(where)} "
                f"{PLURAL[kind]} "
                f"({', '.join(f'{k} {i}' for k, i in sorted(where))}), so tensor parallelism "
                f"would run over the network; make mesh.tensor at most the devices of one "
                f"{kind} ({len(group) // len(where)}) and use mesh.fsdp or mesh.data for the "
                "rest")


def device_grid(cfg: MeshConfig, devices: Sequence) -> np.ndarray:
    """The devices laid out (data, fsdp, expert, tensor), hybrid when they span several
    slices."""
    shape = mesh_shape(cfg, len(devices))
    # Off TPU the layout is the list's order: keep each process's devices next to each other.
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    slices = slice_count(devices)
    if slices > 1:
        ici, dcn = hybrid_shapes(shape, slices)
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices,
                                                    allow_split_physical_axes=True)
    else:
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    check_tensor_groups(grid)
    return grid


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    # Auto axis types: under Explicit ones (jax.make_mesh's default) nnx.Embed's gather fails.
    return Mesh(device_grid(cfg, devices), MESH_AXES,
                axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(logical: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh,
                    name: str = "array") -> P:
    """PartitionSpec for logical axes. A mesh axis of size 1 shards nothing; any other must
    divide its dimension (no silent replication: a parameter meant to be split across devices
    that stays whole on each of them can run out of memory only at scale)."""
    spec = []
    for axis, dim in zip(logical, shape, strict=True):
        if axis is not None and axis not in RULES:
            raise ValueError(f"{name}: no sharding rule for the logical axis {axis!r}; add it to "
                             "lab.accel.sharding.RULES")
        mesh_axes = RULES.get(axis) if axis else None
        if mesh_axes is not None:
            names = (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes
            size = int(np.prod([mesh.shape[n] for n in names]))
            if size == 1:
                mesh_axes = None
            elif dim % size:
                where = " x ".join(f"mesh.{n}={mesh.shape[n]}" for n in names)
                raise UserError(
                    f"parameter {name}: its {axis!r} dimension ({dim}) does not divide by the "
                    f"mesh axis it is split over ({where}); choose a mesh size that divides "
                    f"{dim} or a model size that divides by {size}")
        spec.append(mesh_axes)
    return P(*spec)


def param_shardings(params_shape, specs, mesh: Mesh):
    """A tree of NamedShardings matching a tree of parameters (or their ShapeDtypeStructs),
    from the axes declared in `specs`, a tree of lab.model.roles.ParamSpec of the same structure."""
    def one(path, leaf, spec):
        name = "/".join(map(str, path_names(path)))
        if len(spec.axes) != len(leaf.shape):
            raise ValueError(f"parameter {name} of shape {leaf.shape} declares axes {spec.axes}")
        return NamedSharding(mesh, logical_to_spec(spec.axes, leaf.shape, mesh, name))
    return jax.tree_util.tree_map_with_path(one, params_shape, specs)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Tokens (batch, seq): rows split over data x fsdp x expert."""
    return NamedSharding(mesh, P(BATCH_AXES, None))


def batch_size_divisor(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def global_batch(local_tokens: np.ndarray, mesh: Mesh) -> jax.Array:
    """A global (batch, seq) array from this process's rows of it."""
    return jax.make_array_from_process_local_data(batch_sharding(mesh), local_tokens)


def constrain_activations(x_BxLxD: jax.Array) -> jax.Array:
    """Keep the residual stream split by batch between blocks (a no-op outside a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x_BxLxD
    batch = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    return jax.lax.with_sharding_constraint(x_BxLxD, P(batch, None, None))


def mesh_platform(mesh: Mesh | jax.sharding.AbstractMesh) -> str:
    """cpu | gpu | tpu: the platform of a mesh's devices, real or abstract (an AbstractMesh
    made with `abstract_device`, as for exporting to a platform this host lacks)."""
    if isinstance(mesh, jax.sharding.AbstractMesh):
        device = mesh.abstract_device
        platform = device.platform if device is not None else jax.default_backend()
    else:
        platform = mesh.devices.flat[0].platform
    return "gpu" if platform in ("cuda", "rocm") else platform


def mesh_context(mesh: Mesh | jax.sharding.AbstractMesh):
    """The context that makes `mesh` current: set_mesh for real devices, use_abstract_mesh
    for an AbstractMesh (tracing and exporting only)."""
    if isinstance(mesh, jax.sharding.AbstractMesh):
        return jax.sharding.use_abstract_mesh(mesh)
    return jax.set_mesh(mesh)
