"""Files of a run directory wherever it lives: a local path, or an fsspec URL (`gs://...`;
`memory://...` in tests).

A Cloud TPU pod's hosts share no disk, so run directories live on Cloud Storage there. Local
paths keep the plain pathlib code path (atomic writes by a temporary file and a rename);
a URL goes through `fsspec.core.url_to_fs`, where one put of a whole object is already atomic.
Object stores cannot append, and have no directories: `makedirs` is a no-op there.
`gs://` needs gcsfs (`pip install -e '.[gcs]'`); without it every helper raises a one-line
UserError.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
from pathlib import Path
from typing import Any

from lab.errors import UserError, file_system_error

PathLike = str | os.PathLike


def cache_dir() -> Path:
    """The lab's cache on this machine (prepared default corpus, compiled programs):
    $LAB_CACHE_DIR, or ~/.cache/scaling-lab."""
    return Path(os.environ.get("LAB_CACHE_DIR") or "~/.cache/scaling-lab").expanduser()


def shown_path(path: PathLike) -> str:
    """A path as the user would type it: relative to the working directory when inside it
    (a URL as it is)."""
    if is_remote(path):
        return str(path)
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def safe_name(text: str, extra: str = "", limit: int | None = None) -> str:
    """`text` as a file name: itself if it is plain (letters, digits, `._-` and the characters
    of `extra`), else every other run of characters made `_`, cut to `limit` characters, plus a
    hash of `text` so that two texts cleaned alike still differ."""
    clean = re.sub(rf"[^A-Za-z0-9._{re.escape(extra)}-]+", "_", text).strip("._")[:limit]
    clean = clean or "run"
    return clean if clean == text else f"{clean}-{hashlib.sha1(text.encode()).hexdigest()[:6]}"


def is_remote(path: PathLike) -> bool:
    """True for URLs such as gs://bucket/dir."""
    return "://" in str(path)


def _fs(url: str) -> tuple[Any, str]:
    """The fsspec filesystem of a URL and the path inside it; a missing backend is the
    user's to install."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as err:
        if url.startswith(("gs://", "gcs://")):
            raise UserError(f"{url} is on Cloud Storage but gcsfs is missing; install gcsfs: "
                            "pip install -e '.[gcs]'") from None
        raise UserError(f"cannot use {url}: {err}") from None
    except ValueError as err:  # an unknown protocol
        raise UserError(f"cannot use {url}: {err}; use a local path or gs://") from None


def join(path: PathLike, *names: str) -> str:
    """Path joining that keeps a URL's scheme (pathlib would turn gs:// into gs:/)."""
    if is_remote(path):
        return "/".join([str(path).rstrip("/"), *names])
    return str(Path(path, *names))


def parent(path: PathLike) -> str:
    """The directory holding `path`."""
    if is_remote(path):
        return str(path).rstrip("/").rsplit("/", 1)[0]
    return str(Path(path).parent)


def name(path: PathLike) -> str:
    """The last component of `path`."""
    return str(path).rstrip("/").rsplit("/", 1)[-1] if is_remote(path) else Path(path).name


def absolute(path: PathLike) -> str:
    """An absolute local path, or the URL unchanged."""
    return str(path) if is_remote(path) else str(Path(path).absolute())


def _test(path: PathLike, fs_method: str, local: Any) -> bool:
    """A yes/no question about a path: the filesystem's `fs_method` for a URL, else `local`."""
    if is_remote(path):
        fs, p = _fs(str(path))
        return getattr(fs, fs_method)(p)
    return local(path)


def exists(path: PathLike) -> bool:
    """Whether a file or directory exists."""
    return _test(path, "exists", os.path.exists)


def is_file(path: PathLike) -> bool:
    return _test(path, "isfile", os.path.isfile)


def is_dir(path: PathLike) -> bool:
    return _test(path, "isdir", os.path.isdir)


def read_text(path: PathLike) -> str:
    """The text of one file (FileNotFoundError if there is none)."""
    if is_remote(path):
        fs, p = _fs(str(path))
        return fs.cat_file(p).decode()
    return Path(path).read_text()


def read_input(path: PathLike) -> str:
    """The text of a file the user named (a fit JSON, a CSV, a run's files); a missing or
    unreadable one is the user's to fix."""
    try:
        return read_text(path)
    except FileNotFoundError:
        raise UserError(f"file not found: {path}; check the path") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read {path}: {err}") from None


def write_bytes(path: PathLike, data: bytes) -> None:
    """Replace a file's contents atomically: readers see the old contents or the new, never
    half."""
    if is_remote(path):
        fs, p = _fs(str(path))
        fs.pipe_file(p, data)  # one put of a whole object
        return
    path = Path(path)
    # A temporary name per process, so concurrent writers never share one.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_text(path: PathLike, text: str) -> None:
    """Replace a file's text atomically (UTF-8)."""
    write_bytes(path, text.encode())


def put(local: PathLike, path: PathLike) -> None:
    """Copy a local file to `path` (local or remote), replacing it."""
    write_bytes(path, Path(local).read_bytes())


def makedirs(path: PathLike, fix: str = "") -> None:
    """Create a directory and its parents; object stores have no directories to create. Where
    the file system refuses (a name too long, a read-only disk, a file in the way), a UserError
    says so (with `fix`, if given), and no parent made on the way is left behind."""
    if is_remote(path):
        return
    made: list[Path] = []
    try:
        missing, folder = [], Path(path)
        while not folder.is_dir():
            if folder.exists():
                raise NotADirectoryError(errno.ENOTDIR, "it is a file", str(folder))
            missing.append(folder)
            folder = folder.parent
        for folder in reversed(missing):
            folder.mkdir(exist_ok=True)  # another process may make it meanwhile; a file may not
            made.append(folder)
    except OSError as err:
        _undo(made)
        raise file_system_error(err, "create the directory", fix) from None


def _undo(made: list[Path]) -> None:
    for folder in reversed(made):
        with contextlib.suppress(OSError):
            folder.rmdir()


def remove(path: PathLike) -> None:
    """Delete a file if it exists."""
    if is_remote(path):
        fs, p = _fs(str(path))
        if fs.exists(p):
            fs.rm_file(p)
        return
    Path(path).unlink(missing_ok=True)


def find(root: PathLike, filename: str) -> list[str]:
    """Every file called `filename` under `root` (recursively, `root` included), sorted."""
    if is_remote(root):
        fs, p = _fs(str(root))
        base, url = p.rstrip("/"), str(root).rstrip("/")
        # fsspec lists bare paths (bucket/dir/file): spell them as the URL given
        return sorted(url + f[len(base):] for f in fs.find(p)
                      if f.startswith(base) and f.rsplit("/", 1)[-1] == filename)
    return sorted(str(f) for f in Path(root).rglob(filename) if f.is_file())

