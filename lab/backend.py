"""Which JAX backend starts, decided before JAX does.

With libtpu installed (the `tpu` extra), JAX tries the TPU backend even on a host without TPU
chips: libtpu then prints warnings about TPU_ACCELERATOR_TYPE and TPU_WORKER_HOSTNAMES, and it
takes /tmp/libtpu_lockfile, so a second process on the host (a TPU compile, a test) cannot load
libtpu at all. On a host with no TPU chips the lab therefore asks for the CPU (or CUDA) backend
only; JAX_PLATFORMS set by the user always wins. Compiling for a TPU topology on such a host
(lab.train.aot) loads libtpu for its compiler alone, with the environment it needs to stay quiet.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from pathlib import Path

# PCI ids of TPU chips (Google's vendor id), as in jax._src.hardware_utils.
_GOOGLE_PCI_VENDOR = "0x1ae0"
_TPU_PCI_DEVICES = {"0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076"}
_NVIDIA_DEVICE_FILES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg")

# Topology generation (as in "v5e:2x2") -> Cloud TPU accelerator-type prefix and how many
# TensorCores a chip counts for in that name (v4 and v5p names count cores, two per chip).
_ACCELERATOR_TYPES = {"v4": ("v4", 2), "v5e": ("v5litepod", 1), "v5p": ("v5p", 2),
                      "v6e": ("v6e", 1)}


def tpu_chips_present() -> bool:
    """Whether this host has TPU chips attached (read from the PCI bus, as JAX does)."""
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            if Path(vendor).read_text().strip() != _GOOGLE_PCI_VENDOR:
                continue
            device = (Path(vendor).parent / "device").read_text().strip()
        except OSError:
            continue
        if device in _TPU_PCI_DEVICES:
            return True
    return False


def _cuda_plugin_installed() -> bool:
    return any(importlib.util.find_spec(name) is not None
               for name in ("jax_cuda12_plugin", "jax_cuda13_plugin"))


def choose_platforms() -> None:
    """Set JAX_PLATFORMS for this process when the user has not: no TPU backend on a host
    without TPU chips. Must run before JAX starts a backend."""
    if os.environ.get("JAX_PLATFORMS") or tpu_chips_present():
        return
    gpu = any(os.path.exists(f) for f in _NVIDIA_DEVICE_FILES) and _cuda_plugin_installed()
    os.environ["JAX_PLATFORMS"] = "cuda,cpu" if gpu else "cpu"
    if "jax" in __import__("sys").modules:  # imported already: tell its config too
        import jax

        jax.config.update("jax_platforms", os.environ["JAX_PLATFORMS"])


def prepare_tpu_compiler(topology: str) -> None:
    """Environment for loading libtpu as a compiler only, on a host without TPU chips: no
    lockfile (nothing here touches a chip), and the slice's accelerator type and a worker
    host name, which libtpu otherwise looks up and warns about. No effect on a TPU host."""
    if tpu_chips_present():
        return
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    generation, _, shape = topology.partition(":")
    prefix, per_chip = _ACCELERATOR_TYPES.get(generation, (generation, 1))
    try:
        chips = 1
        for size in shape.split("x"):
            chips *= int(size)
    except ValueError:
        chips = 1
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{prefix}-{chips * per_chip}")
