"""The training stream: a pure function of (seed, step), exact per epoch, split among processes."""

from pathlib import Path

import grain
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lab.data import TrainStream, eval_batches, open_dataset, prepare
from lab.errors import UserError


def _prepared(tmp_path: Path, n_docs: int = 30, **kwargs):
    rng = np.random.default_rng(0)
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(n_docs):
        n = int(rng.integers(50, 400))
        (root / f"d{i:03d}.txt").write_bytes(bytes(rng.integers(32, 127, n).astype(np.uint8)))
    prepare(str(root), str(tmp_path / "data"), **{"val_fraction": 0.2, **kwargs})
    return open_dataset(str(tmp_path / "data"))


def _reference_windows(ds, split: str, seq_len: int) -> np.ndarray:
    """All windows of a split, cut from each shard's tokens independently of the stream."""
    out = []
    for shard in ds.shards(split):
        tokens = np.array(shard, dtype=np.int64)
        for w in range((len(tokens) - 1) // seq_len):
            out.append(tokens[w * seq_len : w * seq_len + seq_len + 1])
    return np.array(out)


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return _prepared(tmp_path_factory.mktemp("stream"))


def test_each_epoch_reads_every_window_once_in_a_fresh_order(ds):
    seq_len, batch = 16, 6
    ref = _reference_windows(ds, "train", seq_len)
    stream = TrainStream(ds, seq_len, batch, seed=7, process_index=0, process_count=1)
    n = stream.n_windows
    assert n == len(ref) > 100
    steps = 2 * n // batch + 3  # past two epochs, with batches straddling the boundaries
    batches = np.concatenate([stream.batch(s) for s in range(steps)])
    ids = np.concatenate([stream.window_ids(s) for s in range(steps)])
    assert batches.dtype == np.int32 and batches.shape == (steps * batch, seq_len + 1)
    np.testing.assert_array_equal(batches, ref[ids])
    for epoch in (0, 1):
        np.testing.assert_array_equal(np.sort(ids[epoch * n : (epoch + 1) * n]), np.arange(n))
    assert not np.array_equal(ids[:n], ids[n : 2 * n])
    assert not np.array_equal(ids[:n], np.arange(n))  # shuffled


def test_windows_never_cross_shard_files(tmp_path):
    ds = _prepared(tmp_path, val_fraction=0, shard_tokens=500)
    assert len(ds.shards("train")) > 5
    ref = _reference_windows(ds, "train", 32)
    stream = TrainStream(ds, 32, 4, seed=0, process_index=0, process_count=1)
    assert stream.n_windows == len(ref)
    ids = np.concatenate([stream.window_ids(s) for s in range(len(ref) // 4)])
    np.testing.assert_array_equal(np.concatenate([stream.batch(s) for s in range(len(ref) // 4)]),
                                  ref[ids])


def test_same_seed_same_batches_other_seed_other_batches(ds):
    a = TrainStream(ds, 16, 8, seed=1, process_index=0, process_count=1)
    b = TrainStream(ds, 16, 8, seed=1, process_index=0, process_count=1)
    c = TrainStream(ds, 16, 8, seed=2, process_index=0, process_count=1)
    for step in (0, 1, 5, 1000, 10**6):
        np.testing.assert_array_equal(a.batch(step), b.batch(step))
        assert not np.array_equal(a.batch(step), c.batch(step))
    # Seed 1's second epoch is not seed 2's first (grain's own shuffle uses seed + epoch).
    n = a.n_windows
    ids_a = np.concatenate([a.window_ids(s) for s in range((n + 40) // 8 + 1)])  # sample k at k
    ids_c = np.concatenate([c.window_ids(s) for s in range(5)])
    assert not np.array_equal(ids_a[n : n + 40], ids_c[:40])


@pytest.mark.parametrize("n_proc", [2, 4])
def test_processes_together_read_exactly_the_global_batch(ds, n_proc):
    one = TrainStream(ds, 16, 8, seed=3, process_index=0, process_count=1)
    parts = [TrainStream(ds, 16, 8, seed=3, process_index=p, process_count=n_proc)
             for p in range(n_proc)]
    for step in range(0, 200, 7):
        local = [p.batch(step) for p in parts]
        assert all(x.shape == (8 // n_proc, 17) for x in local)
        np.testing.assert_array_equal(np.concatenate(local), one.batch(step))


def test_uneven_process_split_is_a_user_error(ds):
    with pytest.raises(UserError, match="multiple of 3"):
        TrainStream(ds, 16, 8, seed=0, process_index=0, process_count=3)
    with pytest.raises(UserError, match="shorter than one window"):
        TrainStream(ds, 10**7, 8, seed=0, process_index=0, process_count=1)


def test_iterator_restored_from_orbax_continues_exactly(ds, tmp_path):
    stream = TrainStream(ds, 16, 4, seed=5, process_index=0, process_count=1)
    it = stream.iterator(start_step=2)
    seen = [next(it) for _ in range(3)]
    for step, b in zip(range(2, 5), seen, strict=True):
        np.testing.assert_array_equal(b, stream.batch(step))
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(5, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"w": jnp.arange(3.0)}),
            data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    uninterrupted = [next(it) for _ in range(4)]

    fresh = TrainStream(ds, 16, 4, seed=5, process_index=0, process_count=1).iterator()
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.restore(5, args=ocp.args.Composite(
            state=ocp.args.StandardRestore({"w": jnp.zeros(3)}),
            data=grain.checkpoint.CheckpointRestore(fresh)))
    assert fresh.get_state()["step"] == 5
    for want in uninterrupted:
        np.testing.assert_array_equal(next(fresh), want)

    other = TrainStream(ds, 16, 4, seed=6, process_index=0, process_count=1).iterator()
    with pytest.raises(UserError, match="run.seed"):
        other.set_state(it.get_state())


def test_eval_batches_are_the_first_val_windows_in_order(ds):
    ref = _reference_windows(ds, "val", 16)
    batches = eval_batches(ds, 16, 4, 3, process_index=0, process_count=1)
    np.testing.assert_array_equal(np.concatenate(batches), ref[:12])
    halves = [eval_batches(ds, 16, 4, 3, process_index=p, process_count=2) for p in (0, 1)]
    for j in range(3):
        np.testing.assert_array_equal(np.concatenate([halves[0][j], halves[1][j]]), batches[j])
    with pytest.raises(UserError, match="val-fraction"):
        eval_batches(ds, 16, 4, len(ref), process_index=0, process_count=1)


def test_default_process_share_comes_from_jax(ds):
    stream = TrainStream(ds, 16, 8, seed=0)  # one process here: jax.process_index() == 0
    assert (stream.process_index, stream.process_count) == (0, 1)
    assert stream.batch(3).shape == (8, 17)
