"""Two real jax.distributed processes on CPU read exactly what one process reads."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from lab.data import TrainStream, eval_batches, open_dataset, prepare

WORKER = """
import sys
import jax
import numpy as np

jax.config.update("jax_num_cpu_devices", 2)
port, pid, data, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
from lab.data import TrainStream, eval_batches, open_dataset

ds = open_dataset(data)
stream = TrainStream(ds, 16, 8, seed=11)  # the process share comes from jax
assert (stream.process_index, stream.process_count) == (pid, 2), stream.process_index
np.save(out + "-train.npy", np.stack([stream.batch(s) for s in range(60)]))
np.save(out + "-eval.npy", np.stack(eval_batches(ds, 16, 4, 3)))
jax.distributed.shutdown()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_jax_processes_split_every_global_batch(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(20):
        (root / f"d{i}.txt").write_bytes(bytes(rng.integers(32, 127, 300).astype(np.uint8)))
    prepare(str(root), str(tmp_path / "data"), val_fraction=0.3)
    ds = open_dataset(str(tmp_path / "data"))

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # no 8 fake devices here
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(port), str(i),
                               str(tmp_path / "data"), str(tmp_path / f"p{i}")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=180)
        assert p.returncode == 0, out[-3000:]

    one = TrainStream(ds, 16, 8, seed=11, process_index=0, process_count=1)
    local = [np.load(tmp_path / f"p{i}-train.npy") for i in range(2)]
    assert local[0].shape == (60, 4, 17)
    for step in range(60):
        np.testing.assert_array_equal(np.concatenate([local[0][step], local[1][step]]),
                                      one.batch(step))
    # Within the first epoch no window is read twice, by either process.
    ids = np.concatenate([one.window_ids(s) for s in range(60)])[: one.n_windows]
    assert len(np.unique(ids)) == len(ids) == min(60 * 8, one.n_windows)

    evals = [np.load(tmp_path / f"p{i}-eval.npy") for i in range(2)]
    whole = eval_batches(ds, 16, 4, 3, process_index=0, process_count=1)
    for j in range(3):
        np.testing.assert_array_equal(np.concatenate([evals[0][j], evals[1][j]]), whole[j])
