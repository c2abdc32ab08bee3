"""The training stream: batch(step) is a pure function of (seed, step), read from memory maps.

A window is seq_len + 1 consecutive tokens; window w of a shard starts at token w * seq_len, so
neighbours share one token (the last target of one is the first input of the next) and windows
never cross shard files. Sample k = step * global_batch + row reads window perm_e(k mod n) with
epoch e = k // n (n windows in the split), perm_e a fresh permutation per epoch, seeded by
(seed, e). A process reads only its rows of each global batch: process p of P gets rows
[p*B/P, (p+1)*B/P), so P processes together see exactly what one process would.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np
from grain.experimental import index_shuffle

from lab.data.format import TokenDataset
from lab.errors import UserError


class _Windows:
    """Random access to the windows of one split, straight from its memory-mapped shards."""

    def __init__(self, shards: list[np.ndarray], seq_len: int):
        # Plain ndarray views of the maps (no copy): slicing an np.memmap is ~5x slower.
        self.shards = [np.asarray(s) for s in shards]
        self.seq_len = seq_len
        counts = np.array([max(0, (len(s) - 1) // seq_len) for s in shards], dtype=np.int64)
        self.ends = np.cumsum(counts)
        self.n = int(self.ends[-1]) if len(counts) else 0

    def read(self, ids: np.ndarray) -> np.ndarray:
        """int32 (len(ids), seq_len + 1): the windows `ids`, copied out of the memory maps."""
        out_BxL = np.empty((len(ids), self.seq_len + 1), dtype=np.int32)
        shard_of = np.searchsorted(self.ends, ids, side="right")
        for row, (w, s) in enumerate(zip(ids.tolist(), shard_of.tolist(), strict=True)):
            start = (w - (int(self.ends[s - 1]) if s else 0)) * self.seq_len
            out_BxL[row] = self.shards[s][start : start + self.seq_len + 1]
        return out_BxL


def _process_share(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None and process_count is None:
        # grain's own notion of "this host": jax.process_index() of jax.process_count().
        opts = grain.sharding.ShardByJaxProcess()
        return opts.shard_index, opts.shard_count
    if process_index is None or process_count is None:
        raise ValueError("give both process_index and process_count, or neither")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    return process_index, process_count


def _local_rows(batch: int, process_index: int, process_count: int, what: str) -> range:
    if batch % process_count:
        raise UserError(
            f"{what} {batch} does not divide among {process_count} processes; "
            f"make it a multiple of {process_count}"
        )
    local = batch // process_count
    return range(process_index * local, (process_index + 1) * local)


class TrainStream:
    """The training batches of a prepared dataset, as a pure function of (seed, step)."""

    def __init__(
        self,
        dataset: TokenDataset,
        seq_len: int,
        global_batch: int,
        seed: int,
        process_index: int | None = None,
        process_count: int | None = None,
        split: str = "train",
    ):
        if seq_len < 1 or global_batch < 1:
            raise UserError(f"seq_len ({seq_len}) and batch size ({global_batch}) must be >= 1")
        if not 0 <= seed < 2**63:
            raise UserError(f"the data seed must be a non-negative integer, got {seed}")
        self.seq_len, self.global_batch, self.seed = seq_len, global_batch, seed
        self.process_index, self.process_count = _process_share(process_index, process_count)
        self.rows = _local_rows(global_batch, self.process_index, self.process_count, "batch size")
        self._windows = _Windows(dataset.shards(split), seq_len)
        self.n_windows = self._windows.n
        if self.n_windows == 0:
            raise UserError(
                f"the {split} split of {dataset.path} ({dataset.n_tokens[split]} tokens) is "
                f"shorter than one window of {seq_len + 1} tokens; lower train.seq_len or add "
                "data"
            )
        self._epoch_seeds: dict[int, int] = {}

    def _epoch_seed(self, epoch: int) -> int:
        # SeedSequence mixes (seed, epoch) well: seed s, epoch 1 is unrelated to seed s+1, epoch 0.
        if epoch not in self._epoch_seeds:
            seq = np.random.SeedSequence([self.seed, epoch])
            self._epoch_seeds[epoch] = int(seq.generate_state(1, np.uint32)[0])
        return self._epoch_seeds[epoch]

    def window_ids(self, step: int) -> np.ndarray:
        """The windows this process reads at `step`, one per local row."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        ids = np.empty(len(self.rows), dtype=np.int64)
        for j, row in enumerate(self.rows):
            epoch, i = divmod(step * self.global_batch + row, self.n_windows)
            # grain's O(1)-memory permutation of [0, n); positional arguments are faster.
            ids[j] = index_shuffle(i, self.n_windows - 1, self._epoch_seed(epoch), 4)
        return ids

    def batch(self, step: int) -> np.ndarray:
        """int32 (global_batch / process_count, seq_len + 1): this process's rows at `step`."""
        return self._windows.read(self.window_ids(step))

    def iterator(self, start_step: int = 0) -> StreamIterator:
        """A checkpointable iterator yielding batch(start_step), batch(start_step + 1), ..."""
        return StreamIterator(self, start_step)


class StreamIterator(grain.DatasetIterator):
    """Iterates a TrainStream; its state is the next step, so grain's orbax handler saves it."""

    def __init__(self, stream: TrainStream, start_step: int = 0):
        super().__init__()
        self._stream = stream
        self.step = start_step

    def __next__(self) -> np.ndarray:
        out = self._stream.batch(self.step)
        self.step += 1
        return out

    def _identity(self) -> dict[str, int]:
        s = self._stream
        return {"seed": s.seed, "seq_len": s.seq_len, "global_batch": s.global_batch}

    def get_state(self) -> dict[str, Any]:
        return {"step": self.step, **self._identity()}

    def set_state(self, state: dict[str, Any]) -> None:
        saved = {k: state.get(k) for k in self._identity()}
        if saved != self._identity():
            # Another seed or shape would silently continue a different stream.
            raise UserError(
                f"the checkpoint's data stream was {saved}, the config gives {self._identity()}; "
                "resume with the original run.seed, train.seq_len and train.batch_size"
            )
        self.step = int(state["step"])

    def __str__(self) -> str:
        return f"StreamIterator(step={self.step})"


def _longest_seq_len(shards: list[np.ndarray], n_windows: int) -> int:
    """The longest seq_len that cuts `n_windows` windows from these shards (0 if none does)."""
    def count(seq_len: int) -> int:
        return sum(max(0, (len(s) - 1) // seq_len) for s in shards)

    low, high = 0, max((len(s) - 1 for s in shards), default=0)  # count(high + 1) == 0
    while low < high:  # count falls as seq_len grows: the last seq_len with enough windows
        mid = (low + high + 1) // 2
        low, high = (mid, high) if count(mid) >= n_windows else (low, mid - 1)
    return low


def eval_batches(dataset: TokenDataset, seq_len: int, batch_size: int, n_batches: int,
                 process_index: int | None = None, process_count: int | None = None
                 ) -> list[np.ndarray]:
    """The fixed evaluation set: the first batch_size * n_batches windows of val, in order.

    Batch j holds windows [j * batch_size, (j + 1) * batch_size); each process gets its rows.
    """
    p, n_proc = _process_share(process_index, process_count)
    rows = _local_rows(batch_size, p, n_proc, "eval batch size")
    windows = _Windows(dataset.shards("val"), seq_len)
    need = batch_size * n_batches
    if windows.n < need:
        have = (f"evaluation needs train.eval_batches x train.batch_size = {n_batches} x "
                f"{batch_size} = {need} windows of {seq_len + 1} tokens but the val split of "
                f"{dataset.path} has {windows.n}")
        longest = _longest_seq_len(windows.shards, batch_size)
        shorter = (f"train.seq_len to {longest} or less" if longest else
                   "train.seq_len (no window length gives one batch)")
        if windows.n >= batch_size:
            fix = f"set train.eval_batches={windows.n // batch_size} or fewer"
        elif windows.n:
            fix = (f"not even one batch fits: lower train.batch_size to {windows.n} or less, "
                   f"or {shorter}")
        else:  # a batch size of 0 is no fix: only a shorter window is
            fix = f"not even one window fits: lower {shorter}"
        raise UserError(f"{have}; {fix}, or prepare the data with a larger --val-fraction")
    return [windows.read(np.arange(j * batch_size + rows.start, j * batch_size + rows.stop))
            for j in range(n_batches)]
