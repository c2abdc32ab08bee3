"""`prepare`: the tokens written equal the text tokenized another way; splits, atomicity, errors."""

import hashlib
import json
import os
import sysconfig
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lab.data import check_vocab, open_dataset, prepare
from lab.data import prep as prep_module
from lab.errors import UserError

WORDS = "alpha beta gamma delta épsilon ζήτα 東京 def class return import lambda".split()


def _texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(20, 200)))) + "\n" for _ in range(n)]


def _write_dir(root: Path, texts: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, t in enumerate(texts):
        (root / f"doc_{i:03d}.txt").write_text(t, encoding="utf-8")
    return root


def _split_tokens(ds, split: str) -> np.ndarray:
    shards = ds.shards(split)
    return np.concatenate(shards) if shards else np.zeros(0, ds.dtype)


def _unit(i: int) -> float:  # the documented split rule, written out again
    return int(hashlib.sha256(str(i).encode()).hexdigest()[:16], 16) / 2**64


def test_dir_prep_tokens_are_utf8_bytes_plus_eod_and_splits_are_disjoint(tmp_path):
    texts = _texts(40)
    texts[7] = ""  # an empty document is skipped, not given a lone EOD
    root = _write_dir(tmp_path / "corpus", texts)
    (root / "sub").mkdir()
    (root / "sub" / "nested.txt").write_text("nested text\n")
    (root / "notes.md").write_text("left out by --include\n")
    meta = prepare(str(root), str(tmp_path / "out"), include=["*.txt"], val_fraction=0.2)

    ds = open_dataset(str(tmp_path / "out"))
    assert (ds.vocab_size, ds.eod_id, ds.dtype) == (257, 256, np.uint16)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.txt"))
    all_texts = [(root / f).read_text(encoding="utf-8") for f in files]
    nonempty = [i for i, t in enumerate(all_texts) if t]
    want_val = {i for i in nonempty if _unit(i) < 0.2}
    assert 0 < len(want_val) < len(nonempty)

    docs = {s: ds.documents(s) for s in ("train", "val")}
    assert set(docs["val"][:, 0]) == want_val
    assert set(docs["train"][:, 0]).isdisjoint(docs["val"][:, 0])
    assert sorted([*docs["train"][:, 0], *docs["val"][:, 0]]) == nonempty
    for split in ("train", "val"):
        expect = [np.frombuffer(all_texts[i].encode(), np.uint8).tolist() + [256]
                  for i in docs[split][:, 0]]
        flat = np.array([t for doc in expect for t in doc])
        np.testing.assert_array_equal(_split_tokens(ds, split), flat)
        assert ds.n_tokens[split] == meta["splits"][split]["n_tokens"] == len(flat)
        # documents.npy locates every document in the split's token stream
        for index, start, n in docs[split]:
            assert ds.tokenizer().decode(flat[start : start + n]) == all_texts[index]
    # No validation document's text occurs in the training tokens.
    train_bytes = bytes(_split_tokens(ds, "train").astype(np.uint8))
    for i in want_val:
        assert all_texts[i].encode() not in train_bytes
    src = meta["source"]
    assert src["n_documents"] == len(files) and src["n_empty_documents"] == 1
    assert src["n_bytes"] == sum(len(t.encode()) for t in all_texts)
    assert meta["format_version"] == 1 and (tmp_path / "out" / "metadata.json").is_file()


def test_jsonl_and_parquet_give_the_same_tokens_as_files(tmp_path):
    texts = _texts(25, seed=1)
    texts[3] = ""
    _write_dir(tmp_path / "files", texts)
    with open(tmp_path / "c.jsonl", "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"id": 1, "body": t}) + "\n")
    pq.write_table(pa.table({"body": texts, "n": list(range(len(texts)))}), tmp_path / "c.parquet")

    prepare(str(tmp_path / "files"), str(tmp_path / "a"), val_fraction=0.2)
    prepare(str(tmp_path / "c.jsonl"), str(tmp_path / "b"), text_field="body", val_fraction=0.2)
    prepare(str(tmp_path / "c.parquet"), str(tmp_path / "c"), text_field="body", val_fraction=0.2)
    a, b, c = (open_dataset(str(tmp_path / x)) for x in "abc")
    for split in ("train", "val"):
        assert a.n_tokens[split] > 0
        np.testing.assert_array_equal(_split_tokens(a, split), _split_tokens(b, split))
        np.testing.assert_array_equal(_split_tokens(a, split), _split_tokens(c, split))


def test_stdlib_prep_counts_every_byte_and_takes_seconds(tmp_path):
    root = Path(sysconfig.get_paths()["stdlib"])
    n_bytes, n_docs = 0, 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages")
                       and not d.startswith(".") and d != "__pycache__"]
        for name in filenames:
            if name.endswith(".py") and not name.startswith("."):
                data = Path(dirpath, name).read_bytes().decode("utf-8", "replace").encode()
                n_bytes += len(data)
                n_docs += bool(data)
    started = time.perf_counter()
    meta = prepare("stdlib", str(tmp_path / "std"))
    seconds = time.perf_counter() - started
    total = meta["splits"]["train"]["n_tokens"] + meta["splits"]["val"]["n_tokens"]
    print(f"stdlib prep: {total:,} tokens in {seconds:.2f} s")
    assert meta["source"]["n_bytes"] == n_bytes > 20e6
    assert total == n_bytes + n_docs  # one byte token per byte, one EOD per document
    assert 0.002 < meta["splits"]["val"]["n_tokens"] / total < 0.05
    assert seconds < 60


def _bpe_file(path: Path, texts: list[str], eod: bool) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                  special_tokens=["</s>"] if eod else [],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(str(path))
    return path


@pytest.mark.parametrize("has_eod", [True, False])
def test_huggingface_tokenizer_file_matches_its_own_encode(tmp_path, has_eod):
    from tokenizers import Tokenizer

    texts = _texts(12, seed=2)
    root = _write_dir(tmp_path / "corpus", texts)
    tok_path = _bpe_file(tmp_path / "tokenizer.json", texts, eod=has_eod)
    before = tok_path.read_bytes()
    meta = prepare(str(root), str(tmp_path / "out"), tokenizer=str(tok_path), val_fraction=0)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "tokenizer.json").write_bytes(before)  # same file, another path
    assert prepare(str(root), str(tmp_path / "out"), tokenizer=str(tmp_path / "elsewhere"),
                   val_fraction=0) == meta
    ds = open_dataset(str(tmp_path / "out"))
    ref = Tokenizer.from_file(str(tok_path))
    n_ref = ref.get_vocab_size(with_added_tokens=True)
    if has_eod:
        assert (ds.eod_id, ds.vocab_size) == (ref.token_to_id("</s>"), n_ref)
    else:  # an end-of-document token is added to the saved copy, not to the user's file
        assert (ds.eod_id, ds.vocab_size) == (n_ref, n_ref + 1)
        assert tok_path.read_bytes() == before
    expect = [t for text in texts for t in [*ref.encode(text, add_special_tokens=False).ids,
                                           ds.eod_id]]
    np.testing.assert_array_equal(_split_tokens(ds, "train"), expect)
    assert ds.tokenizer().decode(ds.shards("train")[0][: ds.documents("train")[0, 2] - 1]) \
        == texts[0]


def test_trained_bpe_round_trips_the_text(tmp_path):
    texts = _texts(30, seed=3)
    root = _write_dir(tmp_path / "corpus", texts)
    meta = prepare(str(root), str(tmp_path / "out"), tokenizer="train:BPE:300", val_fraction=0.1)
    ds = open_dataset(str(tmp_path / "out"))
    assert ds.vocab_size == 300 and meta["dtype"] == "uint16"
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    tokens = _split_tokens(ds, "train")
    assert tokens.max() < 300 and len(tokens) < 0.6 * sum(len(t.encode()) for t in texts)
    tok = ds.tokenizer()
    for index, start, n in ds.documents("train"):
        assert tokens[start + n - 1] == ds.eod_id
        assert tok.decode(tokens[start : start + n - 1]) == texts[index]


def test_large_vocabulary_is_stored_as_uint32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(70_000)}
    vocab["[UNK]"] = 70_000
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("w1 w69999 w65536 nope")
    prepare(str(tmp_path / "corpus"), str(tmp_path / "out"),
            tokenizer=str(tmp_path / "tokenizer.json"), val_fraction=0)
    ds = open_dataset(str(tmp_path / "out"))
    assert ds.dtype == np.uint32 and ds.vocab_size == 70_002
    np.testing.assert_array_equal(_split_tokens(ds, "train"), [1, 69999, 65536, 70000, 70001])
    check_vocab(ds, 70_002)
    with pytest.raises(UserError, match="vocab_size"):
        check_vocab(ds, 65_536)


def _snapshot(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_rerun_never_damages_a_finished_output(tmp_path):
    root = _write_dir(tmp_path / "corpus", _texts(10))
    out = tmp_path / "out"
    meta = prepare(str(root), str(out))
    before = _snapshot(out)
    assert prepare(str(root), str(out)) == meta  # same request: reused as it is
    with pytest.raises(UserError, match="different prepared data"):
        prepare(str(root), str(out), tokenizer="train:BPE:300")
    (root / "doc_000.txt").write_text("changed")
    with pytest.raises(UserError, match="different prepared data"):
        prepare(str(root), str(out))
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "out"]  # no leftovers


def test_an_interrupted_prep_leaves_nothing_that_looks_finished(tmp_path, monkeypatch):
    root = _write_dir(tmp_path / "corpus", _texts(10))
    calls = []

    def fail_midway(self, *args):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return original(self, *args)

    original = prep_module._SplitWriter.add_document
    monkeypatch.setattr(prep_module._SplitWriter, "add_document", fail_midway)
    with pytest.raises(KeyboardInterrupt):
        prepare(str(root), str(tmp_path / "out"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]

    # A directory with shards but no metadata (e.g. copied half-way) is refused, and kept.
    half = tmp_path / "half"
    (half / "train").mkdir(parents=True)
    (half / "train" / "00000.bin").write_bytes(b"\0" * 10)
    with pytest.raises(UserError, match="no metadata.json"):
        open_dataset(str(half))
    with pytest.raises(UserError, match="not a prepared dataset"):
        prepare(str(root), str(half))
    assert (half / "train" / "00000.bin").read_bytes() == b"\0" * 10


def test_small_shards_split_documents_across_files(tmp_path):
    texts = _texts(10, seed=4)
    root = _write_dir(tmp_path / "corpus", texts)
    prepare(str(root), str(tmp_path / "big"), val_fraction=0)
    meta = prepare(str(root), str(tmp_path / "small"), val_fraction=0, shard_tokens=1000)
    big, small = open_dataset(str(tmp_path / "big")), open_dataset(str(tmp_path / "small"))
    n = big.n_tokens["train"]
    assert [s["n_tokens"] for s in meta["splits"]["train"]["shards"]] == \
        [1000] * (n // 1000) + ([n % 1000] if n % 1000 else [])
    np.testing.assert_array_equal(_split_tokens(big, "train"), _split_tokens(small, "train"))


def _file(d: Path, name: str, text: str) -> str:
    (d / name).write_text(text)
    return str(d / name)


def _empty_dir(d: Path) -> str:
    (d / "empty").mkdir()
    return str(d / "empty")


def _parquet(d: Path) -> str:
    pq.write_table(pa.table({"body": ["a"]}), d / "x.parquet")
    return str(d / "x.parquet")


def _one_doc(d: Path) -> str:
    return str(_write_dir(d / "c", ["hi"]))


@pytest.mark.parametrize(
    "make, kwargs, match",
    [
        (lambda d: str(d / "missing"), {}, "does not exist"),
        (_empty_dir, {}, "no files matching"),
        (lambda d: str(_write_dir(d / "e", ["", ""])), {}, "contains no text"),
        (lambda d: _file(d, "x.jsonl", '{"text": "ok"}\n{"txt": "no"}\n'), {},
         r"x.jsonl:2: no field 'text'"),
        (lambda d: _file(d, "x.jsonl", '{"text": "ok"}\n{oops\n'), {}, "x.jsonl:2: not valid JSON"),
        (lambda d: _file(d, "x.jsonl", '{"text": 3}\n'), {}, "not a string"),
        (_parquet, {}, "no column 'text'"),
        (lambda d: _file(d, "x.csv", "a,b\n"), {}, "cannot read"),
        (_one_doc, {"tokenizer": "nope.json"}, "fix --tokenizer"),
        (_one_doc, {"tokenizer": "train:WordPiece:9"}, "train:BPE:SIZE"),
        (_one_doc, {"tokenizer": "train:BPE:100"}, "SIZE must be above"),
        (_one_doc, {"val_fraction": 1.0}, "val fraction"),
        (_one_doc, {"val_fraction": 0.99}, "left for training"),
    ],
)
def test_bad_input_raises_one_line_user_error(tmp_path, make, kwargs, match):
    with pytest.raises(UserError, match=match) as e:
        prepare(make(tmp_path), str(tmp_path / "out"), **kwargs)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_open_dataset_refuses_other_versions_and_damaged_shards(tmp_path):
    root = _write_dir(tmp_path / "corpus", _texts(5))
    prepare(str(root), str(tmp_path / "out"), val_fraction=0)
    meta_path = tmp_path / "out" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(UserError, match="format version 99"):
        open_dataset(str(tmp_path / "out"))
    meta_path.write_text(json.dumps(meta))
    shard = tmp_path / "out" / "train" / "00000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(UserError, match="wrong size"):
        open_dataset(str(tmp_path / "out"))
