"""Corpus sources: each yields its documents, in a fixed order, as (name, text) pairs.

A source is re-iterable (prep reads it once to hash it and train a tokenizer, once to tokenize),
and its order is part of its identity: the validation split is chosen by document index.
"""

from __future__ import annotations

import fnmatch
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lab.errors import UserError, shown

STDLIB = "stdlib"
# Third-party code and bytecode caches vary between machines; the stdlib corpus leaves them out.
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


@dataclass(frozen=True)
class Source:
    """Where the documents come from, and how to read them."""

    kind: str  # "stdlib" | "dir" | "jsonl" | "parquet"
    path: str
    include: tuple[str, ...] = ()
    text_field: str | None = None
    files: tuple[str, ...] = field(default=(), repr=False)  # relative paths, for stdlib and dir

    def describe(self) -> dict:
        """The source as recorded in the metadata (no document contents)."""
        out = {"kind": self.kind, "path": self.path}
        if self.kind == STDLIB:
            out["python"] = sys.version.split()[0]
        if self.include:
            out["include"] = list(self.include)
        if self.text_field is not None:
            out["text_field"] = self.text_field
        return out

    def documents(self) -> Iterator[tuple[str, str]]:
        """Yields (name, text) for every document, in the source's fixed order."""
        if self.kind in (STDLIB, "dir"):
            yield from _read_files(Path(self.path), self.files)
        elif self.kind == "jsonl":
            yield from _read_jsonl(Path(self.path), self.text_field or "text")
        else:
            yield from _read_parquet(Path(self.path), self.text_field or "text")


def open_source(source: str, include: list[str] | None = None, text_field: str = "text") -> Source:
    """Resolves `source` ("stdlib", a directory, a .jsonl or a .parquet file) into a Source."""
    if source == STDLIB:
        root = Path(sysconfig.get_paths()["stdlib"])
        patterns = tuple(include or ["*.py"])
        return Source(STDLIB, str(root), patterns, None, _list_files(root, patterns, source))
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(
            f"data source {shown(source)} does not exist; give 'stdlib', a directory of text "
            "files, "
            "a .jsonl or a .parquet file"
        )
    if path.is_dir():
        patterns = tuple(include or ["*"])
        files = _list_files(path, patterns, source)
        return Source("dir", str(path.resolve()), patterns, None, files)
    if include:
        raise UserError(f"--include applies to a directory source, not to the file {shown(source)}")
    suffixes = path.suffixes
    if suffixes[-1:] == [".jsonl"] or suffixes[-1:] == [".ndjson"]:
        return Source("jsonl", str(path.resolve()), (), text_field)
    if suffixes[-1:] == [".parquet"]:
        return Source("parquet", str(path.resolve()), (), text_field)
    raise UserError(
        f"cannot read data source {shown(source)}: expected a directory, a .jsonl or a "
        ".parquet file"
    )


def _list_files(root: Path, patterns: tuple[str, ...], source: str) -> tuple[str, ...]:
    """Relative posix paths under `root` matching any pattern, sorted; hidden entries skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in _STDLIB_SKIP_DIRS]
        for name in filenames:
            if name.startswith("."):
                continue
            rel = Path(dirpath, name).relative_to(root).as_posix()
            # fnmatch's "*" also matches "/", so "*.py" selects .py files at any depth.
            if any(fnmatch.fnmatch(rel, p) for p in patterns):
                found.append(rel)
    if not found:
        raise UserError(
            f"data source {shown(source)} has no files matching {list(patterns)}; "
            "check the path or pass --include with a matching pattern"
        )
    return tuple(sorted(found))


def _read_files(root: Path, files: tuple[str, ...]) -> Iterator[tuple[str, str]]:
    for rel in files:
        # A few stdlib test files are deliberately not UTF-8; replace their odd bytes.
        yield rel, (root / rel).read_bytes().decode("utf-8", errors="replace")


def _read_jsonl(path: Path, text_field: str) -> Iterator[tuple[str, str]]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg}); fix it") from None
            if not isinstance(record, dict) or text_field not in record:
                raise UserError(
                    f"{path}:{lineno}: no field {shown(text_field)}; pass --field with the name of "
                    "the text field"
                )
            yield f"line {lineno}", _as_text(record[text_field], f"{path}:{lineno}", text_field)


def _read_parquet(path: Path, text_field: str) -> Iterator[tuple[str, str]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise UserError(f"cannot read Parquet file {path}: {e}") from None
    columns = pf.schema_arrow.names
    if text_field not in columns:
        raise UserError(
            f"{path} has no column {shown(text_field)} (columns: {columns}); pass --field with the "
            "name of the text column"
        )
    row = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            yield f"row {row}", _as_text(value, f"{path}: row {row}", text_field)
            row += 1


def _as_text(value: object, where: str, text_field: str) -> str:
    if not isinstance(value, str):
        raise UserError(
            f"{where}: field {shown(text_field)} is {type(value).__name__}, not a string; "
            "fix the record or choose another --field"
        )
    return value
