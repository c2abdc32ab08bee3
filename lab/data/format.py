"""The on-disk format of a prepared dataset, and reading it back.

    OUT/metadata.json           written last; its presence marks a finished dataset
    OUT/tokenizer.json          only for Hugging Face tokenizers (a copy, or the trained one)
    OUT/{train,val}/NNNNN.bin   raw little-endian token ids (uint16 if the vocabulary fits)
    OUT/{train,val}/documents.npy  int64 rows (source document index, first token, n tokens)

Each split is the concatenation of its shards: every document's tokens followed by `eod_id`.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import numpy as np

from lab.errors import UserError, shown

FORMAT = "scaling-lab-tokens"
FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


class TokenDataset:
    """A prepared dataset: its metadata, and its shards as read-only memory maps."""

    def __init__(self, path: Path, meta: dict):
        self.path = path
        self.meta = meta
        self.vocab_size: int = meta["vocab_size"]
        self.eod_id: int = meta["eod_id"]
        self.dtype = np.dtype(meta["dtype"])
        self.n_tokens: dict[str, int] = {s: meta["splits"][s]["n_tokens"] for s in SPLITS}
        self.n_documents: dict[str, int] = {s: meta["splits"][s]["n_documents"] for s in SPLITS}

    def __repr__(self) -> str:
        return (f"TokenDataset({str(self.path)!r}, vocab_size={self.vocab_size}, "
                f"n_tokens={self.n_tokens})")

    @cached_property
    def _maps(self) -> dict[str, list[np.ndarray]]:
        # Memory maps: the OS pages tokens in on demand, so the corpus never sits in RAM.
        out = {}
        for split in SPLITS:
            out[split] = [
                np.memmap(self.path / s["file"], dtype=self.dtype, mode="r", shape=(s["n_tokens"],))
                if s["n_tokens"] else np.zeros(0, self.dtype)
                for s in self.meta["splits"][split]["shards"]
            ]
        return out

    def shards(self, split: str) -> list[np.ndarray]:
        """The split's shards, in order, as read-only memory maps."""
        return self._maps[split]

    def documents(self, split: str) -> np.ndarray:
        """int64 (n_documents, 3): source document index, first token in the split, token count."""
        return np.load(self.path / self.meta["splits"][split]["documents"])

    def tokenizer(self):
        """The tokenizer the data was made with (`encode`, `decode`), e.g. to print samples."""
        from lab.data.tokenizers import load_tokenizer

        return load_tokenizer(self.meta["tokenizer"], self.path)


def open_dataset(path: str) -> TokenDataset:
    """Opens a prepared dataset, checking its metadata and the sizes of its shards."""
    root = Path(path).expanduser()
    meta_path = root / METADATA_FILE
    if not meta_path.is_file():
        raise UserError(
            f"{path} holds no {METADATA_FILE}: not a prepared dataset, or its prep was "
            f"interrupted; run `lab data prep --out {path}`, or point data.path at prepared data"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{meta_path} is not valid JSON ({e}); prepare the data again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{meta_path} does not describe a {FORMAT} dataset; prepare the data again")
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{path} has data format version {meta.get('format_version')}, this lab reads version "
            f"{FORMAT_VERSION}; prepare the data again with `lab data prep`"
        )
    _check_meta(meta, meta_path)
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in SPLITS:
        for shard in meta["splits"][split]["shards"]:
            f = root / shard["file"]
            if not f.is_file() or f.stat().st_size != shard["n_tokens"] * itemsize:
                raise UserError(
                    f"shard {f} is missing or has the wrong size; prepare the data again"
                )
    return TokenDataset(root, meta)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_meta(meta: dict, meta_path: Path) -> None:
    """Every field the reader relies on, with the right type, before any of it is used."""
    def bad(what: str) -> UserError:
        return UserError(f"{meta_path} is damaged: {what}; prepare the data again")

    vocab = meta.get("vocab_size")
    if not _is_count(vocab) or vocab < 1:
        raise bad(f"vocab_size is {shown(vocab)}, not a positive integer")
    eod = meta.get("eod_id")
    if not _is_count(eod) or eod >= vocab:
        raise bad(f"eod_id is {shown(eod)}, not a token id below vocab_size {vocab}")
    if meta.get("dtype") not in ("uint16", "uint32"):
        raise bad(f"dtype is {shown(meta.get('dtype'))}, not uint16 or uint32")
    if np.dtype(meta["dtype"]).itemsize < token_dtype(vocab).itemsize:
        raise bad(f"dtype {meta['dtype']} cannot hold {vocab} token ids")
    tokenizer = meta.get("tokenizer")
    if not isinstance(tokenizer, dict) or "kind" not in tokenizer:
        raise bad("the tokenizer description is missing")
    splits = meta.get("splits")
    for split in SPLITS:
        info = splits.get(split) if isinstance(splits, dict) else None
        if not isinstance(info, dict):
            raise bad(f"splits.{split} is missing")
        for key in ("n_tokens", "n_documents"):
            if not _is_count(info.get(key)):
                raise bad(f"splits.{split}.{key} is {shown(info.get(key))}, not a count")
        if not isinstance(info.get("documents"), str):
            raise bad(f"splits.{split}.documents is not a file name")
        shards = info.get("shards")
        if not isinstance(shards, list) or not all(
                isinstance(sh, dict) and isinstance(sh.get("file"), str)
                and _is_count(sh.get("n_tokens")) for sh in shards):
            raise bad(f"splits.{split}.shards is not a list of {{file, n_tokens}}")
        if sum(sh["n_tokens"] for sh in shards) != info["n_tokens"]:
            raise bad(f"the shards of {split} do not add up to its n_tokens")


def check_vocab(dataset: TokenDataset, model_vocab_size: int) -> None:
    """Raises UserError if the data has token ids the model's embedding cannot hold."""
    if dataset.vocab_size > model_vocab_size:
        raise UserError(
            f"the data at {dataset.path} uses a vocabulary of {dataset.vocab_size} tokens but the "
            f"model's vocab_size is {model_vocab_size}; set model.vocab_size to at least "
            f"{dataset.vocab_size} or prepare the data with a smaller tokenizer"
        )
