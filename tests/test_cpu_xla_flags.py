"""benchmarks.cpu_xla_flags: every flag it tries is one the installed XLA accepts (XLA stops a
process at an unknown flag) and still computes a jitted matmul right."""

import os
import subprocess
import sys

import pytest

from benchmarks.cpu_xla_flags import VARIANTS

PROGRAM = ("import jax, numpy as np; a = np.arange(12.0).reshape(3, 4); "
           "print(float(jax.jit(lambda x: (x @ x.T).sum())(a)))")


@pytest.mark.parametrize("flags", [f for f in VARIANTS.values() if f])
def test_each_flag_is_accepted_and_computes(flags):
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    a = [[4.0 * r + c for c in range(4)] for r in range(3)]
    want = sum(sum(x * y for x, y in zip(ra, rb, strict=True)) for ra in a for rb in a)
    assert float(result.stdout.split()[-1]) == want
