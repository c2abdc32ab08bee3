"""Test-wide set-up: eight fake CPU devices, so sharded and unsharded runs can be compared.

XLA reads the flag when the backend starts, so it must be set before anything imports jax.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
