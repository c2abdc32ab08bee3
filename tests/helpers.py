"""Shared by the tests: run the real `lab` command with a chosen number of fake CPU devices."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def lab_env(devices: int) -> dict:
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def lab_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "lab.cli", *args]


def run_lab(args: list[str], devices: int = 1, expect: int | None = 0,
            timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `lab ARGS` to completion; check its exit status unless `expect` is None."""
    result = subprocess.run(lab_command(args), cwd=ROOT, env=lab_env(devices),
                            capture_output=True, text=True, timeout=timeout)
    if expect is not None:
        assert result.returncode == expect, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def checkpoint_params(run_dir: Path, step: int | None = None) -> dict[str, np.ndarray]:
    """The parameters of a run's checkpoint (default: the newest), as numpy arrays keyed by
    their path, read on whatever mesh saved them."""
    import jax
    import orbax.checkpoint as ocp

    steps = sorted(int(p.name) for p in (Path(run_dir) / "checkpoints").iterdir()
                   if p.name.isdigit())
    path = Path(run_dir) / "checkpoints" / str(steps[-1] if step is None else step) / "state"
    tree = ocp.StandardCheckpointer().metadata(path).item_metadata
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    state = ocp.PyTreeCheckpointer().restore(path, restore_args=args)
    return flat_params(state["params"])


def flat_params(params) -> dict[str, np.ndarray]:
    """A parameter tree as numpy arrays keyed by their path."""
    import jax

    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}


def assert_params_close(a: dict[str, np.ndarray], b: dict[str, np.ndarray], rtol: float,
                        atol: float) -> None:
    """Every parameter of `a` equals `b`'s within rtol/atol (the same keys on both sides)."""
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=rtol, atol=atol, err_msg=key)


def tiny_trainer(small_data: str, overrides: list[str], devices: int):
    """The tiny config with `overrides`, built on the first `devices` fake devices: (its
    Trainer, the training data stream)."""
    import dataclasses

    import jax

    from lab import data as labdata
    from lab.accel.sharding import make_mesh
    from lab.config import load_config
    from lab.model.accounting import with_vocab
    from lab.train import build_trainer

    cfg = load_config(TINY, [f"data.path={small_data}", *overrides])
    dataset = labdata.open_dataset(small_data)
    cfg = dataclasses.replace(cfg, model=with_vocab(cfg.model, dataset.vocab_size))
    trainer = build_trainer(cfg, make_mesh(cfg.mesh, jax.devices()[:devices]))
    return trainer, labdata.TrainStream(dataset, cfg.train.seq_len, cfg.train.batch_size, 0)
