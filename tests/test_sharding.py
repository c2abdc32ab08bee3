"""lab.accel.sharding: the hybrid (multi-slice) mesh, tensor groups kept off the network, no silent
replication of a parameter its mesh axis does not divide, and the coordinator's address."""

import dataclasses
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from lab.accel.sharding import (
    bind_address,
    check_tensor_groups,
    device_grid,
    hybrid_shapes,
    make_mesh,
    param_shardings,
)
from lab.config import MeshConfig, load_config
from lab.errors import UserError
from lab.model.accounting import with_vocab
from lab.model.transformer import Transformer, param_specs

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    """What the mesh code reads of a device."""

    id: int
    process_index: int
    slice_index: int = 0
    platform: str = "cpu"
    device_kind: str = "fake"


def fake_devices(slices: int, processes_per_slice: int, per_process: int) -> list[FakeDevice]:
    devices, i = [], 0
    for s in range(slices):
        for p in range(processes_per_slice):
            for _ in range(per_process):
                devices.append(FakeDevice(i, s * processes_per_slice + p, s))
                i += 1
    return devices


def test_hybrid_shapes_put_the_data_axis_across_slices():
    assert hybrid_shapes((4, 2, 1), 2) == ((2, 2, 1), (2, 1, 1))
    assert hybrid_shapes((2, 16, 4), 2) == ((1, 16, 4), (2, 1, 1))
    with pytest.raises(UserError, match="mesh.data=1 does not divide by 2; set mesh.data"):
        hybrid_shapes((1, 8, 1), 2)


def test_device_grid_keeps_each_slice_together():
    devices = fake_devices(slices=2, processes_per_slice=2, per_process=2)
    shuffled = [devices[i] for i in np.random.default_rng(0).permutation(len(devices))]
    grid = device_grid(MeshConfig(data=2, fsdp=-1, tensor=2), shuffled)
    assert grid.shape == (2, 2, 1, 2)  # data, fsdp, expert, tensor
    slice_of = np.vectorize(lambda d: d.slice_index)(grid)
    assert (slice_of == np.arange(2)[:, None, None, None]).all()  # data index i = slice i
    assert sorted(d.id for d in grid.flat) == list(range(8))
    with pytest.raises(UserError, match="devices span 2 slices"):
        device_grid(MeshConfig(data=1, fsdp=-1, tensor=1), devices)
    # One slice: an ordinary mesh, whatever the data axis.
    assert device_grid(MeshConfig(data=1, fsdp=-1, tensor=1), fake_devices(1, 2, 4)).shape == \
        (1, 8, 1, 1)


def test_tensor_axis_stays_inside_a_host():
    devices = fake_devices(slices=1, processes_per_slice=2, per_process=4)  # 2 hosts x 4
    for tensor in (1, 2, 4):
        device_grid(MeshConfig(data=1, fsdp=-1, tensor=tensor), devices)
    with pytest.raises(UserError) as e:
        device_grid(MeshConfig(data=1, fsdp=-1, tensor=8), devices)
    assert str(e.value).startswith("mesh: the tensor axis (8 devices) spans 2 processes")
    assert "mesh.tensor at most the devices of one process (4)" in str(e.value)
    # On TPU the fast interconnect (ICI) spans the hosts of a slice, not the slices.
    tpu = [dataclasses.replace(d, platform="tpu") for d in devices]
    check_tensor_groups(np.array(tpu).reshape(1, 1, 8))
    two_slices = [dataclasses.replace(d, platform="tpu")
                  for d in fake_devices(slices=2, processes_per_slice=1, per_process=2)]
    with pytest.raises(UserError, match="spans 2 slices"):
        check_tensor_groups(np.array(two_slices).reshape(1, 1, 4))


def tpu_devices(topology: str, slices: int = 1) -> list:
    pytest.importorskip("libtpu")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other test workers' libtpu
    from jax.experimental import topologies

    return topologies.get_topology_desc(topology_name=topology, platform="tpu",
                                        num_slices=slices).devices


def test_hybrid_mesh_of_two_real_tpu_slices():
    """Abstract v5e devices from libtpu (no TPU needed): two 2x2 slices."""
    devices = tpu_devices("v5e:2x2", slices=2)
    assert {d.slice_index for d in devices} == {0, 1}
    mesh = make_mesh(MeshConfig(data=2, fsdp=-1, tensor=2), devices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "expert": 1, "tensor": 2}
    for i in range(2):
        assert {d.slice_index for d in mesh.devices[i].flat} == {i}
    with pytest.raises(UserError, match="set mesh.data to a multiple of 2"):
        make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1), devices)


def abstract_params(config: str, overrides: list[str] = ()) -> tuple[dict, dict]:
    """(shapes, ParamSpecs) of a config's parameters."""
    mcfg = with_vocab(load_config(ROOT / config, list(overrides)).model, 257)
    model = nnx.eval_shape(lambda: Transformer(mcfg, nnx.Rngs(0)))
    return nnx.to_pure_dict(nnx.split(model)[1]), param_specs(mcfg)


@pytest.mark.parametrize("mesh", [(1, 8, 1), (1, 4, 2), (2, 2, 2), (8, 1, 1), (1, 1, 8)])
def test_shipped_configs_divide_on_eight_devices(mesh):
    cfg = MeshConfig(*mesh)
    for config in ["configs/tiny.yaml", "configs/gpu/debug.yaml", "configs/demo-base.yaml"]:
        shardings = param_shardings(*abstract_params(config), make_mesh(cfg))
        wq = shardings["blocks"]["attn"]["wq"].spec
        assert wq == P(None, "fsdp" if mesh[1] > 1 else None, "tensor" if mesh[2] > 1 else None)


def test_an_undivided_parameter_is_an_error_not_replication():
    params, specs = abstract_params("configs/tiny.yaml", ["model.d_model=36", "model.n_heads=3"])
    with pytest.raises(UserError) as e:
        param_shardings(params, specs, make_mesh(MeshConfig(1, 8, 1)))
    message = str(e.value)
    assert message.startswith("parameter blocks/") and "'embed' dimension (36)" in message
    assert "mesh.fsdp=8" in message and "\n" not in message
    with pytest.raises(UserError, match=r"blocks/attn/wk: its 'kv_heads' dimension \(36\).*"
                                        r"mesh.tensor=8"):
        param_shardings(params, specs, make_mesh(MeshConfig(1, 1, 8)))
    # Axes of size 1 split nothing, so nothing needs to divide.
    shardings = param_shardings(params, specs, make_mesh(MeshConfig(8, 1, 1)))
    assert all(s.spec == P(*(None,) * len(s.spec)) for s in jax.tree.leaves(shardings))


def test_bind_address_is_the_advertised_ip():
    assert bind_address("127.0.0.1:1234") == "127.0.0.1:1234"
    assert bind_address("10.1.2.3:8476") == "10.1.2.3:8476"
    assert bind_address("[::1]:1234") == "[::1]:1234"
    assert bind_address("worker-0.internal:8476") is None  # a name: JAX's default


LISTEN = """
import ipaddress, os
from lab.accel.sharding import initialize_distributed
initialize_distributed()
initialize_distributed()  # a second call does nothing
port = int(os.environ["LAB_COORDINATOR"].rsplit(":", 1)[1])
for name in ("tcp", "tcp6"):  # the kernel's socket table: addresses in little-endian words
    for line in open(f"/proc/net/{name}").read().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, local_port = local.rsplit(":", 1)
        if state == "0A" and int(local_port, 16) == port:  # 0A: LISTEN
            raw = b"".join(bytes.fromhex(address[i:i + 8])[::-1] for i in range(0, len(address), 8))
            ip = ipaddress.ip_address(raw)
            print(getattr(ip, "ipv4_mapped", None) or ip)
"""


def listening(coordinator_host: str) -> list[str]:
    """The addresses the coordinator of a one-process run listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, LAB_COORDINATOR=f"{coordinator_host}:{port}", LAB_NUM_PROCESSES="1",
               LAB_PROCESS_ID="0", LAB_LOCAL_DEVICES="1", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", LISTEN], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.split()


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's socket table")
def test_coordinator_listens_only_where_launch_local_points():
    assert listening("127.0.0.1") == ["127.0.0.1"]
    assert listening("localhost") == ["::"]  # a host name: JAX's default, every interface
