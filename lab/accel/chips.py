"""Accelerator chips: each kind's dense bfloat16 peak and its memory, in one table.

A device is matched by its exact `device_kind` string as JAX reports it (case and spacing
ignored), never by a substring: "NVIDIA L4" must not match "NVIDIA L40S", and an H100 PCIe
card must not get the SXM part's peak. Peaks are the vendors' dense (not 2:4 sparse) bf16
tensor figures; memory is what one chip holds (HBM, or GDDR on the L4 and L40S).

Sources: NVIDIA's H100, H200, B200, A100, L4 and L40S datasheets (dense figures, half the
"with sparsity" ones); Google Cloud's TPU system-architecture pages for v4, v5e, v5p and v6e.
"""

from __future__ import annotations

import dataclasses

GIB = 1 << 30
GB = 10**9


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str  # short name used in tables and topologies, e.g. "v5e", "H100 SXM"
    kinds: tuple[str, ...]  # device_kind strings JAX reports for it
    peak_bf16_tflops: float  # dense
    memory_bytes: int  # per chip

    @property
    def peak_flops(self) -> float:
        return self.peak_bf16_tflops * 1e12

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / GIB


CHIPS: tuple[Chip, ...] = (
    # HBM sizes of the NVIDIA parts are binary (an "80GB" H100 reports 79.6 GiB usable);
    # the GDDR6 parts (L4, L40S) are decimal gigabytes.
    Chip("H100 SXM", ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM5 80GB"), 989.0, 80 * GIB),
    Chip("H100 PCIe", ("NVIDIA H100 PCIe",), 756.0, 80 * GIB),
    Chip("H100 NVL", ("NVIDIA H100 NVL",), 835.0, 94 * GIB),
    Chip("H200", ("NVIDIA H200",), 989.0, 141 * GIB),
    Chip("B200", ("NVIDIA B200",), 2250.0, 180 * GIB),
    Chip("A100 40GB", ("NVIDIA A100-SXM4-40GB", "NVIDIA A100-PCIE-40GB"), 312.0, 40 * GIB),
    Chip("A100 80GB", ("NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe"), 312.0, 80 * GIB),
    Chip("L4", ("NVIDIA L4",), 121.0, 24 * GB),
    Chip("L40S", ("NVIDIA L40S",), 362.0, 48 * GB),
    Chip("v4", ("TPU v4",), 275.0, 32 * GIB),
    Chip("v5e", ("TPU v5 lite", "TPU v5e"), 197.0, 16 * GIB),
    Chip("v5p", ("TPU v5", "TPU v5p"), 459.0, 95 * GIB),
    Chip("v6e", ("TPU v6 lite", "TPU v6e"), 918.0, 32 * GIB),
)


def _normal(kind: str) -> str:
    return " ".join(kind.lower().split())


_BY_KIND = {_normal(kind): chip for chip in CHIPS for kind in chip.kinds}


def chip_for(device_kind: str) -> Chip | None:
    """The chip whose device_kind is exactly `device_kind` (case and spacing ignored)."""
    return _BY_KIND.get(_normal(device_kind))


def chip_named(name: str) -> Chip | None:
    """The chip by its short name ("v5e", "H100 SXM"), case ignored."""
    for chip in CHIPS:
        if chip.name.lower() == name.lower():
            return chip
    return None
