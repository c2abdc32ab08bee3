"""Reading run directories wherever they live: local paths, or `gs://` URLs.

The analysis package reads through these few functions, which are `lab.paths` (the module the
training run writes through) with missing files turned into the user's errors. Remote paths
need gcsfs (`pip install -e '.[gcs]'`).
"""

from __future__ import annotations

from lab import paths as _paths
from lab.errors import UserError
from lab.paths import exists, find, is_dir, is_remote, join, parent

__all__ = ["exists", "find", "is_dir", "is_remote", "join", "parent", "read_text"]


def read_text(path: str) -> str:
    """The text of one file; a missing or unreadable file is the user's to fix."""
    try:
        return _paths.read_text(path)
    except FileNotFoundError:
        raise UserError(f"file not found: {path}; check the path") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read {path}: {err}") from None
