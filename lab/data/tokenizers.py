"""Tokenizers for prep: bytes (the default), a Hugging Face tokenizer.json, or one trained here.

Every tokenizer has an end-of-document token (`eod_id`) that prep places after each document.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from lab.errors import UserError, shown

EOD_TOKEN = "<|endoftext|>"
# Names other tokenizers give their end-of-document token; the first one found is used.
_EOD_CANDIDATES = (EOD_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]")
TOKENIZER_FILE = "tokenizer.json"


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus the end-of-document token 256."""

    vocab_size = 257
    eod_id = 256

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids) -> str:
        ids = np.asarray(ids)
        return bytes(ids[ids < 256].astype(np.uint8)).decode("utf-8", errors="replace")

    def describe(self) -> dict:
        return {"kind": "byte", "spec": "byte", "eod_token": "<eod>"}

    def save(self, out_dir: Path) -> None:
        pass  # nothing to save: the byte tokenizer is defined by its name


class HFTokenizer:
    """A Hugging Face `tokenizers.Tokenizer`, saved beside the shards (self-contained data)."""

    def __init__(self, tok, spec: str, origin: dict):
        from tokenizers import AddedToken

        self._tok = tok
        self._spec = spec
        self._origin = origin
        eod = next((c for c in _EOD_CANDIDATES if tok.token_to_id(c) is not None), None)
        if eod is None:  # give it one, saved with the copy; the original file is not touched
            tok.add_special_tokens([AddedToken(EOD_TOKEN, special=True)])
            eod = EOD_TOKEN
        self.eod_token = eod
        self.eod_id = int(tok.token_to_id(eod))
        self.vocab_size = int(max(tok.get_vocab(with_added_tokens=True).values())) + 1

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        # No post-processor specials (BOS/CLS): documents are delimited by eod_id alone.
        try:
            encs = self._tok.encode_batch(texts, add_special_tokens=False)
        except Exception as e:  # the Rust side raises a generic Exception, e.g. no [UNK] token
            raise UserError(f"tokenizer {shown(self._spec)} cannot encode this corpus ({e}); "
                            "give a "
                            "tokenizer that encodes any text (byte-level BPE, or one with an "
                            "unknown token)") from None
        return [np.asarray(e.ids, dtype=np.int64) for e in encs]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def describe(self) -> dict:
        return {"kind": "huggingface", "spec": self._spec, "file": TOKENIZER_FILE,
                "eod_token": self.eod_token, **self._origin}

    def save(self, out_dir: Path) -> None:
        self._tok.save(str(out_dir / TOKENIZER_FILE))


Tokenizer = ByteTokenizer | HFTokenizer


def make_tokenizer(spec: str, train_texts: Callable[[], Iterator[str]]) -> Tokenizer:
    """Builds the tokenizer named by `spec`: "byte", "train:BPE:SIZE", or a tokenizer.json path.

    `train_texts` is called only for "train:..." and yields the texts to train on.
    """
    if spec == "byte":
        return ByteTokenizer()
    if spec.startswith("train:"):
        return _train(spec, train_texts)
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise UserError(
            f"tokenizer {shown(spec)} is neither 'byte', 'train:BPE:SIZE' nor an existing "
            "tokenizer.json file; fix --tokenizer"
        )
    from tokenizers import Tokenizer as HFTok

    try:
        tok = HFTok.from_file(str(path))
    except Exception as e:  # the Rust side raises a generic Exception for a bad file
        raise UserError(f"cannot load tokenizer {path}: {e}") from None
    origin = {"source_file": str(path.resolve()), "source_sha256": _sha256(path)}
    return HFTokenizer(tok, spec, origin)


def spec_key(spec: str) -> dict:
    """What identifies a tokenizer request, for deciding whether an existing output matches."""
    if spec == "byte" or spec.startswith("train:"):
        return {"spec": spec}
    path = Path(spec).expanduser()
    path = path / TOKENIZER_FILE if path.is_dir() else path
    # A file is known by its content, so the same file under another path is the same request.
    return {"file_sha256": _sha256(path) if path.is_file() else None}


def load_tokenizer(meta: dict, dataset_dir: Path) -> Tokenizer:
    """The tokenizer a prepared dataset was made with (for decoding samples)."""
    if meta["kind"] == "byte":
        return ByteTokenizer()
    from tokenizers import Tokenizer as HFTok

    path = dataset_dir / str(meta.get("file", TOKENIZER_FILE))
    try:
        tok = HFTok.from_file(str(path))
    except Exception as e:  # missing or unreadable: the Rust side raises a generic Exception
        raise UserError(f"cannot load the dataset's tokenizer {path}: {e}; prepare the data "
                        "again") from None
    return HFTokenizer(tok, str(meta.get("spec", path)), {})


def _train(spec: str, train_texts: Callable[[], Iterator[str]]) -> HFTokenizer:
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    parts = spec.split(":")
    if len(parts) != 3 or parts[1].upper() != "BPE" or not parts[2].isdigit():
        raise UserError(f"cannot parse tokenizer {shown(spec)}; write train:BPE:SIZE, e.g. "
                        "train:BPE:4096")
    size = int(parts[2])
    n_base = len(pre_tokenizers.ByteLevel.alphabet()) + 1  # every byte, plus the EOD token
    if not n_base < size <= 2**32:
        raise UserError(f"tokenizer {shown(spec)}: SIZE must be above {n_base}; "
                        "e.g. train:BPE:4096")
    # Byte-level BPE, as GPT-2: any text encodes, and decoding gives the text back.
    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=size,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(train_texts(), trainer=trainer)
    return HFTokenizer(tok, spec, {"trained": {"model": "BPE", "vocab_size": size,
                                               "on": "the training split"}})


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
