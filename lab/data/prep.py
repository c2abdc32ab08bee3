"""`prepare`: a corpus in, token shards and metadata out, written atomically.

The output is built in a hidden temporary directory beside OUT, every file fsynced, the metadata
written last, then renamed to OUT in one step: OUT either does not exist or is finished. A finished
OUT is never rewritten; a second prep of the same request (or one that lost a race) reuses it.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lab.data.format import FORMAT, FORMAT_VERSION, METADATA_FILE, SPLITS, token_dtype
from lab.data.sources import Source, open_source
from lab.data.tokenizers import make_tokenizer, spec_key
from lab.errors import UserError, shown
from lab.paths import makedirs

DEFAULT_VAL_FRACTION = 0.01
DEFAULT_SHARD_TOKENS = 2**28  # 512 MiB of uint16 per shard file
_ENCODE_CHUNK_CHARS = 4 << 20  # texts handed to the tokenizer at once
SPLIT_RULE = (
    "a non-empty document with index i (in source order) is in val iff "
    "u(i) < val_fraction, u(i) = first 8 bytes of sha256(str(i)) / 2**64 (big-endian); "
    "if none is, the one with the smallest u(i)"
)


def prepare(
    source: str,
    out_dir: str,
    tokenizer: str = "byte",
    include: list[str] | None = None,
    text_field: str = "text",
    val_fraction: float = DEFAULT_VAL_FRACTION,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Tokenizes `source` into `out_dir` and returns the metadata (see lab/data/format.py)."""
    started = time.perf_counter()
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val fraction {val_fraction} is out of range; give a value in [0, 1)")
    if shard_tokens < 1:
        raise UserError(f"shard_tokens must be positive, got {shard_tokens}")
    src = open_source(source, include, text_field)
    out = Path(out_dir).expanduser().absolute()
    request = {"source": src.describe(), "tokenizer": spec_key(tokenizer),
               "val_fraction": val_fraction, "shard_tokens": shard_tokens}

    summary = _scan(src)  # reads everything once: hash, counts, and user errors before any write
    existing = _existing(out, request, summary["sha256"])
    if existing is not None:
        if log:
            log(f"{out} already holds this prepared data; nothing to do")
        return existing
    in_val = _val_documents(summary["nonempty"], val_fraction)

    def train_texts():
        for i, (_, text) in enumerate(src.documents()):
            if text and i not in in_val:
                yield text

    tok = make_tokenizer(tokenizer, train_texts)
    dtype = token_dtype(tok.vocab_size)
    makedirs(out.parent)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:12]}"
    try:
        tmp.mkdir()
        splits = _write_splits(src, tok, in_val, tmp, dtype, shard_tokens)
        if splits["train"]["n_tokens"] == 0:
            raise UserError(f"no document of {shown(source)} is left for training; "
                            "lower --val-fraction")
        tok.save(tmp)
        seconds = time.perf_counter() - started
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "vocab_size": tok.vocab_size,
            "eod_id": tok.eod_id,
            "dtype": dtype.name,
            "tokenizer": tok.describe(),
            "source": {**src.describe(), "description": _describe(src),
                       "n_documents": len(summary["nonempty"]),
                       "n_empty_documents": int(np.sum(~summary["nonempty"])),
                       "n_bytes": summary["n_bytes"], "sha256": summary["sha256"]},
            "val_fraction": val_fraction,
            "split_rule": SPLIT_RULE,
            "splits": splits,
            "request": request,
            "created_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "prep_seconds": round(seconds, 3),
        }
        _write_file(tmp / METADATA_FILE, json.dumps(meta, indent=2).encode())  # last: marks done
        for d in (tmp / "train", tmp / "val", tmp):
            _fsync_dir(d)
        try:
            os.rename(tmp, out)  # atomic; fails if another process finished OUT first
        except OSError:
            existing = _existing(out, request, summary["sha256"])
            if existing is None:
                raise UserError(f"{out} appeared while preparing; choose another --out") from None
            return existing
        _fsync_dir(out.parent)
        return meta
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _scan(src: Source) -> dict:
    """One pass over the source: its hash, size, and which documents have text."""
    h = hashlib.sha256()
    nonempty, n_bytes = [], 0
    for name, text in src.documents():
        data = text.encode("utf-8")
        for part in (name.encode(), b"\0", len(data).to_bytes(8, "little"), data):
            h.update(part)
        nonempty.append(bool(data))
        n_bytes += len(data)
    if not any(nonempty):
        raise UserError(f"data source {src.path} contains no text; give a source with documents")
    return {"sha256": h.hexdigest(), "n_bytes": n_bytes, "nonempty": np.array(nonempty)}


def _val_documents(nonempty: np.ndarray, val_fraction: float) -> set[int]:
    """Indices of the validation documents: by a hash of the index, see SPLIT_RULE."""
    if val_fraction == 0:
        return set()
    idx = np.flatnonzero(nonempty)
    u = np.array([_unit_hash(int(i)) for i in idx])
    chosen = idx[u < val_fraction]
    if len(chosen) == 0 and len(idx) >= 2:
        chosen = idx[[np.argmin(u)]]
    return {int(i) for i in chosen}


def _unit_hash(i: int) -> float:
    return int.from_bytes(hashlib.sha256(str(i).encode()).digest()[:8], "big") / 2**64


def _write_splits(src, tok, in_val, tmp, dtype, shard_tokens) -> dict:
    writers = {s: _SplitWriter(tmp, s, dtype, shard_tokens) for s in SPLITS}
    pending: list[tuple[int, str]] = []

    def flush():
        for (i, _), ids in zip(pending, tok.encode([t for _, t in pending]), strict=True):
            writers["val" if i in in_val else "train"].add_document(i, ids, tok.eod_id)
        pending.clear()

    size = 0
    for i, (_, text) in enumerate(src.documents()):
        if not text:
            continue
        pending.append((i, text))
        size += len(text)
        if size >= _ENCODE_CHUNK_CHARS:
            flush()
            size = 0
    flush()
    return {s: w.close() for s, w in writers.items()}


class _SplitWriter:
    """Appends documents to a split's shard files, starting a new file every `shard_tokens`."""

    def __init__(self, root: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.root, self.split, self.dtype, self.shard_tokens = root, split, dtype, shard_tokens
        (root / split).mkdir()
        self.shards: list[dict] = []
        self.docs: list[tuple[int, int, int]] = []
        self.n_tokens = 0
        self._file = None

    def add_document(self, index: int, ids: np.ndarray, eod_id: int) -> None:
        tokens = np.concatenate([ids, [eod_id]]).astype(self.dtype)
        self.docs.append((index, self.n_tokens, len(tokens)))
        while len(tokens):
            if self._file is None or self.shards[-1]["n_tokens"] == self.shard_tokens:
                self._next_shard()
            room = self.shard_tokens - self.shards[-1]["n_tokens"]
            self._file.write(tokens[:room].tobytes())
            self.shards[-1]["n_tokens"] += len(tokens[:room])
            self.n_tokens += len(tokens[:room])
            tokens = tokens[room:]

    def _next_shard(self) -> None:
        self._close_file()
        rel = f"{self.split}/{len(self.shards):05d}.bin"
        self._file = open(self.root / rel, "wb")
        self.shards.append({"file": rel, "n_tokens": 0})

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def close(self) -> dict:
        self._close_file()
        docs = np.array(self.docs, dtype=np.int64).reshape(-1, 3)
        rel = f"{self.split}/documents.npy"
        with open(self.root / rel, "wb") as f:
            np.save(f, docs)
            f.flush()
            os.fsync(f.fileno())
        return {"n_tokens": self.n_tokens, "n_documents": len(docs),
                "shards": self.shards, "documents": rel}


def _existing(out: Path, request: dict, source_sha256: str) -> dict | None:
    """The metadata of a finished OUT made by the same request; None if OUT is free to create."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    meta_path = out / METADATA_FILE
    if not meta_path.is_file():
        raise UserError(
            f"{out} exists and is not a prepared dataset; choose another --out or remove it"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        meta = {}
    same = (meta.get("format_version") == FORMAT_VERSION and meta.get("request") == request
            and meta.get("source", {}).get("sha256") == source_sha256)
    if not same:
        raise UserError(
            f"{out} already holds different prepared data (another source, tokenizer, options or "
            "format version); choose another --out, or remove it to prepare again"
        )
    return meta


def _describe(src: Source) -> str:
    if src.kind == "stdlib":
        return (f"the Python {src.describe()['python']} standard library source at {src.path} "
                f"({', '.join(src.include)}; site-packages left out), {len(src.files)} files")
    if src.kind == "dir":
        return f"{len(src.files)} files under {src.path} matching {', '.join(src.include)}"
    return f"the {src.text_field!r} field of {src.path}"


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
