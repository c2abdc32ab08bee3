"""The chip table and MFU: device kinds as JAX reports them, matched exactly."""

import pytest

from lab.accel.chips import CHIPS, GB, GIB, chip_for
from lab.accel.mfu import accelerator_peak_flops, mfu

# (device_kind as jax.Device.device_kind reports it, chip, dense bf16 TFLOP/s, memory bytes)
KINDS = [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989, 80 * GIB),
    ("NVIDIA H100 PCIe", "H100 PCIe", 756, 80 * GIB),
    ("NVIDIA H100 NVL", "H100 NVL", 835, 94 * GIB),
    ("NVIDIA H200", "H200", 989, 141 * GIB),
    ("NVIDIA B200", "B200", 2250, 180 * GIB),
    ("NVIDIA A100-SXM4-40GB", "A100 40GB", 312, 40 * GIB),
    ("NVIDIA A100-PCIE-40GB", "A100 40GB", 312, 40 * GIB),
    ("NVIDIA A100-SXM4-80GB", "A100 80GB", 312, 80 * GIB),
    ("NVIDIA A100 80GB PCIe", "A100 80GB", 312, 80 * GIB),
    ("NVIDIA L4", "L4", 121, 24 * GB),
    ("NVIDIA L40S", "L40S", 362, 48 * GB),
    ("TPU v4", "v4", 275, 32 * GIB),
    ("TPU v5 lite", "v5e", 197, 16 * GIB),
    ("TPU v5e", "v5e", 197, 16 * GIB),
    ("TPU v5", "v5p", 459, 95 * GIB),
    ("TPU v5p", "v5p", 459, 95 * GIB),
    ("TPU v6 lite", "v6e", 918, 32 * GIB),
    ("TPU v6e", "v6e", 918, 32 * GIB),
]


@pytest.mark.parametrize(("kind", "name", "tflops", "memory"), KINDS)
def test_device_kinds_map_to_their_chip(kind, name, tflops, memory):
    chip = chip_for(kind)
    assert chip is not None and chip.name == name
    assert chip.peak_bf16_tflops == tflops and chip.memory_bytes == memory
    assert accelerator_peak_flops(kind) == tflops * 1e12
    assert chip_for(kind.upper()) is chip and chip_for(f"  {kind} ") is chip


@pytest.mark.parametrize("kind", [
    "NVIDIA L40",  # not an L40S, and not an L4
    "NVIDIA H100",  # which one? an unknown variant must not get the SXM peak
    "NVIDIA H20",
    "TPU v5 litepod",
    "TPU v7x",
    "cpu",
    "NVIDIA GeForce RTX 4090",
])
def test_kinds_not_in_the_table_are_unknown_not_near_misses(kind):
    assert chip_for(kind) is None
    assert accelerator_peak_flops(kind) is None
    assert mfu(1e15, kind, 8) is None


def test_every_kind_string_names_one_chip():
    kinds = [k.lower() for chip in CHIPS for k in chip.kinds]
    assert len(kinds) == len(set(kinds))


def test_mfu_is_global_flops_over_devices_times_the_chip_peak():
    # 256 v5e chips at 40% of 197 TFLOP/s each: 2.017e16 model FLOP/s in all.
    achieved = 0.4 * 256 * 197e12
    assert mfu(achieved, "TPU v5 lite", 256) == pytest.approx(0.4)
    # The same FLOP/s on H100 PCIe cards is a higher fraction than on SXM parts.
    assert mfu(1e15, "NVIDIA H100 PCIe", 2) == pytest.approx(1e15 / (2 * 756e12))
    assert mfu(1e15, "NVIDIA H100 80GB HBM3", 2) == pytest.approx(1e15 / (2 * 989e12))
