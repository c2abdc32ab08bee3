"""Data benchmarks: stdlib prep speed, loader tokens/s beside grain's own MapDataset, memory.

    .venv/bin/python -m benchmarks.bench_data [--quick]
"""

from __future__ import annotations

import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import grain
import numpy as np

from benchmarks.common import print_rows, row
from lab.data import TrainStream, open_dataset, prepare
from lab.data.sources import open_source

LOADER_CONFIGS = [(256, 32, "demo-like"), (512, 8, "benchmark model")]


def _rss_anon_mb() -> float:
    """Anonymous resident memory: what the process holds beyond file-backed pages like maps."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _read_only_bytes_per_s() -> float:
    src = open_source("stdlib")
    started = time.perf_counter()
    n = sum(len((Path(src.path) / f).read_bytes()) for f in src.files)
    return n / (time.perf_counter() - started)


def _grain_reference(ds, seq_len: int, batch: int, steps: int) -> float:
    """grain's plain pipeline over the same windows: source -> shuffle -> repeat -> batch."""
    tokens = np.asarray(ds.shards("train")[0])

    class Windows:
        def __len__(self):
            return (len(tokens) - 1) // seq_len

        def __getitem__(self, i):
            return tokens[i * seq_len : i * seq_len + seq_len + 1]

    pipe = (grain.MapDataset.source(Windows()).shuffle(seed=0).repeat().batch(batch)
            .map(lambda x: x.astype(np.int32)))
    pipe[0]
    started = time.perf_counter()
    for step in range(steps):
        pipe[step]
    return steps * batch * seq_len / (time.perf_counter() - started)


def run(quick: bool = False) -> list[dict]:
    rows = []
    steps = 300 if quick else 3000
    with tempfile.TemporaryDirectory() as tmp:
        raw = _read_only_bytes_per_s()  # also warms the page cache, as prep's own scan would
        started = time.perf_counter()
        meta = prepare("stdlib", os.path.join(tmp, "stdlib"))
        seconds = time.perf_counter() - started
        total = meta["splits"]["train"]["n_tokens"] + meta["splits"]["val"]["n_tokens"]
        rows.append(row("data prep: stdlib, byte tokenizer", total / seconds, "tokens/s",
                        "reading the same files only (bytes/s)", raw,
                        f"{total:,} tokens, {meta['source']['n_documents']} files, "
                        f"{seconds:.2f} s"))

        ds = open_dataset(os.path.join(tmp, "stdlib"))
        anon_before = _rss_anon_mb()
        for seq_len, batch, what in LOADER_CONFIGS:
            stream = TrainStream(ds, seq_len, batch, seed=0, process_index=0, process_count=1)
            stream.batch(0)
            started = time.perf_counter()
            for step in range(steps):
                stream.batch(step)
            per_s = steps * batch * seq_len / (time.perf_counter() - started)
            ref = _grain_reference(ds, seq_len, batch, steps)
            rows.append(row(f"loader batch(step), seq {seq_len} x batch {batch} ({what})",
                            per_s, "tokens/s", "grain MapDataset source.shuffle.repeat.batch, "
                            "same windows", ref, f"{steps} steps, 1 process, int32 out"))
        # Touch every window once: the maps page in, but anonymous memory must not grow with it.
        stream = TrainStream(ds, 512, 64, seed=1, process_index=0, process_count=1)
        for step in range(0, stream.n_windows // 64 + 1, 4 if quick else 1):
            stream.batch(step)
        corpus_mb = ds.n_tokens["train"] * ds.dtype.itemsize / 2**20
        rows.append(row("loader anonymous memory growth over an epoch", _rss_anon_mb()
                        - anon_before, "MiB", "train split size on disk (MiB)", corpus_mb,
                        "RssAnon after minus before; the shards are memory-mapped, not loaded"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows.append(row("peak memory (maxrss) of this process", peak, "MiB", "", None,
                    "includes mapped shard pages and the jax/grain imports"))
    return rows


if __name__ == "__main__":
    print_rows("data", run(quick="--quick" in sys.argv))
