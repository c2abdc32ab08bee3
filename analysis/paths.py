"""Reading run directories wherever they live: local paths, or `gs://` through etils.epath.

All file access of the analysis package goes through these few functions, so adding another
store means changing only this module. Remote paths need gcsfs (`pip install gcsfs`).
"""

from __future__ import annotations

import os
from pathlib import Path

from lab.errors import UserError


def is_remote(path: str) -> bool:
    """True for URLs such as gs://bucket/dir."""
    return "://" in str(path)


def _remote(path: str):
    try:
        from etils import epath

        p = epath.Path(path)
        p.exists()  # fails here, not later, when no backend for the scheme is installed
        return p
    except ImportError as err:
        raise UserError(
            f"cannot read {path}: {err}; install it (pip install gcsfs) or copy the runs locally"
        ) from None


def exists(path: str) -> bool:
    """Whether a file or directory exists."""
    return _remote(path).exists() if is_remote(path) else os.path.exists(path)


def is_dir(path: str) -> bool:
    """Whether `path` is a directory."""
    return _remote(path).is_dir() if is_remote(path) else os.path.isdir(path)


def join(path: str, *names: str) -> str:
    """Path joining that keeps a URL's scheme."""
    return "/".join([str(path).rstrip("/"), *names]) if is_remote(path) else str(Path(path, *names))


def parent(path: str) -> str:
    """The directory holding `path`."""
    return str(path).rstrip("/").rsplit("/", 1)[0] if is_remote(path) else str(Path(path).parent)


def find(root: str, name: str) -> list[str]:
    """Every file called `name` under `root` (recursively), sorted."""
    if is_remote(root):
        return sorted(str(p) for p in _remote(root).rglob(name))
    return sorted(str(p) for p in Path(root).rglob(name) if p.is_file())


def read_text(path: str) -> str:
    """The text of one file; a missing or unreadable file is the user's to fix."""
    try:
        if is_remote(path):
            return _remote(path).read_text()
        return Path(path).read_text()
    except FileNotFoundError:
        raise UserError(f"file not found: {path}; check the path") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read {path}: {err}") from None
